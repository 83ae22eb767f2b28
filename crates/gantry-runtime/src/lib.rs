//! The runtime every Gantry system shares.
//!
//! One module per concern:
//! - [`config`]: the TOML config file, `GANTRY_<SECTION>_<KEY>` overrides, validation into checked types.
//! - [`telemetry`]: the `tracing` subscriber and the Prometheus registry with process metrics.
//! - [`admin`]: the admin HTTP server with `/health`, `/ready` and `/metrics`.
//! - [`shutdown`]: signal handling and the ordered drain of running components.
//! - [`retry`]: backoff policies (fixed, linear, exponential) with caps and jitter.
//! - [`circuit_breaker`]: per-key circuit breakers.
//! - [`cron`]: cron expressions in IANA time zones (next tick, latest tick).
//!
//! It owns no system's logic: jobs, search, observer and fleet live in their own crates and use
//! these building blocks.

pub mod admin;
pub mod circuit_breaker;
pub mod config;
pub mod cron;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
