//! The engine: the one place that changes jobs on behalf of clients and workers, and the dispatch
//! loop that pushes due jobs to connected workers.
//!
//! Every mutation goes to the [`Store`] first; only once it is committed does the engine tell
//! anyone (workers, completion subscribers, metrics). The dispatch loop wakes when work may have
//! appeared (an enqueue, an ack freeing capacity, a worker connecting, a retry) or when the store
//! says something becomes due (a delayed job, a lease end, a schedule's tick), fires due cron
//! schedules (their jobs join the same pass), claims for every worker with room in one store call,
//! and hands the jobs to the workers' channels.
//!
//! **Invariant:** a job is sent to at most one worker per attempt: the store's claim moved it to
//! RUNNING with that attempt before it was sent.
//! **Boundary:** wire types never enter here; [`crate::grpc`] converts.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{ConnId, Delivery, Registry, ToWorker};
use crate::machine::{AckEffect, CancelEffect};
use crate::metrics::JobsMetrics;
use crate::model::{Ack, Job, Millis, NewJob, Status, now_millis};
use crate::schedule::{NewSchedule, Schedule, ScheduleChange};
use crate::store::{
    AckResults, Enqueued, JobError, ListFilter, QueueLimits, Stats, Store, StoreError,
};
use crate::store::{FireReport, ScheduleError, ScheduleFilter};

/// A job reached a terminal status.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The job.
    pub job_id: String,
    /// SUCCESS, DEAD or CANCELLED.
    pub status: Status,
    /// The result, when SUCCESS.
    pub result: Option<Vec<u8>>,
    /// The last error, when DEAD or CANCELLED.
    pub error: Option<String>,
}

/// What an engine is configured with.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Never more than `queue_limits[queue]` jobs of a queue running at once.
    pub queue_limits: QueueLimits,
    /// Finished jobs are deleted this long after they finished; `None` keeps them.
    pub retention: Option<Duration>,
}

/// How often the dispatch loop looks for expired leases and due jobs when nothing wakes it.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// How often the dispatch loop looks for due schedules it was not told about (created or
/// changed through another server sharing the database).
const SCHEDULE_POLL: Millis = 1_000;
/// Most schedules checked in one store call (one transaction).
const SCHEDULE_BATCH: usize = 100;
/// Completions buffered for slow subscribers before they must re-read from the store.
const EVENTS: usize = 16_384;

struct Shared<S> {
    store: S,
    registry: Mutex<Registry>,
    wake: Notify,
    events: broadcast::Sender<Completion>,
    metrics: JobsMetrics,
    options: EngineOptions,
    /// Set when the server is going down: closing worker streams then is not the workers' doing,
    /// so their attempts are left RUNNING for them to finish and ack after the restart.
    stopping: CancellationToken,
    /// The earliest `next_run_at` of schedules created or changed through this engine since the
    /// dispatch loop last looked (`Millis::MAX`: none).
    schedule_hint: AtomicI64,
    /// The earliest future moment this server knows work becomes due (a delayed job, a retry
    /// after backoff, a lease end), learned as it happens; `Millis::MAX` when none. Saves asking
    /// the store on every pass of the dispatch loop.
    due_hint: AtomicI64,
}

/// The job engine. Cloning shares it.
pub struct Engine<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: Store> Engine<S> {
    /// An engine over `store`, counting into `metrics`, with default options.
    pub fn new(store: S, metrics: JobsMetrics) -> Self {
        Self::with_options(store, metrics, EngineOptions::default())
    }

