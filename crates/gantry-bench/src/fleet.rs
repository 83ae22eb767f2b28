//! `gantry bench fleet`: a full rollout to simulated devices over real loopback HTTP, and in the
//! same run a baseline — a minimal client doing the same three requests per device (push,
//! version, health) with the same concurrency and no bookkeeping — so the orchestrator's cost is
//! a ratio to what the machine can do.
//!
//! The simulator runs as its own process (`gantry fleet simulate`, one loopback address per
//! device), so the orchestrator's memory is this process's alone.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use gantry_fleet::orchestrator::{RolloutSpec, Rollouts};
use gantry_fleet::registry::{Format, Registry};
use gantry_fleet::rollout::{Change, DeviceState};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::process::{self, memory, work_dir};
use crate::stats::{Summary, fmt_bytes, fmt_rate, fmt_us};

/// `gantry bench fleet`: its flags.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Exit codes: 0 every criterion passed, 1 a criterion failed or the run \
failed, 2 usage.\n\nExample:\n  gantry bench fleet --devices 10000 --concurrency 200"
)]
pub struct FleetBench {
    /// Simulated devices (each its own loopback address and connection).
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,

    /// Pushes in flight at once (the rollout's and the baseline's).
    #[arg(long, default_value_t = 200)]
    pub concurrency: u32,

    /// Size of the artifact pushed to every device, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub artifact_bytes: usize,

    /// Pass bound: the rollout's devices/s over the baseline's.
    #[arg(long, default_value_t = 0.7)]
    pub min_ratio: f64,

    /// The gantry binary that runs the simulator [default: this executable].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Keep the work directory (registry, keys, simulator file).
    #[arg(long)]
    pub keep: bool,
}

