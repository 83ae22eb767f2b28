//! `gantry observer install|uninstall`: the observer's schema in the watched database.
//!
//! Exit codes: 0 ok, 1 error, 2 config (the file cannot be read or parsed), 3 cannot connect,
//! 4 validation (the config names a table the database does not have), 5 not found (`status`
//! of a schema that is not installed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use gantry_observer::config::ObserverConfig;
use gantry_observer::schema::{self, DEFAULT_SCHEMA};
use tokio_postgres::{Client, NoTls};

/// Observer exit codes.
pub(crate) mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const CANNOT_CONNECT: u8 = 3;
    pub const VALIDATION: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
}

#[derive(Debug, Subcommand)]
pub enum ObserverCommand {
    /// Creates or updates the change-log table, checkpoints and the triggers on every table the
    /// config watches (idempotent; triggers on tables no longer watched are dropped).
    Install {
        /// The watched database, e.g. postgres://user@host/db.
        #[arg(long, value_name = "URL")]
        database: String,
        /// The observer config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The PostgreSQL schema holding the observer's tables.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_SCHEMA)]
        schema: String,
        /// Print a JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Runs a listener and an action worker until SIGINT or SIGTERM: the leader of the observer
    /// set reads the change log and hands each match to the jobs store (one
    /// `observer:<observer>:<action>` job per action) with the checkpoint; other listeners stand
    /// by and take over when it dies. Every listener runs action jobs.
    Run {
        /// The watched database.
        #[arg(long, value_name = "URL")]
        database: String,
        /// The observer config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The PostgreSQL schema holding the observer's tables.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_SCHEMA)]
        schema: String,
        /// The jobs store's schema in the same database.
        #[arg(long, value_name = "NAME", default_value = "gantry_jobs")]
        jobs_schema: String,
        /// The observer set: one leader per set, each set sees every change once.
        #[arg(long, value_name = "NAME", default_value = "main")]
        set: String,
        /// Changes per batch.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Pause between polls when nothing is new.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "100ms")]
        poll: std::time::Duration,
        /// Serve /health, /ready and /metrics (Prometheus) here, e.g. 127.0.0.1:9464 (port 0
        /// picks one; the address is printed).
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
    },
    /// Checks an observer config file (keys, entities, conditions) without touching a database;
    /// exits 0 when valid, 2 when not.
    ValidateConfig {
        /// The observer config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print a JSON object instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// The change log: watched tables, rows not yet pruned, and each observer set's position,
    /// pending changes and lag.
    Status {
        /// The watched database.
        #[arg(long, value_name = "URL")]
        database: String,
        /// The PostgreSQL schema holding the observer's tables.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_SCHEMA)]
        schema: String,
        /// The jobs store's schema in the same database (its action jobs are counted).
        #[arg(long, value_name = "NAME", default_value = "gantry_jobs")]
        jobs_schema: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One event: its row images, which observers matched it and why the others did not, and
    /// each action's job (status, attempts, last error).
    DebugEvent {
        /// The event's change-log id (`X-Gantry-Event-Id`, `event_id`).
        id: i64,
        /// The watched database.
        #[arg(long, value_name = "URL")]
        database: String,
        /// The observer config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The PostgreSQL schema holding the observer's tables.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_SCHEMA)]
        schema: String,
        /// The jobs store's schema in the same database.
        #[arg(long, value_name = "NAME", default_value = "gantry_jobs")]
        jobs_schema: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The `gantry_observer_*` metrics of a running `gantry observer run --admin ADDR`.
    Metrics {
        /// Its admin address.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        admin: String,
        /// Print a JSON object (metric with labels → value).
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter queue: actions whose last attempt failed (or that were refused with a
    /// 4xx), kept until retried or removed.
    Dlq {
        #[command(flatten)]
        target: crate::observer_dlq::DlqTarget,
        #[command(subcommand)]
        command: crate::observer_dlq::DlqCommand,
    },
    /// Drops the observer's schema: change log, checkpoints and every trigger it installed.
    Uninstall {
        /// The watched database.
        #[arg(long, value_name = "URL")]
        database: String,
        /// The PostgreSQL schema holding the observer's tables.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_SCHEMA)]
        schema: String,
        /// Print a JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) struct Failure {
    code: u8,
    message: String,
}

pub(crate) fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

pub(crate) async fn connect(url: &str) -> Result<Client, Failure> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(|e| {
        failure(
            exit::CANNOT_CONNECT,
            format!("cannot connect to {url}: {e}"),
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "observer database connection ended");
        }
    });
    Ok(client)
}

pub(crate) fn db_failure(e: gantry_observer::Error) -> Failure {
    match e {
        gantry_observer::Error::Config(m) => failure(exit::VALIDATION, m),
        other => failure(exit::ERROR, other.to_string()),
    }
}

/// Runs an observer command; returns the exit code.
pub async fn run(command: ObserverCommand) -> u8 {
    let result = match command {
        ObserverCommand::Install {
            database,
            config,
            schema,
            json,
        } => install(&database, &config, &schema, json).await,
        ObserverCommand::Uninstall {
            database,
            schema,
            json,
        } => uninstall(&database, &schema, json).await,
        ObserverCommand::ValidateConfig { config, json } => validate(&config, json),
        ObserverCommand::Run {
            database,
            config,
            schema,
            jobs_schema,
            set,
            batch,
            poll,
            admin,
        } => {
            run_listener(
                gantry_observer::listener::ListenerOptions {
                    database,
                    schema,
                    set,
                    jobs_schema,
                    batch: batch.max(1),
                    poll,
                    prune_every: std::time::Duration::from_secs(10),
                },
                &config,
                admin,
            )
            .await
        }
        ObserverCommand::Status {
            database,
            schema,
            jobs_schema,
            json,
        } => status(&database, &schema, &jobs_schema, json).await,
        ObserverCommand::Dlq { target, command } => crate::observer_dlq::run(target, command).await,
        ObserverCommand::DebugEvent {
            id,
            database,
            config,
            schema,
            jobs_schema,
            json,
        } => {
            crate::observer_debug::debug_event(&database, &config, &schema, &jobs_schema, id, json)
                .await
        }
        ObserverCommand::Metrics { admin, json } => {
            crate::observer_debug::metrics(&admin, json).await
        }
    };
    match result {
        Ok(()) => exit::OK,
        Err(f) => {
            eprintln!("gantry observer: {}", f.message);
            f.code
        }
    }
}

async fn install(url: &str, config: &Path, schema: &str, json: bool) -> Result<(), Failure> {
    let config = ObserverConfig::load(config).map_err(|e| failure(exit::CONFIG, e.to_string()))?;
    let entities: BTreeSet<_> = config.entities();
    let mut client = connect(url).await?;
    let done = schema::install(&mut client, schema, &entities)
        .await
        .map_err(db_failure)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "schema": schema,
                "migrations_applied": done.migrations_applied,
                "watched": done.watched,
                "unwatched": done.unwatched,
            })
        );
    } else {
        let watched = if done.watched.is_empty() {
            "no tables".to_owned()
        } else {
            done.watched.join(", ")
        };
        println!(
            "installed schema {schema}: watching {watched} ({} migration(s) applied)",
            done.migrations_applied
        );
        if !done.unwatched.is_empty() {
            println!("no longer watching {}", done.unwatched.join(", "));
        }
    }
    Ok(())
}

/// Every 5 s, writes this process's circuit breakers where `status` reads them; clears them
/// at the end.
async fn report_breakers(
    url: String,
    schema: String,
    process: String,
    runner: std::sync::Arc<gantry_observer::runner::Runner>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut client = None;
    loop {
        let stopping = stop.is_cancelled();
        let states: Vec<(String, String)> = if stopping {
            Vec::new()
        } else {
            runner
                .breakers()
                .into_iter()
                .map(|(endpoint, state)| (endpoint, state.as_str().to_owned()))
                .collect()
        };
        if client.is_none() {
            client = connect(&url).await.ok();
        }
        if let Some(c) = client.as_mut()
            && let Err(e) =
                gantry_observer::capture::report_breakers(c, &schema, &process, &states).await
        {
            tracing::debug!(error = %e, "cannot report circuit breakers");
            client = None;
        }
        if stopping {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}

async fn run_listener(
    options: gantry_observer::listener::ListenerOptions,
    config: &Path,
    admin: Option<std::net::SocketAddr>,
) -> Result<(), Failure> {
    use gantry_observer::dispatch::Matcher;
    use gantry_observer::listener::{Report, run};
    let config = ObserverConfig::load(config).map_err(|e| failure(exit::CONFIG, e.to_string()))?;
    let telemetry = gantry_runtime::telemetry::Metrics::new(crate::BUILD)
        .map_err(|e| failure(exit::ERROR, format!("metrics: {e}")))?;
    let metrics = gantry_observer::metrics::ObserverMetrics::register(telemetry.registry())
        .map_err(|e| failure(exit::ERROR, format!("metrics: {e}")))?;
    let runner = std::sync::Arc::new(
        gantry_observer::runner::Runner::new(&config, metrics.clone())
            .map_err(|e| failure(exit::CONFIG, e.to_string()))?,
    );
    let concurrency = config.worker.concurrency;
    let matchers: Vec<Matcher> = config.observers.into_iter().map(Matcher::new).collect();
    // Fail fast when the database is not there or the schema is not installed.
    let client = connect(&options.database).await?;
    if gantry_observer::capture::status(&client, &options.schema)
        .await
        .map_err(db_failure)?
        .is_none()
    {
        return Err(failure(
            exit::NOT_FOUND,
            format!(
                "schema {} is not installed (gantry observer install)",
                options.schema
            ),
        ));
    }
    drop(client);
    let store = gantry_jobs::store::postgres::PostgresStore::connect(
        &options.database,
        &options.jobs_schema,
    )
    .await
    .map_err(|e| failure(exit::CANNOT_CONNECT, format!("jobs store: {e}")))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let admin = match admin {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                failure(
                    exit::ERROR,
                    format!("cannot bind the admin server to {addr}: {e}"),
                )
            })?;
            let bound = listener
                .local_addr()
                .map_err(|e| failure(exit::ERROR, e.to_string()))?;
            let readiness = gantry_runtime::admin::Readiness::default();
            readiness.register("observer").set_ready();
            let state = gantry_runtime::admin::AdminState {
                metrics: telemetry,
                readiness,
            };
            println!("admin listening on {bound}");
            Some(tokio::spawn(gantry_runtime::admin::serve(
                listener,
                state,
                stop.clone(),
            )))
        }
    };
    let signals = crate::cancel_on_signal(stop.clone());
    // Every listener works, leader or standby: the store spreads the action jobs.
    let process = format!("observer-{}", std::process::id());
    let breakers = tokio::spawn(report_breakers(
        options.database.clone(),
        options.schema.clone(),
        process.clone(),
        std::sync::Arc::clone(&runner),
        stop.clone(),
    ));
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let worker = tokio::spawn(gantry_observer::worker::run(
        store,
        runner,
        gantry_observer::worker::WorkerOptions {
            worker_id: process,
            concurrency,
            poll: options.poll.max(std::time::Duration::from_millis(50)),
        },
        std::sync::Arc::clone(&wake),
        stop.clone(),
    ));
    let set = options.set.clone();
    let result = run(options, matchers, metrics, stop.clone(), |r| match r {
        Report::Leader(epoch) => println!("leader of observer set {set} (epoch {epoch})"),
        Report::Standby => println!("standby for observer set {set}"),
        Report::Handed(events, jobs) => {
            if jobs > 0 {
                wake.notify_one();
            }
            println!("handed over {events} change(s): {jobs} job(s)");
        }
        Report::Lost(why) => println!("lost leadership: {why}"),
    })
    .await;
    // The listener ends on stop or on an error; either way the worker drains and stops.
    stop.cancel();
    let _ = worker.await;
    let _ = breakers.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    signals.abort();
    result.map_err(db_failure)
}

