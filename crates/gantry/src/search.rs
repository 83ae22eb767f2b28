//! Wiring of the search system: opening the data directory and starting the ES-compatible HTTP
//! server under the supervisor.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use gantry_runtime::admin::Readiness;
use gantry_runtime::shutdown::Supervisor;
use gantry_search::api::{self, AppState};
use gantry_search::metrics::SearchMetrics;
use gantry_search::node::Node;

/// `gantry search ...`.
#[derive(Debug, Subcommand)]
pub enum SearchCommand {
    /// Runs only the search server (Elasticsearch 8.x REST API).
    Serve(ServeArgs),
}

/// Where the search server listens and keeps its data.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTP listen address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9200")]
    pub listen: SocketAddr,
    /// Data directory: index metadata, tantivy indices and translogs.
    #[arg(long, value_name = "DIR", default_value = "gantry-data/search")]
    pub data: PathBuf,
}

/// Opens the data directory (replaying translogs) and starts the search server.
pub async fn start(
    args: &ServeArgs,
    registry: &prometheus::Registry,
    readiness: &Readiness,
    supervisor: &mut Supervisor,
) -> anyhow::Result<()> {
    let ready = readiness.register("search");
    let metrics = SearchMetrics::register(registry).context("cannot register search metrics")?;
    let data = args.data.clone();
    let refresh_seconds = Some(metrics.refresh_seconds.clone());
    let node = tokio::task::spawn_blocking(move || Node::open_with(&data, refresh_seconds))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "cannot open the search data directory {}",
                args.data.display()
            )
        })?;
    let node = Arc::new(node);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot bind the search server to {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (stats_node, stats_metrics) = (node.clone(), metrics.clone());
    let state = AppState {
        node: node.clone(),
        metrics,
    };
    supervisor.spawn("search", move |stop| async move {
        let served = api::serve(listener, state, stop).await;
        // Final refresh of every shard, so a clean stop leaves empty translogs.
        let _ = tokio::task::spawn_blocking(move || node.close()).await;
        served
    });
    // Per-index gauges (documents, segments, size on disk), every 5 s. Started after the
    // server, so it stops first (the supervisor stops the last started first).
    {
        let (node, metrics) = (stats_node, stats_metrics);
        supervisor.spawn("search-stats", move |stop| async move {
            loop {
                let (node, metrics) = (node.clone(), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || metrics.record_indices(&node)).await;
                tokio::select! {
                    () = stop.cancelled() => return Ok::<(), std::convert::Infallible>(()),
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        });
    }
    tracing::info!(%addr, data = %args.data.display(), "search server listening");
    ready.set_ready();
    Ok(())
}