/// The simulator child; killed on drop.
struct Simulator(std::process::Child);

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the benchmark; returns the exit code (0 pass, 1 fail).
pub async fn run(args: FleetBench) -> anyhow::Result<u8> {
    if args.devices == 0 || args.concurrency == 0 {
        bail!("--devices and --concurrency must be at least 1");
    }
    let dir = work_dir("fleet")?;
    let result = measure(&args, &dir).await;
    if args.keep {
        eprintln!("gantry bench: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report["passed"] == true { 0 } else { 1 })
}

async fn measure(args: &FleetBench, dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let n = args.devices;
    // Keys, an artifact, a registry.
    let (secret, public) = gantry_fleet::artifact::generate_keys(dir, "bench")?;
    let key = gantry_fleet::artifact::read_signing_key(&secret)?;
    let file = dir.join("artifact.bin");
    std::fs::write(&file, vec![0x5a; args.artifact_bytes])?;
    let db = dir.join("fleet.db");
    let mut registry = Registry::open(&db)?;
    let artifact = registry.add_artifact("2.0.0", &file, &key)?;

    // The simulated fleet, in its own process.
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find this executable")?,
    };
    let port = process::free_addr()?.port();
    let sim_csv = dir.join("sim.csv");
    let mut child = std::process::Command::new(&bin)
        .args(["fleet", "simulate", "--devices", &n.to_string(), "--port"])
        .arg(port.to_string())
        .arg("--public-key")
        .arg(&public)
        .arg("--registry-file")
        .arg(&sim_csv)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {} fleet simulate", bin.display()))?;
    let stdout = child.stdout.take().context("no simulator stdout")?;
    let sim = Simulator(child);
    let mut first = String::new();
    std::io::BufReader::new(stdout).read_line(&mut first)?;
    if !first.starts_with("simulating") {
        bail!("the simulator did not start: {first}");
    }
    let imported = registry.import(std::fs::File::open(&sim_csv)?, Format::Csv)?;
    drop(registry);

    // The baseline: the same three requests per device, same concurrency, no bookkeeping —
    // once before the rollout and once after.
    let body = Arc::new(bytes_of(&file)?);
    let devices: Vec<(String, String)> = std::fs::read_to_string(&sim_csv)?
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut c = l.split(',');
            Some((c.next()?.to_owned(), c.next()?.to_owned()))
        })
        .collect();
    // One client, as a minimal program would have (the rollout shares one too): its pool
    // keeps one connection per device for that device's three requests.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(Duration::from_secs(1))
        .build()?;
    let cpu = cpu_seconds();
    let (before_ok, before_s) =
        baseline(&client, &devices, &body, &artifact, args.concurrency).await?;
    let before_cpu = cpu_seconds() - cpu;

    // The rollout.
    let spec = RolloutSpec {
        canary: 1,
        canary_percent: true,
        batch: 0,
        growth: 4.0,
        threshold_percent: 100.0,
        concurrency: args.concurrency,
        attempts: 3,
        retry_delay_ms: 100,
        timeout_ms: 10_000,
        gate_timeout_ms: 10_000,
        start_at_ms: None,
        window: None,
        ssh: None,
        filter: Default::default(),
        dynamic: false,
    };
    let mut rollouts = Rollouts::open(&db)?;
    let info = rollouts.create("2.0.0", spec)?;
    let rss_before = memory(std::process::id()).map_or(0, |m| m.rss);
    let started = Instant::now();
    let cpu = cpu_seconds();
    let done = rollouts.run(&info.id, |_| {}).await?;
    let rollout_s = started.elapsed().as_secs_f64();
    let rollout_cpu = cpu_seconds() - cpu;
    let peak_rss = memory(std::process::id()).map_or(0, |m| m.hwm);
    let mut per_device = Vec::new();
    for e in rollouts.events(&info.id)? {
        if let (
            Change::Device {
                state: DeviceState::Succeeded,
                ..
            },
            Some(detail),
        ) = (&e.change, &e.detail)
        {
            let v: serde_json::Value = serde_json::from_str(detail).unwrap_or_default();
            let ms = v["push_ms"].as_u64().unwrap_or(0) + v["verify_ms"].as_u64().unwrap_or(0);
            per_device.push(ms * 1000);
        }
    }
    let latency = Summary::of(per_device);

    // The baseline again, after the rollout: the faster of its two runs is the one compared
    // (noise on a shared machine only ever slows a run down).
    let cpu = cpu_seconds();
    let (after_ok, after_s) =
        baseline(&client, &devices, &body, &artifact, args.concurrency).await?;
    let after_cpu = cpu_seconds() - cpu;
    drop(sim);
    let (baseline_ok, baseline_s) = if after_s < before_s {
        (after_ok, after_s)
    } else {
        (before_ok, before_s)
    };

    let rollout_rate = f64::from(n) / rollout_s.max(1e-9);
    let baseline_rate = f64::from(n) / baseline_s.max(1e-9);
    let ratio = rollout_rate / baseline_rate.max(1e-9);
    let succeeded = done.devices.succeeded;
    let passed = done.phase == "completed"
        && succeeded == u64::from(n)
        && baseline_ok == u64::from(n)
        && ratio >= args.min_ratio;
    Ok(serde_json::json!({
        "devices": n,
        "imported": imported,
        "concurrency": args.concurrency,
        "artifact_bytes": args.artifact_bytes,
        "rollout": {
            "phase": done.phase,
            "succeeded": succeeded,
            "failed": done.devices.failed + done.devices.rejected,
            "seconds": rollout_s,
            "devices_per_s": rollout_rate,
            "per_device_us": latency,
            "orchestrator_rss_before_bytes": rss_before,
            "orchestrator_peak_rss_bytes": peak_rss,
            "orchestrator_cpu_seconds": rollout_cpu,
        },
        "baseline": {
            "succeeded": baseline_ok,
            "seconds": baseline_s,
            "devices_per_s": baseline_rate,
            "runs_seconds": [before_s, after_s],
            "runs_cpu_seconds": [before_cpu, after_cpu],
        },
        "ratio": ratio,
        "min_ratio": args.min_ratio,
        "passed": passed,
    }))
}

