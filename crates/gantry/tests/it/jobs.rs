//! `gantry jobs`: the server as a child process, driven by the CLI and by the unmodified Reseolio
//! npm SDK.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::serve::Served;
use crate::{gantry, temp_dir};

fn jobs_server(dir: &Path) -> Served {
    let db = dir.join("jobs.db");
    Served::start_with(
        &[
            "jobs",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ],
        &[],
        &["admin server listening", "jobs server listening"],
    )
}

fn cli(server: &Served, args: &[&str]) -> Output {
    gantry()
        .args(["jobs"])
        .args(args)
        .env("GANTRY_JOBS_SERVER", server.jobs.unwrap().to_string())
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cli_enqueue_list_show_cancel_stats_purge() {
    let dir = temp_dir("jobs-cli");
    let mut server = jobs_server(&dir);

    let out = cli(
        &server,
        &[
            "enqueue",
            "email:send",
            r#"["a@example.com"]"#,
            "--idempotency-key",
            "k1",
            "--json",
        ],
    );
    let first = json(&out);
    assert_eq!(first["deduplicated"], false);
    let id = first["id"].as_str().unwrap().to_owned();
    let again = json(&cli(
        &server,
        &[
            "enqueue",
            "email:send",
            r#"["a@example.com"]"#,
            "--idempotency-key",
            "k1",
            "--json",
        ],
    ));
    assert_eq!(
        (again["id"].as_str(), again["deduplicated"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    let later = stdout(&cli(&server, &["enqueue", "report", "[]", "--delay", "1h"]));

    let listed = json(&cli(&server, &["list", "--json", "--name", "email:send"]));
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["jobs"][0]["id"], id.as_str());
    assert_eq!(
        listed["jobs"][0]["args"],
        serde_json::json!(["a@example.com"])
    );

    let table = stdout(&cli(&server, &["list"]));
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains("email:send") && table.contains(later.trim()));
    assert!(table.trim_end().ends_with("2 of 2 jobs"), "{table}");

    let shown = json(&cli(&server, &["show", &id, "--json"]));
    assert_eq!(
        (shown["status"].as_str(), shown["idempotency_key"].as_str()),
        (Some("pending"), Some("k1"))
    );

    let out = cli(&server, &["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&server, &["retry", &id]);
    assert_eq!(out.status.code(), Some(1), "a cancelled job is not dead");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected dead"));

    let stats = json(&cli(&server, &["stats", "--json"]));
    assert_eq!(
        (stats["pending"].as_i64(), stats["cancelled"].as_i64()),
        (Some(1), Some(1))
    );

    let purged = json(&cli(&server, &["purge", "--older-than", "0s", "--json"]));
    assert_eq!(purged["deleted"], 1);
    assert_eq!(json(&cli(&server, &["list", "--json"]))["total"], 1);

    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).0, Some(0));
}

#[test]
fn cli_exit_codes() {
    let dir = temp_dir("jobs-codes");
    let server = jobs_server(&dir);
    let out = cli(&server, &["show", "no-such-job"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "gantry jobs: job no-such-job not found\n"
    );
    let out = cli(&server, &["retry", "no-such-job"]);
    assert_eq!(out.status.code(), Some(4));
    let out = cli(&server, &["enqueue", "x", "{not json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("args: is not valid JSON"));
    let out = cli(&server, &["list", "--status", "sleeping"]);
    assert_eq!(out.status.code(), Some(2));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = gantry()
        .args(["jobs", "stats", "--server", &closed.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to the jobs server"));
}

#[test]
fn jobs_survive_a_sigkill_of_the_server() {
    let dir = temp_dir("jobs-kill");
    let server = jobs_server(&dir);
    let mut ids = Vec::new();
    for i in 0..20 {
        let out = cli(&server, &["enqueue", "n", &format!("[{i}]"), "--json"]);
        ids.push(json(&out)["id"].as_str().unwrap().to_owned());
    }
    // Every enqueue above was acknowledged; none may be lost to a crash.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    drop(server);
    let server = jobs_server(&dir);
    let listed = json(&cli(&server, &["list", "--json", "--limit", "100"]));
    assert_eq!(listed["total"], 20);
    for id in ids {
        assert!(cli(&server, &["show", &id]).status.success(), "{id} lost");
    }
}

/// The `reseolio` npm package, installed once per build directory.
fn reseolio_sdk() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reseolio-sdk");
    let marker = dir.join("node_modules/reseolio/package.json");
    if !marker.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("package.json"),
            r#"{"name":"gantry-reseolio-check","private":true,"type":"module"}"#,
        )
        .unwrap();
        let out = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--silent",
                "reseolio@0.1.3",
            ])
            .current_dir(&dir)
            .output()
            .expect("npm is needed to test the Reseolio SDK (install Node.js and npm)");
        assert!(
            out.status.success(),
            "npm install reseolio@0.1.3 failed: {out:?}"
        );
    }
    // The SDK loads `<project>/proto/reseolio.proto`: ours.
    std::fs::create_dir_all(dir.join("proto")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto/reseolio.proto"),
        dir.join("proto/reseolio.proto"),
    )
    .unwrap();
    dir
}

const SDK_SCRIPT: &str = r#"
import { Reseolio } from 'reseolio';

const client = new Reseolio({ address: process.env.ADDR, autoStart: false, workerConcurrency: 4 });
let flakyCalls = 0;
const add = client.durable('sdk:add', async (a, b) => ({ sum: a + b }));
const flaky = client.durable('sdk:flaky', async (n) => {
  flakyCalls += 1;
  if (flakyCalls < 2) throw new Error('first try fails');
  return { n, calls: flakyCalls };
}, { maxAttempts: 3, backoff: 'fixed', initialDelayMs: 50 });

const watchdog = setTimeout(() => { console.error('TIMEOUT'); process.exit(2); }, 30000);
await client.start();
const handles = [];
for (let i = 0; i < 20; i++) handles.push(await add(i, 1));
const results = await Promise.all(handles.map((h) => h.result(20000)));
const flakyResult = await (await flaky(7)).result(20000);
const job = await client.getJob(handles[0].jobId);
console.log(JSON.stringify({
  sums: results.map((r) => r.sum),
  flaky: flakyResult,
  status: job.status,
  attempt: job.attempt,
}));
await client.stop();
clearTimeout(watchdog);
process.exit(0);
"#;

#[test]
fn the_reseolio_npm_sdk_runs_jobs_unmodified() {
    let sdk = reseolio_sdk();
    let script = sdk.join("check.mjs");
    std::fs::write(&script, SDK_SCRIPT).unwrap();
    let dir = temp_dir("jobs-sdk");
    let server = jobs_server(&dir);
    let out = Command::new("node")
        .arg(&script)
        .current_dir(&sdk)
        .env("ADDR", server.jobs.unwrap().to_string())
        .output()
        .expect("node is needed to test the Reseolio SDK");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "SDK script failed: {out:?}");
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("no result line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let sums: Vec<i64> = v["sums"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_i64().unwrap())
        .collect();
    assert_eq!(sums, (1..=20).collect::<Vec<i64>>());
    assert_eq!(v["flaky"], serde_json::json!({ "n": 7, "calls": 2 }));
    assert_eq!(v["status"], 3, "SUCCESS");
    assert_eq!(v["attempt"], 1);

    // The server agrees: 21 succeeded, the flaky one on its second attempt.
    let stats = json(&cli(&server, &["stats", "--json"]));
    assert_eq!(stats["success"], 21);
    let flaky = json(&cli(&server, &["list", "--json", "--name", "sdk:flaky"]));
    assert_eq!(flaky["jobs"][0]["attempt"], 2);
}

pub fn database_url() -> String {
    std::env::var("GANTRY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A PostgreSQL schema of its own, dropped at the end.
struct Schema {
    name: String,
}

impl Schema {
    fn new() -> Self {
        Self {
            name: format!("gantry_it_{}", uuid::Uuid::now_v7().simple()),
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            if let Ok((client, conn)) =
                tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await;
            }
        });
    }
}

#[test]
fn two_servers_on_one_postgres_never_run_a_job_twice() {
    use gantry_jobs::proto::gantry::jobs::v1::{self, jobs_client::JobsClient};
    use gantry_jobs::proto::reseolio_client::ReseolioClient;
    use gantry_jobs::proto::{self, JobStatus};
    use std::sync::{Arc, Mutex};
    use tokio_stream::StreamExt as _;

    const JOBS: usize = 300;
    let schema = Schema::new();
    let url = database_url();
    let start = || {
        Served::start_with(
            &["jobs", "serve", "--listen", "127.0.0.1:0", "--db", &url],
            &[("GANTRY_JOBS_POSTGRES_SCHEMA", schema.name.as_str())],
            &[
                "admin server listening",
                "jobs server listening (PostgreSQL)",
            ],
        )
    };
    let a = start();
    let b = start();
    let addrs = [a.jobs_pg.unwrap(), b.jobs_pg.unwrap()];

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // (job id, attempt, worker, start, end) for every delivery.
    type Ledger = Arc<Mutex<Vec<(String, i32, usize, std::time::Instant, std::time::Instant)>>>;
    let ledger: Ledger = Arc::default();
    rt.block_on(async {
        let mut workers = Vec::new();
        // Workers whose stream is open: jobs are enqueued only once all four are.
        let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for w in 0..4 {
            let addr = addrs[w % 2];
            let ledger = Arc::clone(&ledger);
            let connected = Arc::clone(&connected);
            workers.push(tokio::spawn(async move {
                let mut client = ReseolioClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tx.send(proto::PollRequest {
                    worker_id: format!("w{w}"),
                    names: vec!["n".into()],
                    concurrency: 5,
                })
                .await
                .unwrap();
                let mut jobs = client
                    .poll_jobs(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                connected.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut acks = tokio::task::JoinSet::new();
                while let Some(Ok(job)) = jobs.next().await {
                    let mut client = client.clone();
                    let ledger = Arc::clone(&ledger);
                    acks.spawn(async move {
                        let started = std::time::Instant::now();
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        let ended = std::time::Instant::now();
                        ledger.lock().unwrap().push((
                            job.id.clone(),
                            job.attempt,
                            w,
                            started,
                            ended,
                        ));
                        client
                            .ack_job(proto::AckRequest {
                                job_id: job.id,
                                attempt: job.attempt,
                                result: Some(proto::AckResult {
                                    success: true,
                                    return_value: b"1".to_vec(),
                                    ..Default::default()
                                }),
                            })
                            .await
                            .unwrap();
                    });
                }
                drop(tx);
            }));
        }
        let wait = std::time::Instant::now() + Duration::from_secs(30);
        while connected.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            assert!(std::time::Instant::now() < wait, "workers did not connect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut clients = Vec::new();
        for addr in addrs {
            clients.push(JobsClient::connect(format!("http://{addr}")).await.unwrap());
        }
        // Each chunk is enqueued through a different server than the one before: a server
        // hands out what is enqueued through it at once, and finds the other's on its next
        // poll, so both hand out work whatever the timing.
        for chunk in 0..3 {
            let jobs_client = &mut clients[chunk % 2];
            let batch = (0..JOBS / 3)
                .map(|i| proto::EnqueueRequest {
                    name: "n".into(),
                    args: format!("[{}]", chunk * 1000 + i).into_bytes(),
                    ..Default::default()
                })
                .collect();
            jobs_client
                .enqueue_batch(v1::EnqueueBatchRequest { jobs: batch })
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let stats = clients[0]
                .stats(v1::StatsRequest {})
                .await
                .unwrap()
                .into_inner();
            let done = stats
                .counts
                .iter()
                .find(|c| c.status == JobStatus::Success as i32)
                .map_or(0, |c| c.count);
            if done == JOBS as i64 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {done} of {JOBS} jobs finished"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for w in workers {
            w.abort();
        }
    });

    let ledger = ledger.lock().unwrap();
    let mut seen = std::collections::HashMap::new();
    for (id, attempt, worker, _, _) in ledger.iter() {
        assert_eq!(*attempt, 1, "job {id} was delivered again");
        assert!(
            seen.insert(id.clone(), *worker).is_none(),
            "job {id} ran twice"
        );
    }
    assert_eq!(seen.len(), JOBS);
    // Both servers handed out work.
    let by_server = |s: usize| seen.values().filter(|w| **w % 2 == s).count();
    assert!(
        by_server(0) > 0 && by_server(1) > 0,
        "{} / {}",
        by_server(0),
        by_server(1)
    );
}

#[test]
fn jobs_metrics_are_exported() {
    let dir = temp_dir("jobs-metrics");
    let server = jobs_server(&dir);
    for _ in 0..2 {
        assert!(cli(&server, &["enqueue", "metered", "[]"]).status.success());
    }
    let id = stdout(&cli(&server, &["enqueue", "metered", "[]"]));
    assert!(cli(&server, &["cancel", id.trim()]).status.success());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        reqwest::get(format!("http://{}/metrics", server.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    for line in [
        r#"gantry_jobs_enqueued_total{name="metered"} 3"#,
        r#"gantry_jobs_cancelled_total{name="metered"} 1"#,
        "gantry_jobs_workers 0",
        "# TYPE gantry_jobs_start_delay_seconds histogram",
        "# TYPE gantry_jobs_run_seconds histogram",
        "# TYPE gantry_jobs_ack_seconds histogram",
    ] {
        assert!(body.contains(line), "`{line}` missing from:\n{body}");
    }
}

#[test]
fn cli_schedules_create_list_pause_resume_delete() {
    let dir = temp_dir("jobs-schedules");
    let mut server = jobs_server(&dir);
    let code = |out: &Output| out.status.code();

    let nightly = json(&cli(
        &server,
        &[
            "schedules",
            "create",
            "nightly",
            "0 3 * * *",
            r#"["report"]"#,
            "--timezone",
            "Europe/Berlin",
            "--misfire",
            "skip",
            "--json",
        ],
    ));
    assert_eq!(
        (
            nightly["status"].as_str(),
            nightly["timezone"].as_str(),
            nightly["misfire"].as_str(),
            nightly["cron"].as_str()
        ),
        (
            Some("active"),
            Some("Europe/Berlin"),
            Some("skip"),
            Some("0 3 * * *")
        )
    );
    assert_eq!(nightly["args"], serde_json::json!(["report"]));
    assert!(nightly["next_run_at"].as_i64().unwrap() > 0);
    let id = nightly["id"].as_str().unwrap().to_owned();

    // Errors: a taken name (1), bad input (2), bad flags (2).
    let out = cli(&server, &["schedules", "create", "nightly", "0 4 * * *"]);
    assert_eq!(code(&out), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = cli(
        &server,
        &[
            "schedules",
            "create",
            "x",
            "* * * * *",
            "--timezone",
            "Mars/Base",
        ],
    );
    assert_eq!(code(&out), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("timezone: unknown time zone"));
    let out = cli(&server, &["schedules", "create", "x", "99 * * * *"]);
    assert_eq!(code(&out), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cron_expression:"));
    let out = cli(
        &server,
        &[
            "schedules",
            "create",
            "x",
            "* * * * *",
            "--misfire",
            "later",
        ],
    );
    assert_eq!(code(&out), Some(2), "{out:?}");

    // A schedule every second: its jobs appear, and the metric counts them.
    let out = cli(&server, &["schedules", "create", "beat", "* * * * * *"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("created schedule beat ("));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while json(&cli(&server, &["list", "--name", "beat", "--json"]))["total"] == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no job from the schedule"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let table = stdout(&cli(&server, &["schedules", "list"]));
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("nightly") && table.contains("Europe/Berlin"),
        "{table}"
    );
    assert!(table.trim_end().ends_with("2 of 2 schedules"), "{table}");

    // Pause and resume, by name or id.
    assert!(
        cli(&server, &["schedules", "pause", "nightly"])
            .status
            .success()
    );
    let out = cli(&server, &["schedules", "pause", &id]);
    assert_eq!(code(&out), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("schedule is paused, expected active"));
    let paused = json(&cli(
        &server,
        &["schedules", "list", "--status", "paused", "--json"],
    ));
    assert_eq!(paused["total"], 1);
    assert_eq!(paused["schedules"][0]["id"], id.as_str());
    assert_eq!(
        paused["schedules"][0]["next_run_at"],
        serde_json::Value::Null
    );
    let resumed = json(&cli(&server, &["schedules", "resume", "nightly", "--json"]));
    assert_eq!(resumed["status"], "active");
    let shown = stdout(&cli(&server, &["schedules", "show", &id]));
    assert!(
        shown.contains("misfire") && shown.contains("skip"),
        "{shown}"
    );

    // Delete; unknown schedules are "not found" (4).
    let out = cli(&server, &["schedules", "delete", "beat"]);
    assert!(out.status.success(), "{out:?}");
    for args in [
        &["schedules", "delete", "beat"][..],
        &["schedules", "show", "no-such"],
        &["schedules", "pause", "no-such"],
        &["schedules", "resume", "no-such"],
    ] {
        let out = cli(&server, args);
        assert_eq!(code(&out), Some(4), "{args:?}: {out:?}");
    }
    let listed = json(&cli(&server, &["schedules", "list", "--json"]));
    assert_eq!(listed["total"], 1);
    let deleted = json(&cli(
        &server,
        &["schedules", "list", "--status", "deleted", "--json"],
    ));
    assert_eq!(deleted["schedules"][0]["name"], "beat");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        reqwest::get(format!("http://{}/metrics", server.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        body.contains(r#"gantry_jobs_schedule_fired_total{schedule="beat"}"#),
        "{body}"
    );

    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).0, Some(0));
}
