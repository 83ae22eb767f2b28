//! `gantry bench observer`: writers insert and update orders in PostgreSQL at a set rate,
//! `gantry observer run` processes turn every change into a webhook to a receiver this harness
//! runs on loopback, and the receiver's ledger says what arrived, when, and how often.
//!
//! Before that, the same writers insert as fast as they can into a table of their own with the
//! capture trigger installed and nothing reading it: the database's own ceiling with capture,
//! which the observer's throughput is reported against.
//!
//! Reports: events/s, commit→delivery latency (the writer's commit returning to the receiver
//! getting the webhook, both clocks this process's), lost events, duplicates raw and after the
//! receiver drops repeats of an idempotency key, the listeners' peak RSS, and with
//! `--kill-leader` the failover time (SIGKILL of the leader to another listener leading).

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio_postgres::NoTls;

use crate::process::{memory, work_dir};
use crate::stats::{Summary, fmt_bytes, fmt_rate, fmt_us};

/// `gantry bench observer`: its flags.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Exit codes: 0 every criterion passed, 1 a criterion failed or the run \
failed, 2 usage.\n\nExample:\n  gantry bench observer --rate 5000 --duration 60s --listeners 3 --kill-leader"
)]
pub struct ObserverBench {
    /// The PostgreSQL database to write to and observe.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database: String,

    /// Changes per second, all writers together (inserts and updates); 0: as fast as the
    /// writers go (then the observer's throughput is a ratio of the database-alone ceiling).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,

    /// How long the writers write.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub duration: Duration,

    /// Writer connections.
    #[arg(long, default_value_t = 4)]
    pub writers: u32,

    /// Rows per writer transaction.
    #[arg(long, default_value_t = 10)]
    pub batch: u32,

    /// `gantry observer run` processes (one leads, all deliver).
    #[arg(long, default_value_t = 1)]
    pub listeners: u32,

    /// Record delivered actions in this Redis (`[redis] url`), so an action delivered by a
    /// killed listener is not delivered again.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,

    /// SIGKILL the leader halfway through.
    #[arg(long)]
    pub kill_leader: bool,

    /// How long the database-alone ceiling is measured (0 skips it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub baseline: Duration,

    /// How long to wait after the writers stop for the last deliveries.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub drain: Duration,

    /// Pass bound: commit→delivery p99 (not judged with --kill-leader, whose in-flight
    /// attempts wait out their lease).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    pub max_p99: Duration,

    /// Pass bound with --kill-leader: SIGKILL to a new leader.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub max_failover: Duration,

    /// Pass bound: the listeners' peak RSS, bytes.
    #[arg(long, default_value_t = 500 * 1024 * 1024)]
    pub max_rss: u64,

    /// The gantry binary that runs the listeners [default: this executable].
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Keep the tables, schemas and work directory.
    #[arg(long)]
    pub keep: bool,
}

/// What the receiver got: per (order id, op) the first arrival, and every idempotency key.
#[derive(Default)]
struct Ledger {
    first: HashMap<(i64, String), Instant>,
    keys: HashMap<String, (i64, String)>,
    raw: u64,
}

/// A listener child; killed on drop.
struct Listener {
    child: std::process::Child,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the benchmark; returns the exit code (0 pass, 1 fail).
pub async fn run(args: ObserverBench) -> anyhow::Result<u8> {
    if args.writers == 0 || args.batch == 0 || args.listeners == 0 {
        bail!("--writers, --batch and --listeners must be at least 1");
    }
    if args.kill_leader && args.listeners < 2 {
        bail!("--kill-leader needs --listeners 2 or more (someone must take over)");
    }
    let dir = work_dir("observer")?;
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
            & 0xffff_ffff_ffff
    );
    let result = measure(&args, &dir, &tag).await;
    if !args.keep {
        let _ = cleanup(&args.database, &tag).await;
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "gantry bench: kept {} and the tables/schemas tagged {tag}",
            dir.display()
        );
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report["passed"] == true { 0 } else { 1 })
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn cleanup(url: &str, tag: &str) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    for schema in [
        format!("gantry_obsbench_{tag}"),
        format!("gantry_obsbench_base_{tag}"),
    ] {
        let _ = gantry_observer::schema::uninstall(&mut client, &schema).await;
    }
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_orders_{tag}; DROP TABLE IF EXISTS bench_base_{tag};
             DROP SCHEMA IF EXISTS gantry_obsjobs_{tag} CASCADE;"
        ))
        .await?;
    Ok(())
}