fn bytes_of(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// User + system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Runs the baseline over `devices`; returns how many succeeded and the seconds it took.
async fn baseline(
    client: &reqwest::Client,
    devices: &[(String, String)],
    body: &Arc<Vec<u8>>,
    artifact: &gantry_fleet::registry::Artifact,
    concurrency: u32,
) -> anyhow::Result<(u64, f64)> {
    let permits = Arc::new(Semaphore::new(concurrency as usize));
    let (sha, sig) = (
        Arc::new(artifact.sha256.clone()),
        Arc::new(artifact.signature.clone()),
    );
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (id, addr) in devices {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (body, sha, sig) = (Arc::clone(body), Arc::clone(&sha), Arc::clone(&sig));
        let (id, addr, client) = (id.clone(), addr.clone(), client.clone());
        tasks.spawn(async move {
            let ok = baseline_device(&client, &id, &addr, body, &sha, &sig).await;
            drop(permit);
            ok
        });
    }
    let mut ok = 0u64;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap_or(false) {
            ok += 1;
        }
    }
    Ok((ok, started.elapsed().as_secs_f64()))
}

async fn baseline_device(
    client: &reqwest::Client,
    id: &str,
    addr: &str,
    body: Arc<Vec<u8>>,
    sha: &str,
    sig: &str,
) -> bool {
    let base = format!("http://{addr}");
    let pushed = client
        .post(format!("{base}/update"))
        .header("Content-Type", "application/octet-stream")
        .header("X-Device-ID", id)
        .header("X-Artifact-Version", "2.0.1")
        .header("X-Artifact-SHA256", sha)
        .header("X-Artifact-Signature", sig)
        .body(body.as_ref().clone())
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    let version = client
        .get(format!("{base}/version"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    // The last request closes the connection, as the rollout's does.
    let health = client
        .get(format!("{base}/health"))
        .header(reqwest::header::CONNECTION, "close")
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    pushed && version && health
}

fn render(r: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let latency: Summary =
        serde_json::from_value(r["rollout"]["per_device_us"].clone()).unwrap_or_default();
    let ok = if r["passed"] == true { "PASS" } else { "FAIL" };
    format!(
        "gantry bench fleet — {} simulated devices, concurrency {}, artifact {} bytes\n  \
         rollout   {} of {} succeeded ({} failed) in {:.2} s = {}\n  \
         per device (push + health gate) p50 {}  p95 {}  p99 {}  max {}\n  \
         baseline  {} of {} succeeded in {:.2} s = {} (the faster of {:.2} s before, {:.2} s after)\n  \
         orchestrator RSS {} before, {} peak; CPU {:.2} s (baseline {:.2} s, {:.2} s)\n\
         {ok}  rollout / baseline devices/s  {:.2}  (>= {})\n{}\n",
        r["devices"],
        r["concurrency"],
        r["artifact_bytes"],
        r["rollout"]["succeeded"],
        r["devices"],
        r["rollout"]["failed"],
        f(&r["rollout"]["seconds"]),
        fmt_rate(f(&r["rollout"]["devices_per_s"])),
        fmt_us(latency.p50_us),
        fmt_us(latency.p95_us),
        fmt_us(latency.p99_us),
        fmt_us(latency.max_us),
        r["baseline"]["succeeded"],
        r["devices"],
        f(&r["baseline"]["seconds"]),
        fmt_rate(f(&r["baseline"]["devices_per_s"])),
        f(&r["baseline"]["runs_seconds"][0]),
        f(&r["baseline"]["runs_seconds"][1]),
        fmt_bytes(
            r["rollout"]["orchestrator_rss_before_bytes"]
                .as_u64()
                .unwrap_or(0)
        ),
        fmt_bytes(
            r["rollout"]["orchestrator_peak_rss_bytes"]
                .as_u64()
                .unwrap_or(0)
        ),
        f(&r["rollout"]["orchestrator_cpu_seconds"]),
        f(&r["baseline"]["runs_cpu_seconds"][0]),
        f(&r["baseline"]["runs_cpu_seconds"][1]),
        f(&r["ratio"]),
        r["min_ratio"],
        if r["passed"] == true {
            "PASSED"
        } else {
            "FAILED"
        },
    )
}
