//! The `gantry` binary: command-line parsing and wiring of the systems. No system logic lives here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use gantry_runtime::admin::{self, AdminState, Readiness};
use gantry_runtime::config::{Config, DEFAULT_CONFIG, LogFilter, LogFormat};
use gantry_runtime::shutdown::{Signals, Supervisor};
use gantry_runtime::telemetry::{self, BuildInfo, Metrics};

/// mimalloc instead of the system allocator: indexing, JSON and request handling allocate on
/// every thread, and glibc's malloc spent about 45 % of the search server's indexing time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub(crate) const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("GANTRY_COMMIT"),
};

mod fleet_cli;
/// Exit codes shared by every command.
mod jobs;
mod jobs_cli;
mod observer_cli;
mod observer_debug;
mod observer_dlq;
mod search;

mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CANNOT_CONNECT: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
}

/// Gantry: durable jobs, Elasticsearch-compatible search, a PostgreSQL change observer and device
/// fleet rollouts, in one binary.
#[derive(Debug, Parser)]
#[command(name = "gantry", version = VERSION_LINE, about, long_about = None)]
struct Cli {
    /// Config file (TOML). Without it, the embedded defaults apply; `GANTRY_<SECTION>_<KEY>`
    /// variables override either.
    #[arg(long, global = true, env = "GANTRY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log output format; overrides `[log] format`.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,