/// Action jobs by name and status (`[(name, [pending, running, succeeded, dead])]`), if the
/// jobs store is there.
async fn action_counts(
    client: &Client,
    url: &str,
    jobs_schema: &str,
) -> Result<Vec<(String, [u64; 4])>, Failure> {
    use gantry_jobs::model::Status;
    let there: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.jobs', $1::text)) IS NOT NULL",
            &[&jobs_schema],
        )
        .await
        .map_err(|e| failure(exit::ERROR, e.to_string()))?
        .get(0);
    if !there {
        return Ok(Vec::new());
    }
    let store = gantry_jobs::store::postgres::PostgresStore::connect(url, jobs_schema)
        .await
        .map_err(|e| failure(exit::CANNOT_CONNECT, format!("jobs store: {e}")))?;
    let mut counts: std::collections::BTreeMap<String, [u64; 4]> = Default::default();
    for (i, status) in [
        Status::Pending,
        Status::Running,
        Status::Success,
        Status::Dead,
    ]
    .into_iter()
    .enumerate()
    {
        for (name, n) in store
            .count_by_name("observer", status)
            .await
            .map_err(|e| failure(exit::ERROR, format!("jobs store: {e}")))?
        {
            counts.entry(name).or_default()[i] = n;
        }
    }
    Ok(counts.into_iter().collect())
}