    /// An engine over `store` with `options`.
    pub fn with_options(store: S, metrics: JobsMetrics, options: EngineOptions) -> Self {
        let (events, _) = broadcast::channel(EVENTS);
        Self {
            shared: Arc::new(Shared {
                store,
                registry: Mutex::new(Registry::default()),
                wake: Notify::new(),
                events,
                metrics,
                options,
                stopping: CancellationToken::new(),
                schedule_hint: AtomicI64::new(Millis::MAX),
                due_hint: AtomicI64::new(Millis::MAX),
            }),
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Notes that something becomes due at `at`, so the dispatch loop wakes for it.
    fn hint_due(&self, at: Millis) {
        self.shared.due_hint.fetch_min(at, Ordering::AcqRel);
    }

    /// Completions from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Completion> {
        self.shared.events.subscribe()
    }

    fn completed(&self, job: &Job, effect: &AckEffect) {
        if let Some(at) = effect.next_run_at {
            self.hint_due(at);
        }
        let m = &self.shared.metrics;
        match effect.status {
            Status::Success => {
                m.succeeded.with_label_values(&[&job.name]).inc();
            }
            Status::Dead => {
                m.failed.with_label_values(&[&job.name]).inc();
                m.dead.with_label_values(&[&job.name]).inc();
            }
            Status::Cancelled => {
                m.cancelled.with_label_values(&[&job.name]).inc();
            }
            Status::Pending => {
                m.failed.with_label_values(&[&job.name]).inc();
            }
            Status::Running => {}
        }
        if let (
            Some(started),
            Status::Success | Status::Dead | Status::Cancelled | Status::Pending,
        ) = (job.started_at, effect.status)
        {
            m.run_seconds
                .observe(millis_to_secs(now_millis().saturating_sub(started)));
        }
        if effect.status.is_terminal() {
            self.publish(job);
        }
    }

    fn publish(&self, job: &Job) {
        // No subscriber is not an error.
        let _ = self.shared.events.send(Completion {
            job_id: job.id.clone(),
            status: job.status,
            result: job.result.clone(),
            error: job.error.clone(),
        });
    }

    /// Stores new jobs and wakes the dispatcher.
    pub async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, StoreError> {
        let names: Vec<String> = jobs.iter().map(|j| j.name.clone()).collect();
        let first_run = jobs.iter().map(|j| j.run_at).min();
        let out = self.shared.store.enqueue(jobs, now_millis()).await?;
        for (name, e) in names.iter().zip(&out) {
            if !e.deduplicated {
                self.shared
                    .metrics
                    .enqueued
                    .with_label_values(&[name])
                    .inc();
            }
        }
        if let Some(at) = first_run {
            self.hint_due(at);
        }
        self.wake();
        Ok(out)
    }

    /// Applies acks; each gets its own result.
    pub async fn ack(&self, acks: Vec<Ack>) -> Result<AckResults, StoreError> {
        let started = std::time::Instant::now();
        let keys: Vec<(String, Option<u32>)> =
            acks.iter().map(|a| (a.job_id.clone(), a.attempt)).collect();
        let out = self.shared.store.ack(acks, now_millis()).await?;
        let mut freed = false;
        {
            let mut registry = self.registry();
            for ((id, _), result) in keys.iter().zip(&out) {
                if let Ok((job, _)) = result {
                    freed |= registry.release(id, Some(job.attempt));
                }
            }
        }
        for (job, effect) in out.iter().flatten() {
            self.completed(job, effect);
        }
        let per_ack = started.elapsed().as_secs_f64() / keys.len().max(1) as f64;
        for _ in &keys {
            self.shared.metrics.ack_seconds.observe(per_ack);
        }
        if freed {
            self.wake();
        }
        Ok(out)
    }

    /// Extends the leases of running attempts.
    pub async fn heartbeat(
        &self,
        beats: Vec<(String, Option<u32>)>,
        extend: Option<Duration>,
    ) -> Result<Vec<Result<Millis, JobError>>, StoreError> {
        self.shared
            .store
            .heartbeat(beats, extend, now_millis())
            .await
    }

    /// Cancels a job, or asks its worker to stop.
    pub async fn cancel(
        &self,
        id: String,
    ) -> Result<Result<(Job, CancelEffect), JobError>, StoreError> {
        let out = self.shared.store.cancel(id, now_millis()).await?;
        if let Ok((job, effect)) = &out {
            match effect {
                CancelEffect::Cancelled => {
                    self.shared
                        .metrics
                        .cancelled
                        .with_label_values(&[&job.name])
                        .inc();
                    self.publish(job);
                }
                CancelEffect::Requested => {
                    self.registry().notify_cancel(&job.id);
                }
                CancelEffect::AlreadyFinished(_) => {}
            }
        }
        Ok(out)
    }

    /// Revives a DEAD job.
    pub async fn retry(&self, id: String) -> Result<Result<Job, JobError>, StoreError> {
        let out = self.shared.store.retry(id, now_millis()).await?;
        if out.is_ok() {
            self.wake();
        }
        Ok(out)
    }

    /// One job.
    pub async fn get(&self, id: String) -> Result<Option<Job>, StoreError> {
        self.shared.store.get(id).await
    }

    /// A page of jobs and the number matching.
    pub async fn list(&self, filter: ListFilter) -> Result<(Vec<Job>, u64), StoreError> {
        self.shared.store.list(filter).await
    }

    /// Job counts by status.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.shared.store.stats().await
    }

