//! Whole-system load harness behind `gantry bench`: drives a running server over its public
//! protocol, keeps a ledger of what every request and job did, and reports throughput, latency
//! percentiles, duplicates, lost work and the server's memory, judged against pass criteria.
//!
//! - [`jobs`]: `gantry bench jobs <scenario>`, for any server speaking Reseolio's gRPC contract.
//! - [`fleet`]: `gantry bench fleet`, a rollout to simulated devices beside a baseline client.
//! - [`observer`]: `gantry bench observer`, PostgreSQL writers against `gantry observer run`
//!   listeners delivering webhooks to a receiver on loopback.
//! - [`search`]: `gantry bench search index|query`, `_bulk` loading beside raw tantivy and a
//!   query mix by type, against `gantry search serve` or any Elasticsearch-compatible server.
//! - [`process`]: servers the harness starts itself (kill, restart) and process memory.
//! - [`proxy`]: a TCP proxy that adds latency.
//! - [`stats`]: percentiles and formatting.
//!
//! It does not micro-benchmark functions (that is `cargo bench` with criterion) and never runs
//! in the test suite's timing assertions: it reports, the pass criteria judge.
//!
//! ```no_run
//! use clap::Parser as _;
//!
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     bench: gantry_bench::jobs::JobsBench,
//! }
//!
//! # async fn example() -> anyhow::Result<()> {
//! let cli = Cli::parse_from(["bench", "throughput", "--target", "127.0.0.1:50051", "--jobs", "1000"]);
//! let exit_code = gantry_bench::jobs::run(cli.bench).await?;
//! # let _ = exit_code;
//! # Ok(())
//! # }
//! ```

pub mod fleet;
pub mod jobs;
pub mod observer;
pub mod process;
pub mod proxy;
pub mod search;
pub mod stats;
