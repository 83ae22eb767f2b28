//! Cron schedules through the Reseolio gRPC service on a real loopback port: jobs enqueued at
//! every tick and pushed to a worker, pause/resume/delete, validation and error codes, and the
//! misfire policy across a server restart on the same database. These tests run on real time
//! (seconds-granular cron ticks), with generous margins for a loaded machine.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_jobs::engine::Engine;
use gantry_jobs::metrics::JobsMetrics;
use gantry_jobs::model::{Millis, now_millis};
use gantry_jobs::proto::gantry::jobs::v1::{self, jobs_client::JobsClient};
use gantry_jobs::proto::reseolio_client::ReseolioClient;
use gantry_jobs::proto::{self, ScheduleStatus};
use gantry_jobs::schedule::tick_of_key;
use gantry_jobs::server;
use gantry_jobs::store::sqlite::{SqliteOptions, SqliteStore};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// A jobs server on a SQLite file that outlives it.
struct Server {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), server::ServeError>>,
}

impl Server {
    async fn start(db: &Path) -> Self {
        let store = SqliteStore::open(SqliteOptions::new(db)).unwrap();
        let engine = Engine::new(store, JobsMetrics::unregistered().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(engine, listener, stop.clone()));
        Self { addr, stop, task }
    }

    async fn client(&self) -> ReseolioClient<Channel> {
        ReseolioClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn temp_db(tag: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!(
            "gantry-jobs-schedules-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ))
        .join("jobs.db")
}

fn schedule(name: &str, cron: &str) -> proto::CreateScheduleRequest {
    proto::CreateScheduleRequest {
        name: name.into(),
        cron_expression: cron.into(),
        args: br#"["scheduled"]"#.to_vec(),
        ..Default::default()
    }
}

async fn jobs_named(client: &mut ReseolioClient<Channel>, name: &str) -> Vec<proto::Job> {
    client
        .list_jobs(proto::ListJobsRequest {
            names: vec![name.into()],
            limit: 1000,
            ascending: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
}

/// The tick each job was enqueued for, from its idempotency key.
fn ticks(jobs: &[proto::Job], schedule_id: &str) -> Vec<Millis> {
    jobs.iter()
        .map(|j| {
            tick_of_key(schedule_id, &j.idempotency_key)
                .unwrap_or_else(|| panic!("job {} has no tick key: {:?}", j.id, j.idempotency_key))
        })
        .collect()
}

async fn get_schedule(client: &mut ReseolioClient<Channel>, key: &str) -> proto::Schedule {
    client
        .get_schedule(proto::GetScheduleRequest {
            schedule_id: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls until `count` jobs named `name` exist, or fails after `within`.
async fn wait_for_jobs(
    client: &mut ReseolioClient<Channel>,
    name: &str,
    count: usize,
    within: Duration,
) -> Vec<proto::Job> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let jobs = jobs_named(client, name).await;
        if jobs.len() >= count {
            return jobs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} jobs named {name} within {within:?}",
            jobs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker stream: the sender keeps it open, the receiver yields pushed jobs.
struct Worker {
    _tx: mpsc::Sender<proto::PollRequest>,
    jobs: tonic::Streaming<proto::Job>,
}

async fn worker(client: &mut ReseolioClient<Channel>, name: &str) -> Worker {
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::PollRequest {
        worker_id: format!("w-{}", uuid::Uuid::now_v7()),
        names: vec![name.into()],
        concurrency: 16,
    })
    .await
    .unwrap();
    let jobs = client
        .poll_jobs(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Worker { _tx: tx, jobs }
}

impl Worker {
    async fn next(&mut self) -> proto::Job {
        tokio::time::timeout(Duration::from_secs(10), self.jobs.next())
            .await
            .expect("no job pushed within 10 s")
            .expect("stream ended")
            .expect("stream error")
    }
}

async fn ack(client: &mut ReseolioClient<Channel>, job: &proto::Job) {
    client
        .ack_job(proto::AckRequest {
            job_id: job.id.clone(),
            attempt: job.attempt,
            result: Some(proto::AckResult {
                success: true,
                return_value: b"null".to_vec(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_second_schedule_pushes_jobs_and_obeys_pause_resume_delete() {
    let db = temp_db("life");
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let mut w = worker(&mut client, "tick").await;

    let created = client
        .create_schedule(schedule("tick", "* * * * * *"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.status, ScheduleStatus::Active as i32);
    assert_eq!(
        (created.timezone.as_str(), created.misfire.as_str()),
        ("UTC", "coalesce")
    );
    assert!(created.next_run_at > created.created_at);
    assert_eq!(created.next_run_at % 1000, 0);
    let handler = created.handler_options.clone().unwrap();
    assert_eq!((handler.max_attempts, handler.timeout_ms), (3, 30_000));

    // Pushed at each tick, one job per tick, with the schedule's args.
    let first = w.next().await;
    let second = w.next().await;
    for job in [&first, &second] {
        assert_eq!(
            (job.name.as_str(), job.args.as_slice()),
            ("tick", &br#"["scheduled"]"#[..])
        );
        ack(&mut client, job).await;
    }
    let t = ticks(&[first.clone(), second.clone()], &created.id);
    assert_eq!(t[0], created.next_run_at);
    assert_eq!(t[1], t[0] + 1000);
    let s = get_schedule(&mut client, "tick").await;
    assert!(s.last_run_at >= t[1] && s.next_run_at > t[1], "{s:?}");

    // Paused: no more jobs. One enqueued just before the pause may still arrive.
    let paused = client
        .pause_schedule(proto::PauseScheduleRequest {
            schedule_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (paused.status, paused.next_run_at),
        (ScheduleStatus::Paused as i32, 0)
    );
    let at_pause = jobs_named(&mut client, "tick").await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(jobs_named(&mut client, "tick").await.len(), at_pause);

    // Resumed (by name): ticks again, from now.
    let resumed_at = now_millis();
    let resumed = client
        .resume_schedule(proto::ResumeScheduleRequest {
            schedule_id: "tick".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.status, ScheduleStatus::Active as i32);
    assert!(resumed.next_run_at > resumed_at);
    let jobs = wait_for_jobs(&mut client, "tick", at_pause + 1, Duration::from_secs(5)).await;
    // Nothing fired for the ticks that passed while paused.
    let after: Vec<Millis> = ticks(&jobs, &created.id)
        .into_iter()
        .filter(|t| *t > resumed_at - 2000)
        .collect();
    assert!(after.iter().all(|t| *t >= resumed.next_run_at), "{after:?}");

    // Deleted: never again; the name is free and the old schedule is DELETED.
    let deleted = client
        .delete_schedule(proto::DeleteScheduleRequest {
            schedule_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.success, "{deleted:?}");
    let at_delete = jobs_named(&mut client, "tick").await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(jobs_named(&mut client, "tick").await.len(), at_delete);
    let gone = get_schedule(&mut client, &created.id).await;
    assert_eq!(
        (gone.status, gone.next_run_at),
        (ScheduleStatus::Deleted as i32, 0)
    );
    let listed = client
        .list_schedules(proto::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.schedules.len(), listed.total), (0, 0));
    let again = client
        .create_schedule(schedule("tick", "0 0 * * *"))
        .await
        .unwrap();
    assert_ne!(again.into_inner().id, created.id);

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_rpcs_validate_and_map_errors() {
    let server = Server::start(&temp_db("errors")).await;
    let mut c = server.client().await;
    let code_and_message = |r: Result<tonic::Response<proto::Schedule>, tonic::Status>| {
        let e = r.expect_err("expected an error");
        (e.code(), e.message().to_owned())
    };
    let invalid = |field: &str, r| {
        let (code, message) = code_and_message(r);
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(message.starts_with(&format!("{field}:")), "{message}");
    };
    invalid(
        "cron_expression",
        c.create_schedule(schedule("a", "61 * * * *")).await,
    );
    invalid(
        "cron_expression",
        c.create_schedule(schedule("a", "")).await,
    );
    invalid(
        "cron_expression",
        c.create_schedule(schedule("a", "0 0 30 2 *")).await,
    );
    invalid(
        "timezone",
        c.create_schedule(proto::CreateScheduleRequest {
            timezone: "Mars/Olympus".into(),
            ..schedule("a", "* * * * *")
        })
        .await,
    );
    invalid(
        "handler_options.max_attempts",
        c.create_schedule(proto::CreateScheduleRequest {
            handler_options: Some(proto::JobOptions {
                max_attempts: -1,
                ..Default::default()
            }),
            ..schedule("a", "* * * * *")
        })
        .await,
    );
    invalid(
        "misfire",
        c.create_schedule(proto::CreateScheduleRequest {
            misfire: "later".into(),
            ..schedule("a", "* * * * *")
        })
        .await,
    );
    invalid(
        "args",
        c.create_schedule(proto::CreateScheduleRequest {
            args: b"{nope".to_vec(),
            ..schedule("a", "* * * * *")
        })
        .await,
    );
    invalid("name", c.create_schedule(schedule("", "* * * * *")).await);

    let a = c
        .create_schedule(proto::CreateScheduleRequest {
            timezone: "America/New_York".into(),
            misfire: "skip".into(),
            ..schedule("a", "0 9 * * MON-FRI")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (a.timezone.as_str(), a.misfire.as_str()),
        ("America/New_York", "skip")
    );
    let (code, message) = code_and_message(c.create_schedule(schedule("a", "* * * * *")).await);
    assert_eq!(code, Code::AlreadyExists, "{message}");

    // Unknown schedules.
    let (code, _) = code_and_message(
        c.get_schedule(proto::GetScheduleRequest {
            schedule_id: "nope".into(),
        })
        .await,
    );
    assert_eq!(code, Code::NotFound);
    let (code, _) = code_and_message(
        c.pause_schedule(proto::PauseScheduleRequest {
            schedule_id: "nope".into(),
        })
        .await,
    );
    assert_eq!(code, Code::NotFound);
    let (code, _) = code_and_message(
        c.update_schedule(proto::UpdateScheduleRequest {
            schedule_id: "nope".into(),
            cron_expression: "* * * * *".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code, Code::NotFound);
    let deleted = c
        .delete_schedule(proto::DeleteScheduleRequest {
            schedule_id: "nope".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !deleted.success && deleted.message.contains("not found"),
        "{deleted:?}"
    );

    // Wrong status.
    let (code, _) = code_and_message(
        c.resume_schedule(proto::ResumeScheduleRequest {
            schedule_id: a.id.clone(),
        })
        .await,
    );
    assert_eq!(code, Code::FailedPrecondition);
    c.pause_schedule(proto::PauseScheduleRequest {
        schedule_id: a.id.clone(),
    })
    .await
    .unwrap();
    let (code, message) = code_and_message(
        c.pause_schedule(proto::PauseScheduleRequest {
            schedule_id: a.id.clone(),
        })
        .await,
    );
    assert_eq!(
        (code, message.as_str()),
        (
            Code::FailedPrecondition,
            "schedule is paused, expected active"
        )
    );

    // Update: validated per field; empty fields keep their value.
    invalid(
        "timezone",
        c.update_schedule(proto::UpdateScheduleRequest {
            schedule_id: a.id.clone(),
            timezone: "Nowhere".into(),
            ..Default::default()
        })
        .await,
    );
    let updated = c
        .update_schedule(proto::UpdateScheduleRequest {
            schedule_id: "a".into(),
            cron_expression: "*/5 * * * *".into(),
            misfire: "coalesce".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            updated.cron_expression.as_str(),
            updated.timezone.as_str(),
            updated.misfire.as_str(),
            updated.status
        ),
        (
            "*/5 * * * *",
            "America/New_York",
            "coalesce",
            ScheduleStatus::Paused as i32
        )
    );

    // Listing.
    c.create_schedule(schedule("b", "0 0 1 1 *")).await.unwrap();
    let list = |status: &str, limit| proto::ListSchedulesRequest {
        status_filter: status.into(),
        limit,
        offset: 0,
    };
    let all = c.list_schedules(list("all", 0)).await.unwrap().into_inner();
    assert_eq!(all.total, 2);
    // The paused one has no next run and comes last.
    assert_eq!(
        all.schedules
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["b", "a"]
    );
    let paused = c
        .list_schedules(list("paused", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((paused.total, paused.schedules[0].name.as_str()), (1, "a"));
    let page = c.list_schedules(list("", 1)).await.unwrap().into_inner();
    assert_eq!((page.total, page.schedules.len()), (2, 1));
    let e = c.list_schedules(list("sleeping", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("status_filter:"), "{}", e.message());

    server.shutdown().await;
}

/// The server is down across three ticks: the default policy fires exactly one catch-up job for
/// them when the server is back; `skip` fires none. Both then wait for their next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_policy_across_a_restart() {
    let db = temp_db("misfire");
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    // Three ticks a second apart, the first 4 s from now, then none for a minute.
    let tick = (now_millis() / 1000 + 4) * 1000;
    let s0 = tick / 1000 % 60;
    let cron = format!("{},{},{} * * * * *", s0, (s0 + 1) % 60, (s0 + 2) % 60);
    let coalesce = client
        .create_schedule(schedule("catch-up", &cron))
        .await
        .unwrap()
        .into_inner();
    let skip = client
        .create_schedule(proto::CreateScheduleRequest {
            misfire: "skip".into(),
            ..schedule("no-catch-up", &cron)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((coalesce.next_run_at, skip.next_run_at), (tick, tick));
    server.shutdown().await;
    assert!(
        now_millis() < tick,
        "the server stopped too late for this test"
    );

    // Down across the three ticks, and back well past the 1 s grace of the last.
    let back = tick + 2000 + 2500;
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(back - now_millis()).unwrap(),
    ))
    .await;
    let server = Server::start(&db).await;
    let mut client = server.client().await;
    let jobs = wait_for_jobs(&mut client, "catch-up", 1, Duration::from_secs(5)).await;
    // Give a wrong second fire (or a skip that fires anyway) time to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let jobs_after = jobs_named(&mut client, "catch-up").await;
    assert_eq!(jobs_after.len(), 1, "{jobs_after:?}");
    assert_eq!(ticks(&jobs, &coalesce.id), [tick]);
    assert!(jobs[0].created_at >= back);
    assert!(jobs_named(&mut client, "no-catch-up").await.is_empty());

    let c = get_schedule(&mut client, &coalesce.id).await;
    assert_eq!(c.next_run_at, tick + 60_000);
    assert!(c.last_run_at >= back);
    let s = get_schedule(&mut client, &skip.id).await;
    assert_eq!((s.next_run_at, s.last_run_at), (tick + 60_000, 0));
    server.shutdown().await;
}

/// A restart never fires a tick again, even when the job of that tick is gone (finished and
/// purged), so the idempotency key cannot catch it: the fire and the schedule's next tick are
/// committed together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_double_fire_across_restarts() {
    let db = temp_db("restart");
    let mut fired: Vec<Millis> = Vec::new();
    let mut id = String::new();
    for round in 0..3 {
        let server = Server::start(&db).await;
        let started = now_millis();
        let mut client = server.client().await;
        if round == 0 {
            id = client
                .create_schedule(schedule("beat", "* * * * * *"))
                .await
                .unwrap()
                .into_inner()
                .id;
        }
        let mut w = worker(&mut client, "beat").await;
        for _ in 0..2 {
            let job = w.next().await;
            ack(&mut client, &job).await;
        }
        // Ticks of the jobs this run created: all later than every tick fired before.
        let jobs = jobs_named(&mut client, "beat").await;
        let mine: Vec<Millis> = jobs
            .iter()
            .filter(|j| j.created_at >= started)
            .map(|j| tick_of_key(&id, &j.idempotency_key).unwrap())
            .collect();
        assert!(mine.len() >= 2, "{mine:?}");
        let last_before = fired.iter().max().copied().unwrap_or(0);
        assert!(
            mine.iter().all(|t| *t > last_before),
            "round {round} fired {mine:?} again (before: {fired:?})"
        );
        fired.extend(mine);
        // Forget every finished job, so only the schedule itself can prevent a repeat.
        JobsClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap()
            .purge(v1::PurgeRequest {
                completed_before: now_millis() + 1,
                statuses: vec![],
            })
            .await
            .unwrap();
        drop(w);
        server.shutdown().await;
    }
    let distinct: HashSet<Millis> = fired.iter().copied().collect();
    assert_eq!(distinct.len(), fired.len(), "{fired:?}");
}
