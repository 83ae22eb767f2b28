//! The harness's side of Gantry's own protocol (`gantry.jobs.v1.Jobs`), as the Rust SDK uses it:
//! closed-loop enqueues in `EnqueueBatch` calls, and one `Work` stream per worker on which acks
//! travel in batches (whatever handlers finished since the last batch) and are answered in
//! order. Handlers, the ledger and the end-of-run check are shared with the contract's
//! [driver](super::driver); only the transport differs.
//!
//! After a broken stream the worker reconnects under the same id, declares the attempts it
//! still holds (running handlers and acks without a verdict) and sends those acks again; the
//! server answers each by its attempt, so a resent ack is accepted once or refused as stale.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gantry_jobs::proto;
pub use gantry_jobs::proto::gantry::jobs::v1;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::driver::{
    Abort, Acker, Ctx, EnqueueShared, Verdict, WorkerSpec, enqueue_request, handle, retryable,
    sleep_until_opt,
};
use super::ledger::Enqueued;

/// A client of Gantry's own jobs API.
pub type JobsClient = v1::jobs_client::JobsClient<Channel>;

/// A finished handler's ack on its way to the worker's stream, and where its verdict goes.
pub struct PendingAck {
    ack: v1::WorkAck,
    reply: oneshot::Sender<Verdict>,
}

type Key = (String, i32);

/// Hands `request` to the worker's stream and waits for the server's verdict.
pub(super) async fn ack(
    tx: &mpsc::UnboundedSender<PendingAck>,
    request: proto::AckRequest,
) -> Verdict {
    let result = request.result.unwrap_or_default();
    let (reply, verdict) = oneshot::channel();
    let ack = v1::WorkAck {
        job_id: request.job_id,
        attempt: request.attempt,
        success: result.success,
        result: result.return_value,
        error: result.error,
        retry: result.should_retry,
    };
    if tx.send(PendingAck { ack, reply }).is_err() {
        return Err(true);
    }
    // Dropped unanswered: the worker stopped or gave up on the server.
    verdict.await.unwrap_or(Err(true))
}

/// Enqueues the plan's jobs `range` in one `EnqueueBatch` call (all or nothing), retried within
/// the patience when the run's enqueues are idempotent.
pub(super) async fn enqueue_batch(
    shared: &EnqueueShared,
    mut client: JobsClient,
    range: Range<usize>,
) -> Vec<Enqueued> {
    let ctx = &shared.ctx;
    let request = v1::EnqueueBatchRequest {
        jobs: range.clone().map(|i| enqueue_request(shared, i)).collect(),
    };
    let at = ctx.clock.now();
    let give_up = Instant::now() + ctx.patience;
    let mut delay = Duration::from_millis(20);
    loop {
        match client.enqueue_batch(request.clone()).await {
            Ok(response) => {
                return response
                    .into_inner()
                    .results
                    .into_iter()
                    .zip(range)
                    .map(|(r, i)| Enqueued {
                        id: r.job_id,
                        kind: usize::from(shared.spec.plan[i]),
                        at,
                    })
                    .collect();
            }
            Err(s) if shared.spec.idempotent && retryable(s.code()) && Instant::now() < give_up => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(_) => {
                shared
                    .errors
                    .fetch_add(range.len() as u64, Ordering::Relaxed);
                return Vec::new();
            }
        }
    }
}

/// A resent success ack was refused: it is ours after all when the job succeeded with this
/// attempt (the broken stream's server applied it); otherwise it was refused.
async fn resolve_resent(
    mut client: proto::reseolio_client::ReseolioClient<Channel>,
    job_id: &str,
    attempt: i32,
) -> Verdict {
    let request = proto::GetJobRequest {
        job_id: job_id.to_owned(),
    };
    match client.get_job(request).await {
        Ok(job) => {
            let job = job.into_inner();
            if job.attempt == attempt && job.status == proto::JobStatus::Success as i32 {
                Ok(job.status)
            } else {
                Err(false)
            }
        }
        Err(_) => Err(false),
    }
}

/// Most acks in one `AckBatch`.
const MAX_ACK_BATCH: usize = 1_000;

