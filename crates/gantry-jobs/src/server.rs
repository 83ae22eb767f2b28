//! Serving the jobs engine: the gRPC listener, the dispatch loop and housekeeping, started and
//! stopped together.
//!
//! Stopping goes in this order: the engine is marked as stopping (so worker streams closed by the
//! shutdown keep their attempts RUNNING for the workers to finish and ack after a restart), open
//! streams end with `UNAVAILABLE` (clients reconnect), the gRPC server finishes in-flight calls,
//! and the dispatch loop ends.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::engine::Engine;
use crate::grpc::{GantryJobsService, ReseolioService};
use crate::model::limits;
use crate::proto::gantry::jobs::v1::jobs_server::JobsServer;
use crate::proto::reseolio_server::ReseolioServer;
use crate::store::Store;

/// How often finished jobs past their retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How often the queue-depth gauges are refreshed.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The dispatch loop failed.
    #[error("dispatch loop failed: {0}")]
    Engine(String),
}

/// Serves `engine` on `listener` until `stop` is cancelled.
pub async fn serve<S: Store>(
    engine: Engine<S>,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let streams_stop = CancellationToken::new();
    let loop_stop = CancellationToken::new();
    let service = ReseolioServer::new(ReseolioService::new(engine.clone(), streams_stop.clone()))
        // Room for the largest args plus the rest of the message.
        .max_decoding_message_size(limits::PAYLOAD_BYTES + 64 * 1024)
        .max_encoding_message_size(usize::MAX);

    let dispatcher = {
        let engine = engine.clone();
        let loop_stop = loop_stop.clone();
        tokio::spawn(async move { engine.run(loop_stop).await })
    };
    let depth = {
        let engine = engine.clone();
        let stop = loop_stop.clone();
        tokio::spawn(async move {
            let mut last_purge: Option<tokio::time::Instant> = None;
            loop {
                if let Err(e) = engine.refresh_depth().await {
                    tracing::warn!(error = %e, "cannot refresh queue depth");
                }
                if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
                    if let Err(e) = engine.purge_expired().await {
                        tracing::warn!(error = %e, "cannot purge finished jobs");
                    }
                    last_purge = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(DEPTH_EVERY) => {}
                }
            }
        })
    };

    let shutdown = {
        let engine = engine.clone();
        let streams_stop = streams_stop.clone();
        async move {
            stop.cancelled().await;
            engine.begin_stop();
            streams_stop.cancel();
        }
    };
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service)
        .add_service(
            JobsServer::new(GantryJobsService::new(engine.clone(), streams_stop.clone()))
                .max_decoding_message_size(16 * (limits::PAYLOAD_BYTES + 64 * 1024)),
        )
        // Accepted sockets get TCP_NODELAY here: the builder's `tcp_nodelay` only reaches
        // listeners tonic binds itself, and Nagle's algorithm meeting delayed ACKs costs every
        // small message ~40 ms.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;

    // Whether the server failed or was stopped, the streams and the loop stop now.
    engine.begin_stop();
    streams_stop.cancel();
    loop_stop.cancel();
    let _ = depth.await;
    let engine_result = dispatcher.await;
    served?;
    match engine_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServeError::Engine(e.to_string())),
        Err(e) => Err(ServeError::Engine(e.to_string())),
    }
}