    /// Deletes finished jobs completed before `before`.
    pub async fn purge(&self, before: Millis, statuses: Vec<Status>) -> Result<u64, StoreError> {
        self.shared.store.purge(before, statuses).await
    }

    /// Creates a cron schedule.
    pub async fn create_schedule(
        &self,
        new: NewSchedule,
    ) -> Result<Result<Schedule, ScheduleError>, StoreError> {
        let out = self.shared.store.create_schedule(new, now_millis()).await?;
        if let Ok(s) = &out {
            self.schedule_changed(s);
        }
        Ok(out)
    }

    /// A schedule by id, or by the name of one not deleted.
    pub async fn get_schedule(&self, id_or_name: String) -> Result<Option<Schedule>, StoreError> {
        self.shared.store.get_schedule(id_or_name).await
    }

    /// A page of schedules and the number matching.
    pub async fn list_schedules(
        &self,
        filter: ScheduleFilter,
    ) -> Result<(Vec<Schedule>, u64), StoreError> {
        self.shared.store.list_schedules(filter).await
    }

    /// Updates, pauses, resumes or deletes a schedule.
    pub async fn change_schedule(
        &self,
        id_or_name: String,
        change: ScheduleChange,
    ) -> Result<Result<Schedule, ScheduleError>, StoreError> {
        let out = self
            .shared
            .store
            .change_schedule(id_or_name, change, now_millis())
            .await?;
        if let Ok(s) = &out {
            self.schedule_changed(s);
        }
        Ok(out)
    }

    /// Tells the dispatch loop about a schedule's (new) next tick.
    fn schedule_changed(&self, s: &Schedule) {
        if let Some(at) = s.next_run_at {
            self.shared.schedule_hint.fetch_min(at, Ordering::AcqRel);
            self.wake();
        }
    }

