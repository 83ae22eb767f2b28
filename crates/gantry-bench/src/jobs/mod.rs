//! `gantry bench jobs <scenario>`: the seed's ten load scenarios against any server speaking
//! Reseolio's contract — a running one (`--target ADDR`) or one the harness starts itself
//! (`--spawn gantry|reseolio`).
//!
//! - [`ledger`]: what happened to every job, and the duplicates, lost jobs and latencies that
//!   follow (pure).
//! - [`criteria`]: the seed's pass criteria as PASS / FAIL / SKIP lines (pure).
//! - [`driver`]: enqueuers, workers and the end-of-run check over gRPC (the Reseolio contract).
//! - [`native`]: the same over Gantry's own protocol (batched enqueues, the `Work` stream).
//! - [`scenarios`]: the ten scenarios.
//! - [`report`]: the results table and JSON.
//!
//! It does not implement a server or an SDK: it drives the wire contract directly.

pub mod criteria;
pub mod driver;
pub mod ledger;
pub mod native;
pub mod report;
pub mod scenarios;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::{self, Server, ServerKind, Spec};

/// The scenarios (the seed's list, in its order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One worker drains jobs enqueued as fast as they go; end-to-end jobs/s.
    Throughput,
    /// Ten workers share the load; no job is claimed twice; every worker gets work.
    MultiWorker,
    /// Every attempt fails: backoff respected, DEAD after exactly max attempts, no amplification.
    RetryStorm,
    /// Many clients enqueue at a fixed rate; enqueue→start latency and the rate achieved.
    EnqueueRate,
    /// Long jobs and jobs that time out alongside short ones: short ones are not held up.
    LongRunning,
    /// Workers drop their streams mid-job and reconnect: abandoned jobs rerun, none lost.
    WorkerChurn,
    /// The harness SIGKILLs its own server mid-run and restarts it: nothing acknowledged lost.
    CrashRecovery,
    /// A steady rate for an hour (by default): server memory must not grow.
    Soak,
    /// A million pending jobs: claim latency against a near-empty queue, then drain them all.
    DbStress,
    /// Everything through a proxy adding latency each way.
    NetworkLatency,
}

impl Scenario {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::MultiWorker => "multi-worker",
            Scenario::RetryStorm => "retry-storm",
            Scenario::EnqueueRate => "enqueue-rate",
            Scenario::LongRunning => "long-running",
            Scenario::WorkerChurn => "worker-churn",
            Scenario::CrashRecovery => "crash-recovery",
            Scenario::Soak => "soak",
            Scenario::DbStress => "db-stress",
            Scenario::NetworkLatency => "network-latency",
        }
    }
}

/// Which wire protocol the harness speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolChoice {
    /// Gantry's own when the server has it (`gantry.jobs.v1.Jobs`), else Reseolio's contract.
    Auto,
    /// Reseolio's contract, as its SDKs speak it: unary enqueues and acks.
    Reseolio,
    /// Gantry's own, as its Rust SDK speaks it: batched enqueues, the `Work` stream.
    Gantry,
}

/// `gantry bench jobs`: its flags. Sizes left unset take the scenario's defaults (each scenario
/// but `soak` and `db-stress` finishes in about a minute or less against gantry).
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Exit codes: 0 every criterion passed, 1 a criterion failed or the run \
failed, 2 usage.\n\nExamples:\n  gantry bench jobs throughput --target 127.0.0.1:50051\n  \
gantry bench jobs multi-worker --spawn gantry\n  gantry bench jobs crash-recovery --spawn \
reseolio --server-bin node_modules/reseolio/vendor/reseolio-linux-x64"
)]
pub struct JobsBench {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// A running server speaking the Reseolio contract (host:port or URL) [default:
    /// 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR", conflicts_with = "spawn")]
    pub target: Option<String>,

    /// Start the server for this run (a free loopback port, a fresh SQLite database in a
    /// temporary directory). crash-recovery always starts its own (gantry by default).
    #[arg(long, value_enum, value_name = "KIND")]
    pub spawn: Option<ServerKind>,

    /// The binary for --spawn [default for gantry: this executable; required for reseolio, e.g.
    /// node_modules/reseolio/vendor/reseolio-linux-x64].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,

    /// An environment variable for the spawned server (repeatable), e.g.
    /// GANTRY_JOBS_SYNC=normal.
    #[arg(long = "server-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub server_env: Vec<(String, String)>,

    /// The pid of the --target server, to report its peak RSS (and memory growth in soak).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Jobs to enqueue (rate-driven scenarios: rate × duration).
    #[arg(long, value_name = "N")]
    pub jobs: Option<u64>,

    /// Harness workers (one PollJobs stream each).
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,

    /// The wire protocol: each server is best measured the way its own SDK talks to it.
    #[arg(long, value_enum, default_value = "auto")]
    pub protocol: ProtocolChoice,

    /// Jobs per `EnqueueBatch` call in closed-loop scenarios (Gantry's protocol).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub enqueue_batch: u32,

    /// Jobs each worker runs at once.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u32>,

    /// Concurrent enqueue calls (closed loop) or enqueuing connections (rate-driven).
    #[arg(long, value_name = "N")]
    pub clients: Option<u32>,

    /// How long rate-driven scenarios offer load (enqueue-rate, long-running, soak,
    /// network-latency).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Offered enqueue rate, jobs per second (rate-driven scenarios and crash-recovery).
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,

    /// How long one job's handler works, where handlers work (long-running's long jobs,
    /// worker-churn, crash-recovery).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub job_time: Option<Duration>,

