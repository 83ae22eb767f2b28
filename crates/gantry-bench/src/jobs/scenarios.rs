//! The ten scenarios: what each enqueues, how its workers behave, what it judges.
//!
//! All but `db-stress` follow one shape ([`measure`]): start workers, enqueue (as fast as
//! `--clients` concurrent calls go, or at `--rate`), wait until every acknowledged job has
//! finished (or nothing finishes for `--stall-timeout`), stop the workers, ask the server for
//! every job's final status, analyze the ledger. `crash-recovery` kills and restarts the server
//! while that runs; `network-latency` puts a delaying proxy in between.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gantry_jobs::proto;
use tokio_util::sync::CancellationToken;

use super::criteria::{self, Bounds, Check, ratio};
use super::driver::{
    self, Behaviour, Ctx, EnqueueOutcome, EnqueueSpec, Kind, Mode, Protocol, Settled, WorkerSpec,
    Workers,
};
use super::ledger::{self, Analysis, Backoff, Expect, KindRules, Policy};
use super::report::Report;
use super::{JobsBench, ProtocolChoice, Scenario, Target};
use crate::process::Sampler;
use crate::proxy::DelayProxy;
use crate::stats::{Clock, Summary, fmt_bytes, fmt_rate, fmt_us};

/// A scenario's sizes after defaults.
#[derive(Debug, Clone)]
struct Settings {
    jobs: u64,
    workers: u32,
    concurrency: u32,
    clients: u32,
    /// Set for rate-driven scenarios (and crash-recovery).
    rate: Option<f64>,
    duration: Duration,
    job_time: Duration,
    job_timeout: Option<Duration>,
    bounds: Bounds,
    tag: String,
    protocol: Protocol,
    batch: usize,
}

impl Settings {
    fn resolve(a: &JobsBench) -> Self {
        // (jobs, workers, concurrency, clients, rate, duration, job time)
        let (jobs, workers, concurrency, clients, rate, duration, job_time): (
            u64,
            u32,
            u32,
            u32,
            Option<f64>,
            u64,
            u64,
        ) = match a.scenario {
            Scenario::Throughput => (20_000, 1, 100, 32, None, 0, 0),
            Scenario::MultiWorker => (50_000, 10, 100, 32, None, 0, 0),
            Scenario::RetryStorm => (2_000, 4, 100, 16, None, 0, 0),
            Scenario::EnqueueRate => (0, 4, 100, 20, Some(1_000.0), 20, 0),
            Scenario::LongRunning => (0, 2, 20, 4, Some(200.0), 10, 3_000),
            Scenario::WorkerChurn => (3_000, 4, 10, 8, None, 0, 100),
            Scenario::CrashRecovery => (5_000, 4, 25, 8, Some(1_000.0), 0, 10),
            Scenario::Soak => (0, 4, 20, 4, Some(1_000.0), 3_600, 0),
            Scenario::DbStress => (1_000_000, 10, 100, 64, None, 0, 0),
            Scenario::NetworkLatency => (0, 4, 50, 8, Some(500.0), 10, 0),
        };
        let rate = a.rate.or(rate);
        let duration = a.duration.unwrap_or(Duration::from_secs(duration));
        let jobs = a.jobs.unwrap_or_else(|| match (jobs, rate) {
            (0, Some(r)) => (r * duration.as_secs_f64()).round() as u64,
            (n, _) => n,
        });
        let min_throughput = a.min_throughput.or(match a.scenario {
            Scenario::Throughput => Some(50.0),
            Scenario::MultiWorker => Some(200.0),
            _ => None,
        });
        Self {
            jobs,
            workers: a.workers.unwrap_or(workers).max(1),
            concurrency: a.concurrency.unwrap_or(concurrency).max(1),
            clients: a.clients.unwrap_or(clients).max(1),
            rate,
            duration,
            job_time: a.job_time.unwrap_or(Duration::from_millis(job_time)),
            job_timeout: a.job_timeout,
            bounds: Bounds {
                min_throughput,
                max_p99: a.max_p99,
                min_success_rate: a.min_success / 100.0,
                max_rss_growth_mib: a.max_rss_growth,
            },
            tag: format!("bench-{:08x}", rand::random::<u32>()),
            // Settled against the server in `run`.
            protocol: Protocol::Reseolio,
            batch: a.enqueue_batch.max(1) as usize,
        }
    }

