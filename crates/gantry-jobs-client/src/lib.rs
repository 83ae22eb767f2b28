//! Rust SDK for Gantry's jobs server.
//!
//! - [`Client`]: enqueue jobs (one or a batch), read them back, wait for their outcome (typed with
//!   serde), cancel, retry, list and count them. It speaks both services the server offers:
//!   `reseolio.Reseolio` and `gantry.jobs.v1.Jobs`.
//! - [`Worker`]: runs typed handlers for named jobs over the `gantry.jobs.v1.Jobs/Work` stream, at
//!   most `concurrency` at a time, with heartbeats for long attempts, cancellation delivered to the
//!   handler ([`JobContext`]), a graceful drain on shutdown and reconnection with backoff when the
//!   server restarts (attempts still running are re-adopted, not run twice).
//!
//! Arguments and results travel as JSON. The Reseolio convention is a JSON array of positional
//! arguments, which a tuple serializes to and deserializes from: `client.enqueue("math:add",
//! &(2, 3), ..)` is run by a handler taking `(i64, i64)`.
//!
//! It owns no server code and no storage: it carries its own generated client for
//! `proto/reseolio.proto` and `proto/gantry_jobs.proto` and nothing else of the `gantry-jobs` crate.
//!
//! Delivery is at least once: a handler may run again for the same job after a crash or a lost
//! lease, so handlers should be idempotent. Acknowledgements are fenced by attempt number, so a
//! late or repeated acknowledgement never changes a job that has moved on.

mod client;
mod ledger;
mod reconnect;
mod wire;
mod worker;

pub use client::{
    Backoff, Client, ClientError, EnqueueOptions, Enqueued, Job, JobPage, JobStatus, ListFilter,
    ListOrder, NewJob, Outcome, Stats,
};
pub use worker::{HandlerError, JobContext, Worker, WorkerBuilder, WorkerError};

/// Generated gRPC client code (client side only).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod proto {
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

/// The default server address, as in Reseolio.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

/// Turns `host:port` or a URL into an endpoint. No request timeout is set: the worker's stream and
/// `Client::wait` live as long as they need.
fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Largest message the SDK accepts from the server. Pages of jobs carry up to 1 MiB of arguments
/// and 1 MiB of result each; the server bounds the page size, so the SDK does not bound it again.
const MAX_DECODING: usize = usize::MAX;
