//! `gantry fleet devices add|import|export|list|show|remove`: the device registry;
//! `gantry fleet keys generate` and `gantry fleet artifacts add|list|show|verify`.
//!
//! Exit codes: 0 ok, 1 error (also: an artifact that fails verification), 2 usage or invalid
//! input (a bad import record, filter, field or key file), 4 not found (an unknown device or
//! artifact).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use gantry_fleet::registry::{
    Delivery, Device, Filter, FilterSpec, Format, Health, Registry, RegistryError, format_time,
    now_ms,
};

mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const NOT_FOUND: u8 = 4;
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// The device registry.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Artifacts: files registered under a version, hashed and signed.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Rollouts: an artifact to the devices matching a filter, in waves.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Pushes an artifact to one device (HTTP, or SSH for `ssh` devices), retrying transient
    /// failures, then waits for the device to report the new version (and, over HTTP, health);
    /// records the result in the registry.
    Push(PushArgs),
    /// Serves the REST JSON API (devices, artifacts, rollouts, and a server-sent-events
    /// stream of each rollout's trail) until SIGINT or SIGTERM; runs the rollouts started
    /// through it and continues, at start, those left running.
    Serve(ServeArgs),
    /// Runs N simulated devices, each on its own loopback address (127.1.0.1 onwards) and the
    /// same port, until SIGINT or SIGTERM; writes a registry import file for them.
    Simulate(SimulateArgs),
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Creates a rollout: its targets are the devices matching the filters now, in id order.
    Create {
        #[command(flatten)]
        db: Db,
        /// The artifact version to install.
        #[arg(long)]
        artifact: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// The canary wave: a count (5) or a percentage (10%).
        #[arg(long, default_value = "1")]
        canary: String,
        /// Devices per wave after the canary.
        #[arg(long, default_value_t = 10, conflicts_with = "growth")]
        batch: u32,
        /// Instead of fixed batches, each wave this factor (> 1) times the previous.
        #[arg(long)]
        growth: Option<f64>,
        /// Abort when a wave's failures exceed this percentage.
        #[arg(long, default_value_t = 10.0)]
        threshold: f64,
        /// Pushes in flight at once.
        #[arg(long, default_value_t = 50)]
        concurrency: u32,
        /// Push attempts per device (transient failures).
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// First delay between attempts (doubling, jittered).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1s")]
        retry_delay: std::time::Duration,
        /// Timeout of each request.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
        timeout: std::time::Duration,
        /// How long a device has to report the new version and health.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
        gate_timeout: std::time::Duration,
        /// Start no push before this time (RFC 3339, e.g. 2026-11-23T02:00:00Z).
        #[arg(long, value_name = "TIME")]
        start_at: Option<String>,
        /// Push only inside maintenance windows opening at these cron ticks, e.g. "0 2 * * *".
        #[arg(long, value_name = "CRON", requires = "window_duration")]
        window: Option<String>,
        /// How long each maintenance window stays open, e.g. 3h.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "window")]
        window_duration: Option<std::time::Duration>,
        /// The IANA time zone the window's cron is read in [default: UTC].
        #[arg(long, value_name = "ZONE", default_value = "", requires = "window")]
        window_tz: String,
        #[command(flatten)]
        ssh: SshArgs,
        /// Also take in devices that match the filter later (registered or changed after
        /// creation), as a wave of their own, until `rollout close`.
        #[arg(long)]
        dynamic: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Runs (or continues, after a stop or a crash) a rollout in the foreground until it
    /// completes, aborts, or is paused.
    Start {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
        /// Print the final state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stops new pushes (in-flight ones finish).
    Pause {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
    },
    /// Lets a paused rollout go on (its runner, or the next `start`, applies it).
    Resume {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
    },
    /// Stops a rollout for good.
    Abort {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
    },
    /// A dynamic rollout takes in no more devices: it completes once its waves have ended.
    Close {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
    },
    /// One rollout: phase, wave settings, device counts.
    Status {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every rollout, newest first.
    List {
        #[command(flatten)]
        db: Db,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A rollout's audit trail.
    Events {
        #[command(flatten)]
        db: Db,
        /// The rollout id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_rollout(r: &gantry_fleet::orchestrator::RolloutInfo) {
    let d = r.devices;
    println!(
        "{}  {}  artifact {}  {} devices: {} succeeded, {} failed, {} rejected, {} in flight, {} pending{}",
        r.id,
        r.phase,
        r.artifact,
        r.targets,
        d.succeeded,
        d.failed,
        d.rejected,
        d.in_flight,
        d.pending,
        r.requested
            .as_deref()
            .map(|q| format!(" ({q} requested)"))
            .unwrap_or_default()
    );
}

/// A running rollout's progress on stderr: a bar on a terminal, a line a second otherwise,
/// nothing with `--json`.
enum Progress {
    Quiet,
    Bar(indicatif::ProgressBar),
    Lines(Option<std::time::Instant>),
}

impl Progress {
    fn new(json: bool) -> Self {
        use std::io::IsTerminal as _;
        if json {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Progress::Bar(bar)
        } else {
            Progress::Lines(None)
        }
    }

    fn show(&mut self, info: &gantry_fleet::orchestrator::RolloutInfo) {
        let d = info.devices;
        let ended = d.succeeded + d.failed + d.rejected;
        let counts = format!(
            "{} succeeded, {} failed, {} rejected",
            d.succeeded, d.failed, d.rejected
        );
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => {
                bar.set_prefix(info.id.clone());
                bar.set_length(info.targets);
                bar.set_position(ended);
                bar.set_message(counts);
            }
            Progress::Lines(last) => {
                let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
                if due || ended == info.targets {
                    *last = Some(std::time::Instant::now());
                    eprintln!("{}: {ended}/{} done ({counts})", info.id, info.targets);
                }
            }
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// `gantry fleet rollout …`; returns the exit code.
pub async fn rollout(command: RolloutCommand) -> u8 {
    exit_code(rollout_inner(command).await)
}

async fn rollout_inner(command: RolloutCommand) -> Result<u8, Failure> {
    use gantry_fleet::orchestrator::{RolloutSpec, Rollouts};
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let not_found = |e: RegistryError| -> Failure {
        match &e {
            RegistryError::Invalid(m) if m.starts_with("no rollout") => {
                failure(exit::NOT_FOUND, m.clone())
            }
            _ => e.into(),
        }
    };
    match command {
        RolloutCommand::Create {
            db,
            artifact,
            filter: f,
            canary,
            batch,
            growth,
            threshold,
            concurrency,
            attempts,
            retry_delay,
            timeout,
            gate_timeout,
            start_at,
            window,
            window_duration,
            window_tz,
            ssh,
            dynamic,
            json,
        } => {
            let ssh = ssh.spec();
            let start_at_ms = start_at
                .map(|t| {
                    gantry_fleet::registry::parse_time(&t)
                        .map_err(|e| failure(exit::INVALID, format!("--start-at: {e}")))
                })
                .transpose()?;
            let window = match (window, window_duration) {
                (Some(cron), Some(d)) => Some(gantry_fleet::window::WindowSpec {
                    cron,
                    duration_ms: millis(d),
                    timezone: window_tz,
                }),
                _ => None,
            };
            let (canary, canary_percent) = match canary.strip_suffix('%') {
                Some(p) => (p, true),
                None => (canary.as_str(), false),
            };
            let canary: u32 = canary.trim().parse().map_err(|_| {
                failure(
                    exit::INVALID,
                    format!("--canary {canary:?} is not a count or a percentage"),
                )
            })?;
            let spec = RolloutSpec {
                canary,
                canary_percent,
                batch,
                growth: growth.unwrap_or(0.0),
                threshold_percent: threshold,
                concurrency,
                attempts,
                retry_delay_ms: millis(retry_delay),
                timeout_ms: millis(timeout),
                gate_timeout_ms: millis(gate_timeout),
                start_at_ms,
                window,
                ssh,
                filter: filter_spec(f),
                dynamic,
            };
            let info = Rollouts::open(&db.db)?.create(&artifact, spec)?;
            if json {
                json_line(&info)?;
            } else {
                println!(
                    "created rollout {} of {} to {} devices",
                    info.id, info.artifact, info.targets
                );
            }
        }
        RolloutCommand::Start { db, id, json } => {
            let mut rollouts = Rollouts::open(&db.db)?;
            let mut progress = Progress::new(json);
            let info = rollouts
                .run(&id, |info| progress.show(info))
                .await
                .map_err(not_found)?;
            progress.finish();
            if json {
                json_line(&info)?;
            } else {
                print_rollout(&info);
            }
            return Ok(if info.phase == "aborted" {
                exit::ERROR
            } else {
                exit::OK
            });
        }
        RolloutCommand::Pause { db, id } => {
            Rollouts::open(&db.db)?
                .request(&id, "pause")
                .map_err(not_found)?;
            println!("pause requested for {id}");
        }
        RolloutCommand::Resume { db, id } => {
            Rollouts::open(&db.db)?
                .request(&id, "resume")
                .map_err(not_found)?;
            println!("resume requested for {id}");
        }
        RolloutCommand::Abort { db, id } => {
            Rollouts::open(&db.db)?
                .request(&id, "abort")
                .map_err(not_found)?;
            println!("abort requested for {id}");
        }
        RolloutCommand::Close { db, id } => {
            Rollouts::open(&db.db)?
                .request(&id, "close")
                .map_err(not_found)?;
            println!("close requested for {id}");
        }
        RolloutCommand::Status { db, id, json } => {
            let info = Rollouts::open(&db.db)?
                .info(&id)?
                .ok_or_else(|| failure(exit::NOT_FOUND, format!("no rollout {id}")))?;
            if json {
                json_line(&info)?;
            } else {
                print_rollout(&info);
            }
        }
        RolloutCommand::List { db, json } => {
            let all = Rollouts::open(&db.db)?.list()?;
            if json {
                json_line(&all)?;
            } else {
                for r in &all {
                    print_rollout(r);
                }
            }
        }
        RolloutCommand::Events { db, id, json } => {
            let rollouts = Rollouts::open(&db.db)?;
            if rollouts.info(&id)?.is_none() {
                return Err(failure(exit::NOT_FOUND, format!("no rollout {id}")));
            }
            let events = rollouts.events(&id)?;
            if json {
                json_line(&events)?;
            } else {
                for e in &events {
                    println!(
                        "{:>5} {} {} {}{}",
                        e.seq,
                        format_time(e.at_ms),
                        serde_json::to_string(&e.change).unwrap_or_default(),
                        e.device.as_deref().unwrap_or(""),
                        e.detail
                            .as_deref()
                            .map(|d| format!(" {d}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(exit::OK)
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    db: Db,
    /// The device id.
    #[arg(long)]
    device: String,
    /// The artifact's version.
    #[arg(long)]
    artifact: String,
    /// Push attempts (transient failures: connection errors, timeouts, 5xx, 429).
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// First delay between attempts (doubling, jittered).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "1s")]
    retry_delay: std::time::Duration,
    /// Timeout of each request.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: std::time::Duration,
    /// How long the device has to report the new version and health.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    gate_timeout: std::time::Duration,
    #[command(flatten)]
    ssh: SshArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// How `ssh` devices are reached (`push` and `rollout create`).
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// SSH devices: the private key to log in with.
    #[arg(long, value_name = "FILE", requires_all = ["known_hosts", "install_command"])]
    ssh_identity: Option<PathBuf>,
    /// SSH devices: the known_hosts file their host keys must be in (unknown keys are refused).
    #[arg(long, value_name = "FILE", requires = "ssh_identity")]
    known_hosts: Option<PathBuf>,
    /// SSH devices: run after the copy; {path}, {version}, {sha256}, {signature} and {device}
    /// are replaced (shell-quoted).
    #[arg(long, value_name = "COMMAND", requires = "ssh_identity")]
    install_command: Option<String>,
    /// SSH devices: prints the version the device runs (the health gate, and the check after
    /// a crash); none: no gate.
    #[arg(long, value_name = "COMMAND", requires = "ssh_identity")]
    version_command: Option<String>,
    /// SSH devices: where the artifact is copied.
    #[arg(long, value_name = "DIR", default_value = "/tmp")]
    remote_dir: String,
}

impl SshArgs {
    /// The settings, when they were given (clap makes the three required ones go together).
    fn spec(&self) -> Option<gantry_fleet::ssh::SshSpec> {
        Some(gantry_fleet::ssh::SshSpec {
            identity: self.ssh_identity.clone()?,
            known_hosts: self.known_hosts.clone()?,
            install_command: self.install_command.clone()?,
            version_command: self.version_command.clone(),
            remote_dir: self.remote_dir.clone(),
        })
    }
}

/// `gantry fleet push`; returns the exit code.
pub async fn push(args: PushArgs) -> u8 {
    exit_code(push_inner(args).await.map(|()| exit::OK))
}

async fn push_inner(args: PushArgs) -> Result<(), Failure> {
    use gantry_fleet::delivery::{self, Outcome, PushOptions};
    let (device, artifact) = {
        let registry = open(&args.db)?;
        let device = registry
            .get(&args.device)?
            .ok_or_else(|| failure(exit::NOT_FOUND, format!("no device {}", args.device)))?;
        let artifact = registry
            .artifact(&args.artifact)?
            .ok_or_else(|| failure(exit::NOT_FOUND, format!("no artifact {}", args.artifact)))?;
        (device, artifact)
    };
    let retry = gantry_runtime::retry::RetryPolicy::builder()
        .max_attempts(args.attempts.max(1))
        .initial_delay(args.retry_delay)
        .build()
        .map_err(|e| failure(exit::INVALID, e.to_string()))?;
    let options = PushOptions {
        request_timeout: args.timeout,
        retry,
        gate_timeout: args.gate_timeout,
        ..PushOptions::default()
    };
    let outcome = if device.delivery == Delivery::Ssh {
        let Some(ssh) = args.ssh.spec() else {
            return Err(failure(
                exit::INVALID,
                format!(
                    "device {} is delivered over ssh: --ssh-identity, --known-hosts and \
                     --install-command are required",
                    device.id
                ),
            ));
        };
        let options = ssh.options(&options);
        gantry_fleet::ssh::push(&device.id, &device.address, &artifact, &options).await
    } else {
        let client = delivery::client(&options).map_err(|e| failure(exit::ERROR, e))?;
        delivery::push(&client, &device.id, &device.address, &artifact, &options).await
    };
    let now = now_ms();
    let seen = match &outcome {
        Outcome::Delivered { .. } => Some((Some(artifact.version.as_str()), Health::Healthy)),
        Outcome::Unhealthy { .. } => Some((None, Health::Unhealthy)),
        // It answered, so it was seen; its version and health are unchanged.
        Outcome::Rejected { .. } => Some((None, device.health)),
        Outcome::Failed { .. } => None,
    };
    if let Some((version, health)) = seen {
        open(&args.db)?.record_seen(&device.id, version, health, now)?;
    }
    if args.json {
        json_line(&outcome)?;
    } else {
        match &outcome {
            Outcome::Delivered {
                attempts,
                push_ms,
                verify_ms,
            } => println!(
                "delivered {} to {} in {attempts} attempt(s): push {push_ms} ms, health gate {verify_ms} ms",
                artifact.version, device.id
            ),
            other => println!("{}: {other:?}", device.id),
        }
    }
    match outcome {
        Outcome::Delivered { .. } => Ok(()),
        Outcome::Rejected { status, error, .. } => Err(failure(
            exit::ERROR,
            format!(
                "device {} refused the update ({status}): {error}",
                device.id
            ),
        )),
        Outcome::Failed { attempts, error } => Err(failure(
            exit::ERROR,
            format!(
                "device {}: {attempts} attempt(s) failed; last: {error}",
                device.id
            ),
        )),
        Outcome::Unhealthy { reason, .. } => Err(failure(
            exit::ERROR,
            format!(
                "device {} took the update but failed the health gate: {reason}",
                device.id
            ),
        )),
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// How many devices.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// The port each device listens on.
    #[arg(long, default_value_t = 18080)]
    port: u16,
    /// The version every device starts at.
    #[arg(long, default_value = "1.0.0")]
    initial_version: String,
    /// The fleet's public key: devices refuse artifacts whose signature does not verify.
    #[arg(long, value_name = "PUB")]
    public_key: Option<PathBuf>,
    /// Share of update requests answered 500 (0..1).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Delay before every answer, e.g. 20ms.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "0s")]
    latency: std::time::Duration,
    /// Share of devices answering 503 to their first two update attempts.
    #[arg(long, default_value_t = 0.0)]
    flaky: f64,
    /// Share of devices that never listen.
    #[arg(long, default_value_t = 0.0)]
    dead: f64,
    /// Share of devices refusing every update (409).
    #[arg(long, default_value_t = 0.0)]
    reject: f64,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the registry import file (CSV) for these devices.
    #[arg(long, value_name = "FILE", default_value = "gantry-fleet-sim.csv")]
    registry_file: PathBuf,
}

/// `gantry fleet simulate`: runs until a signal; returns the exit code.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    db: Db,
    /// Where the API listens.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8480")]
    listen: std::net::SocketAddr,
    /// Signs artifacts uploaded through the API (`POST /v1/artifacts`); without it uploads
    /// are refused.
    #[arg(long, value_name = "FILE")]
    signing_key: Option<PathBuf>,
    /// Serve /health, /ready and /metrics (`gantry_fleet_*`) here.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

/// `gantry fleet serve`; returns the exit code.
pub async fn serve(args: ServeArgs) -> u8 {
    exit_code(serve_inner(args).await.map(|()| exit::OK))
}

async fn serve_inner(args: ServeArgs) -> Result<(), Failure> {
    use gantry_fleet::api::{ApiState, serve as serve_api};
    let err = |what: &str, e: &dyn std::fmt::Display| failure(exit::ERROR, format!("{what}: {e}"));
    // Fail fast on a database that cannot be opened.
    drop(open(&args.db)?);
    if let Some(key) = &args.signing_key {
        gantry_fleet::artifact::read_signing_key(key)
            .map_err(|e| failure(exit::INVALID, e.to_string()))?;
    }
    let telemetry =
        gantry_runtime::telemetry::Metrics::new(crate::BUILD).map_err(|e| err("metrics", &e))?;
    let metrics = std::sync::Arc::new(
        gantry_fleet::metrics::FleetMetrics::register(telemetry.registry())
            .map_err(|e| err("metrics", &e))?,
    );
    let state = std::sync::Arc::new(ApiState::new(
        args.db.db.clone(),
        args.signing_key.clone(),
        Some(metrics),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| err(&format!("cannot bind {}", args.listen), &e))?;
    let bound = listener.local_addr().map_err(|e| err("listener", &e))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let admin = match args.admin {
        None => None,
        Some(addr) => {
            let admin_listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| err(&format!("cannot bind the admin server to {addr}"), &e))?;
            let admin_bound = admin_listener.local_addr().map_err(|e| err("admin", &e))?;
            let readiness = gantry_runtime::admin::Readiness::default();
            readiness.register("fleet").set_ready();
            println!("admin listening on {admin_bound}");
            Some(tokio::spawn(gantry_runtime::admin::serve(
                admin_listener,
                gantry_runtime::admin::AdminState {
                    metrics: telemetry,
                    readiness,
                },
                stop.clone(),
            )))
        }
    };
    println!("fleet API listening on {bound}");
    match state.resume_running().await {
        Ok(ids) => {
            for id in ids {
                println!("continuing rollout {id}");
            }
        }
        Err(e) => tracing::warn!(error = ?e, "cannot list rollouts to continue"),
    }
    let gauges = {
        let state = std::sync::Arc::clone(&state);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = state.refresh_metrics().await {
                    tracing::warn!(error = ?e, "cannot refresh the registry gauges");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        })
    };
    let signals = crate::cancel_on_signal(stop.clone());
    let served = serve_api(listener, std::sync::Arc::clone(&state), stop.clone()).await;
    stop.cancel();
    // Running rollouts stop where they are; their trail says where, and a restart continues.
    state.stop_all();
    let _ = gauges.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    signals.abort();
    served.map_err(|e| err("API server", &e))
}

pub async fn simulate(args: SimulateArgs) -> u8 {
    exit_code(simulate_inner(args).await.map(|()| exit::OK))
}

async fn simulate_inner(args: SimulateArgs) -> Result<(), Failure> {
    use gantry_fleet::simulator::{SimSpec, Simulation, raise_fd_limit};
    let shares = [
        ("--fail-rate", args.fail_rate),
        ("--flaky", args.flaky),
        ("--dead", args.dead),
        ("--reject", args.reject),
    ];
    if let Some((flag, v)) = shares.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
        return Err(failure(
            exit::INVALID,
            format!("{flag} {v} is not between 0 and 1"),
        ));
    }
    if args.flaky + args.dead + args.reject > 1.0 {
        return Err(failure(
            exit::INVALID,
            "--flaky, --dead and --reject add up to more than all devices",
        ));
    }
    let public_key = args
        .public_key
        .as_deref()
        .map(gantry_fleet::artifact::read_verifying_key)
        .transpose()
        .map_err(|e| failure(exit::INVALID, e.to_string()))?;
    // Every connection is a file; the devices themselves share one socket.
    raise_fd_limit();
    let sim = Simulation::start(SimSpec {
        devices: args.devices,
        port: args.port,
        initial_version: args.initial_version,
        public_key,
        fail_rate: args.fail_rate,
        latency: args.latency,
        flaky: args.flaky,
        dead: args.dead,
        reject: args.reject,
        seed: args.seed,
    })
    .await
    .map_err(|e| failure(exit::ERROR, e.to_string()))?;
    std::fs::write(&args.registry_file, sim.registry_csv()).map_err(|e| {
        failure(
            exit::ERROR,
            format!("cannot write {}: {e}", args.registry_file.display()),
        )
    })?;
    let stats = sim.stats();
    println!(
        "simulating {} devices ({} listening, {} dead) on port {} from {}; registry file {}",
        args.devices,
        stats.listening,
        stats.dead,
        args.port,
        gantry_fleet::simulator::device_ip(0),
        args.registry_file.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| failure(exit::ERROR, e.to_string()))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let applied = sim.stats().applied;
    sim.stop().await;
    println!("stopped; {applied} update(s) applied");
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Writes a new Ed25519 key pair: DIR/NAME.key (secret, mode 0600) and DIR/NAME.pub; never
    /// overwrites.
    Generate {
        /// Where to write them.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
        /// The file name stem.
        #[arg(long, default_value = "fleet-signing")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Registers FILE as VERSION: copies it beside the registry, computes its SHA-256 and signs
    /// the digest with the secret key.
    Add {
        #[command(flatten)]
        db: Db,
        /// The version it installs (letters, digits, `. _ + -`).
        #[arg(long)]
        version: String,
        /// The file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// The secret key file (from `gantry fleet keys generate`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists artifacts, newest first.
    List {
        #[command(flatten)]
        db: Db,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows one artifact.
    Show {
        #[command(flatten)]
        db: Db,
        /// Its version.
        version: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-hashes the registry's copy and checks the signature with a public key, as a device
    /// does; exits 1 when either does not match.
    Verify {
        #[command(flatten)]
        db: Db,
        /// Its version.
        version: String,
        /// The public key file.
        #[arg(long, value_name = "PUB")]
        public_key: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct Db {
    /// The registry database (SQLite; created if missing).
    #[arg(long, value_name = "PATH", default_value = "gantry-fleet.db")]
    db: PathBuf,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Has this tag (repeatable: all of them).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// In this group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// At this location.
    #[arg(long, value_name = "LOCATION")]
    location: Option<String>,
    /// Runs a version matching this semver requirement, e.g. ">=1.2, <2".
    #[arg(long, value_name = "REQ")]
    version: Option<String>,
    /// Seen within this long, e.g. 1h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    seen_within: Option<std::time::Duration>,
    /// Not seen for this long (or never).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    unseen_for: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Registers one device (its id must be new).
    Add {
        #[command(flatten)]
        db: Db,
        /// Unique id.
        #[arg(long)]
        id: String,
        /// Where it is reached: host:port (http) or [user@]host[:port] (ssh).
        #[arg(long)]
        address: String,
        /// A human name [default: the id].
        #[arg(long)]
        name: Option<String>,
        /// http or ssh.
        #[arg(long, default_value = "http")]
        delivery: String,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Its group.
        #[arg(long)]
        group: Option<String>,
        /// Its location.
        #[arg(long)]
        location: Option<String>,
        /// The version it runs.
        #[arg(long)]
        version: Option<String>,
        /// Print the device as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Imports devices from a CSV or JSON file in one transaction: all, or none when a record is
    /// bad (its line is named). Existing ids are replaced.
    Import {
        #[command(flatten)]
        db: Db,
        /// The file (`-` for standard input).
        file: PathBuf,
        /// csv or json [default: by the file's extension, csv otherwise].
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Writes the devices matching the filters to standard output (the import formats).
    Export {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        filter: FilterArgs,
        /// csv or json.
        #[arg(long, value_name = "FORMAT", default_value = "csv")]
        format: String,
    },
    /// Lists devices matching the filters, in id order.
    List {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Skip this many.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shows one device.
    Show {
        #[command(flatten)]
        db: Db,
        /// The device id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Removes one device.
    Remove {
        #[command(flatten)]
        db: Db,
        /// The device id.
        id: String,
    },
}

struct Failure {
    code: u8,
    message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        let code = match e {
            RegistryError::Invalid(_) | RegistryError::Exists(_) => exit::INVALID,
            RegistryError::Database(_) | RegistryError::Io(_) | RegistryError::Busy(_) => {
                exit::ERROR
            }
        };
        failure(code, e.to_string())
    }
}

/// Runs a fleet command; returns the exit code.
pub fn run(command: FleetCommand) -> u8 {
    let result = match command {
        FleetCommand::Devices(command) => devices(command),
        FleetCommand::Keys(command) => keys(command),
        FleetCommand::Artifacts(command) => artifacts(command),
        // Routed to `simulate` by the caller, which owns the runtime.
        FleetCommand::Simulate(_)
        | FleetCommand::Push(_)
        | FleetCommand::Rollout(_)
        | FleetCommand::Serve(_) => Err(failure(exit::ERROR, "this command needs the runtime")),
    };
    exit_code(result.map(|()| exit::OK))
}

/// The exit code of a command's result, its failure reported on stderr.
fn exit_code(result: Result<u8, Failure>) -> u8 {
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("gantry fleet: {}", f.message);
            f.code
        }
    }
}

fn open(db: &Db) -> Result<Registry, Failure> {
    Ok(Registry::open(&db.db)?)
}

fn format_arg(s: &str) -> Result<Format, Failure> {
    match s {
        "csv" => Ok(Format::Csv),
        "json" => Ok(Format::Json),
        other => Err(failure(
            exit::INVALID,
            format!("format {other:?} is not csv or json"),
        )),
    }
}

fn filter_spec(args: FilterArgs) -> FilterSpec {
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    FilterSpec {
        tags: args.tags,
        group: args.group,
        location: args.location,
        version: args.version,
        seen_within_ms: args.seen_within.map(millis),
        unseen_for_ms: args.unseen_for.map(millis),
    }
}

fn filter(args: FilterArgs) -> Result<Filter, Failure> {
    filter_spec(args)
        .at(now_ms())
        .map_err(|e| failure(exit::INVALID, e.to_string()))
}

fn print_device(d: &Device) {
    println!("id:        {}", d.id);
    println!("name:      {}", d.name);
    println!("address:   {} ({})", d.address, d.delivery.as_str());
    println!("tags:      {}", d.tags.join(", "));
    println!("group:     {}", d.group.as_deref().unwrap_or("-"));
    println!("location:  {}", d.location.as_deref().unwrap_or("-"));
    println!("version:   {}", d.version.as_deref().unwrap_or("-"));
    println!(
        "last seen: {}",
        d.last_seen
            .map(format_time)
            .unwrap_or_else(|| "never".into())
    );
    println!("health:    {}", d.health.as_str());
}

fn json_line(v: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string(v).map_err(|e| failure(exit::ERROR, e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn artifact_failure(e: gantry_fleet::artifact::ArtifactError) -> Failure {
    use gantry_fleet::artifact::ArtifactError;
    let code = match e {
        ArtifactError::BadKey(_) => exit::INVALID,
        ArtifactError::Io(_) | ArtifactError::Mismatch(_) => exit::ERROR,
    };
    failure(code, e.to_string())
}

fn keys(command: KeysCommand) -> Result<(), Failure> {
    let KeysCommand::Generate { out_dir, name } = command;
    let (secret, public) =
        gantry_fleet::artifact::generate_keys(&out_dir, &name).map_err(artifact_failure)?;
    println!(
        "wrote {} (secret: keep it safe) and {} (give it to devices)",
        secret.display(),
        public.display()
    );
    Ok(())
}

fn print_artifact(a: &gantry_fleet::registry::Artifact) {
    println!("version:    {}", a.version);
    println!("file:       {}", a.path.display());
    println!("size:       {} bytes", a.size);
    println!("sha256:     {}", a.sha256);
    println!("signature:  {}", a.signature);
    println!("public key: {}", a.public_key);
    println!("registered: {}", format_time(a.created_ms));
}

fn artifacts(command: ArtifactsCommand) -> Result<(), Failure> {
    use gantry_fleet::artifact;
    match command {
        ArtifactsCommand::Add {
            db,
            version,
            file,
            key,
            json,
        } => {
            // An unreadable or malformed key file is bad input either way.
            let key = artifact::read_signing_key(&key)
                .map_err(|e| failure(exit::INVALID, e.to_string()))?;
            let a = open(&db)?.add_artifact(&version, &file, &key)?;
            if json {
                json_line(&a)?;
            } else {
                print_artifact(&a);
            }
        }
        ArtifactsCommand::List { db, json } => {
            let all = open(&db)?.artifacts()?;
            if json {
                json_line(&all)?;
            } else {
                println!("{:<16} {:>12} {:<64}", "VERSION", "BYTES", "SHA256");
                for a in &all {
                    println!("{:<16} {:>12} {:<64}", a.version, a.size, a.sha256);
                }
            }
        }
        ArtifactsCommand::Show { db, version, json } => {
            let a = open(&db)?
                .artifact(&version)?
                .ok_or_else(|| failure(exit::NOT_FOUND, format!("no artifact {version}")))?;
            if json {
                json_line(&a)?;
            } else {
                print_artifact(&a);
            }
        }
        ArtifactsCommand::Verify {
            db,
            version,
            public_key,
        } => {
            let key = artifact::read_verifying_key(&public_key)
                .map_err(|e| failure(exit::INVALID, e.to_string()))?;
            let a = open(&db)?
                .artifact(&version)?
                .ok_or_else(|| failure(exit::NOT_FOUND, format!("no artifact {version}")))?;
            let actual = artifact::sha256_file(&a.path).map_err(artifact_failure)?;
            if actual != a.sha256 {
                return Err(failure(
                    exit::ERROR,
                    format!(
                        "artifact {version}: {} has SHA-256 {actual}, registered {}",
                        a.path.display(),
                        a.sha256
                    ),
                ));
            }
            artifact::verify(&a.sha256, &a.signature, &key)
                .map_err(|e| failure(exit::ERROR, format!("artifact {version}: {e}")))?;
            println!("artifact {version}: SHA-256 and signature verify");
        }
    }
    Ok(())
}

fn devices(command: DevicesCommand) -> Result<(), Failure> {
    match command {
        DevicesCommand::Add {
            db,
            id,
            address,
            name,
            delivery,
            tags,
            group,
            location,
            version,
            json,
        } => {
            let delivery: Delivery = delivery
                .parse()
                .map_err(|e: String| failure(exit::INVALID, e))?;
            let device = Device {
                name: name.unwrap_or_else(|| id.clone()),
                id,
                address,
                delivery,
                tags,
                group,
                location,
                version,
                last_seen: None,
                health: Health::Unknown,
            };
            open(&db)?.add(&device)?;
            if json {
                json_line(&device)?;
            } else {
                println!("added device {}", device.id);
            }
        }
        DevicesCommand::Import {
            db,
            file,
            format,
            json,
        } => {
            let format = match format {
                Some(f) => format_arg(&f)?,
                None => Format::of_path(&file),
            };
            let mut registry = open(&db)?;
            let started = std::time::Instant::now();
            let n = if file == Path::new("-") {
                registry.import(std::io::stdin().lock(), format)?
            } else {
                let f = std::fs::File::open(&file).map_err(|e| {
                    failure(
                        exit::INVALID,
                        format!("cannot open {}: {e}", file.display()),
                    )
                })?;
                registry.import(std::io::BufReader::new(f), format)?
            };
            let secs = started.elapsed().as_secs_f64();
            if json {
                json_line(&serde_json::json!({ "imported": n, "seconds": secs }))?;
            } else {
                println!("imported {n} devices in {secs:.2} s");
            }
        }
        DevicesCommand::Export {
            db,
            filter: f,
            format,
        } => {
            let format = format_arg(&format)?;
            let f = filter(f)?;
            open(&db)?.export(&f, format, std::io::stdout().lock())?;
        }
        DevicesCommand::List {
            db,
            filter: f,
            limit,
            offset,
            json,
        } => {
            let f = filter(f)?;
            let (page, total) = open(&db)?.list(&f, offset, limit)?;
            if json {
                json_line(&serde_json::json!({ "devices": page, "total": total }))?;
            } else {
                println!(
                    "{:<20} {:<22} {:<6} {:<12} {:<12} {:<10} {:<9}",
                    "ID", "ADDRESS", "VIA", "GROUP", "LOCATION", "VERSION", "HEALTH"
                );
                for d in &page {
                    println!(
                        "{:<20} {:<22} {:<6} {:<12} {:<12} {:<10} {:<9}",
                        d.id,
                        d.address,
                        d.delivery.as_str(),
                        d.group.as_deref().unwrap_or("-"),
                        d.location.as_deref().unwrap_or("-"),
                        d.version.as_deref().unwrap_or("-"),
                        d.health.as_str()
                    );
                }
                println!("{} of {total} matching device(s)", page.len());
            }
        }
        DevicesCommand::Show { db, id, json } => {
            let device = open(&db)?
                .get(&id)?
                .ok_or_else(|| failure(exit::NOT_FOUND, format!("no device {id}")))?;
            if json {
                json_line(&device)?;
            } else {
                print_device(&device);
            }
        }
        DevicesCommand::Remove { db, id } => {
            if !open(&db)?.remove(&id)? {
                return Err(failure(exit::NOT_FOUND, format!("no device {id}")));
            }
            println!("removed device {id}");
        }
    }
    Ok(())
}