    fn mode(&self) -> Mode {
        self.rate.map_or(Mode::Closed, Mode::Rate)
    }

    fn workers(
        &self,
        first: u32,
        seed: u64,
        churn: Option<(Duration, Duration)>,
    ) -> Vec<WorkerSpec> {
        (first..first + self.workers)
            .map(|index| WorkerSpec {
                index,
                concurrency: i32::try_from(self.concurrency).unwrap_or(i32::MAX),
                tag: self.tag.clone(),
                churn,
                seed,
            })
            .collect()
    }

    fn timeout_ms(&self, default: Duration) -> i32 {
        let t = self.job_timeout.unwrap_or(default);
        i32::try_from(t.as_millis()).unwrap_or(i32::MAX)
    }
}

fn kind(
    s: &Settings,
    label: &str,
    behaviour: Behaviour,
    options: proto::JobOptions,
    expect: Expect,
) -> Kind {
    let max_attempts = if options.max_attempts > 0 {
        options.max_attempts.unsigned_abs()
    } else {
        3
    };
    Kind {
        name: format!("{}.{label}", s.tag),
        behaviour,
        options,
        rules: KindRules {
            label: label.to_owned(),
            expect,
            max_attempts,
            backoff: None,
        },
    }
}

fn noop(s: &Settings) -> Kind {
    let options = proto::JobOptions {
        timeout_ms: s.job_timeout.map_or(0, |_| s.timeout_ms(Duration::ZERO)),
        ..Default::default()
    };
    kind(s, "noop", Behaviour::Noop, options, Expect::Success)
}

/// What [`measure`] runs.
struct Load {
    kinds: Vec<Kind>,
    plan: Vec<u8>,
    mode: Mode,
    connections: usize,
    idempotent: bool,
    workers: Vec<WorkerSpec>,
}

/// crash-recovery's kills.
struct Crash {
    kill_at: f64,
    kills: u32,
    downtime: Duration,
}

/// What [`measure`] saw.
struct Measured {
    ctx: Arc<Ctx>,
    enqueue: EnqueueOutcome,
    settled: Settled,
    analysis: Analysis,
    rss_samples: Vec<(u64, u64)>,
    peak_rss: Option<u64>,
    restarts: u32,
    /// CPU seconds used while enqueuing and waiting (harness, server) and the wall time.
    cpu: Option<(f64, Option<f64>, f64)>,
}

