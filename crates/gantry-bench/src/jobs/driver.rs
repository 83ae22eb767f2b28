//! The harness's side of the Reseolio contract: enqueuers, workers and the end-of-run check, all
//! through `reseolio.Reseolio` calls only (EnqueueJob, PollJobs, AckJob, GetJob), so any server
//! speaking the contract can be measured.
//!
//! Workers behave like the SDK: one PollJobs stream per worker (its own worker id, the
//! scenario's job names, a concurrency), a handler per pushed job, one unary AckJob per job
//! (carrying Gantry's `attempt` fencing field, which other servers ignore), reconnecting with
//! backoff when the stream breaks. Every push and ack is written to the [ledger](super::ledger).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use gantry_jobs::proto::reseolio_client::ReseolioClient;
use gantry_jobs::proto::{self, JobStatus};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::ledger::{Enqueued, Final, KindRules, Run, RunEnd};
use super::native;
use crate::stats::{Clock, Micros};

/// A client of the contract.
pub type Client = ReseolioClient<Channel>;

/// A lazily connecting channel to `addr` (`host:port` or a URL); it reconnects by itself after
/// the server goes away, calls failing with UNAVAILABLE meanwhile.
pub fn channel(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad server address {addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// What a job's handler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Acks success at once.
    Noop,
    /// Works this long, then acks success — or acks failure ("timed out") when its attempt's
    /// timeout (the job's `timeout_ms`, or the server's `deadline_ms` if sooner) comes first.
    Sleep(Duration),
    /// Acks failure (retry requested) at once.
    Fail,
}

/// One kind of job in a scenario.
#[derive(Debug, Clone)]
pub struct Kind {
    /// Its job name (unique to the run).
    pub name: String,
    /// Its handler.
    pub behaviour: Behaviour,
    /// The options it is enqueued with.
    pub options: proto::JobOptions,
    /// What the analysis expects of it.
    pub rules: KindRules,
}

impl Kind {
    fn max_attempts(&self) -> i32 {
        if self.options.max_attempts > 0 {
            self.options.max_attempts
        } else {
            3
        }
    }

    fn timeout(&self) -> Duration {
        let ms = if self.options.timeout_ms > 0 {
            self.options.timeout_ms
        } else {
            30_000
        };
        Duration::from_millis(u64::from(ms.unsigned_abs()))
    }
}

/// Counters of things that went wrong (or happened) along the way.
#[derive(Debug, Default)]
pub struct Counters {
    /// Acks the server refused (FAILED_PRECONDITION, NOT_FOUND): stale attempts.
    pub stale_acks: AtomicU64,
    /// Acks that could not be delivered within the patience.
    pub ack_errors: AtomicU64,
    /// Worker streams that broke or could not be opened.
    pub stream_breaks: AtomicU64,
    /// Worker streams the harness dropped on purpose (churn).
    pub churns: AtomicU64,
    /// Jobs pushed with a name the run does not know.
    pub foreign_jobs: AtomicU64,
}

/// The wire protocol a run speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Reseolio's contract, as its SDKs use it: one `EnqueueJob` per job, a `PollJobs` stream
    /// per worker, one unary `AckJob` per job.
    Reseolio,
    /// Gantry's own: `EnqueueBatch` (closed-loop enqueues in batches), a `Work` stream per
    /// worker with acks batched on the stream, as the Rust SDK does.
    Gantry,
}

impl Protocol {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Reseolio => "reseolio",
            Protocol::Gantry => "gantry",
        }
    }
}

/// Whether the server at `addr` speaks Gantry's own protocol (`gantry.jobs.v1.Jobs`).
pub async fn speaks_gantry(addr: &str) -> anyhow::Result<bool> {
    let mut client = native::JobsClient::new(channel(addr)?);
    match client.stats(native::v1::StatsRequest {}).await {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::Unimplemented => Ok(false),
        Err(s) => Err(anyhow::anyhow!(
            "cannot ask {addr} which protocol it speaks: {s}"
        )),
    }
}

