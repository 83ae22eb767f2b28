//! The Reseolio gRPC service on a real loopback port, driven by a generated tonic client.

use std::time::Duration;

use gantry_jobs::engine::Engine;
use gantry_jobs::metrics::JobsMetrics;
use gantry_jobs::proto::reseolio_client::ReseolioClient;
use gantry_jobs::proto::{self, JobStatus};
use gantry_jobs::server;
use gantry_jobs::store::sqlite::{SqliteOptions, SqliteStore};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), server::ServeError>>,
    dir: std::path::PathBuf,
}

impl Server {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "gantry-jobs-grpc-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        Self::start_in(dir).await
    }

    async fn start_in(dir: std::path::PathBuf) -> Self {
        Self::start_with(dir, Default::default()).await
    }

    pub async fn start_with(
        dir: std::path::PathBuf,
        limits: gantry_jobs::store::QueueLimits,
    ) -> Self {
        let store = SqliteStore::open(SqliteOptions::new(dir.join("jobs.db"))).unwrap();
        let options = gantry_jobs::engine::EngineOptions {
            queue_limits: limits,
            ..Default::default()
        };
        let engine = Engine::with_options(store, JobsMetrics::unregistered().unwrap(), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve(engine, listener, stop.clone()));
        Self {
            addr,
            stop,
            task,
            dir,
        }
    }

    pub async fn client(&self) -> ReseolioClient<Channel> {
        ReseolioClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    pub async fn shutdown(self) -> std::path::PathBuf {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.dir
    }
}

/// A worker stream: the sender keeps it open, the receiver yields pushed jobs.
struct Worker {
    _tx: mpsc::Sender<proto::PollRequest>,
    jobs: tonic::Streaming<proto::Job>,
}