/// One harness worker on a `Work` stream.
pub(super) async fn worker(
    ctx: Arc<Ctx>,
    channel: Channel,
    spec: WorkerSpec,
    stop: CancellationToken,
) {
    let client_channel = channel.clone();
    let client = JobsClient::new(channel);
    let names = ctx.names();
    let mut rng = StdRng::seed_from_u64(spec.seed ^ u64::from(spec.index).wrapping_mul(0x9e37));
    let mut incarnation = 0u32;
    let mut backoff = Duration::from_millis(50);
    let mut handlers: JoinSet<Key> = JoinSet::new();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<PendingAck>();
    // Attempts pushed here whose handler has not acked yet.
    let mut running: HashSet<Key> = HashSet::new();
    // Acks sent and not yet answered.
    let mut sent: HashMap<Key, PendingAck> = HashMap::new();
    // Once stopping: when to give up on the verdicts still awaited.
    let mut stopping: Option<Instant> = None;
    // A new identity (after churn) holds nothing from the old one.
    let mut fresh = true;
    // Acks sent again after a reconnect, not answered yet.
    let mut resent: HashSet<Key> = HashSet::new();
    let lookups = proto::reseolio_client::ReseolioClient::new(client_channel.clone());
    'connect: loop {
        if stopping.is_some() && handlers.is_empty() && sent.is_empty() {
            break;
        }
        if stop.is_cancelled() && stopping.is_none() {
            stopping = Some(Instant::now() + ctx.patience);
        }
        let (tx, rx) = mpsc::channel(64);
        let held = if fresh {
            Vec::new()
        } else {
            running
                .iter()
                .chain(sent.keys())
                .map(|(job_id, attempt)| v1::Held {
                    job_id: job_id.clone(),
                    attempt: *attempt,
                })
                .collect()
        };
        let register = v1::Register {
            worker_id: format!("{}-w{}-{incarnation}", spec.tag, spec.index),
            names: names.clone(),
            concurrency: spec.concurrency,
            held,
        };
        let msg = |m: v1::work_request::Msg| v1::WorkRequest { msg: Some(m) };
        if tx
            .send(msg(v1::work_request::Msg::Register(register)))
            .await
            .is_err()
        {
            break;
        }
        let mut streamer = client.clone();
        let opened = tokio::select! {
            () = stop.cancelled(), if stopping.is_none() => break,
            () = sleep_until_opt(stopping) => break,
            opened = streamer.work(ReceiverStream::new(rx)) => opened,
        };
        let mut inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(_) => {
                ctx.counters.stream_breaks.fetch_add(1, Ordering::Relaxed);
                if stopping.is_some() {
                    break;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        fresh = false;
        if !sent.is_empty() {
            resent.extend(sent.keys().cloned());
            let all: Vec<v1::WorkAck> = sent.values().map(|p| p.ack.clone()).collect();
            for chunk in all.chunks(MAX_ACK_BATCH) {
                let acks = chunk.to_vec();
                let _ = tx
                    .send(msg(v1::work_request::Msg::Acks(v1::AckBatch { acks })))
                    .await;
            }
        }
        let abort = Abort::new();
        let churn_at = spec
            .churn
            .map(|(lo, hi)| Instant::now() + rng.random_range(lo..=hi.max(lo)));
        loop {
            if stopping.is_some() && handlers.is_empty() && sent.is_empty() {
                break 'connect;
            }
            tokio::select! {
                biased;
                () = stop.cancelled(), if stopping.is_none() => {
                    abort.fire(ctx.clock.now());
                    stopping = Some(Instant::now() + ctx.patience);
                }
                () = sleep_until_opt(stopping) => break 'connect,
                () = sleep_until_opt(churn_at), if stopping.is_none() => {
                    abort.fire(ctx.clock.now());
                    ctx.counters.churns.fetch_add(1, Ordering::Relaxed);
                    incarnation += 1;
                    fresh = true;
                    continue 'connect;
                }
                Some(joined) = handlers.join_next(), if !handlers.is_empty() => {
                    if let Ok(key) = joined {
                        running.remove(&key);
                    }
                }
                Some(first) = ack_rx.recv() => {
                    let mut acks = Vec::new();
                    let mut next = Some(first);
                    while let Some(p) = next {
                        let key = (p.ack.job_id.clone(), p.ack.attempt);
                        running.remove(&key);
                        acks.push(p.ack.clone());
                        sent.insert(key, p);
                        next = if acks.len() < MAX_ACK_BATCH { ack_rx.try_recv().ok() } else { None };
                    }
                    // A broken stream shows on the inbound side; these are resent after it.
                    // A stream that takes nothing must not keep the worker from seeing a stop.
                    let mut send =
                        std::pin::pin!(tx.send(msg(v1::work_request::Msg::Acks(v1::AckBatch { acks }))));
                    loop {
                        tokio::select! {
                            biased;
                            _ = &mut send => break,
                            () = sleep_until_opt(stopping) => break 'connect,
                            () = stop.cancelled(), if stopping.is_none() => {
                                abort.fire(ctx.clock.now());
                                stopping = Some(Instant::now() + ctx.patience);
                            }
                        }
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(v1::WorkResponse { msg: Some(m) })) => match m {
                        v1::work_response::Msg::Job(job) => {
                            backoff = Duration::from_millis(50);
                            let key = (job.id.clone(), job.attempt);
                            running.insert(key.clone());
                            let run = handle(
                                Arc::clone(&ctx),
                                Acker::Stream(ack_tx.clone()),
                                job,
                                ctx.clock.now(),
                                spec.index,
                                Arc::clone(&abort),
                            );
                            handlers.spawn(async move {
                                run.await;
                                key
                            });
                        }
                        v1::work_response::Msg::Acks(answers) => {
                            for r in answers.results {
                                let key = (r.job_id, r.attempt);
                                let was_resent = resent.remove(&key);
                                if let Some(p) = sent.remove(&key) {
                                    if !r.ok && was_resent && p.ack.success {
                                        // The old stream may have applied it before it broke:
                                        // then this attempt is the job's last, and SUCCESS.
                                        let lookup = lookups.clone();
                                        tokio::spawn(async move {
                                            let verdict = resolve_resent(lookup, &key.0, key.1).await;
                                            let _ = p.reply.send(verdict);
                                        });
                                        continue;
                                    }
                                    let verdict = if r.ok { Ok(r.new_status) } else { Err(false) };
                                    let _ = p.reply.send(verdict);
                                }
                            }
                        }
                        // No cancels or drains in the scenarios; lost attempts show as refused acks.
                        _ => {}
                    },
                    Ok(Some(v1::WorkResponse { msg: None })) => {}
                    Ok(None) | Err(_) => {
                        ctx.counters.stream_breaks.fetch_add(1, Ordering::Relaxed);
                        if stopping.is_some() {
                            break 'connect;
                        }
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue 'connect;
                    }
                },
            }
        }
    }
    // Verdicts never coming: their handlers record the acks as undelivered.
    drop(sent);
    ack_rx.close();
    while let Some(p) = ack_rx.recv().await {
        drop(p);
    }
    while handlers.join_next().await.is_some() {}
}