/// Runs the scenario in `args` against `target`.
pub async fn run(args: &JobsBench, mut target: Target) -> anyhow::Result<Report> {
    let mut s = Settings::resolve(args);
    s.protocol = match args.protocol {
        ProtocolChoice::Reseolio => Protocol::Reseolio,
        ProtocolChoice::Gantry => Protocol::Gantry,
        ProtocolChoice::Auto => {
            if driver::speaks_gantry(&target.addr).await? {
                Protocol::Gantry
            } else {
                Protocol::Reseolio
            }
        }
    };
    let one_kind = |k: Kind, n: u64| (vec![k], vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)]);
    let standard = |kinds: Vec<Kind>, plan: Vec<u8>, churn, idempotent| Load {
        kinds,
        plan,
        mode: s.mode(),
        connections: match s.mode() {
            Mode::Closed => (s.clients as usize).div_ceil(8),
            Mode::Rate(_) => s.clients as usize,
        },
        idempotent,
        workers: s.workers(0, args.seed, churn),
    };
    let scenario = args.scenario;
    let mut crash = None;
    let mut proxy = None;
    let load = match scenario {
        Scenario::Throughput
        | Scenario::MultiWorker
        | Scenario::EnqueueRate
        | Scenario::Soak
        | Scenario::NetworkLatency => {
            let (kinds, plan) = one_kind(noop(&s), s.jobs);
            if scenario == Scenario::NetworkLatency {
                let addr = resolve(&target.addr).await?;
                proxy = Some(DelayProxy::start(addr, args.latency).await?);
            }
            standard(kinds, plan, None, false)
        }
        Scenario::RetryStorm => {
            let options = proto::JobOptions {
                max_attempts: 3,
                backoff: "exponential".into(),
                initial_delay_ms: 200,
                max_delay_ms: 2_000,
                timeout_ms: s.timeout_ms(Duration::from_secs(30)),
                jitter: 0.1,
            };
            let mut fail = kind(&s, "fail", Behaviour::Fail, options, Expect::Dead);
            fail.rules.backoff = Some(Backoff {
                policy: Policy::Exponential,
                initial_ms: 200,
                max_ms: 2_000,
                jitter: 0.1,
            });
            let (kinds, plan) = one_kind(fail, s.jobs);
            standard(kinds, plan, None, false)
        }
        Scenario::LongRunning => {
            let short = noop(&s);
            let long = kind(
                &s,
                "long",
                Behaviour::Sleep(s.job_time),
                proto::JobOptions {
                    timeout_ms: s.timeout_ms(s.job_time * 10),
                    ..Default::default()
                },
                Expect::Success,
            );
            let timeout = s.job_timeout.unwrap_or(Duration::from_secs(1));
            let over = kind(
                &s,
                "timeout",
                Behaviour::Sleep(timeout * 5),
                proto::JobOptions {
                    max_attempts: 2,
                    backoff: "fixed".into(),
                    initial_delay_ms: 100,
                    timeout_ms: i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
                    ..Default::default()
                },
                Expect::Dead,
            );
            // A quarter of the capacity held by long jobs, a few timing out, the rest short;
            // the long and timing-out ones come first so they hold their slots throughout.
            let capacity = u64::from(s.workers) * u64::from(s.concurrency);
            let n_long = (capacity / 4).max(1);
            let n_timeout = (capacity / 8).max(1);
            let mut plan = vec![1u8; n_long as usize];
            plan.extend(vec![2u8; n_timeout as usize]);
            plan.extend(vec![
                0u8;
                s.jobs.saturating_sub(n_long + n_timeout) as usize
            ]);
            standard(vec![short, long, over], plan, None, false)
        }
        Scenario::WorkerChurn => {
            let work = kind(
                &s,
                "work",
                Behaviour::Sleep(s.job_time),
                proto::JobOptions {
                    // Abandoned attempts count as attempts on some servers.
                    max_attempts: 25,
                    timeout_ms: s.timeout_ms(Duration::from_secs(30)),
                    ..Default::default()
                },
                Expect::Success,
            );
            let (kinds, plan) = one_kind(work, s.jobs);
            let churn = Some((Duration::from_millis(500), Duration::from_millis(1_500)));
            standard(kinds, plan, churn, false)
        }
        Scenario::CrashRecovery => {
            let work = kind(
                &s,
                "work",
                Behaviour::Sleep(s.job_time),
                proto::JobOptions {
                    max_attempts: 25,
                    timeout_ms: s.timeout_ms(Duration::from_secs(5)),
                    ..Default::default()
                },
                Expect::Success,
            );
            let (kinds, plan) = one_kind(work, s.jobs);
            crash = Some(Crash {
                kill_at: args.kill_at,
                kills: args.kills.max(1),
                downtime: args.downtime,
            });
            standard(kinds, plan, None, true)
        }
        Scenario::DbStress => return db_stress(args, &s, target).await,
    };
    let addr = proxy
        .as_ref()
        .map_or_else(|| target.addr.clone(), |p| p.addr().to_string());
    let m = measure(args, &s, &mut target, &addr, load, crash).await?;
    drop(proxy);
    let mut r = report(scenario, &target, &s, &m);
    let b = &s.bounds;
    let mut checks = common_checks(&r, b);
    match scenario {
        Scenario::Throughput => {
            checks.push(Check::throughput(
                "throughput, 1 worker",
                r.throughput_per_s,
                b.min_throughput.unwrap_or(0.0),
            ));
        }
        Scenario::MultiWorker => {
            checks.push(Check::throughput(
                &format!("throughput, {} workers", s.workers),
                r.throughput_per_s,
                b.min_throughput.unwrap_or(0.0),
            ));
            let fair = m.analysis.runs as f64 / f64::from(s.workers);
            let least = (0..s.workers)
                .map(|w| m.analysis.runs_by_worker.get(&w).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let most = m
                .analysis
                .runs_by_worker
                .values()
                .copied()
                .max()
                .unwrap_or(0);
            r.note(
                "runs per worker (least / most)",
                format!("{least} / {most}"),
            );
            checks.push(Check::new(
                "load shared: least-loaded worker's share of a fair split",
                fair == 0.0 || least as f64 >= 0.1 * fair,
                format!(
                    "{:.0} %",
                    if fair > 0.0 {
                        100.0 * least as f64 / fair
                    } else {
                        100.0
                    }
                ),
                ">= 10 %",
            ));
        }
        Scenario::RetryStorm => {
            let k = &m.analysis.kinds[0];
            r.note(
                "runs per job (min / max)",
                format!("{} / {}", k.min_runs, k.max_runs),
            );
            checks.push(Check::zero(
                "jobs not tried exactly max_attempts (3) times",
                k.wrong_attempts,
            ));
            checks.push(Check::zero(
                "retries sooner than the backoff allows",
                k.backoff_violations,
            ));
        }
        Scenario::EnqueueRate | Scenario::NetworkLatency | Scenario::Soak => {
            let offered = s.rate.unwrap_or(0.0);
            checks.push(Check::share(
                "enqueue rate achieved / offered",
                if offered > 0.0 {
                    r.enqueue_rate_per_s / offered
                } else {
                    1.0
                },
                0.95,
            ));
            checks.push(Check::latency(
                "enqueue→start p99",
                r.start_latency.p99_us,
                b.max_p99,
            ));
            if scenario == Scenario::NetworkLatency {
                r.note(
                    "added latency each way",
                    fmt_us(args.latency.as_micros() as u64),
                );
            }
            if scenario == Scenario::Soak {
                checks.push(soak_memory(&mut r, &m, &s));
            }
        }
        Scenario::LongRunning => {
            let short = &m.analysis.kinds[0];
            checks.push(Check::latency(
                "short jobs enqueue→start p99 beside long ones",
                short.start_latency.p99_us,
                b.max_p99,
            ));
        }
        Scenario::WorkerChurn => {
            let churns = m
                .ctx
                .counters
                .churns
                .load(std::sync::atomic::Ordering::Relaxed);
            r.note("worker streams dropped mid-run", churns);
            checks.push(Check::new(
                "workers churned",
                churns > 0,
                churns.to_string(),
                ">= 1",
            ));
        }
        Scenario::CrashRecovery => {
            let kills = args.kills.max(1);
            r.note("server kills (SIGKILL) and restarts", m.restarts);
            r.note("downtime each", fmt_us(args.downtime.as_micros() as u64));
            checks.push(Check::new(
                "server killed and restarted mid-run",
                m.restarts == kills,
                m.restarts.to_string(),
                format!("= {kills}"),
            ));
        }
        Scenario::DbStress => {}
    }
    r.judge(checks);
    Ok(r)
}