/// State shared by a run's enqueuers and workers.
pub struct Ctx {
    /// The harness's clock.
    pub clock: Clock,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// The scenario's job kinds.
    pub kinds: Vec<Kind>,
    by_name: HashMap<String, usize>,
    /// How long an ack (or an idempotent enqueue) is retried while the server is unreachable.
    pub patience: Duration,
    /// Counters.
    pub counters: Counters,
    done: AtomicU64,
    done_ids: Mutex<HashSet<String>>,
    runs: Mutex<Vec<Run>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ctx {
    /// A context for `kinds`.
    pub fn new(
        clock: Clock,
        protocol: Protocol,
        kinds: Vec<Kind>,
        patience: Duration,
    ) -> Arc<Self> {
        let by_name = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| (k.name.clone(), i))
            .collect();
        Arc::new(Self {
            clock,
            protocol,
            kinds,
            by_name,
            patience,
            counters: Counters::default(),
            done: AtomicU64::new(0),
            done_ids: Mutex::new(HashSet::new()),
            runs: Mutex::new(Vec::new()),
        })
    }

    /// The job names, for worker registration.
    pub fn names(&self) -> Vec<String> {
        self.kinds.iter().map(|k| k.name.clone()).collect()
    }

    /// The kinds' analysis rules.
    pub fn rules(&self) -> Vec<KindRules> {
        self.kinds.iter().map(|k| k.rules.clone()).collect()
    }

    /// Jobs known finished (by an ack, or by the server when asked).
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub(super) fn mark_done(&self, id: &str) {
        if lock(&self.done_ids).insert(id.to_owned()) {
            self.done.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn record(&self, run: Run) {
        lock(&self.runs).push(run);
    }

    /// Takes the runs recorded so far.
    pub fn take_runs(&self) -> Vec<Run> {
        std::mem::take(&mut *lock(&self.runs))
    }

    /// A snapshot of the runs recorded so far.
    pub fn runs_snapshot(&self) -> Vec<Run> {
        lock(&self.runs).clone()
    }

    fn unfinished(&self, enqueued: &[Enqueued]) -> Vec<String> {
        let done = lock(&self.done_ids);
        let mut seen = HashSet::new();
        enqueued
            .iter()
            .filter(|e| !done.contains(&e.id) && seen.insert(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect()
    }
}

pub(super) fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

// ------------------------------------------------------------------------------------ workers

/// One harness worker.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Its index (the ledger's worker number).
    pub index: u32,
    /// Jobs it runs at once (the PollRequest's concurrency).
    pub concurrency: i32,
    /// Prefix of its worker ids.
    pub tag: String,
    /// Churn: drop the stream (abandoning running jobs) after a random time in this range, then
    /// reconnect under a new worker id.
    pub churn: Option<(Duration, Duration)>,
    /// Seed for the churn timing.
    pub seed: u64,
}

/// Running workers.
pub struct Workers {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Workers {
    /// Starts `specs`, each on its own connection to `addr`.
    pub fn start(ctx: &Arc<Ctx>, addr: &str, specs: Vec<WorkerSpec>) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for spec in specs {
            let channel = channel(addr)?;
            let ctx = Arc::clone(ctx);
            match ctx.protocol {
                Protocol::Reseolio => tasks.spawn(worker(ctx, channel, spec, stop.clone())),
                Protocol::Gantry => tasks.spawn(native::worker(ctx, channel, spec, stop.clone())),
            };
        }
        Ok(Self { stop, tasks })
    }

    /// Stops every worker: streams closed, running handlers abandoned, acks in flight finished.
    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Fired when a worker drops its stream: handlers not yet acking give their job up, as of `at`.
pub(super) struct Abort {
    token: CancellationToken,
    at: AtomicU64,
}

impl Abort {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            token: CancellationToken::new(),
            at: AtomicU64::new(u64::MAX),
        })
    }

    pub(super) fn fire(&self, now: Micros) {
        self.at.store(now, Ordering::SeqCst);
        self.token.cancel();
    }

    fn at(&self) -> Micros {
        self.at.load(Ordering::SeqCst)
    }
}

async fn worker(ctx: Arc<Ctx>, channel: Channel, spec: WorkerSpec, stop: CancellationToken) {
    let client = ReseolioClient::new(channel);
    let names = ctx.names();
    let mut rng = StdRng::seed_from_u64(spec.seed ^ u64::from(spec.index).wrapping_mul(0x9e37));
    let mut incarnation = 0u32;
    let mut backoff = Duration::from_millis(50);
    let mut handlers: JoinSet<()> = JoinSet::new();
    'connect: while !stop.is_cancelled() {
        let (tx, rx) = mpsc::channel(1);
        let hello = proto::PollRequest {
            worker_id: format!("{}-w{}-{incarnation}", spec.tag, spec.index),
            names: names.clone(),
            concurrency: spec.concurrency,
        };
        if tx.send(hello).await.is_err() {
            break;
        }
        let mut poller = client.clone();
        let opened = tokio::select! {
            () = stop.cancelled() => break,
            opened = poller.poll_jobs(ReceiverStream::new(rx)) => opened,
        };
        let mut inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(_) => {
                ctx.counters.stream_breaks.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let abort = Abort::new();
        let churn_at = spec
            .churn
            .map(|(lo, hi)| Instant::now() + rng.random_range(lo..=hi.max(lo)));
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    abort.fire(ctx.clock.now());
                    break 'connect;
                }
                () = sleep_until_opt(churn_at) => {
                    abort.fire(ctx.clock.now());
                    ctx.counters.churns.fetch_add(1, Ordering::Relaxed);
                    incarnation += 1;
                    continue 'connect;
                }
                Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
                message = inbound.message() => match message {
                    Ok(Some(job)) => {
                        backoff = Duration::from_millis(50);
                        let start = ctx.clock.now();
                        handlers.spawn(handle(
                            Arc::clone(&ctx),
                            Acker::Unary(client.clone()),
                            job,
                            start,
                            spec.index,
                            Arc::clone(&abort),
                        ));
                    }
                    // The server went away (or ended the stream): running handlers carry on and
                    // their acks wait for it; reconnect under the same worker id.
                    Ok(None) | Err(_) => {
                        ctx.counters.stream_breaks.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            () = stop.cancelled() => break 'connect,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue 'connect;
                    }
                },
            }
        }
    }
    while handlers.join_next().await.is_some() {}
}

pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn wall_deadline(deadline_ms: i64) -> Option<Instant> {
    if deadline_ms <= 0 {
        return None;
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let left = u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(0);
    Some(Instant::now() + Duration::from_millis(left))
}

/// How a handler's ack reaches the server.
pub(super) enum Acker {
    /// One unary `AckJob` call, retried within the patience.
    Unary(Client),
    /// Handed to the worker's `Work` stream, which batches it and sends back the verdict.
    Stream(mpsc::UnboundedSender<native::PendingAck>),
}

/// An ack's fate: the job's new status, or `Err(true)` undelivered, `Err(false)` refused
/// (a stale attempt).
pub(super) type Verdict = Result<i32, bool>;

impl Acker {
    async fn ack(&mut self, ctx: &Ctx, request: proto::AckRequest) -> Verdict {
        match self {
            Acker::Unary(client) => {
                let give_up = Instant::now() + ctx.patience;
                let mut delay = Duration::from_millis(20);
                loop {
                    match client.ack_job(request.clone()).await {
                        Ok(response) => break Ok(response.into_inner().new_status),
                        Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                            break Err(false);
                        }
                        Err(s) if retryable(s.code()) && Instant::now() < give_up => {
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_millis(500));
                        }
                        Err(_) => break Err(true),
                    }
                }
            }
            Acker::Stream(tx) => native::ack(tx, request).await,
        }
    }
}