    /// Fires the due schedules; returns when to look again.
    async fn fire_schedules(&self, now: Millis) -> Millis {
        let report = match self
            .shared
            .store
            .fire_due_schedules(now, SCHEDULE_BATCH)
            .await
        {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(error = %e, "cannot fire due schedules");
                return now.saturating_add(millis(IDLE_TICK));
            }
        };
        let FireReport {
            fired,
            broken,
            next_due,
        } = report;
        let full = fired.len() + broken.len() >= SCHEDULE_BATCH;
        let m = &self.shared.metrics;
        for f in &fired {
            let created = f.job.as_ref().filter(|j| !j.deduplicated);
            if let Some(job) = created {
                m.schedule_fired.with_label_values(&[&f.name]).inc();
                m.enqueued.with_label_values(&[&f.name]).inc();
                tracing::debug!(schedule = %f.name, schedule_id = %f.schedule_id, tick = f.tick, job_id = %job.id, "schedule fired");
            }
            if f.late {
                m.schedule_late.with_label_values(&[&f.name]).inc();
                match f.tick {
                    Some(tick) => {
                        tracing::warn!(schedule = %f.name, schedule_id = %f.schedule_id, tick, "schedule missed ticks; fired one job for them (misfire policy coalesce)")
                    }
                    None => {
                        tracing::warn!(schedule = %f.name, schedule_id = %f.schedule_id, "schedule missed ticks; dropped them (misfire policy skip)")
                    }
                }
            }
        }
        for (id, error) in &broken {
            tracing::error!(schedule_id = %id, error = %error, "schedule cannot be read; stopped it");
        }
        if full {
            // More may be due: look again at once.
            self.wake();
            return now;
        }
        next_due
            .unwrap_or(Millis::MAX)
            .min(now.saturating_add(SCHEDULE_POLL))
    }

    /// Registers a worker stream; jobs (and cancels) for it arrive on the returned receiver.
    pub fn connect_worker(
        &self,
        worker_id: String,
        names: Vec<String>,
        concurrency: usize,
    ) -> (ConnId, mpsc::Receiver<ToWorker>) {
        // Room for every job it may hold plus cancels for them.
        let (tx, rx) = mpsc::channel(concurrency.saturating_mul(2).max(1));
        let conn = self.registry().connect(worker_id, names, concurrency, tx);
        self.shared.metrics.workers.inc();
        self.wake();
        (conn, rx)
    }

    /// Re-adopts attempts a reconnecting worker still runs: those still current count against
    /// `conn`; the rest are returned as lost (the worker should stop them).
    pub async fn adopt(
        &self,
        conn: ConnId,
        held: Vec<(String, u32)>,
    ) -> Result<(Vec<(String, u32)>, Vec<(String, u32)>), StoreError> {
        let mut adopted = Vec::new();
        let mut lost = Vec::new();
        for (id, attempt) in held {
            match self.shared.store.get(id.clone()).await? {
                Some(job) if job.status == Status::Running && job.attempt == attempt => {
                    let mut registry = self.registry();
                    registry.adopt(conn, id.clone(), attempt);
                    // A cancel asked for while the worker was away is delivered now.
                    if job.cancel_requested {
                        registry.notify_cancel(&id);
                    }
                    drop(registry);
                    adopted.push((id, attempt));
                }
                _ => lost.push((id, attempt)),
            }
        }
        Ok((adopted, lost))
    }

    /// Sends `conn` no more jobs.
    pub fn drain_worker(&self, conn: ConnId) {
        self.registry().drain(conn);
    }

    /// Attempts `conn` holds now.
    pub fn worker_in_flight(&self, conn: ConnId) -> usize {
        self.registry().in_flight(conn)
    }

    /// A later registration message on a worker's stream.
    pub fn update_worker(&self, conn: ConnId, names: Vec<String>, concurrency: usize) {
        self.registry().update(conn, names, concurrency);
        self.wake();
    }

    /// A worker stream closed. Unless the server is stopping, the attempts it held are abandoned:
    /// pending again at once, or DEAD when out of attempts.
    pub async fn disconnect_worker(&self, conn: ConnId) {
        let held = self.registry().disconnect(conn);
        self.shared.metrics.workers.dec();
        if held.is_empty() || self.shared.stopping.is_cancelled() {
            return;
        }
        self.abandon(held, "worker stream closed").await;
    }

    async fn abandon(&self, held: Vec<(String, u32)>, reason: &str) {
        let n = held.len();
        match self
            .shared
            .store
            .abandon(held, reason.to_owned(), now_millis())
            .await
        {
            Ok(changed) => {
                for (job, effect) in &changed {
                    self.completed(job, effect);
                }
                tracing::info!(jobs = n, reason, "abandoned attempts");
            }
            Err(e) => {
                // The leases still expire and the jobs are retried then.
                tracing::error!(error = %e, jobs = n, "cannot abandon attempts; they will time out");
            }
        }
        self.wake();
    }

    /// Runs the dispatch loop until `stop` is cancelled. Marks the engine as stopping first, so
    /// worker streams closed by the shutdown keep their attempts.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), StoreError> {
        let mut next_expiry: Millis = 0;
        let mut next_store_check: Millis = 0;
        let mut store_next: Option<Millis> = None;
        // When to check schedules next; at once on start, for ticks missed while down.
        let mut schedules_due: Millis = 0;
        loop {
            let now = now_millis();
            schedules_due = schedules_due.min(
                self.shared
                    .schedule_hint
                    .swap(Millis::MAX, Ordering::AcqRel),
            );
            if now >= schedules_due {
                // Before dispatching, so the jobs it enqueues go out in this pass.
                schedules_due = self.fire_schedules(now).await;
            }
            if now >= next_expiry {
                match self.shared.store.expire_leases(now).await {
                    Ok(expired) => {
                        let mut registry = self.registry();
                        for (job, _) in &expired {
                            registry.release(&job.id, Some(job.attempt));
                        }
                        drop(registry);
                        for (job, effect) in &expired {
                            tracing::warn!(job_id = %job.id, name = %job.name, status = %effect.status, "lease expired");
                            self.completed(job, effect);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "lease expiry failed"),
                }
                next_expiry = now + millis(IDLE_TICK);
            }

            if let Err(e) = self.dispatch_once(now).await {
                tracing::error!(error = %e, "dispatch failed");
            }

            // The store is asked at most every IDLE_TICK (it also knows what other servers
            // sharing the database scheduled); in between, the hints this server collects say
            // when to wake.
            if now >= next_store_check {
                store_next = match self.shared.store.next_wakeup(now).await {
                    Ok(next) => next,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the next wake-up time");
                        None
                    }
                };
                next_store_check = now + millis(IDLE_TICK);
            }
            let hint = self.shared.due_hint.load(Ordering::Acquire);
            if hint <= now {
                // Passed: this pass dispatched it. A newer, later hint may have raced in; keep it.
                let _ = self.shared.due_hint.compare_exchange(
                    hint,
                    Millis::MAX,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            let wake_at = [store_next, Some(hint), Some(next_store_check)]
                .into_iter()
                .flatten()
                .filter(|at| *at > now)
                .min()
                .unwrap_or(next_store_check);
            let sleep = Duration::from_millis(
                u64::try_from(wake_at.saturating_sub(now_millis())).unwrap_or(0),
            )
            .min(IDLE_TICK);
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.shared.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
        self.shared.stopping.cancel();
        Ok(())
    }

    /// Marks the engine as stopping without waiting for the loop (for servers that stop their
    /// gRPC side first).
    pub fn begin_stop(&self) {
        self.shared.stopping.cancel();
    }

    async fn dispatch_once(&self, now: Millis) -> Result<(), StoreError> {
        let requests = self.registry().claim_requests();
        if requests.is_empty() {
            return Ok(());
        }
        let (conns, requests): (Vec<ConnId>, Vec<_>) = requests.into_iter().unzip();
        let claimed = self
            .shared
            .store
            .claim(requests, self.shared.options.queue_limits.clone(), now)
            .await?;
        let mut undeliverable = Vec::new();
        {
            let mut registry = self.registry();
            for (conn, jobs) in conns.into_iter().zip(claimed) {
                for job in jobs {
                    if let Some(until) = job.lease_until {
                        self.hint_due(until);
                    }
                    let key = (job.id.clone(), job.attempt);
                    let name = job.name.clone();
                    let wait = now.saturating_sub(job.run_at.max(job.created_at));
                    match registry.deliver(conn, job) {
                        Delivery::Sent => {
                            let m = &self.shared.metrics;
                            m.started.with_label_values(&[&name]).inc();
                            m.start_delay_seconds.observe(millis_to_secs(wait));
                        }
                        Delivery::Undeliverable => undeliverable.push(key),
                    }
                }
            }
        }
        if !undeliverable.is_empty() {
            self.abandon(undeliverable, "worker went away before delivery")
                .await;
        }
        Ok(())
    }

    /// Deletes finished jobs older than the retention, if one is set. Returns how many.
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        let Some(retention) = self.shared.options.retention else {
            return Ok(0);
        };
        let before = now_millis().saturating_sub(millis(retention));
        let n = self.shared.store.purge(before, Vec::new()).await?;
        if n > 0 {
            tracing::info!(
                deleted = n,
                ?retention,
                "purged finished jobs past retention"
            );
        }
        Ok(n)
    }

    /// Refreshes the queue-depth gauges from the store.
    pub async fn refresh_depth(&self) -> Result<(), StoreError> {
        let stats = self.shared.store.stats().await?;
        for (status, n) in stats.by_status {
            self.shared
                .metrics
                .depth
                .with_label_values(&[status.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(())
    }
}

fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn millis_to_secs(ms: Millis) -> f64 {
    ms.max(0) as f64 / 1000.0
}
