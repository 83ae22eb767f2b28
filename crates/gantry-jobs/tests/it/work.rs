//! The `gantry.jobs.v1.Jobs` service: the Work stream (fenced acks on the stream, cancels, drain,
//! re-adoption after a reconnect), heartbeats, batch enqueue, stats and purge.

use std::time::Duration;

use gantry_jobs::proto::gantry::jobs::v1::jobs_client::JobsClient;
use gantry_jobs::proto::gantry::jobs::v1::{self, work_request, work_response};
use gantry_jobs::proto::{self, JobStatus};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::grpc::{Server, enqueue};

struct Worker {
    tx: mpsc::Sender<v1::WorkRequest>,
    rx: tonic::Streaming<v1::WorkResponse>,
}

fn register(names: &[&str], concurrency: i32, held: Vec<v1::Held>) -> v1::WorkRequest {
    v1::WorkRequest {
        msg: Some(work_request::Msg::Register(v1::Register {
            worker_id: "rust-worker".into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            concurrency,
            held,
        })),
    }
}

async fn connect(
    client: &mut JobsClient<Channel>,
    first: v1::WorkRequest,
) -> (Worker, v1::Registered) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let rx = client
        .work(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut w = Worker { tx, rx };
    match w.next().await {
        work_response::Msg::Registered(r) => (w, r),
        other => panic!("expected Registered, got {other:?}"),
    }
}

impl Worker {
    async fn next(&mut self) -> work_response::Msg {
        tokio::time::timeout(Duration::from_secs(10), self.rx.next())
            .await
            .expect("nothing within 10 s")
            .expect("stream ended")
            .expect("stream error")
            .msg
            .expect("empty message")
    }