async fn resolve(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    let hostport = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let hostport = hostport.trim_end_matches('/');
    tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}

fn sample_every(s: &Settings, scenario: Scenario) -> Duration {
    if scenario == Scenario::Soak {
        (s.duration / 300).clamp(Duration::from_secs(1), Duration::from_secs(10))
    } else {
        Duration::from_millis(250)
    }
}

async fn measure(
    args: &JobsBench,
    s: &Settings,
    target: &mut Target,
    addr: &str,
    load: Load,
    crash: Option<Crash>,
) -> anyhow::Result<Measured> {
    let clock = Clock::start();
    let ctx = Ctx::new(clock, s.protocol, load.kinds, args.patience);
    let sampler = target
        .pid
        .clone()
        .map(|pid| Sampler::start(pid, sample_every(s, args.scenario), clock));
    let cpu = CpuWindow::start(target);
    let workers = Workers::start(&ctx, addr, load.workers)?;
    let offered = load.plan.len() as u64;
    let spec = EnqueueSpec {
        plan: Arc::new(load.plan),
        mode: load.mode,
        clients: s.clients as usize,
        connections: load.connections,
        idempotent: load.idempotent,
        tag: s.tag.clone(),
        batch: s.batch,
    };
    let finished = CancellationToken::new();
    // Status look-ups go straight to the server (not through network-latency's proxy).
    let direct = target.addr.clone();
    let main = async {
        let out = driver::enqueue(&ctx, addr, spec).await;
        let settled = match &out {
            Ok(e) => driver::settle(&ctx, &direct, &e.enqueued, args.stall_timeout).await,
            Err(_) => Ok(Settled::Stalled),
        };
        finished.cancel();
        Ok::<_, anyhow::Error>((out?, settled?))
    };
    let server = target.server.as_mut();
    let killer = async {
        match (crash, server) {
            (Some(c), Some(server)) => crash_loop(server, &ctx, offered, &c, &finished).await,
            (Some(_), None) => anyhow::bail!("crash-recovery needs a server it started itself"),
            (None, _) => Ok(0),
        }
    };
    let (main, killer) = tokio::join!(main, killer);
    let cpu = cpu.finish(target);
    workers.stop().await;
    let (enqueue, settled) = main?;
    let restarts = killer?;
    // Memory is sampled under the scenario's load only: the end-of-run check below reads every
    // job back, which fills the server's read caches and is not part of the load.
    let (rss_samples, sampled_peak) = match sampler {
        Some(sampler) => {
            let (samples, peak) = sampler.finish().await;
            (samples, Some(peak))
        }
        None => (Vec::new(), None),
    };
    let finals = driver::final_statuses(&target.addr, &enqueue.enqueued).await?;
    let peak_rss = sampled_peak.map(|p| p.max(target.spawned_peak_rss()));
    let analysis = ledger::analyze(&enqueue.enqueued, ctx.take_runs(), &finals, &ctx.rules());
    Ok(Measured {
        ctx,
        enqueue,
        settled,
        analysis,
        rss_samples,
        peak_rss,
        restarts,
        cpu,
    })
}

