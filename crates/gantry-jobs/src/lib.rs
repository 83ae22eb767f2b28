//! Durable job execution: enqueue a call, workers run it to completion across crashes.
//!
//! - [`model`]: jobs, options, statuses (the domain; wire types convert at the boundary).
//! - [`machine`]: every status change as a pure function — the semantics live here.
//! - [`schedule`]: cron schedules as pure functions: ticks in IANA zones, the misfire policy.
//! - [`store`]: durable storage behind one trait; SQLite embedded, PostgreSQL shared.
//! - [`dispatch`]: the registry of connected workers, their capacity and the attempts they hold.
//! - [`engine`]: the one place that changes jobs for clients and workers, and the dispatch loop.
//! - [`grpc`]: the Reseolio service: validation and wire ↔ domain conversion.
//! - [`server`]: serving it all on a listener, stopping in order.
//! - [`metrics`]: Prometheus counters, gauges and histograms.
//! - [`proto`]: the Reseolio gRPC contract, generated from `proto/reseolio.proto`.
//!
//! It does not parse command lines or config files: the `gantry` binary wires it.

pub mod dispatch;
pub mod engine;
pub mod grpc;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod schedule;
pub mod server;
pub mod store;

/// Generated gRPC code: `proto/reseolio.proto` (package `reseolio`, also re-exported here) and
/// `proto/gantry_jobs.proto` (package `gantry.jobs.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    pub use self::reseolio::*;

    /// The Reseolio contract.
    pub mod reseolio {
        tonic::include_proto!("reseolio");
    }

    /// Gantry's own jobs API.
    pub mod gantry {
        /// Jobs.
        pub mod jobs {
            /// Version 1.
            pub mod v1 {
                tonic::include_proto!("gantry.jobs.v1");
            }
        }
    }
}