    /// The per-attempt timeout jobs are enqueued with (crash-recovery: how soon a server may
    /// recover attempts that were running when it died).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub job_timeout: Option<Duration>,

    /// network-latency: delay the proxy adds to each chunk, each way.
    #[arg(long, value_name = "DURATION", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,

    /// crash-recovery: share of the jobs finished before the (first) kill.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.3)]
    pub kill_at: f64,

    /// crash-recovery: how many times the server is killed (evenly spread up to --kill-at ×
    /// kills, capped at 90 %).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub kills: u32,

    /// crash-recovery: how long the server stays down.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub downtime: Duration,

    /// Stop waiting when no job has finished for this long (what is unfinished then is lost).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// How long an ack (or, in crash-recovery, an enqueue) is retried while the server is
    /// unreachable.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub patience: Duration,

    /// Pass bound: end-to-end jobs/s [default: the seed's acceptable 50 for throughput, 200 for
    /// multi-worker; none elsewhere].
    #[arg(long, value_name = "PER_SECOND")]
    pub min_throughput: Option<f64>,

    /// Pass bound: enqueue→start p99 in rate-driven scenarios (the seed's acceptable).
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub max_p99: Duration,

    /// Pass bound: percent of jobs ending as expected (the seed's acceptable).
    #[arg(long, value_name = "PERCENT", default_value_t = 99.9)]
    pub min_success: f64,

    /// Pass bound for soak: server RSS growth, MiB per hour (at least this many MiB for runs
    /// under an hour).
    #[arg(long, value_name = "MIB", default_value_t = 10.0)]
    pub max_rss_growth: f64,

    /// Seed for the harness's random choices (churn timing).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Keep the spawned server's work directory (database and log) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

/// The server a run measures.
pub struct Target {
    /// Where the harness connects.
    pub addr: String,
    /// `gantry (spawned)`, `reseolio (spawned)` or `external`.
    pub label: String,
    /// The server process, when the harness started it.
    pub server: Option<Server>,
    /// Its pid, for memory (spawned, or `--server-pid`).
    pub pid: Option<Arc<AtomicU32>>,
    work_dir: Option<(PathBuf, bool)>,
}

impl Target {
    /// Starts a server of `kind` for this run, waiting until it answers.
    pub async fn spawn(
        kind: ServerKind,
        bin: Option<PathBuf>,
        env: Vec<(String, String)>,
        keep: bool,
    ) -> anyhow::Result<Self> {
        let bin = match (kind, bin) {
            (_, Some(bin)) => bin,
            (ServerKind::Gantry, None) => {
                std::env::current_exe().context("cannot find this executable to spawn gantry")?
            }
            (ServerKind::Reseolio, None) => bail!(
                "--spawn reseolio needs --server-bin PATH (the npm package's \
                 vendor/reseolio-linux-x64)"
            ),
        };
        let dir = process::work_dir(match kind {
            ServerKind::Gantry => "gantry",
            ServerKind::Reseolio => "reseolio",
        })?;
        let addr = process::free_addr()?;
        let mut server = Server::start(Spec {
            kind,
            bin,
            addr,
            db: dir.join("jobs.db"),
            log: dir.join("server.log"),
            env,
        })?;
        let target = addr.to_string();
        server
            .wait_ready(Duration::from_secs(30), || driver::answers(&target))
            .await?;
        let label = match kind {
            ServerKind::Gantry => "gantry (spawned)",
            ServerKind::Reseolio => "reseolio (spawned)",
        };
        Ok(Self {
            addr: target,
            label: label.to_owned(),
            pid: Some(server.pid()),
            server: Some(server),
            work_dir: Some((dir, keep)),
        })
    }

    /// A server someone else runs.
    pub fn external(addr: String, pid: Option<u32>) -> Self {
        Self {
            addr,
            label: "external".to_owned(),
            server: None,
            pid: pid.map(|p| Arc::new(AtomicU32::new(p))),
            work_dir: None,
        }
    }

    /// Peak RSS of a spawned server over all its processes (0 when unknown).
    pub fn spawned_peak_rss(&self) -> u64 {
        self.server.as_ref().map_or(0, Server::peak_rss)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
        }
        if let Some((dir, false)) = &self.work_dir {
            let _ = std::fs::remove_dir_all(dir);
        } else if let Some((dir, true)) = &self.work_dir {
            eprintln!("gantry bench: kept {}", dir.display());
        }
    }
}

/// Runs `gantry bench jobs`; returns the exit code (0 pass, 1 fail).
pub async fn run(args: JobsBench) -> anyhow::Result<u8> {
    let spawn = match (args.scenario, args.spawn) {
        (Scenario::CrashRecovery, None) => {
            if args.target.is_some() {
                bail!(
                    "crash-recovery kills and restarts the server, so it starts its own: use --spawn gantry|reseolio instead of --target"
                );
            }
            Some(ServerKind::Gantry)
        }
        (_, spawn) => spawn,
    };
    let target = match spawn {
        Some(kind) => {
            Target::spawn(
                kind,
                args.server_bin.clone(),
                args.server_env.clone(),
                args.keep,
            )
            .await?
        }
        None => Target::external(
            args.target
                .clone()
                .unwrap_or_else(|| "127.0.0.1:50051".to_owned()),
            args.server_pid,
        ),
    };
    let report = tokio::select! {
        report = scenarios::run(&args, target) => report?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.passed { 0 } else { 1 })
}