/// CPU used by the harness and the server over the measured part of a run: the "limit" figure
/// beside every throughput (on a 2-core machine the harness's own share is large).
struct CpuWindow {
    wall: std::time::Instant,
    harness: Option<f64>,
    server: Option<(u32, f64)>,
}

impl CpuWindow {
    fn start(target: &Target) -> Self {
        let server = target.pid.as_ref().and_then(|p| {
            let pid = p.load(std::sync::atomic::Ordering::Relaxed);
            crate::process::cpu_seconds(pid).map(|c| (pid, c))
        });
        Self {
            wall: std::time::Instant::now(),
            harness: crate::process::cpu_seconds(std::process::id()),
            server,
        }
    }

    /// (harness, server — unless its process changed, wall) seconds.
    fn finish(self, target: &Target) -> Option<(f64, Option<f64>, f64)> {
        let harness = crate::process::cpu_seconds(std::process::id())? - self.harness?;
        let server = self.server.and_then(|(pid, before)| {
            let now = target
                .pid
                .as_ref()?
                .load(std::sync::atomic::Ordering::Relaxed);
            (now == pid).then(|| crate::process::cpu_seconds(pid).map(|c| c - before))?
        });
        Some((harness, server, self.wall.elapsed().as_secs_f64()))
    }
}