async fn worker(client: &mut ReseolioClient<Channel>, names: &[&str], concurrency: i32) -> Worker {
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::PollRequest {
        worker_id: format!("w-{}", uuid::Uuid::now_v7()),
        names: names.iter().map(|s| s.to_string()).collect(),
        concurrency,
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

    async fn nothing_for(&mut self, wait: Duration) {
        if let Ok(Some(job)) = tokio::time::timeout(wait, self.jobs.next()).await {
            panic!("unexpected push: {job:?}");
        }
    }
}

pub fn enqueue(name: &str, args: &str) -> proto::EnqueueRequest {
    proto::EnqueueRequest {
        name: name.into(),
        args: args.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn fast_retries(max_attempts: i32, timeout_ms: i32) -> Option<proto::JobOptions> {
    Some(proto::JobOptions {
        max_attempts,
        backoff: "fixed".into(),
        initial_delay_ms: 20,
        max_delay_ms: 20,
        timeout_ms,
        jitter: 0.0,
    })
}

fn ack(job_id: &str, attempt: i32, success: bool, value: &str) -> proto::AckRequest {
    proto::AckRequest {
        job_id: job_id.into(),
        attempt,
        result: Some(proto::AckResult {
            success,
            return_value: if success {
                value.as_bytes().to_vec()
            } else {
                vec![]
            },
            error: if success { String::new() } else { value.into() },
            should_retry: true,
        }),
    }
}

async fn get(client: &mut ReseolioClient<Channel>, id: &str) -> proto::Job {
    client
        .get_job(proto::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn enqueue_push_ack_and_completion() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut w = worker(&mut client, &["math:add"], 4).await;

    let id = client
        .enqueue_job(enqueue("math:add", "[2,3]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;

    // Subscribe for the completion before the ack.
    let (sub_tx, sub_rx) = mpsc::channel(4);
    sub_tx
        .send(proto::SubscribeRequest {
            job_ids: vec![id.clone()],
            unsubscribe: false,
        })
        .await
        .unwrap();
    let mut completions = client
        .subscribe_to_jobs(ReceiverStream::new(sub_rx))
        .await
        .unwrap()
        .into_inner();

    let job = w.next().await;
    assert_eq!(job.id, id);
    assert_eq!(job.args, b"[2,3]");
    assert_eq!(job.attempt, 1);
    assert_eq!(job.status, JobStatus::Running as i32);
    assert!(job.deadline_ms > job.started_at);

    let resp = client
        .ack_job(ack(&id, 1, true, r#"{"sum":5}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.new_status, JobStatus::Success as i32);

    let done = tokio::time::timeout(Duration::from_secs(5), completions.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.job_id, id);
    assert_eq!(done.status, JobStatus::Success as i32);
    assert_eq!(done.result, br#"{"sum":5}"#);

    let stored = get(&mut client, &id).await;
    assert_eq!(stored.status, JobStatus::Success as i32);
    assert_eq!(stored.result, br#"{"sum":5}"#);
    assert!(stored.completed_at >= stored.started_at && stored.started_at > 0);
    assert_eq!(stored.max_attempts, 3);
    server.shutdown().await;
}

#[tokio::test]
async fn subscribing_to_a_finished_job_answers_at_once() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let id = client
        .enqueue_job(enqueue("x", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert!(
        client
            .cancel_job(proto::CancelRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .success
    );
    let (tx, rx) = mpsc::channel(1);
    tx.send(proto::SubscribeRequest {
        job_ids: vec![id.clone()],
        unsubscribe: false,
    })
    .await
    .unwrap();
    let mut stream = client
        .subscribe_to_jobs(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let c = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.job_id.as_str(), c.status),
        (id.as_str(), JobStatus::Cancelled as i32)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_dead_then_retry_job_revives() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut w = worker(&mut client, &["flaky"], 1).await;
    let mut req = enqueue("flaky", "[]");
    req.options = fast_retries(2, 30_000);
    let id = client.enqueue_job(req).await.unwrap().into_inner().job_id;

    let job = w.next().await;
    let resp = client
        .ack_job(ack(&id, job.attempt, false, "boom 1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.new_status, JobStatus::Pending as i32);
    assert_eq!(resp.next_attempt, 2);
    assert!(resp.next_run_at > 0);

    let job = w.next().await;
    assert_eq!(job.attempt, 2);
    assert_eq!(job.error, "boom 1");
    let resp = client
        .ack_job(ack(&id, 2, false, "boom 2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.new_status, JobStatus::Dead as i32);

    let dead = get(&mut client, &id).await;
    assert_eq!(
        (dead.status, dead.error.as_str()),
        (JobStatus::Dead as i32, "boom 2")
    );

    let revived = client
        .retry_job(proto::RetryRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(revived.success, "{}", revived.message);
    let job = w.next().await;
    // The counter keeps growing across the revival, so acks for attempts 1 and 2 stay stale.
    assert_eq!(
        (job.id.as_str(), job.attempt, job.max_attempts),
        (id.as_str(), 3, 2)
    );

    let again = client
        .retry_job(proto::RetryRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.success, "a running job cannot be retried");
    server.shutdown().await;
}

#[tokio::test]
async fn idempotency_keys_deduplicate_per_name() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut req = enqueue("mail", r#"["a@example.com"]"#);
    req.idempotency_key = "order-7".into();
    let first = client.enqueue_job(req.clone()).await.unwrap().into_inner();
    let second = client.enqueue_job(req.clone()).await.unwrap().into_inner();
    assert!(!first.deduplicated);
    assert!(second.deduplicated);
    assert_eq!(first.job_id, second.job_id);
    req.name = "sms".into();
    let other = client.enqueue_job(req).await.unwrap().into_inner();
    assert!(!other.deduplicated);
    assert_ne!(other.job_id, first.job_id);
    server.shutdown().await;
}

#[tokio::test]
async fn a_closed_worker_stream_requeues_its_jobs_at_once() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut a = worker(&mut client, &["long"], 1).await;
    let mut req = enqueue("long", "[]");
    req.options = fast_retries(3, 600_000);
    let id = client.enqueue_job(req).await.unwrap().into_inner().job_id;
    let job = a.next().await;
    assert_eq!(job.attempt, 1);
    drop(a);

    // Long before the ten-minute timeout, another worker gets it as attempt 2.
    let mut b = worker(&mut client, &["long"], 1).await;
    let job = b.next().await;
    assert_eq!((job.id.as_str(), job.attempt), (id.as_str(), 2));
    assert!(job.error.contains("abandoned"), "{}", job.error);

    // The first worker's late, fenced ack is refused and changes nothing.
    let stale = client.ack_job(ack(&id, 1, true, "1")).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("stale"), "{}", stale.message());
    assert_eq!(
        get(&mut client, &id).await.status,
        JobStatus::Running as i32
    );
    server.shutdown().await;
}

#[tokio::test]
async fn an_expired_lease_is_a_failed_attempt() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut w = worker(&mut client, &["slow"], 5).await;
    let mut req = enqueue("slow", "[]");
    req.options = fast_retries(2, 200);
    let id = client.enqueue_job(req).await.unwrap().into_inner().job_id;
    assert_eq!(w.next().await.attempt, 1);
    // No ack: the 200 ms lease runs out, the attempt fails, and after the backoff it comes back.
    let job = w.next().await;
    assert_eq!((job.id.as_str(), job.attempt), (id.as_str(), 2));
    assert!(job.error.contains("timed out"), "{}", job.error);
    server.shutdown().await;
}

#[tokio::test]
async fn concurrency_limits_pushes_until_acks_free_capacity() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut w = worker(&mut client, &["n"], 2).await;
    for i in 0..5 {
        client
            .enqueue_job(enqueue("n", &format!("[{i}]")))
            .await
            .unwrap();
    }
    let a = w.next().await;
    let b = w.next().await;
    w.nothing_for(Duration::from_millis(300)).await;
    client
        .ack_job(ack(&a.id, a.attempt, true, "null"))
        .await
        .unwrap();
    let c = w.next().await;
    assert!(c.id != a.id && c.id != b.id);
    w.nothing_for(Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn queue_limits_hold_across_workers() {
    let dir = std::env::temp_dir().join(format!("gantry-jobs-grpc-q-{}", uuid::Uuid::now_v7()));
    let limits = std::sync::Arc::new([("mail".to_owned(), 1)].into_iter().collect());
    let server = Server::start_with(dir, limits).await;
    let mut client = server.client().await;
    let mut a = worker(&mut client, &["send"], 10).await;
    let mut b = worker(&mut client, &["send"], 10).await;
    for _ in 0..3 {
        let mut r = enqueue("send", "[]");
        r.queue = "mail".into();
        client.enqueue_job(r).await.unwrap();
    }
    let mut other = enqueue("send", r#""other""#);
    other.queue = "bulk".into();
    client.enqueue_job(other).await.unwrap();
    // One mail job and the bulk job start; the other mail jobs wait for the first to finish.
    let mut started = Vec::new();
    let window = tokio::time::sleep(Duration::from_millis(600));
    tokio::pin!(window);
    loop {
        tokio::select! {
            () = &mut window => break,
            Some(Ok(j)) = a.jobs.next() => started.push(j),
            Some(Ok(j)) = b.jobs.next() => started.push(j),
        }
    }
    let mail: Vec<&proto::Job> = started.iter().filter(|j| j.queue == "mail").collect();
    assert_eq!(mail.len(), 1, "{started:?}");
    assert_eq!(started.len(), 2, "{started:?}");
    client
        .ack_job(ack(&mail[0].id, mail[0].attempt, true, "1"))
        .await
        .unwrap();
    let next = tokio::select! {
        j = a.next() => j,
        j = b.next() => j,
    };
    assert_eq!(next.queue, "mail");
    server.shutdown().await;
}

#[tokio::test]
async fn names_route_jobs_to_the_workers_that_handle_them() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut emails = worker(&mut client, &["email"], 10).await;
    let mut reports = worker(&mut client, &["report"], 10).await;
    let report = client
        .enqueue_job(enqueue("report", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let email = client
        .enqueue_job(enqueue("email", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(reports.next().await.id, report);
    assert_eq!(emails.next().await.id, email);
    emails.nothing_for(Duration::from_millis(200)).await;
    reports.nothing_for(Duration::from_millis(1)).await;

    // A worker that names nothing takes any job.
    let mut any = worker(&mut client, &[], 10).await;
    let other = client
        .enqueue_job(enqueue("anything", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(any.next().await.id, other);
    server.shutdown().await;
}

#[tokio::test]
async fn delayed_and_prioritised_jobs() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut later = enqueue("p", r#""later""#);
    later.delay_ms = 400;
    client.enqueue_job(later).await.unwrap();
    let mut low = enqueue("p", r#""low""#);
    low.priority = 5;
    client.enqueue_job(low).await.unwrap();
    let mut high = enqueue("p", r#""high""#);
    high.priority = 0;
    client.enqueue_job(high).await.unwrap();

    let mut w = worker(&mut client, &["p"], 10).await;
    assert_eq!(w.next().await.args, br#""high""#);
    assert_eq!(w.next().await.args, br#""low""#);
    let started = std::time::Instant::now();
    let job = w.next().await;
    assert_eq!(job.args, br#""later""#);
    assert!(job.started_at >= job.scheduled_at);
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.shutdown().await;
}

#[tokio::test]
async fn list_filters_and_counts() {
    let server = Server::start().await;
    let mut client = server.client().await;
    for name in ["a", "a", "b"] {
        client.enqueue_job(enqueue(name, "[]")).await.unwrap();
    }
    let id = client
        .enqueue_job(enqueue("b", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    client
        .cancel_job(proto::CancelRequest { job_id: id.clone() })
        .await
        .unwrap();

    let all = client
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.jobs.len(), all.total), (4, 4));
    assert_eq!(all.jobs[0].id, id, "newest first by default");

    let page = client
        .list_jobs(proto::ListJobsRequest {
            names: vec!["a".into()],
            limit: 1,
            ascending: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page.jobs.len(), page.total), (1, 2));

    let cancelled = client
        .list_jobs(proto::ListJobsRequest {
            statuses: vec![JobStatus::Cancelled as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cancelled.total, cancelled.jobs[0].id.as_str()),
        (1, id.as_str())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_clear_statuses() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let check = |r: Result<tonic::Response<proto::EnqueueResponse>, tonic::Status>,
                 code: Code,
                 text: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(text),
            "`{}` lacks `{text}`",
            e.message()
        );
    };
    check(
        client.enqueue_job(enqueue("", "[]")).await,
        Code::InvalidArgument,
        "name: must not be empty",
    );
    check(
        client.enqueue_job(enqueue("n", "{nope")).await,
        Code::InvalidArgument,
        "args: is not valid JSON",
    );
    let mut r = enqueue("n", "[]");
    r.delay_ms = -5;
    check(
        client.enqueue_job(r).await,
        Code::InvalidArgument,
        "must not be negative",
    );
    let mut r = enqueue("n", "[]");
    r.options = Some(proto::JobOptions {
        backoff: "quadratic".into(),
        ..Default::default()
    });
    check(
        client.enqueue_job(r).await,
        Code::InvalidArgument,
        "unknown backoff `quadratic`",
    );
    let mut r = enqueue("n", "[]");
    r.options = Some(proto::JobOptions {
        initial_delay_ms: -1,
        ..Default::default()
    });
    check(
        client.enqueue_job(r).await,
        Code::InvalidArgument,
        "options.initial_delay_ms",
    );
    let mut r = enqueue("n", "[]");
    r.options = Some(proto::JobOptions {
        jitter: 2.0,
        ..Default::default()
    });
    check(
        client.enqueue_job(r).await,
        Code::InvalidArgument,
        "options.jitter",
    );
    let mut r = enqueue("n", "[]");
    r.priority = 10;
    check(
        client.enqueue_job(r).await,
        Code::InvalidArgument,
        "priority",
    );
    // Just over the documented 1 MiB payload limit: refused by name.
    let big = format!("[\"{}\"]", "x".repeat(1 << 20));
    check(
        client.enqueue_job(enqueue("n", &big)).await,
        Code::InvalidArgument,
        "args: is 1048580 bytes",
    );
    // Far over it: refused by the transport before decoding.
    let huge = format!("[\"{}\"]", "x".repeat(8 << 20));
    let e = client.enqueue_job(enqueue("n", &huge)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    let e = client
        .get_job(proto::GetJobRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("no-such-job"));
    let e = client
        .ack_job(ack("no-such-job", 0, true, "1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .ack_job(proto::AckRequest {
            job_id: "x".into(),
            attempt: 0,
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let cancel = client
        .cancel_job(proto::CancelRequest {
            job_id: "no-such-job".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cancel.success && cancel.message.contains("not found"));
    let e = client
        .list_jobs(proto::ListJobsRequest {
            order_by: "name; DROP TABLE jobs".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .create_schedule(proto::CreateScheduleRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("name:"), "{}", e.message());
    // Nothing was stored by any of it.
    let all = client
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.total, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_worker_streams_with_unavailable_and_keeps_attempts() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let mut w = worker(&mut client, &["n"], 1).await;
    let id = client
        .enqueue_job(enqueue("n", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    w.next().await;
    let dir = server.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), w.jobs.next())
        .await
        .unwrap();
    match end {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    // After a restart the attempt is still RUNNING: the worker may still finish and ack it.
    let server = Server::start_in(dir).await;
    let mut client = server.client().await;
    let job = get(&mut client, &id).await;
    assert_eq!((job.status, job.attempt), (JobStatus::Running as i32, 1));
    let resp = client
        .ack_job(ack(&id, 1, true, "42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.new_status, JobStatus::Success as i32);
    server.shutdown().await;
}

#[tokio::test]
async fn retention_purges_only_finished_jobs_past_it() {
    let dir = std::env::temp_dir().join(format!("gantry-jobs-ret-{}", uuid::Uuid::now_v7()));
    let store = SqliteStore::open(SqliteOptions::new(dir.join("jobs.db"))).unwrap();
    let options = gantry_jobs::engine::EngineOptions {
        retention: Some(Duration::from_millis(50)),
        ..Default::default()
    };
    let engine = Engine::with_options(store, JobsMetrics::unregistered().unwrap(), options);
    let new = |name: &str| gantry_jobs::model::NewJob {
        name: name.into(),
        queue: gantry_jobs::model::DEFAULT_QUEUE.into(),
        priority: 0,
        args: b"[]".to_vec(),
        options: Default::default(),
        idempotency_key: None,
        run_at: gantry_jobs::model::now_millis(),
    };
    let out = engine.enqueue(vec![new("a"), new("b")]).await.unwrap();
    engine.cancel(out[0].id.clone()).await.unwrap().unwrap();
    assert_eq!(
        engine.purge_expired().await.unwrap(),
        0,
        "not old enough yet"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(engine.purge_expired().await.unwrap(), 1);
    assert!(engine.get(out[0].id.clone()).await.unwrap().is_none());
    assert!(
        engine.get(out[1].id.clone()).await.unwrap().is_some(),
        "pending jobs stay"
    );
    let _ = std::fs::remove_dir_all(dir);
}