async fn status(url: &str, schema: &str, jobs_schema: &str, json: bool) -> Result<(), Failure> {
    let client = connect(url).await?;
    let Some(st) = gantry_observer::capture::status(&client, schema)
        .await
        .map_err(db_failure)?
    else {
        return Err(failure(
            exit::NOT_FOUND,
            format!("schema {schema} is not installed (gantry observer install)"),
        ));
    };
    let actions = action_counts(&client, url, jobs_schema).await?;
    if json {
        let actions: Vec<_> = actions
            .iter()
            .map(|(name, [pending, running, succeeded, dead])| {
                serde_json::json!({
                    "job": name,
                    "pending": pending,
                    "running": running,
                    "succeeded": succeeded,
                    "dead": dead,
                })
            })
            .collect();
        let sets: Vec<_> = st
            .sets
            .iter()
            .map(|s| {
                serde_json::json!({
                    "observer_set": s.set,
                    "lo": s.position.lo.to_string(),
                    "hi": s.position.hi.to_string(),
                    "last_id": s.position.last_id,
                    "epoch": s.epoch,
                    "pending": s.pending,
                    "lag_ms": s.lag_ms,
                    "updated_at_ms": s.updated_at_ms,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "schema": schema,
                "changes": st.changes,
                "watched": st.watched,
                "observer_sets": sets,
                "actions": actions,
                "breakers": st.breakers.iter().map(|(process, endpoint, state)| {
                    serde_json::json!({ "process": process, "endpoint": endpoint, "state": state })
                }).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "schema {schema}: {} change(s) in the log; watching {}",
            st.changes,
            if st.watched.is_empty() {
                "no tables".to_owned()
            } else {
                st.watched.join(", ")
            }
        );
        if st.sets.is_empty() {
            println!("no observer set has read the log yet");
        } else {
            println!(
                "{:<24} {:>8} {:>10} {:>10}",
                "OBSERVER SET", "EPOCH", "PENDING", "LAG"
            );
            for s in &st.sets {
                println!(
                    "{:<24} {:>8} {:>10} {:>9.1}s",
                    s.set,
                    s.epoch,
                    s.pending,
                    s.lag_ms as f64 / 1000.0
                );
            }
        }
        if !actions.is_empty() {
            println!(
                "{:<40} {:>9} {:>9} {:>10} {:>7}",
                "ACTION JOB", "PENDING", "RUNNING", "SUCCEEDED", "DEAD"
            );
            for (name, [pending, running, succeeded, dead]) in &actions {
                println!("{name:<40} {pending:>9} {running:>9} {succeeded:>10} {dead:>7}");
            }
        }
        for (process, endpoint, state) in &st.breakers {
            println!("circuit {state} for {endpoint} (in {process})");
        }
    }
    Ok(())
}

fn validate(path: &Path, json: bool) -> Result<(), Failure> {
    let config = ObserverConfig::load(path).map_err(|e| failure(exit::CONFIG, e.to_string()))?;
    if json {
        let observers: Vec<_> = config
            .observers
            .iter()
            .map(|o| {
                serde_json::json!({
                    "name": o.name,
                    "entity": o.entity,
                    "events": o.events.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
                    "condition": o.condition,
                    "actions": o.actions.iter().map(|a| {
                        serde_json::json!({ "name": a.name(), "type": a.kind() })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "valid": true, "observers": observers })
        );
    } else {
        println!(
            "{}: valid, {} observer(s)",
            path.display(),
            config.observers.len()
        );
        for o in &config.observers {
            let events: Vec<&str> = o.events.iter().map(|e| e.as_str()).collect();
            let actions: Vec<String> = o
                .actions
                .iter()
                .map(|a| {
                    if a.name() == a.kind() {
                        a.kind().to_owned()
                    } else {
                        format!("{} ({})", a.name(), a.kind())
                    }
                })
                .collect();
            println!(
                "  {}: {} on {}{} -> {}",
                o.name,
                events.join("|"),
                o.entity,
                o.condition
                    .as_deref()
                    .map(|c| format!(" when {c}"))
                    .unwrap_or_default(),
                if actions.is_empty() {
                    "no actions".to_owned()
                } else {
                    actions.join(", ")
                }
            );
        }
    }
    Ok(())
}

async fn uninstall(url: &str, schema: &str, json: bool) -> Result<(), Failure> {
    let mut client = connect(url).await?;
    let removed = schema::uninstall(&mut client, schema)
        .await
        .map_err(db_failure)?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "schema": schema, "removed": removed })
        );
    } else if removed {
        println!("removed schema {schema} and its triggers");
    } else {
        println!("schema {schema} was not installed; nothing to remove");
    }
    Ok(())
}