async fn crash_loop(
    server: &mut crate::process::Server,
    ctx: &Ctx,
    offered: u64,
    c: &Crash,
    finished: &CancellationToken,
) -> anyhow::Result<u32> {
    let mut restarts = 0;
    let addr = server.addr().to_string();
    for k in 1..=c.kills {
        let share = (c.kill_at * f64::from(k)).min(0.9);
        let threshold = (offered as f64 * share) as u64;
        while ctx.done() < threshold {
            if finished.is_cancelled() {
                return Ok(restarts);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        server.kill()?;
        tokio::time::sleep(c.downtime).await;
        server.restart()?;
        server
            .wait_ready(Duration::from_secs(30), || driver::answers(&addr))
            .await?;
        restarts += 1;
    }
    Ok(restarts)
}

fn report(scenario: Scenario, target: &Target, s: &Settings, m: &Measured) -> Report {
    let a = &m.analysis;
    let elapsed_s = a.last_done.saturating_sub(a.first_enqueue) as f64 / 1e6;
    let counters = &m.ctx.counters;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let mut r = Report {
        scenario: scenario.name().to_owned(),
        server: target.label.clone(),
        target: target.addr.clone(),
        offered: m.enqueue.offered,
        total: a.acknowledged,
        completed: a.completed,
        succeeded: a.succeeded,
        dead: a.dead,
        success_rate: ratio(a.as_expected, m.enqueue.offered),
        elapsed_s,
        throughput_per_s: if elapsed_s > 0.0 {
            a.completed as f64 / elapsed_s
        } else {
            0.0
        },
        enqueue_rate_per_s: m.enqueue.rate(),
        start_latency: a.start_latency,
        done_latency: a.done_latency,
        duplicates: a.duplicates,
        concurrent_duplicates: a.concurrent_duplicates,
        reruns_after_success: a.reruns_after_success,
        lost: a.lost,
        lost_unfinished: a.lost_unfinished,
        lost_missing: a.lost_missing,
        lost_examples: a.lost_examples.clone(),
        duplicate_examples: a.duplicate_examples.clone(),
        enqueue_errors: m.enqueue.errors,
        ack_errors: load(&counters.ack_errors),
        stale_acks: load(&counters.stale_acks),
        stream_breaks: load(&counters.stream_breaks),
        peak_rss_bytes: m.peak_rss,
        settled: match m.settled {
            Settled::AllDone => "all-done".into(),
            Settled::Stalled => "stalled".into(),
        },
        kinds: a.kinds.clone(),
        ..Report::default()
    };
    r.note(
        "harness",
        format!(
            "{} protocol, {} workers × concurrency {}, {} {}",
            s.protocol.name(),
            s.workers,
            s.concurrency,
            s.clients,
            match s.mode() {
                Mode::Closed if s.protocol == Protocol::Gantry => {
                    format!("concurrent enqueue calls of {} jobs", s.batch)
                }
                Mode::Closed => "concurrent enqueue calls".to_owned(),
                Mode::Rate(per_s) => format!("enqueue connections at {} offered", fmt_rate(per_s)),
            }
        ),
    );
    if let Some((harness, server, wall)) = m.cpu {
        let cores = |c: f64| if wall > 0.0 { c / wall } else { 0.0 };
        r.note(
            "CPU while loaded (harness / server)",
            match server {
                Some(server) => format!(
                    "{harness:.1} s / {server:.1} s over {wall:.1} s = {:.2} / {:.2} cores",
                    cores(harness),
                    cores(server)
                ),
                None => format!(
                    "{harness:.1} s / unknown over {wall:.1} s = {:.2} cores",
                    cores(harness)
                ),
            },
        );
    }
    let foreign = load(&counters.foreign_jobs);
    if foreign > 0 {
        r.note("jobs of other runs pushed to this run's workers", foreign);
    }
    r
}

fn common_checks(r: &Report, b: &Bounds) -> Vec<Check> {
    vec![
        Check::share("success rate", r.success_rate, b.min_success_rate),
        Check::zero("duplicates", r.duplicates),
        Check::zero("lost", r.lost),
    ]
}

fn soak_memory(r: &mut Report, m: &Measured, s: &Settings) -> Check {
    let name = "server RSS growth after warm-up";
    let allowed = criteria::allowed_rss_growth(&s.bounds, s.duration);
    let bound = format!("<= {}", fmt_bytes(allowed));
    let rss: Vec<u64> = m.rss_samples.iter().map(|&(_, b)| b).collect();
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        r.note(
            "RSS first / last sample",
            format!("{} / {}", fmt_bytes(*first), fmt_bytes(*last)),
        );
    }
    match criteria::rss_growth(&rss) {
        None if m.peak_rss.is_none() => {
            Check::skip(name, "no server pid (--spawn or --server-pid)", bound)
        }
        None => Check::skip(name, "too few samples (run longer)", bound),
        Some(growth) => {
            r.note("RSS growth after warm-up (bytes)", growth);
            Check::new(
                name,
                growth <= i64::try_from(allowed).unwrap_or(i64::MAX),
                if growth < 0 {
                    format!("-{}", fmt_bytes(growth.unsigned_abs()))
                } else {
                    fmt_bytes(growth.unsigned_abs())
                },
                bound,
            )
        }
    }
}

// ---------------------------------------------------------------------------------- db-stress

/// db-stress: claim latency with a near-empty queue, then with `--jobs` pending, then a drain.
///
/// "Claim latency" is what a worker with concurrency 1 waits between its ack returning and the
/// next job arriving: the server's claim-and-push time, measured the same way on both queues.
async fn db_stress(args: &JobsBench, s: &Settings, target: Target) -> anyhow::Result<Report> {
    let probe = (s.jobs / 10).clamp(1, 2_000);
    let clock = Clock::start();
    let ctx = Ctx::new(clock, s.protocol, vec![noop(s)], args.patience);
    let sampler = target
        .pid
        .clone()
        .map(|pid| Sampler::start(pid, Duration::from_secs(1), clock));
    let addr = target.addr.clone();
    let one_worker = |index: u32| {
        vec![WorkerSpec {
            index,
            concurrency: 1,
            tag: s.tag.clone(),
            churn: None,
            seed: args.seed,
        }]
    };
    let spec = |n: u64, tag: &str| EnqueueSpec {
        plan: Arc::new(vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)]),
        mode: Mode::Closed,
        clients: s.clients as usize,
        connections: (s.clients as usize).div_ceil(8),
        idempotent: false,
        tag: format!("{}-{tag}", s.tag),
        batch: s.batch,
    };
    let progress = |what: &str| {
        if !args.json {
            eprintln!("db-stress: {what}");
        }
    };

    // 1. Baseline: a queue of `probe` jobs drained by one worker, one job at a time.
    let baseline = driver::enqueue(&ctx, &addr, spec(probe, "baseline")).await?;
    let w = Workers::start(&ctx, &addr, one_worker(0))?;
    wait_done(&ctx, baseline.enqueued.len() as u64, args.stall_timeout).await;
    w.stop().await;
    let baseline_gaps = Summary::of(ledger::claim_gaps(&ctx.runs_snapshot(), 0));
    progress(&format!(
        "baseline claim latency p50 {} over {} jobs",
        fmt_us(baseline_gaps.p50_us),
        probe
    ));

    // 2. Fill: `jobs` pending, nobody working.
    let fill = driver::enqueue(&ctx, &addr, spec(s.jobs, "fill")).await?;
    progress(&format!(
        "filled {} jobs at {}",
        fill.enqueued.len(),
        fmt_rate(fill.rate())
    ));

    // 3. The same worker measurement against the full queue.
    let before = ctx.done();
    let w = Workers::start(&ctx, &addr, one_worker(1))?;
    wait_done(&ctx, before + probe, args.stall_timeout).await;
    w.stop().await;
    let backlog_gaps = Summary::of(ledger::claim_gaps(&ctx.runs_snapshot(), 1));
    progress(&format!(
        "claim latency with the backlog p50 {}",
        fmt_us(backlog_gaps.p50_us)
    ));

    // 4. Drain the rest with every worker.
    let drain_start = clock.now();
    let drained_before = ctx.done();
    let fill_rate = fill.rate();
    let mut all = baseline.enqueued;
    all.extend(fill.enqueued);
    let w = Workers::start(&ctx, &addr, s.workers(2, args.seed, None))?;
    let settled = driver::settle(&ctx, &addr, &all, args.stall_timeout).await?;
    w.stop().await;
    let drain_end = clock.now();
    progress("drained; checking every job");

    let finals = driver::final_statuses(&addr, &all).await?;
    let (rss_samples, sampled_peak) = match sampler {
        Some(sampler) => {
            let (samples, peak) = sampler.finish().await;
            (samples, Some(peak))
        }
        None => (Vec::new(), None),
    };
    let analysis = ledger::analyze(&all, ctx.take_runs(), &finals, &ctx.rules());
    let drained = ctx.done().saturating_sub(drained_before);
    let drain_s = drain_end.saturating_sub(drain_start) as f64 / 1e6;
    let m = Measured {
        ctx: Arc::clone(&ctx),
        enqueue: EnqueueOutcome {
            enqueued: Vec::new(),
            offered: probe + s.jobs,
            errors: baseline.errors + fill.errors,
            started: fill.started,
            finished: fill.finished,
        },
        settled,
        analysis,
        rss_samples,
        peak_rss: sampled_peak.map(|p| p.max(target.spawned_peak_rss())),
        restarts: 0,
        cpu: None,
    };
    let mut r = report(Scenario::DbStress, &target, s, &m);
    r.enqueue_rate_per_s = fill_rate;
    r.note("pending jobs at the second measurement", s.jobs);
    r.note(
        "claim latency, near-empty queue (p50 / p99)",
        format!(
            "{} / {}",
            fmt_us(baseline_gaps.p50_us),
            fmt_us(baseline_gaps.p99_us)
        ),
    );
    r.note(
        "claim latency, full queue (p50 / p99)",
        format!(
            "{} / {}",
            fmt_us(backlog_gaps.p50_us),
            fmt_us(backlog_gaps.p99_us)
        ),
    );
    r.note(
        "drain throughput",
        fmt_rate(if drain_s > 0.0 {
            drained as f64 / drain_s
        } else {
            0.0
        }),
    );
    r.note("fill rate (enqueue)", fmt_rate(fill_rate));
    let mut checks = common_checks(&r, &s.bounds);
    let allowed = baseline_gaps.p50_us.max(1) * 2;
    checks.push(Check::new(
        "claim latency p50 with the backlog within 2× of a near-empty queue",
        backlog_gaps.count > 0 && backlog_gaps.p50_us <= allowed,
        fmt_us(backlog_gaps.p50_us),
        format!(
            "<= {} (2 × {})",
            fmt_us(allowed),
            fmt_us(baseline_gaps.p50_us)
        ),
    ));
    r.judge(checks);
    Ok(r)
}

/// Waits until `ctx` has seen `n` jobs finish, or none for `stall`.
async fn wait_done(ctx: &Ctx, n: u64, stall: Duration) {
    let mut last = ctx.done();
    let mut since = tokio::time::Instant::now();
    while ctx.done() < n {
        if ctx.done() != last {
            last = ctx.done();
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