    async fn job(&mut self) -> proto::Job {
        match self.next().await {
            work_response::Msg::Job(j) => j,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    async fn ack(&mut self, acks: Vec<v1::WorkAck>) -> Vec<v1::AckResult> {
        self.tx
            .send(v1::WorkRequest {
                msg: Some(work_request::Msg::Acks(v1::AckBatch { acks })),
            })
            .await
            .unwrap();
        match self.next().await {
            work_response::Msg::Acks(r) => r.results,
            other => panic!("expected ack results, got {other:?}"),
        }
    }
}

fn ok(job: &proto::Job, value: &str) -> v1::WorkAck {
    v1::WorkAck {
        job_id: job.id.clone(),
        attempt: job.attempt,
        success: true,
        result: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn fail(job: &proto::Job) -> v1::WorkAck {
    v1::WorkAck {
        job_id: job.id.clone(),
        attempt: job.attempt,
        success: false,
        error: "stopped".into(),
        retry: true,
        ..Default::default()
    }
}

async fn clients(
    server: &Server,
) -> (
    JobsClient<Channel>,
    gantry_jobs::proto::reseolio_client::ReseolioClient<Channel>,
) {
    let url = format!("http://{}", server.addr);
    (
        JobsClient::connect(url.clone()).await.unwrap(),
        server.client().await,
    )
}

#[tokio::test]
async fn acks_travel_on_the_stream_fenced_by_attempt() {
    let server = Server::start().await;
    let (mut jobs, mut reseolio) = clients(&server).await;
    let (mut w, registered) = connect(&mut jobs, register(&["n"], 4, vec![])).await;
    assert!(registered.adopted.is_empty() && registered.lost.is_empty());
    let batch = jobs
        .enqueue_batch(v1::EnqueueBatchRequest {
            jobs: vec![enqueue("n", "[1]"), enqueue("n", "[2]")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 2);
    let a = w.job().await;
    let b = w.job().await;
    let mut stale = ok(&b, "0");
    stale.attempt = b.attempt + 1;
    let results = w.ack(vec![ok(&a, "10"), stale, fail(&b)]).await;
    assert!(results[0].ok && results[0].new_status == JobStatus::Success as i32);
    assert!(
        !results[1].ok && results[1].error.contains("stale"),
        "{:?}",
        results[1]
    );
    assert!(results[2].ok && results[2].new_status == JobStatus::Pending as i32);
    assert!(results[2].next_run_at > 0);
    let stored = reseolio
        .get_job(proto::GetJobRequest {
            job_id: a.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.result, b"10");
    server.shutdown().await;
}

#[tokio::test]
async fn ack_batches_sent_back_to_back_get_one_answer_each_in_order() {
    let server = Server::start().await;
    let (mut jobs, mut reseolio) = clients(&server).await;
    let (mut w, _) = connect(&mut jobs, register(&["n"], 6, vec![])).await;
    jobs.enqueue_batch(v1::EnqueueBatchRequest {
        jobs: (0..6).map(|i| enqueue("n", &format!("[{i}]"))).collect(),
    })
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(w.job().await);
    }
    // Three batches before reading any answer: the server may apply them together, but each
    // gets its own answer, in order, with its refused lines in place.
    let mut unfenced = ok(&held[1], "1");
    unfenced.attempt = 0;
    let batches = vec![
        vec![ok(&held[0], "0")],
        vec![unfenced, ok(&held[2], "2")],
        vec![ok(&held[1], "1"), ok(&held[3], "3")],
    ];
    for acks in &batches {
        w.tx.send(v1::WorkRequest {
            msg: Some(work_request::Msg::Acks(v1::AckBatch { acks: acks.clone() })),
        })
        .await
        .unwrap();
    }
    for acks in &batches {
        let results = match w.next().await {
            work_response::Msg::Acks(r) => r.results,
            other => panic!("expected ack results, got {other:?}"),
        };
        let ids: Vec<&str> = results.iter().map(|r| r.job_id.as_str()).collect();
        let sent: Vec<&str> = acks.iter().map(|a| a.job_id.as_str()).collect();
        assert_eq!(ids, sent);
        for (r, a) in results.iter().zip(acks) {
            assert_eq!(r.ok, a.attempt > 0, "{r:?}");
        }
    }
    // Acks sent just before the worker closes its side are applied before the stream's held
    // attempts are let go.
    w.tx.send(v1::WorkRequest {
        msg: Some(work_request::Msg::Acks(v1::AckBatch {
            acks: vec![ok(&held[4], "4"), ok(&held[5], "5")],
        })),
    })
    .await
    .unwrap();
    let Worker { tx, rx: _rx } = w;
    drop(tx);
    for job in &held {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stored = reseolio
                .get_job(proto::GetJobRequest {
                    job_id: job.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if stored.status == JobStatus::Success as i32 {
                assert_eq!(stored.attempt, 1, "{stored:?}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {} is {:?}",
                job.id,
                stored
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_running_job_reaches_its_worker() {
    let server = Server::start().await;
    let (mut jobs, mut reseolio) = clients(&server).await;
    let (mut w, _) = connect(&mut jobs, register(&["n"], 1, vec![])).await;
    let id = reseolio
        .enqueue_job(enqueue("n", "[]"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let job = w.job().await;
    let resp = reseolio
        .cancel_job(proto::CancelRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.success && resp.message.contains("requested"),
        "{resp:?}"
    );
    match w.next().await {
        work_response::Msg::Cancel(c) => {
            assert_eq!((c.job_id.as_str(), c.attempt), (id.as_str(), job.attempt))
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    let results = w.ack(vec![fail(&job)]).await;
    assert_eq!(results[0].new_status, JobStatus::Cancelled as i32);
    server.shutdown().await;
}

#[tokio::test]
async fn drain_finishes_held_work_then_ends_the_stream() {
    let server = Server::start().await;
    let (mut jobs, mut reseolio) = clients(&server).await;
    let (mut w, _) = connect(&mut jobs, register(&["n"], 1, vec![])).await;
    reseolio.enqueue_job(enqueue("n", "[1]")).await.unwrap();
    reseolio.enqueue_job(enqueue("n", "[2]")).await.unwrap();
    let first = w.job().await;
    w.tx.send(v1::WorkRequest {
        msg: Some(work_request::Msg::Drain(v1::Drain {})),
    })
    .await
    .unwrap();
    let results = w.ack(vec![ok(&first, "1")]).await;
    assert!(results[0].ok);
    assert!(matches!(w.next().await, work_response::Msg::Drained(_)));
    let end = tokio::time::timeout(Duration::from_secs(5), w.rx.next())
        .await
        .unwrap();
    assert!(
        end.is_none(),
        "the stream ends cleanly after Drained: {end:?}"
    );
    // The second job was never sent to the draining worker.
    let pending = reseolio
        .list_jobs(proto::ListJobsRequest {
            statuses: vec![JobStatus::Pending as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.total, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_reconnecting_worker_keeps_the_attempts_it_still_runs() {
    let server = Server::start().await;
    let (mut jobs, mut reseolio) = clients(&server).await;
    let (mut old, _) = connect(&mut jobs, register(&["n"], 1, vec![])).await;
    reseolio.enqueue_job(enqueue("n", "[]")).await.unwrap();
    let job = old.job().await;
    let held = vec![
        v1::Held {
            job_id: job.id.clone(),
            attempt: job.attempt,
        },
        v1::Held {
            job_id: "gone".into(),
            attempt: 3,
        },
    ];
    let (mut new, registered) = connect(&mut jobs, register(&["n"], 1, held)).await;
    assert_eq!(registered.adopted.len(), 1);
    assert_eq!(
        registered
            .lost
            .iter()
            .map(|h| h.job_id.as_str())
            .collect::<Vec<_>>(),
        ["gone"]
    );
    // The old stream closing abandons nothing: the new one holds the attempt.
    drop(old);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let results = new.ack(vec![ok(&job, "7")]).await;
    assert!(results[0].ok, "{:?}", results[0]);
    assert_eq!(results[0].new_status, JobStatus::Success as i32);
    server.shutdown().await;
}

#[tokio::test]
async fn heartbeats_keep_a_long_job_from_timing_out() {
    let server = Server::start().await;
    let (mut jobs, mut reseolio) = clients(&server).await;
    let (mut w, _) = connect(&mut jobs, register(&["long"], 1, vec![])).await;
    let mut req = enqueue("long", "[]");
    req.options = Some(proto::JobOptions {
        timeout_ms: 600,
        max_attempts: 1,
        ..Default::default()
    });
    reseolio.enqueue_job(req).await.unwrap();
    let job = w.job().await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let beat = jobs
            .heartbeat(v1::HeartbeatRequest {
                beats: vec![v1::Beat {
                    job_id: job.id.clone(),
                    attempt: job.attempt,
                }],
                extend_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(beat.results[0].ok, "{:?}", beat.results[0]);
    }
    // 1.2 s after the claim, twice the 600 ms timeout, the attempt is still current.
    let results = w.ack(vec![ok(&job, "1")]).await;
    assert_eq!(results[0].new_status, JobStatus::Success as i32);
    let stale = jobs
        .heartbeat(v1::HeartbeatRequest {
            beats: vec![v1::Beat {
                job_id: job.id.clone(),
                attempt: job.attempt,
            }],
            extend_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stale.results[0].ok && stale.results[0].error.contains("success"));
    server.shutdown().await;
}

#[tokio::test]
async fn work_stream_bad_input() {
    let server = Server::start().await;
    let (mut jobs, _) = clients(&server).await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(v1::WorkRequest {
        msg: Some(work_request::Msg::Drain(v1::Drain {})),
    })
    .await
    .unwrap();
    let e = jobs.work(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("first message must be Register"));

    // A bad ack is refused on its own; the stream and the other acks carry on.
    let (mut w, _) = connect(&mut jobs, register(&["n"], 1, vec![])).await;
    let results = w
        .ack(vec![
            v1::WorkAck {
                job_id: "x".into(),
                attempt: 0,
                success: true,
                ..Default::default()
            },
            v1::WorkAck {
                job_id: "y".into(),
                attempt: 1,
                success: true,
                ..Default::default()
            },
        ])
        .await;
    assert!(
        !results[0].ok && results[0].error.contains("acks[0].attempt"),
        "{:?}",
        results[0]
    );
    assert!(
        !results[1].ok && results[1].error.contains("not found"),
        "{:?}",
        results[1]
    );
    let more = w.ack(vec![]).await;
    assert!(more.is_empty(), "the stream is still open");

    let e = jobs
        .enqueue_batch(v1::EnqueueBatchRequest {
            jobs: vec![enqueue("ok", "[]"), enqueue("", "[]")],
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("jobs[1].name"), "{}", e.message());
    let stats = jobs.stats(v1::StatsRequest {}).await.unwrap().into_inner();
    assert!(
        stats.counts.iter().all(|c| c.count == 0),
        "a refused batch stores nothing"
    );
    let e = jobs
        .purge(v1::PurgeRequest {
            completed_before: 0,
            statuses: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}
