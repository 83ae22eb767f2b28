//! `Worker` behaviour: retries, bad input, panics, concurrency, cancellation, heartbeats, drain
//! and reconnection across a server restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gantry_jobs_client::{
    Backoff, ClientError, EnqueueOptions, HandlerError, JobContext, JobStatus, NewJob, Worker,
    WorkerError,
};
use tokio::sync::{Semaphore, mpsc};

use crate::server::{Server, add, spawn};

const WAIT: Duration = Duration::from_secs(10);

fn fast_retries(max_attempts: u32) -> EnqueueOptions {
    EnqueueOptions {
        max_attempts: Some(max_attempts),
        backoff: Some(Backoff::Fixed),
        initial_delay: Some(Duration::from_millis(10)),
        jitter: Some(0.0),
        ..Default::default()
    }
}

async fn started(rx: &mut mpsc::Receiver<String>) -> String {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no handler started within 10 s")
        .expect("channel closed")
}

#[tokio::test]
async fn failures_are_retried_then_dead_is_a_typed_error() {
    let server = Server::start().await;
    let client = server.client().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = spawn(
        server
            .worker()
            .handler("flaky", {
                let runs = Arc::clone(&runs);
                move |(): ()| {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    async move { Err::<(), _>(HandlerError::new(format!("boom {n}"))) }
                }
            })
            .handler("panics", |(): ()| async move {
                if true {
                    panic!("handler bug");
                }
                Ok::<(), HandlerError>(())
            })
            .handler("math:add", add)
            .build()
            .unwrap(),
    );

    let job = client.enqueue("flaky", &(), fast_retries(3)).await.unwrap();
    match client.result::<()>(&job.id, WAIT).await.unwrap_err() {
        ClientError::Dead {
            id,
            attempts,
            error,
        } => {
            assert_eq!(
                (id.as_str(), attempts, error.as_str()),
                (job.id.as_str(), 3, "boom 3")
            );
        }
        other => panic!("expected Dead, got {other}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // A panic is a failed attempt like any other, and the worker carries on.
    let job = client
        .enqueue("panics", &(), fast_retries(2))
        .await
        .unwrap();
    match client.result::<()>(&job.id, WAIT).await.unwrap_err() {
        ClientError::Dead {
            attempts, error, ..
        } => {
            assert_eq!(attempts, 2);
            assert!(error.contains("panicked: handler bug"), "{error}");
        }
        other => panic!("expected Dead, got {other}"),
    }
    let job = client
        .enqueue("math:add", &(1, 1), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(client.result::<i64>(&job.id, WAIT).await.unwrap(), 2);

    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn bad_arguments_are_dead_without_retries() {
    let server = Server::start().await;
    let client = server.client().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let permanent = Arc::new(AtomicUsize::new(0));
    let worker = spawn(
        server
            .worker()
            .handler("math:add", {
                let calls = Arc::clone(&calls);
                move |args: (i64, i64)| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    add(args)
                }
            })
            .handler("strict", {
                let permanent = Arc::clone(&permanent);
                move |(n,): (i64,)| {
                    permanent.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < 0 {
                            return Err(HandlerError::permanent("negative input"));
                        }
                        Ok(n)
                    }
                }
            })
            .build()
            .unwrap(),
    );
    let job = client
        .enqueue("math:add", &("two", "three"), fast_retries(5))
        .await
        .unwrap();
    match client.result::<i64>(&job.id, WAIT).await.unwrap_err() {
        ClientError::Dead {
            attempts, error, ..
        } => {
            assert_eq!(attempts, 1, "bad input is not retried");
            assert!(
                error.contains("invalid arguments for `math:add`"),
                "{error}"
            );
        }
        other => panic!("expected Dead, got {other}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");

    let job = client
        .enqueue("strict", &(-1,), fast_retries(5))
        .await
        .unwrap();
    assert!(matches!(
        client.result::<i64>(&job.id, WAIT).await.unwrap_err(),
        ClientError::Dead { attempts: 1, .. }
    ));
    assert_eq!(permanent.load(Ordering::SeqCst), 1);
    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn oversized_results_fail_without_retries() {
    let server = Server::start().await;
    let client = server.client().await;
    let worker = spawn(
        server
            .worker()
            .handler("big", |(n,): (usize,)| async move {
                Ok::<_, HandlerError>("x".repeat(n))
            })
            .build()
            .unwrap(),
    );
    // Just under the server's 1 MiB limit: delivered, alongside others in the same batches.
    let jobs = (0..3)
        .map(|_| NewJob::new("big", &(900_000,)))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    for job in client.enqueue_batch(jobs).await.unwrap() {
        let s: String = client.result(&job.id, WAIT).await.unwrap();
        assert_eq!(s.len(), 900_000);
    }
    // Over it: the worker fails the job itself instead of sending what the server would refuse.
    let job = client
        .enqueue("big", &(2 << 20,), fast_retries(3))
        .await
        .unwrap();
    match client.result::<String>(&job.id, WAIT).await.unwrap_err() {
        ClientError::Dead {
            attempts, error, ..
        } => {
            assert_eq!(attempts, 1);
            assert!(error.contains("the limit is 1048576"), "{error}");
        }
        other => panic!("expected Dead, got {other}"),
    }
    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn concurrency_is_respected() {
    let server = Server::start().await;
    let client = server.client().await;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let worker = spawn(
        server
            .worker()
            .concurrency(2)
            .handler("slow", {
                let (now, peak) = (Arc::clone(&now), Arc::clone(&peak));
                move |(): ()| {
                    let (now, peak) = (Arc::clone(&now), Arc::clone(&peak));
                    async move {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, HandlerError>(n)
                    }
                }
            })
            .build()
            .unwrap(),
    );
    let jobs = (0..6)
        .map(|_| NewJob::new("slow", &()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let started = Instant::now();
    for job in client.enqueue_batch(jobs).await.unwrap() {
        let n: usize = client.result(&job.id, WAIT).await.unwrap();
        assert!(n <= 2, "{n} handlers at once");
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "6 jobs of 100 ms, 2 at a time"
    );
    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn cancel_reaches_a_running_handler() {
    let server = Server::start().await;
    let client = server.client().await;
    let (tx, mut rx) = mpsc::channel(4);
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let worker = spawn(
        server
            .worker()
            .cancel_grace(Duration::from_millis(200))
            .handler_with_context("polite", {
                let (tx, saw_cancel) = (tx.clone(), Arc::clone(&saw_cancel));
                move |(): (), ctx: JobContext| {
                    let (tx, saw_cancel) = (tx.clone(), Arc::clone(&saw_cancel));
                    async move {
                        assert_eq!((ctx.name(), ctx.attempt()), ("polite", 1));
                        tx.send(ctx.job_id().to_owned()).await.unwrap();
                        ctx.cancelled().await;
                        saw_cancel.store(ctx.is_cancelled(), Ordering::SeqCst);
                        Err::<(), _>(HandlerError::new("stopped on request"))
                    }
                }
            })
            .handler_with_context("stubborn", move |(): (), ctx: JobContext| {
                let tx = tx.clone();
                async move {
                    tx.send(ctx.job_id().to_owned()).await.unwrap();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .unwrap(),
    );

    let polite = client
        .enqueue("polite", &(), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(started(&mut rx).await, polite.id);
    let outcome = client.cancel(&polite.id).await.unwrap();
    assert!(outcome.accepted, "{}", outcome.message);
    let e = client.result::<()>(&polite.id, WAIT).await.unwrap_err();
    assert!(matches!(e, ClientError::Cancelled { .. }), "{e}");
    assert!(saw_cancel.load(Ordering::SeqCst));

    // A handler that ignores the cancel is aborted after the grace period.
    let stubborn = client
        .enqueue("stubborn", &(), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(started(&mut rx).await, stubborn.id);
    let asked = Instant::now();
    assert!(client.cancel(&stubborn.id).await.unwrap().accepted);
    let job = client.wait(&stubborn.id, WAIT).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(asked.elapsed() >= Duration::from_millis(200));
    assert!(job.error.unwrap().contains("did not return"));

    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_short_lease_alive() {
    let server = Server::start().await;
    let client = server.client().await;
    let worker = spawn(
        server
            .worker()
            .handler("long", |(): ()| async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok::<_, HandlerError>("done")
            })
            .build()
            .unwrap(),
    );
    let job = client
        .enqueue(
            "long",
            &(),
            EnqueueOptions {
                timeout: Some(Duration::from_millis(600)),
                max_attempts: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Without heartbeats the 300 ms lease would expire and the only attempt would be DEAD.
    assert_eq!(
        client.result::<String>(&job.id, WAIT).await.unwrap(),
        "done"
    );
    let job = client.get(&job.id).await.unwrap();
    assert_eq!((job.status, job.attempt), (JobStatus::Success, 1));
    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_jobs_and_takes_no_new_ones() {
    let server = Server::start().await;
    let client = server.client().await;
    let (tx, mut rx) = mpsc::channel(4);
    let worker = spawn(
        server
            .worker()
            .concurrency(4)
            .handler_with_context("slow", move |(): (), ctx: JobContext| {
                let tx = tx.clone();
                async move {
                    tx.send(ctx.job_id().to_owned()).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok::<_, HandlerError>(ctx.is_cancelled())
                }
            })
            .build()
            .unwrap(),
    );
    let running = client
        .enqueue("slow", &(), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(started(&mut rx).await, running.id);

    let stopping = tokio::spawn(worker.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = client
        .enqueue("slow", &(), EnqueueOptions::default())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The running job finished (and was not cancelled); the new one was left for others.
    let done = client.get(&running.id).await.unwrap();
    assert_eq!(done.status, JobStatus::Success);
    assert!(!done.result::<bool>().unwrap().unwrap(), "not cancelled");
    let waiting = client.get(&later.id).await.unwrap();
    assert_eq!((waiting.status, waiting.attempt), (JobStatus::Pending, 0));
    assert!(rx.try_recv().is_err(), "no handler started after the drain");
    server.stop().await;
}

#[tokio::test]
async fn drain_timeout_aborts_handlers() {
    let server = Server::start().await;
    let client = server.client().await;
    let (tx, mut rx) = mpsc::channel(1);
    let worker = spawn(
        server
            .worker()
            .drain_timeout(Duration::from_millis(200))
            .handler_with_context("forever", move |(): (), ctx: JobContext| {
                let tx = tx.clone();
                async move {
                    tx.send(ctx.job_id().to_owned()).await.unwrap();
                    std::future::pending::<()>().await;
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .unwrap(),
    );
    let job = client
        .enqueue("forever", &(), fast_retries(3))
        .await
        .unwrap();
    started(&mut rx).await;
    match worker.stop().await.unwrap_err() {
        WorkerError::DrainTimedOut { abandoned, .. } => assert_eq!(abandoned, 1),
        other => panic!("expected DrainTimedOut, got {other}"),
    }
    // The stream closed with the attempt held: the server requeues it at once.
    let deadline = Instant::now() + WAIT;
    loop {
        let job = client.get(&job.id).await.unwrap();
        if job.status == JobStatus::Pending {
            assert_eq!(job.attempt, 1);
            break;
        }
        assert!(Instant::now() < deadline, "still {}", job.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_worker_reconnects_after_a_server_restart_and_readopts_its_attempts() {
    let server = Server::start().await;
    let client = server.client().await;
    let (tx, mut rx) = mpsc::channel(4);
    // Job `n` (0, 1, 2) finishes when `release[n]` gets a permit, or fails when cancelled.
    let release: Arc<[Semaphore; 3]> = Arc::new(std::array::from_fn(|_| Semaphore::new(0)));
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = spawn(
        server
            .worker()
            .concurrency(4)
            .handler_with_context("hold", {
                let (release, runs) = (Arc::clone(&release), Arc::clone(&runs));
                move |(n,): (usize,), ctx: JobContext| {
                    let (tx, release, runs) = (tx.clone(), Arc::clone(&release), Arc::clone(&runs));
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tx.send(ctx.job_id().to_owned()).await.unwrap();
                        tokio::select! {
                            permit = release[n].acquire() => {
                                permit.unwrap().forget();
                                Ok(n * 10)
                            }
                            () = ctx.cancelled() => Err(HandlerError::new("cancelled")),
                        }
                    }
                }
            })
            .handler("math:add", add)
            .build()
            .unwrap(),
    );
    let mut ids = Vec::new();
    for n in 0..3_usize {
        let job = client
            .enqueue("hold", &(n,), EnqueueOptions::default())
            .await
            .unwrap();
        ids.push(job.id);
    }
    let mut running = Vec::new();
    for _ in 0..3 {
        running.push(started(&mut rx).await);
    }
    running.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(running, expected);

    // The server stops: the worker's stream ends UNAVAILABLE. Job 1 finishes while the server is
    // down, so its ack has nowhere to go yet.
    let (addr, dir) = server.shutdown().await;
    release[1].add_permits(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = Server::start_again(addr, dir).await;
    let client = server.client().await;

    // The worker comes back by itself and takes new work.
    let job = client
        .enqueue("math:add", &(20, 22), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(client.result::<i64>(&job.id, WAIT).await.unwrap(), 42);
    // Job 1's ack, held across the restart, was delivered on the new stream.
    assert_eq!(client.result::<usize>(&ids[1], WAIT).await.unwrap(), 10);

    // Jobs 0 and 2 ran across the restart and were re-adopted by the new stream: a cancel now
    // reaches the worker (the server routes it to the stream holding the attempt), and an ack
    // lands on it.
    assert!(client.cancel(&ids[2]).await.unwrap().accepted);
    let e = client.result::<usize>(&ids[2], WAIT).await.unwrap_err();
    assert!(matches!(e, ClientError::Cancelled { .. }), "{e}");
    release[0].add_permits(1);
    assert_eq!(client.result::<usize>(&ids[0], WAIT).await.unwrap(), 0);

    for id in &ids {
        assert_eq!(
            client.get(id).await.unwrap().attempt,
            1,
            "job {id} ran once"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "no handler ran twice");
    worker.stop().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn the_worker_waits_for_a_server_that_is_not_up_yet() {
    // Reserve a port, then free it: the worker starts first and retries until a server binds it.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let worker = spawn(
        Worker::builder(&addr.to_string())
            .handler("math:add", add)
            .build()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = std::env::temp_dir().join(format!(
        "gantry-jobs-client-late-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let server = Server::start_again(addr, dir).await;
    let client = server.client().await;
    let job = client
        .enqueue("math:add", &(1, 2), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(client.result::<i64>(&job.id, WAIT).await.unwrap(), 3);
    worker.stop().await.unwrap();
    server.stop().await;
}

#[test]
fn builder_refuses_bad_setups() {
    assert!(matches!(
        Worker::builder("127.0.0.1:1").build().unwrap_err(),
        WorkerError::NoHandlers
    ));
    assert!(matches!(
        Worker::builder("127.0.0.1:1")
            .handler("a", add)
            .handler("a", add)
            .build()
            .unwrap_err(),
        WorkerError::DuplicateHandler(name) if name == "a"
    ));
    assert!(matches!(
        Worker::builder("127.0.0.1:1")
            .handler("", add)
            .build()
            .unwrap_err(),
        WorkerError::InvalidHandlerName(_)
    ));
    assert!(matches!(
        Worker::builder("http://bad host")
            .handler("a", add)
            .build()
            .unwrap_err(),
        WorkerError::InvalidAddress { .. }
    ));
    let worker = Worker::builder("127.0.0.1:1")
        .worker_id("w-1")
        .handler("a", add)
        .build()
        .unwrap();
    assert_eq!(worker.worker_id(), "w-1");
}