    /// Log level or filter directives (e.g. `info,gantry_jobs=debug`); overrides `[log] level`.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_filter)]
    log_level: Option<LogFilter>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs every system in one process with the configured (or embedded default) settings.
    Serve,
    /// Prints the version and the commit it was built from.
    Version,
    /// Checks or prints configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Durable job execution.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Elasticsearch-compatible search.
    #[command(subcommand)]
    Search(search::SearchCommand),
    /// PostgreSQL change observer.
    #[command(subcommand)]
    Observer(observer_cli::ObserverCommand),
    /// Device fleet rollouts (so far: the device registry).
    #[command(subcommand)]
    Fleet(fleet_cli::FleetCommand),
    /// Load benchmarks: drive a running server and judge the seed's pass criteria.
    #[command(subcommand)]
    Bench(BenchCommand),
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// A job-queue scenario against any server speaking Reseolio's contract (gantry or Reseolio).
    Jobs(gantry_bench::jobs::JobsBench),
    /// A rollout to simulated devices over loopback HTTP, beside a minimal baseline client.
    Fleet(gantry_bench::fleet::FleetBench),
    /// PostgreSQL writers against `gantry observer run` listeners delivering webhooks.
    Observer(gantry_bench::observer::ObserverBench),
    /// `_bulk` indexing beside raw tantivy, and query latency by type.
    Search(gantry_bench::search::SearchBench),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validates FILE with the environment's overrides applied; exits 0 when valid, 2 when not.
    Check {
        /// The config file to check.
        file: PathBuf,
    },
    /// Prints the full documented default config file.
    Default,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Runs only the jobs server (gRPC, Reseolio's contract).
    Serve {
        /// gRPC listen address; overrides `[jobs] listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// SQLite file or postgres:// URL; overrides `[jobs] database`.
        #[arg(long, value_name = "PATH_OR_URL")]
        db: Option<String>,
    },
    /// Enqueues one job.
    Enqueue {
        #[command(flatten)]
        client: ClientArgs,
        /// The job (handler) name.
        name: String,
        /// JSON arguments, usually an array.
        #[arg(default_value = "[]")]
        args: String,
        /// Run no earlier than this long from now, e.g. `30s`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        delay: Option<std::time::Duration>,
        /// 0 (most urgent, default) to 9.
        #[arg(long, default_value_t = 0)]
        priority: u8,
        /// Deduplicates per job name.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Total attempts (default 3).
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Lists jobs, newest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only jobs in this status (repeatable): pending, running, success, dead, cancelled.
        #[arg(long = "status", value_name = "STATUS", value_parser = jobs_cli::parse_status)]
        statuses: Vec<gantry_jobs::proto::JobStatus>,
        /// Only jobs with this name (repeatable).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Jobs to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Shows one job.
    Show {
        #[command(flatten)]
        client: ClientArgs,
        /// The job id.
        id: String,
    },
    /// Puts a DEAD job back to PENDING with fresh attempts.
    Retry {
        #[command(flatten)]
        client: ClientArgs,
        /// The job id.
        id: String,
    },
    /// Cancels a pending job, or asks the worker of a running one to stop.
    Cancel {
        #[command(flatten)]
        client: ClientArgs,
        /// The job id.
        id: String,
    },
    /// Job counts by status.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deletes finished jobs (success, dead, cancelled) completed longer ago than a duration.
    Purge {
        #[command(flatten)]
        client: ClientArgs,
        /// Age of the jobs to delete, e.g. `7d`, `12h`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Only jobs in this finished status (repeatable).
        #[arg(long = "status", value_name = "STATUS", value_parser = jobs_cli::parse_status)]
        statuses: Vec<gantry_jobs::proto::JobStatus>,
    },
    /// Cron schedules: each tick of a schedule enqueues one job named after it.
    #[command(subcommand)]
    Schedules(jobs_cli::SchedulesCommand),
}

/// How a CLI command reaches the jobs server.
#[derive(Debug, Args)]
struct ClientArgs {
    /// The jobs server (host:port or URL).
    #[arg(
        long,
        env = "GANTRY_JOBS_SERVER",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    server: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GANTRY_COMMIT"),
    ")"
);

fn parse_filter(s: &str) -> Result<LogFilter, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A listener is a long-running process: it logs (to stderr) as `serve` does, with the
    // default log settings and `--log-format` / `--log-level` (its `--config` is the observer
    // file, not Gantry's).
    if matches!(
        cli.command,
        Command::Observer(observer_cli::ObserverCommand::Run { .. })
    ) {
        let mut log = Config::default().log;
        if let Some(format) = cli.log_format {
            log.format = match format {
                LogFormatArg::Pretty => LogFormat::Pretty,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        if let Some(level) = &cli.log_level {
            log.level = level.clone();
        }
        if let Err(e) = telemetry::init_tracing(log.format, &log.level) {
            eprintln!("gantry: cannot set up logging: {e}");
        }
    }
    let code = match cli.command {
        Command::Version => {
            println!("gantry {VERSION_LINE}");
            exit::OK
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_CONFIG}");
            exit::OK
        }
        Command::Config(ConfigCommand::Check { ref file }) => config_check(file),
        Command::Serve => match load_config(&cli) {
            Ok(config) => run(serve(config, Systems::All)),
            Err(code) => code,
        },
        Command::Jobs(JobsCommand::Serve { ref listen, ref db }) => match load_config(&cli) {
            Ok(mut config) => {
                if let Some(listen) = listen {
                    config.jobs.listen = *listen;
                }
                if let Some(db) = db {
                    config.jobs.database = db.clone();
                }
                config.jobs.enabled = true;
                run(serve(config, Systems::JobsOnly))
            }
            Err(code) => code,
        },
        Command::Jobs(command) => jobs_client(command),
        Command::Search(search::SearchCommand::Serve(ref args)) => match load_config(&cli) {
            Ok(config) => run(serve(config, Systems::SearchOnly(args.clone()))),
            Err(code) => code,
        },
        Command::Observer(command) => run(async move { Ok(observer_cli::run(command).await) }),
        Command::Fleet(fleet_cli::FleetCommand::Simulate(args)) => {
            run(async move { Ok(fleet_cli::simulate(args).await) })
        }
        Command::Fleet(fleet_cli::FleetCommand::Rollout(command)) => {
            run(async move { Ok(fleet_cli::rollout(command).await) })
        }
        Command::Fleet(fleet_cli::FleetCommand::Serve(args)) => {
            run(async move { Ok(fleet_cli::serve(args).await) })
        }
        Command::Fleet(fleet_cli::FleetCommand::Push(args)) => {
            run(async move { Ok(fleet_cli::push(args).await) })
        }
        Command::Fleet(command) => fleet_cli::run(command),
        Command::Bench(BenchCommand::Jobs(args)) => run(gantry_bench::jobs::run(args)),
        Command::Bench(BenchCommand::Fleet(args)) => run(gantry_bench::fleet::run(args)),
        Command::Bench(BenchCommand::Observer(args)) => run(gantry_bench::observer::run(args)),
        Command::Bench(BenchCommand::Search(args)) => run(gantry_bench::search::run(args)),
    };
    ExitCode::from(code)
}

fn jobs_client(command: JobsCommand) -> u8 {
    run(async move {
        let result = async {
            match command {
                JobsCommand::Serve { .. } => Ok(()),
                JobsCommand::Enqueue {
                    client,
                    name,
                    args,
                    delay,
                    priority,
                    idempotency_key,
                    max_attempts,
                } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    let request = jobs_cli::EnqueueArgs {
                        name,
                        args,
                        delay,
                        priority,
                        idempotency_key,
                        max_attempts,
                    };
                    jobs_cli::enqueue(channel, request, client.json).await
                }
                JobsCommand::List {
                    client,
                    statuses,
                    names,
                    limit,
                    offset,
                } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    jobs_cli::list(channel, statuses, names, limit, offset, client.json).await
                }
                JobsCommand::Show { client, id } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    jobs_cli::show(channel, id, client.json).await
                }
                JobsCommand::Retry { client, id } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    jobs_cli::retry_or_cancel(channel, id, false, client.json).await
                }
                JobsCommand::Cancel { client, id } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    jobs_cli::retry_or_cancel(channel, id, true, client.json).await
                }
                JobsCommand::Stats { client } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    jobs_cli::stats(channel, client.json).await
                }
                JobsCommand::Purge {
                    client,
                    older_than,
                    statuses,
                } => {
                    let channel = jobs_cli::connect(&client.server).await?;
                    jobs_cli::purge(channel, older_than, statuses, client.json).await
                }
                JobsCommand::Schedules(command) => jobs_cli::schedules(command).await,
            }
        }
        .await;
        Ok(match result {
            Ok(()) => exit::OK,
            Err(f) => {
                eprintln!("gantry jobs: {}", f.message);
                f.code
            }
        })
    })
}

