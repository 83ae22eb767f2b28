//! The `gantry` binary: command-line parsing and wiring of the systems. No system logic lives here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use gantry_runtime::admin::{self, AdminState, Readiness};
use gantry_runtime::config::{Config, DEFAULT_CONFIG, LogFilter, LogFormat};
use gantry_runtime::shutdown::{Signals, Supervisor};
use gantry_runtime::telemetry::{self, BuildInfo, Metrics};

const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("GANTRY_COMMIT"),
};

/// Exit codes shared by every command.
mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
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
    /// Durable job execution (not built yet).
    Jobs(NotBuilt),
    /// Elasticsearch-compatible search (not built yet).
    Search(NotBuilt),
    /// PostgreSQL change observer (not built yet).
    Observer(NotBuilt),
    /// Device fleet rollouts (not built yet).
    Fleet(NotBuilt),
    /// Load benchmarks of the systems (not built yet).
    Bench(NotBuilt),
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

#[derive(Debug, Args)]
struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
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
            Ok(config) => run(serve(config)),
            Err(code) => code,
        },
        Command::Jobs(_) => not_built("jobs"),
        Command::Search(_) => not_built("search"),
        Command::Observer(_) => not_built("observer"),
        Command::Fleet(_) => not_built("fleet"),
        Command::Bench(_) => not_built("bench"),
    };
    ExitCode::from(code)
}

fn not_built(system: &str) -> u8 {
    eprintln!("gantry {system}: this system is not built yet");
    exit::ERROR
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

async fn serve(config: Config) -> anyhow::Result<u8> {
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
    supervisor.spawn("admin", |stop| admin::serve(listener, state, stop));
    tracing::info!(%addr, version = BUILD.version, commit = BUILD.commit, "admin server listening");

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
