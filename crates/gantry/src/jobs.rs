//! Wiring of the jobs system: opening its store and starting its server under the supervisor.

use anyhow::Context as _;
use gantry_jobs::engine::{Engine, EngineOptions};
use gantry_jobs::metrics::JobsMetrics;
use gantry_jobs::server;
use gantry_jobs::store::Store;
use gantry_jobs::store::postgres::PostgresStore;
use gantry_jobs::store::sqlite::{SqliteOptions, SqliteStore, Sync};
use gantry_runtime::admin::Readiness;
use gantry_runtime::config::{JobsConfig, SyncMode};
use gantry_runtime::shutdown::Supervisor;

/// Opens the configured store and starts the jobs server.
pub async fn start(
    config: &JobsConfig,
    registry: &prometheus::Registry,
    readiness: &Readiness,
    supervisor: &mut Supervisor,
) -> anyhow::Result<()> {
    let ready = readiness.register("jobs");
    let metrics = JobsMetrics::register(registry).context("cannot register jobs metrics")?;
    let engine_options = EngineOptions {
        queue_limits: std::sync::Arc::new(config.queues.clone()),
        retention: (!config.retention.is_zero()).then_some(config.retention),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot bind the jobs server to {}", config.listen))?;
    let addr = listener.local_addr()?;
    if config.database.starts_with("postgres://") || config.database.starts_with("postgresql://") {
        let store = PostgresStore::connect(&config.database, &config.postgres_schema)
            .await
            .with_context(|| {
                format!(
                    "cannot open the jobs schema {} in PostgreSQL",
                    config.postgres_schema
                )
            })?;
        spawn(
            Engine::with_options(store, metrics, engine_options),
            listener,
            supervisor,
        );
        tracing::info!(%addr, schema = %config.postgres_schema, "jobs server listening (PostgreSQL)");
        ready.set_ready();
        return Ok(());
    }
    let options = SqliteOptions {
        path: config.database.clone().into(),
        sync: match config.sync {
            SyncMode::Full => Sync::Full,
            SyncMode::Normal => Sync::Normal,
        },
    };
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(options))
        .await?
        .with_context(|| format!("cannot open the jobs database {}", config.database))?;
    spawn(
        Engine::with_options(store, metrics, engine_options),
        listener,
        supervisor,
    );
    tracing::info!(%addr, database = %config.database, "jobs server listening");
    ready.set_ready();
    Ok(())
}

fn spawn<S: Store>(
    engine: Engine<S>,
    listener: tokio::net::TcpListener,
    supervisor: &mut Supervisor,
) {
    supervisor.spawn("jobs", move |stop| server::serve(engine, listener, stop));
}