/// Cancels `stop` on the first SIGINT or SIGTERM (for the commands that run until stopped
/// outside the supervisor: `observer run`, `fleet serve`).
pub(crate) fn cancel_on_signal(
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending().await,
                }
            } => {}
        }
        stop.cancel();
    })
}

fn config_check(file: &Path) -> u8 {
    match Config::load(Some(file), std::env::vars()) {
        Ok(_) => {
            println!("{}: ok", file.display());
            exit::OK
        }
        Err(e) => {
            eprintln!("gantry: invalid config: {e}");
            exit::USAGE
        }
    }
}

/// The effective config: file, then environment, then command-line flags.
fn load_config(cli: &Cli) -> Result<Config, u8> {
    let mut config = Config::load(cli.config.as_deref(), std::env::vars()).map_err(|e| {
        eprintln!("gantry: invalid config: {e}");
        exit::USAGE
    })?;
    if let Some(format) = cli.log_format {
        config.log.format = match format {
            LogFormatArg::Pretty => LogFormat::Pretty,
            LogFormatArg::Json => LogFormat::Json,
        };
    }
    if let Some(level) = &cli.log_level {
        config.log.level = level.clone();
    }
    Ok(config)
}

/// Runs `fut` on a multi-threaded runtime and turns its result into an exit code.
fn run(fut: impl std::future::Future<Output = anyhow::Result<u8>>) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry: cannot start the async runtime: {e}");
            return exit::ERROR;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gantry failed");
            eprintln!("gantry: {e:#}");
            exit::ERROR
        }
    }
}

/// Which systems a serve command runs.
#[derive(Debug, Clone)]
enum Systems {
    /// Every enabled system.
    All,
    /// The jobs server only.
    JobsOnly,
    /// The search server only.
    SearchOnly(search::ServeArgs),
}

async fn serve(config: Config, systems: Systems) -> anyhow::Result<u8> {
    telemetry::init_tracing(config.log.format, &config.log.level)?;
    let signals = Signals::new().context("cannot install signal handlers")?;
    let metrics = Metrics::new(BUILD)?;
    let readiness = Readiness::default();
    let mut supervisor = Supervisor::new(config.shutdown.deadline);

    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot bind the admin server to {}", config.admin.listen))?;
    let addr = listener.local_addr()?;
    let state = AdminState { metrics, readiness };
    let registry = state.metrics.registry().clone();
    let readiness = state.readiness.clone();
    supervisor.spawn("admin", |stop| admin::serve(listener, state, stop));
    tracing::info!(%addr, version = BUILD.version, commit = BUILD.commit, "admin server listening");

    if config.jobs.enabled && matches!(systems, Systems::All | Systems::JobsOnly) {
        jobs::start(&config.jobs, &registry, &readiness, &mut supervisor).await?;
    }
    match &systems {
        Systems::SearchOnly(args) => {
            search::start(args, &registry, &readiness, &mut supervisor).await?;
        }
        Systems::All if config.search.enabled => {
            let args = search::ServeArgs {
                listen: config.search.listen,
                data: config.search.data.clone(),
            };
            search::start(&args, &registry, &readiness, &mut supervisor).await?;
        }
        _ => {}
    }

    let report = supervisor
        .run(async {
            signals.first().await;
        })
        .await;
    if report.is_clean() {
        tracing::info!("shut down cleanly");
        Ok(exit::OK)
    } else {
        tracing::error!(?report, "shut down with errors");
        Ok(exit::ERROR)
    }
}
