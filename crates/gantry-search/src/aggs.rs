//! Aggregations (`aggs`): not built yet. A request with `aggs` gets a clear 400.

use serde_json::Value;
use tantivy::Searcher;
use tantivy::query::Query;

use crate::error::EsError;
use crate::mapping::Mapping;
use crate::shard::Fields;

/// One shard's partial aggregation result.
#[derive(Debug)]
pub struct Partial;

/// Runs `aggs` over one shard.
pub fn collect(
    _searcher: &Searcher,
    _query: &dyn Query,
    _aggs: &Value,
    _mapping: &Mapping,
    _fields: Fields,
) -> Result<Partial, EsError> {
    Err(EsError::illegal_argument(
        "aggregations are not supported yet",
    ))
}

/// Merges shard partials into the ES `aggregations` object.
pub fn finish(_aggs: &Value, _parts: Vec<Partial>) -> Result<Value, EsError> {
    Err(EsError::illegal_argument(
        "aggregations are not supported yet",
    ))
}