async fn create_table(url: &str, table: &str, schema: &str) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, customer text, total numeric, status text)"
        ))
        .await?;
    let entities =
        std::collections::BTreeSet::from([
            gantry_observer::config::Entity::parse(table).context("table name")?
        ]);
    gantry_observer::schema::install(&mut client, schema, &entities).await?;
    Ok(())
}

/// One writer: every `every`, a transaction of `batch` inserts, and (every other time) `batch`
/// updates of rows it inserted. Returns the commit instant of every change: (id, op) → when.
async fn write(
    url: String,
    table: String,
    writer: u32,
    batch: u32,
    every: Option<Duration>,
    until: Instant,
) -> anyhow::Result<Commits> {
    let client = connect(&url).await?;
    let insert = client
        .prepare(&format!(
            "INSERT INTO {table} SELECT g, 'c' || g, (g % 500) + 0.5, 'new' FROM generate_series($1::bigint, $2::bigint) g"
        ))
        .await?;
    let update = client
        .prepare(&format!(
            "UPDATE {table} SET status = 'paid' WHERE id BETWEEN $1 AND $2"
        ))
        .await?;
    let base = i64::from(writer) * 1_000_000_000;
    let n = i64::from(batch);
    let mut next_id = base;
    let mut updated_to = base;
    let mut commits = Vec::new();
    let mut ticker = every.map(|e| {
        let mut t = tokio::time::interval(e);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut round = 0u64;
    while Instant::now() < until {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        round += 1;
        // Inserts, and every other round updates of the oldest rows not updated yet.
        if round % 2 == 1 || updated_to + n > next_id {
            client
                .execute(&insert, &[&next_id, &(next_id + n - 1)])
                .await?;
            let at = Instant::now();
            commits.extend((next_id..next_id + n).map(|id| ((id, "INSERT".to_owned()), at)));
            next_id += n;
        } else {
            client
                .execute(&update, &[&updated_to, &(updated_to + n - 1)])
                .await?;
            let at = Instant::now();
            commits.extend((updated_to..updated_to + n).map(|id| ((id, "UPDATE".to_owned()), at)));
            updated_to += n;
        }
    }
    Ok(commits)
}

type Commits = Vec<((i64, String), Instant)>;

/// `--writers` writers into `table` until `until`, each committing every `every` (or as fast
/// as it can).
fn spawn_writers(
    args: &ObserverBench,
    table: &str,
    every: Option<Duration>,
    until: Instant,
) -> tokio::task::JoinSet<anyhow::Result<Commits>> {
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..args.writers {
        writers.spawn(write(
            args.database.clone(),
            table.to_owned(),
            w,
            args.batch,
            every,
            until,
        ));
    }
    writers
}

#[allow(clippy::too_many_lines)]
async fn measure(args: &ObserverBench, dir: &std::path::Path, tag: &str) -> anyhow::Result<Value> {
    let url = &args.database;
    // Each writer commits `batch` changes per tick.
    let every = (args.rate > 0).then(|| {
        let per_writer = f64::from(args.rate) / f64::from(args.writers);
        Duration::from_secs_f64(f64::from(args.batch) / per_writer)
    });

    // 1. The database alone, with the capture trigger, as fast as the writers go.
    let baseline = if args.baseline.is_zero() {
        None
    } else {
        let table = format!("bench_base_{tag}");
        create_table(url, &table, &format!("gantry_obsbench_base_{tag}")).await?;
        let until = Instant::now() + args.baseline;
        let started = Instant::now();
        let mut writers = spawn_writers(args, &table, None, until);
        let mut rows = 0usize;
        while let Some(done) = writers.join_next().await {
            rows += done??.len();
        }
        #[allow(clippy::cast_precision_loss)]
        Some(rows as f64 / started.elapsed().as_secs_f64())
    };

    // 2. The receiver.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = listener.local_addr()?;
    {
        let ledger = Arc::clone(&ledger);
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let ledger = Arc::clone(&ledger);
                async move {
                    let at = Instant::now();
                    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let id = event["data"]["id"].as_i64().unwrap_or(-1);
                    let op = event["op"].as_str().unwrap_or("").to_owned();
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                    l.raw += 1;
                    l.first.entry((id, op.clone())).or_insert(at);
                    l.keys.entry(key).or_insert((id, op));
                    axum::http::StatusCode::NO_CONTENT
                }
            },
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    // 3. The observed table and the listeners.
    let table = format!("bench_orders_{tag}");
    let schema = format!("gantry_obsbench_{tag}");
    let jobs_schema = format!("gantry_obsjobs_{tag}");
    create_table(url, &table, &schema).await?;
    let config = dir.join("observers.toml");
    let redis = args
        .redis
        .as_ref()
        .map(|u| format!("[redis]\nurl = \"{u}\"\nprefix = \"gantry:obsbench:{tag}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "{redis}[worker]\nconcurrency = 256\n\
             [[observers]]\nname = \"orders\"\nentity = \"{table}\"\nevents = [\"INSERT\", \"UPDATE\"]\n\
             timeout = \"5s\"\nretry = {{ max_attempts = 20, initial_delay = \"100ms\", max_delay = \"2s\" }}\n\
             [[observers.actions]]\ntype = \"webhook\"\nurl = \"http://{receiver}/hook\"\n"
        ),
    )?;
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("cannot find this executable")?,
    };
    let (lines_tx, lines) = std::sync::mpsc::channel::<(usize, Instant, String)>();
    let mut listeners = Vec::new();
    for i in 0..args.listeners as usize {
        let log = std::fs::File::create(dir.join(format!("listener-{i}.log")))?;
        let mut child = std::process::Command::new(&bin)
            .args(["observer", "run", "--database", url, "--config"])
            .arg(&config)
            .args([
                "--schema",
                &schema,
                "--jobs-schema",
                &jobs_schema,
                "--poll",
                "50ms",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} observer run", bin.display()))?;
        let stdout = child.stdout.take().context("no listener stdout")?;
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send((i, Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        listeners.push(Listener { child });
    }
    drop(lines_tx);
    let mut leader = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, _, line) = lines
            .recv_timeout(left)
            .context("no listener became leader within 30 s")?;
        if line.starts_with("leader of observer set") {
            leader = Some(i);
        }
    }
    let mut leader = leader.unwrap_or(0);

    // 4. Memory of every listener, sampled.
    let pids: Vec<u32> = listeners.iter().map(|l| l.child.id()).collect();
    let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, on) = (Arc::clone(&peak_rss), Arc::clone(&sampling));
        tokio::spawn(async move {
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                for &pid in &pids {
                    if let Some(m) = memory(pid) {
                        peak.fetch_max(m.hwm, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // 5. The writers, and the leader's death halfway.
    let started = Instant::now();
    let until = started + args.duration;
    let mut writers = spawn_writers(args, &table, every, until);
    let mut failover = None;
    if args.kill_leader {
        tokio::time::sleep(args.duration / 2).await;
        let killed_at = Instant::now();
        listeners[leader].child.kill()?;
        let _ = listeners[leader].child.wait();
        let deadline = killed_at + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, at, line) = tokio::task::block_in_place(|| lines.recv_timeout(left))
                .context("no listener took over within 60 s")?;
            if i != leader && line.starts_with("leader of observer set") {
                failover = Some(at.saturating_duration_since(killed_at));
                leader = i;
                break;
            }
        }
    }
    let mut commits: HashMap<(i64, String), Instant> = HashMap::new();
    while let Some(done) = writers.join_next().await {
        commits.extend(done??);
    }
    let written = commits.len();
    let wrote_for = started.elapsed();

    // 6. Drain: wait for every change to arrive (or the drain to run out).
    let drain_until = Instant::now() + args.drain;
    loop {
        let arrived = ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first
            .keys()
            .filter(|k| commits.contains_key(k))
            .count();
        if arrived >= written || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    for l in &listeners {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(l.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    drop(listeners);

    // 7. The ledger against what was written.
    let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
    let mut latencies = Vec::with_capacity(written);
    let mut last_arrival = started;
    for (k, committed) in &commits {
        if let Some(at) = l.first.get(k) {
            latencies.push(
                u64::try_from(at.saturating_duration_since(*committed).as_micros())
                    .unwrap_or(u64::MAX),
            );
            last_arrival = last_arrival.max(*at);
        }
    }
    let delivered = latencies.len();
    let lost = written - delivered;
    let unexpected = l.first.keys().filter(|k| !commits.contains_key(k)).count();
    // After dropping repeats of an idempotency key, any event still seen twice came under two
    // keys: a real duplicate.
    let distinct_keys = l.keys.len();
    let duplicated_after_dedup = distinct_keys.saturating_sub(l.first.len());
    let duplicated_raw = usize::try_from(l.raw).unwrap_or(usize::MAX) - l.first.len();
    let latency = Summary::of(latencies);
    let span = last_arrival
        .saturating_duration_since(started)
        .as_secs_f64()
        .max(1e-9);
    #[allow(clippy::cast_precision_loss)]
    let events_per_s = delivered as f64 / span;
    #[allow(clippy::cast_precision_loss)]
    let written_per_s = written as f64 / wrote_for.as_secs_f64();
    let peak = peak_rss.load(std::sync::atomic::Ordering::Relaxed);
    let mut checks = vec![
        json!({"criterion": "lost == 0", "value": lost, "passed": lost == 0}),
        json!({"criterion": "duplicates after dedup by idempotency key == 0", "value": duplicated_after_dedup, "passed": duplicated_after_dedup == 0}),
        json!({"criterion": format!("peak RSS <= {}", fmt_bytes(args.max_rss)), "value": peak, "passed": peak <= args.max_rss}),
    ];
    let max_p99 = u64::try_from(args.max_p99.as_micros()).unwrap_or(u64::MAX);
    match failover {
        Some(f) => checks.push(json!({
            "criterion": format!("failover <= {}", humantime::format_duration(args.max_failover)),
            "value_ms": f.as_millis(),
            "passed": f <= args.max_failover,
        })),
        None => checks.push(json!({
            "criterion": format!("commit->delivery p99 <= {}", fmt_us(max_p99)),
            "value_us": latency.p99_us,
            "passed": latency.p99_us <= max_p99,
        })),
    }
    let passed = checks.iter().all(|c| c["passed"] == true);
    Ok(json!({
        "scenario": "observer",
        "rate": args.rate,
        "writers": args.writers,
        "batch": args.batch,
        "listeners": args.listeners,
        "duration_s": args.duration.as_secs_f64(),
        "written": written,
        "written_per_s": written_per_s,
        "delivered": delivered,
        "events_per_s": events_per_s,
        "database_alone_per_s": baseline,
        "ratio_to_database_alone": baseline.map(|b| events_per_s / b),
        "lost": lost,
        "unexpected": unexpected,
        "duplicated_raw": duplicated_raw,
        "duplicated_after_dedup": duplicated_after_dedup,
        "latency": latency,
        "peak_rss": peak,
        "failover_ms": failover.map(|f| f.as_millis()),
        "final_leader": leader,
        "checks": checks,
        "passed": passed,
    }))
}

fn render(r: &Value) -> String {
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    out.push_str(&format!(
        "observer: {} writers x {} rows/txn at {} for {} s, {} listener(s)\n",
        r["writers"],
        r["batch"],
        match r["rate"].as_u64() {
            Some(0) | None => "full speed".to_owned(),
            Some(n) => format!("{n}/s"),
        },
        r["duration_s"],
        r["listeners"]
    ));
    out.push_str(&format!(
        "  written     {} changes ({})\n  delivered   {} ({})\n",
        r["written"],
        fmt_rate(f(&r["written_per_s"])),
        r["delivered"],
        fmt_rate(f(&r["events_per_s"]))
    ));
    if let Some(b) = r["database_alone_per_s"].as_f64() {
        out.push_str(&format!(
            "  database alone with capture: {} (delivered/s over it: {:.2})\n",
            fmt_rate(b),
            f(&r["ratio_to_database_alone"])
        ));
    }
    let l = &r["latency"];
    let us = |v: &Value| fmt_us(v.as_u64().unwrap_or(0));
    out.push_str(&format!(
        "  commit->delivery  p50 {}  p95 {}  p99 {}  max {}\n",
        us(&l["p50_us"]),
        us(&l["p95_us"]),
        us(&l["p99_us"]),
        us(&l["max_us"])
    ));
    out.push_str(&format!(
        "  lost {}  duplicated raw {}  after dedup {}  peak RSS {}\n",
        r["lost"],
        r["duplicated_raw"],
        r["duplicated_after_dedup"],
        fmt_bytes(r["peak_rss"].as_u64().unwrap_or(0))
    ));
    if let Some(ms) = r["failover_ms"].as_u64() {
        out.push_str(&format!("  failover {ms} ms\n"));
    }
    for c in r["checks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  [{}] {}\n",
            if c["passed"] == true { "PASS" } else { "FAIL" },
            c["criterion"].as_str().unwrap_or_default()
        ));
    }
    out
}