pub(super) async fn handle(
    ctx: Arc<Ctx>,
    mut acker: Acker,
    job: proto::Job,
    start: Micros,
    worker: u32,
    abort: Arc<Abort>,
) {
    let Some(kind) = ctx.by_name.get(&job.name).map(|&i| &ctx.kinds[i]) else {
        // Not ours (another run's job on a shared server): hand it back for a retry.
        ctx.counters.foreign_jobs.fetch_add(1, Ordering::Relaxed);
        let request = proto::AckRequest {
            job_id: job.id,
            result: Some(proto::AckResult {
                success: false,
                return_value: vec![],
                error: "not a job of this benchmark run".into(),
                should_retry: true,
            }),
            attempt: job.attempt,
        };
        let _ = acker.ack(&ctx, request).await;
        return;
    };
    let abandoned = |ctx: &Ctx, job: proto::Job| {
        ctx.record(Run {
            job_id: job.id,
            attempt: job.attempt,
            worker,
            start,
            end: RunEnd::Abandoned { at: abort.at() },
        });
    };
    let outcome: Result<(), String> = match kind.behaviour {
        Behaviour::Noop => Ok(()),
        Behaviour::Fail => Err("failing on purpose (retry-storm)".into()),
        Behaviour::Sleep(work) => {
            let local = Instant::from_std(ctx.clock.instant(start)) + kind.timeout();
            let deadline = wall_deadline(job.deadline_ms).map_or(local, |d| d.min(local));
            tokio::select! {
                () = abort.token.cancelled() => {
                    abandoned(&ctx, job);
                    return;
                }
                () = tokio::time::sleep(work) => Ok(()),
                () = tokio::time::sleep_until(deadline) => Err("timed out".into()),
            }
        }
    };
    let sent = ctx.clock.now();
    if abort.token.is_cancelled() {
        abandoned(&ctx, job);
        return;
    }
    let success = outcome.is_ok();
    let request = proto::AckRequest {
        job_id: job.id.clone(),
        result: Some(proto::AckResult {
            success,
            return_value: if success { b"null".to_vec() } else { vec![] },
            error: outcome.err().unwrap_or_default(),
            should_retry: true,
        }),
        attempt: job.attempt,
    };
    let verdict = acker.ack(&ctx, request).await;
    let done = ctx.clock.now();
    let (accepted, terminal) = match verdict {
        Ok(status) => (
            true,
            success || status == JobStatus::Dead as i32 || job.attempt >= kind.max_attempts(),
        ),
        Err(undelivered) => {
            let counter = if undelivered {
                &ctx.counters.ack_errors
            } else {
                &ctx.counters.stale_acks
            };
            counter.fetch_add(1, Ordering::Relaxed);
            (false, false)
        }
    };
    if terminal {
        ctx.mark_done(&job.id);
    }
    ctx.record(Run {
        job_id: job.id,
        attempt: job.attempt,
        worker,
        start,
        end: RunEnd::Acked {
            sent,
            done,
            success,
            accepted,
            terminal,
        },
    });
}

// ------------------------------------------------------------------------------------ enqueue

/// How enqueues are offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// As fast as `clients` concurrent calls go (closed loop).
    Closed,
    /// At this many jobs per second on a fixed schedule (open loop; at most `clients × 64` calls
    /// in flight — beyond that the schedule slips and the achieved rate shows it).
    Rate(f64),
}

/// What to enqueue and how.
#[derive(Debug, Clone)]
pub struct EnqueueSpec {
    /// The kind of each job, in enqueue order (an index into the run's kinds).
    pub plan: Arc<Vec<u8>>,
    /// Closed loop or a fixed rate.
    pub mode: Mode,
    /// Concurrent enqueue calls (closed loop) or connections (rate).
    pub clients: usize,
    /// Connections the calls are spread over.
    pub connections: usize,
    /// Send idempotency keys and retry failed calls (within the patience).
    pub idempotent: bool,
    /// Prefix of idempotency keys.
    pub tag: String,
    /// Jobs per `EnqueueBatch` call (closed loop, Gantry's protocol).
    pub batch: usize,
}

/// What the enqueuers did.
#[derive(Debug, Default)]
pub struct EnqueueOutcome {
    /// Calls that returned OK.
    pub enqueued: Vec<Enqueued>,
    /// Jobs offered.
    pub offered: u64,
    /// Jobs whose enqueue failed for good.
    pub errors: u64,
    /// The first call.
    pub started: Micros,
    /// The last reply.
    pub finished: Micros,
}

impl EnqueueOutcome {
    /// Offered jobs per second over the enqueue phase.
    pub fn rate(&self) -> f64 {
        let secs = self.finished.saturating_sub(self.started) as f64 / 1e6;
        if secs > 0.0 {
            self.enqueued.len() as f64 / secs
        } else {
            0.0
        }
    }
}

pub(super) struct EnqueueShared {
    pub(super) ctx: Arc<Ctx>,
    pub(super) spec: EnqueueSpec,
    out: Mutex<Vec<Enqueued>>,
    pub(super) errors: AtomicU64,
}

