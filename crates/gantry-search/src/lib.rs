//! Gantry search: a single-node Elasticsearch-compatible engine on tantivy.
//!
//! Owns mappings, the query DSL, shards (a tantivy index plus its translog), the index registry on
//! disk and the ES REST API. It does not own process wiring (the `gantry` binary does that) nor any
//! cluster concern yet (placement, replication).

pub mod aggs;
pub mod api;
pub mod date;
pub mod error;
pub mod highlight;
pub mod mapping;
pub mod metrics;
pub mod node;
pub mod query;
pub mod search;
pub mod shard;
pub mod translog;
