//! The action worker: claims `observer:*` jobs from the jobs store, runs each through the
//! [`Runner`], and acknowledges what happened — so backoff, timeouts, crash recovery and the
//! dead-letter queue are the jobs engine's.
//!
//! Every `gantry observer run` process works, leader or standby: the store's
//! `FOR UPDATE SKIP LOCKED` claim spreads the jobs and never hands one to two workers at once.
//! An attempt's lease is its action's timeout plus a grace, so a worker that dies mid-attempt
//! loses it to the next lease check (any worker runs one every second) and the job is retried
//! after backoff. Acks are batched: one transaction for whatever finished meanwhile. The jobs
//! of a `search` action claimed together go out as one `_bulk` request.
//!
//! Delivery is at least once: a worker that delivers and dies before its ack commits leaves the
//! job to be run again, with the same `Idempotency-Key`.

use std::sync::Arc;
use std::time::Duration;

use gantry_jobs::model::{Ack, Job, Outcome, now_millis};
use gantry_jobs::store::postgres::PostgresStore;
use gantry_jobs::store::{ClaimRequest, Store};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::action::Attempt;
use crate::runner::Runner;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Its id in the jobs store (`worker_id` of the jobs it holds).
    pub worker_id: String,
    /// Attempts run at once.
    pub concurrency: usize,
    /// Pause between claims when there is nothing to do and nothing woke it.
    pub poll: Duration,
}

/// Acks written per transaction, at most.
const ACK_BATCH: usize = 512;

/// The ack for one attempt's outcome.
pub fn ack(job: &Job, attempt: Attempt) -> Ack {
    let outcome = match attempt {
        Attempt::Done(result) => Outcome::Success(result.to_string().into_bytes()),
        Attempt::Retry { error, after: None } => Outcome::Failure { error, retry: true },
        Attempt::Retry {
            error,
            after: Some(after),
        } => Outcome::RetryAfter {
            error,
            after_ms: i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        },
        Attempt::GiveUp(error) => Outcome::Failure {
            error,
            retry: false,
        },
        Attempt::Deferred { error, after } => Outcome::Defer {
            error,
            after_ms: i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        },
    };
    Ack {
        job_id: job.id.clone(),
        attempt: Some(job.attempt),
        outcome,
    }
}

/// Runs until `stop`, then lets the attempts in flight finish (each is bounded by its timeout)
/// and writes their acks. `wake` hurries the next claim (the listener pokes it after a
/// hand-off).
pub async fn run(
    store: PostgresStore,
    runner: Arc<Runner>,
    options: WorkerOptions,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let names = runner.job_names();
    if names.is_empty() {
        stop.cancelled().await;
        return;
    }
    let concurrency = options.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(concurrency));
    let (acks, ack_rx) = mpsc::channel::<Ack>(concurrency * 2);
    let acker = tokio::spawn(write_acks(store.clone(), ack_rx));
    let mut last_expiry = tokio::time::Instant::now();
    let mut store_down = false;
    while !stop.is_cancelled() {
        if last_expiry.elapsed() >= Duration::from_secs(1) {
            last_expiry = tokio::time::Instant::now();
            match store.expire_leases(now_millis()).await {
                Ok(expired) if !expired.is_empty() => {
                    tracing::info!(
                        expired = expired.len(),
                        "action attempts timed out (lease expired)"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lease check failed"),
            }
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                () = stop.cancelled() => break,
                permit = Arc::clone(&slots).acquire_owned() => drop(permit),
            }
            continue;
        }
        let request = ClaimRequest {
            worker_id: options.worker_id.clone(),
            names: names.clone(),
            limit: free,
        };
        let claimed = match store
            .claim(vec![request], Arc::default(), now_millis())
            .await
        {
            Ok(mut per_request) => {
                if store_down {
                    tracing::info!("jobs store reachable again");
                    store_down = false;
                }
                per_request.pop().unwrap_or_default()
            }
            Err(e) => {
                if !store_down {
                    tracing::warn!(error = %e, "cannot claim action jobs; retrying");
                    store_down = true;
                }
                Vec::new()
            }
        };
        let got = claimed.len();
        // Jobs of an action that batches (search: one `_bulk`) run together; others alone.
        let mut groups: Vec<Vec<Job>> = Vec::new();
        let mut batched: std::collections::HashMap<String, usize> = Default::default();
        for job in claimed {
            if runner.batches(&job.name) {
                match batched.get(&job.name) {
                    Some(&g) => groups[g].push(job),
                    None => {
                        batched.insert(job.name.clone(), groups.len());
                        groups.push(vec![job]);
                    }
                }
            } else {
                groups.push(vec![job]);
            }
        }
        for group in groups {
            let n = u32::try_from(group.len()).unwrap_or(u32::MAX);
            let Ok(permit) = Arc::clone(&slots).try_acquire_many_owned(n) else {
                break;
            };
            let runner = Arc::clone(&runner);
            let acks = acks.clone();
            tokio::spawn(async move {
                let args: Vec<&[u8]> = group.iter().map(|j| j.args.as_slice()).collect();
                let attempts = runner.run_many(&group[0].name, &args).await;
                for (job, attempt) in group.iter().zip(attempts) {
                    if let Attempt::GiveUp(error) = &attempt {
                        tracing::warn!(job = %job.id, name = %job.name, %error, "action failed for good: to the dead-letter queue");
                    }
                    // The worker waits for every slot before it stops, so the acker is there.
                    let _ = acks.send(ack(job, attempt)).await;
                }
                drop(permit);
            });
        }
        if got < free {
            tokio::select! {
                () = stop.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(options.poll) => {}
            }
        }
    }
    // Let what runs finish and its acks be written.
    let _all = slots
        .acquire_many(u32::try_from(concurrency).unwrap_or(u32::MAX))
        .await;
    drop(acks);
    let _ = acker.await;
}

/// Writes acks in batches until every sender is gone.
async fn write_acks(store: PostgresStore, mut rx: mpsc::Receiver<Ack>) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    while rx.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let acks = std::mem::take(&mut batch);
        let n = acks.len();
        // A failed write leaves the attempts running until their leases expire: they are then
        // retried (at least once, never lost).
        match store.ack(acks, now_millis()).await {
            Ok(results) => {
                for r in results.iter().filter_map(|r| r.as_ref().err()) {
                    tracing::info!(error = %r, "ack refused (the attempt was no longer current)");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, acks = n, "cannot write acks; their attempts will time out and retry")
            }
        }
    }
}