/// Enqueues `spec.plan` through `addr`; returns when every call has finished.
pub async fn enqueue(
    ctx: &Arc<Ctx>,
    addr: &str,
    spec: EnqueueSpec,
) -> anyhow::Result<EnqueueOutcome> {
    let channels = (0..spec.connections.max(1))
        .map(|_| channel(addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let n = spec.plan.len();
    let clients = spec.clients.max(1);
    let mode = spec.mode;
    let shared = Arc::new(EnqueueShared {
        ctx: Arc::clone(ctx),
        spec,
        out: Mutex::new(Vec::with_capacity(n)),
        errors: AtomicU64::new(0),
    });
    let started = ctx.clock.now();
    match mode {
        Mode::Closed if ctx.protocol == Protocol::Gantry => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = JoinSet::new();
            for c in 0..clients {
                let client = native::JobsClient::new(channels[c % channels.len()].clone());
                let (shared, next) = (Arc::clone(&shared), Arc::clone(&next));
                tasks.spawn(async move {
                    let batch = shared.spec.batch.max(1);
                    let mut out = Vec::new();
                    loop {
                        let first = next.fetch_add(batch, Ordering::Relaxed);
                        if first >= n {
                            break;
                        }
                        let range = first..(first + batch).min(n);
                        out.extend(native::enqueue_batch(&shared, client.clone(), range).await);
                    }
                    lock(&shared.out).extend(out);
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        Mode::Closed => {
            let next = Arc::new(AtomicUsize::new(0));
            let mut tasks = JoinSet::new();
            for c in 0..clients {
                let client = ReseolioClient::new(channels[c % channels.len()].clone());
                let (shared, next) = (Arc::clone(&shared), Arc::clone(&next));
                tasks.spawn(async move {
                    let mut batch = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        if let Some(e) = enqueue_one(&shared, client.clone(), i).await {
                            batch.push(e);
                        }
                    }
                    lock(&shared.out).extend(batch);
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        Mode::Rate(per_s) => {
            let limit = clients.saturating_mul(64);
            let permits = Arc::new(Semaphore::new(limit));
            let t0 = Instant::now();
            for i in 0..n {
                let due = t0 + Duration::from_secs_f64(i as f64 / per_s.max(1e-9));
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                let permit = Arc::clone(&permits).acquire_owned().await?;
                let client = ReseolioClient::new(channels[i % channels.len()].clone());
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Some(e) = enqueue_one(&shared, client, i).await {
                        lock(&shared.out).push(e);
                    }
                    drop(permit);
                });
            }
            let all = u32::try_from(limit).unwrap_or(u32::MAX);
            let _ = permits.acquire_many(all).await?;
        }
    }
    let finished = ctx.clock.now();
    let enqueued = std::mem::take(&mut *lock(&shared.out));
    Ok(EnqueueOutcome {
        enqueued,
        offered: n as u64,
        errors: shared.errors.load(Ordering::Relaxed),
        started,
        finished,
    })
}

/// The `EnqueueJob` request for the plan's `i`th job.
pub(super) fn enqueue_request(shared: &EnqueueShared, i: usize) -> proto::EnqueueRequest {
    let kind = &shared.ctx.kinds[usize::from(shared.spec.plan[i])];
    proto::EnqueueRequest {
        name: kind.name.clone(),
        args: format!("[{i}]").into_bytes(),
        options: Some(kind.options.clone()),
        idempotency_key: if shared.spec.idempotent {
            format!("{}-{i}", shared.spec.tag)
        } else {
            String::new()
        },
        ..Default::default()
    }
}

async fn enqueue_one(shared: &EnqueueShared, mut client: Client, i: usize) -> Option<Enqueued> {
    let ctx = &shared.ctx;
    let kind_index = usize::from(shared.spec.plan[i]);
    let request = enqueue_request(shared, i);
    let at = ctx.clock.now();
    let give_up = Instant::now() + ctx.patience;
    let mut delay = Duration::from_millis(20);
    loop {
        match client.enqueue_job(request.clone()).await {
            Ok(response) => {
                return Some(Enqueued {
                    id: response.into_inner().job_id,
                    kind: kind_index,
                    at,
                });
            }
            Err(s) if shared.spec.idempotent && retryable(s.code()) && Instant::now() < give_up => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    }
}

// ------------------------------------------------------------------------------------ settle

/// How waiting for the jobs to finish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Settled {
    /// Every acknowledged job finished.
    AllDone,
    /// No job finished for the stall timeout.
    Stalled,
}

/// Waits until every job in `enqueued` is finished, or nothing finishes for `stall`. Jobs the
/// harness has not seen finish through an ack (a lease that expired into DEAD, a retry after a
/// worker vanished) are looked up with GetJob once few are left or progress stops.
pub async fn settle(
    ctx: &Arc<Ctx>,
    addr: &str,
    enqueued: &[Enqueued],
    stall: Duration,
) -> anyhow::Result<Settled> {
    let client = ReseolioClient::new(channel(addr)?);
    let total = enqueued
        .iter()
        .map(|e| e.id.as_str())
        .collect::<HashSet<_>>()
        .len() as u64;
    let mut last_done = ctx.done();
    let mut last_progress = Instant::now();
    let mut last_lookup = Instant::now();
    loop {
        let done = ctx.done();
        if done >= total {
            return Ok(Settled::AllDone);
        }
        if done != last_done {
            last_done = done;
            last_progress = Instant::now();
        }
        let few_left = total - done <= 2_000;
        let quiet = last_progress.elapsed() >= Duration::from_secs(2);
        if (few_left || quiet) && last_lookup.elapsed() >= Duration::from_secs(1) {
            let ids = ctx.unfinished(enqueued);
            for (id, status) in statuses(&client, ids, 16).await {
                if status.is_terminal() {
                    ctx.mark_done(&id);
                }
            }
            last_lookup = Instant::now();
            continue;
        }
        if last_progress.elapsed() >= stall {
            return Ok(Settled::Stalled);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's view of every job in `enqueued` at the end. Unfinished ones are asked again a
/// few times (servers may apply acks asynchronously).
pub async fn final_statuses(
    addr: &str,
    enqueued: &[Enqueued],
) -> anyhow::Result<HashMap<String, Final>> {
    let client = ReseolioClient::new(channel(addr)?);
    let ids: Vec<String> = enqueued
        .iter()
        .map(|e| e.id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut out: HashMap<String, Final> = statuses(&client, ids, 32).await.into_iter().collect();
    for _ in 0..3 {
        let again: Vec<String> = out
            .iter()
            .filter(|(_, f)| !f.is_terminal())
            .map(|(id, _)| id.clone())
            .collect();
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        out.extend(statuses(&client, again, 32).await);
    }
    Ok(out)
}

/// GetJob for each id, `parallel` at a time.
async fn statuses(client: &Client, ids: Vec<String>, parallel: usize) -> Vec<(String, Final)> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (ids, next, mut client) = (Arc::clone(&ids), Arc::clone(&next), client.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                out.push((id.clone(), status_of(&mut client, id).await));
            }
            out
        });
    }
    let mut all = Vec::with_capacity(ids.len());
    while let Some(part) = tasks.join_next().await {
        all.extend(part.unwrap_or_default());
    }
    all
}

async fn status_of(client: &mut Client, id: &str) -> Final {
    let mut delay = Duration::from_millis(20);
    for _ in 0..8 {
        match client
            .get_job(proto::GetJobRequest {
                job_id: id.to_owned(),
            })
            .await
        {
            Ok(job) => {
                return match JobStatus::try_from(job.into_inner().status) {
                    Ok(JobStatus::Success) => Final::Success,
                    Ok(JobStatus::Dead) => Final::Dead,
                    Ok(JobStatus::Cancelled) => Final::Cancelled,
                    _ => Final::Unfinished,
                };
            }
            Err(s) if s.code() == Code::NotFound => return Final::Missing,
            Err(s) if retryable(s.code()) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(_) => return Final::Missing,
        }
    }
    Final::Missing
}

/// True once the server at `addr` answers a ListJobs call.
pub async fn answers(addr: &str) -> bool {
    let Ok(channel) = channel(addr) else {
        return false;
    };
    let request = proto::ListJobsRequest {
        limit: 1,
        ..Default::default()
    };
    tokio::time::timeout(
        Duration::from_secs(2),
        ReseolioClient::new(channel).list_jobs(request),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}
