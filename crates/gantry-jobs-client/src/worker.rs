//! [`Worker`]: runs handlers for named jobs over the `gantry.jobs.v1.Jobs/Work` stream.
//!
//! One task owns the worker's state (the [`Ledger`] of held attempts, the stream, the timers) and
//! reacts to one event at a time: a message from the server, a handler finishing, a timer (ack
//! linger, heartbeat, cancel grace, drain deadline), the stream breaking, shutdown. Handlers run
//! as tasks in a `JoinSet` that the worker owns, so none outlives [`Worker::run`].
//!
//! - Acks travel on the stream, batched: those finishing within [`ACK_LINGER`] share one
//!   `AckBatch`. They are fenced by attempt, so sending one again after a reconnect is safe.
//! - Each held attempt is heartbeated every third of its lease (the pushed job's `deadline_ms -
//!   started_at`), all due attempts in one `Heartbeat` call. A refused beat means the attempt is
//!   no longer this worker's: its handler is told to stop and nothing is acked for it.
//! - A cancel from the server (or a lost attempt) fires the handler's [`JobContext::cancelled`];
//!   a handler still running after the cancel grace is aborted and acked as a failure, which the
//!   server turns into CANCELLED. A handler that returns anyway is acked with what it returned:
//!   one that still succeeds did the work, and its job ends SUCCESS (the server's rule).
//! - Shutdown sends `Drain` (no more jobs), lets running handlers finish, delivers their acks and
//!   waits for `Drained`, all within the drain timeout; past it, handlers are aborted.
//! - A broken stream (the server restarting answers UNAVAILABLE, or the connection is refused) is
//!   reopened after a backoff of 100 ms doubling to 5 s, jittered; the new `Register` names the
//!   attempts still held, which the server re-adopts, and unanswered acks go out again.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::ledger::{self, Finish, Key, Ledger};
use crate::proto::gantry::jobs::v1::jobs_client::JobsClient;
use crate::proto::gantry::jobs::v1::{self, work_request, work_response};
use crate::proto::reseolio as pb;
use crate::reconnect;

/// The server's limit on a result (and on arguments).
const PAYLOAD_BYTES: usize = 1 << 20;
/// The server's limit on attempts held by one worker stream.
const MAX_CONCURRENCY: usize = 10_000;
/// The server's limit on beats per `Heartbeat` call and acks per batch.
const MAX_BATCH: usize = 10_000;
/// Longest job name the server accepts.
const NAME_BYTES: usize = 256;
/// Acks finishing within this long of the first one share a batch.
pub(crate) const ACK_LINGER: Duration = Duration::from_millis(2);
/// Most acks in one `AckBatch`.
const ACKS_PER_BATCH: usize = 1_000;
/// Most result and error bytes in one `AckBatch` (one ack may be larger: up to the 1 MiB result
/// limit). Within tonic's default 4 MiB message limit.
const BATCH_BYTES: usize = 2 << 20;
/// Pause before retrying a send when the outbound queue is full.
const RETRY_SEND: Duration = Duration::from_millis(5);
/// Outbound messages queued on one stream.
const OUTBOUND: usize = 64;
/// How long opening the stream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `Heartbeat` call may take.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONCURRENCY: usize = 10;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Why a [`Worker`] could not be built or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The address is not a valid `host:port` or URL.
    #[error("invalid jobs server address `{addr}`: {source}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// [`WorkerBuilder::build`] with no handler.
    #[error("a worker needs at least one handler")]
    NoHandlers,
    /// Two handlers for one job name.
    #[error("two handlers for job name `{0}`")]
    DuplicateHandler(String),
    /// A handler name the server would refuse.
    #[error("invalid handler name `{0}`: names are 1 to 256 bytes")]
    InvalidHandlerName(String),
    /// Shutdown did not finish within the drain timeout: handlers still running were aborted
    /// (the server runs those jobs again) and acks not yet delivered were dropped.
    #[error("shutdown took longer than {timeout:?}: {abandoned} attempts abandoned")]
    DrainTimedOut {
        /// The drain timeout.
        timeout: Duration,
        /// Attempts running or unacknowledged when it passed.
        abandoned: usize,
    },
}

/// A handler's failure: a message, and whether another attempt could succeed.
///
/// Any `std::error::Error` converts into a retryable one, so `?` works in handlers. Errors that
/// will not go away by retrying (bad input) should be [`HandlerError::permanent`]: the job goes
/// straight to DEAD instead of using up its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    retry: bool,
}

impl HandlerError {
    /// A failure worth retrying: the job runs again after its backoff while attempts remain.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retry: true,
        }
    }

    /// A failure that retrying cannot fix: the job becomes DEAD now.
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retry: false,
        }
    }

    /// The message stored as the job's error.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the job may be retried.
    pub fn is_retryable(&self) -> bool {
        self.retry
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Retryable, with the error's chain of sources in the message.
impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self {
            message,
            retry: true,
        }
    }
}

/// What a handler may know about the attempt it runs, and how it learns that it should stop.
#[derive(Debug, Clone)]
pub struct JobContext {
    job_id: Arc<str>,
    name: Arc<str>,
    attempt: u32,
    max_attempts: u32,
    cancel: watch::Receiver<bool>,
}

impl JobContext {
    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts allowed in total.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether the attempt has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when the attempt should stop: the job was cancelled by a client, the server no
    /// longer counts the attempt as this worker's, or the worker is going away. A handler that
    /// keeps running is aborted after the worker's cancel grace.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        // An error means the worker dropped the attempt: stop as well.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, HandlerError>> + Send>>;
/// A handler with its argument and result types erased: JSON in, JSON out.
type Handler =
    Arc<dyn Fn(&[u8], JobContext) -> Result<HandlerFuture, serde_json::Error> + Send + Sync>;

fn erase<T, R, E, F, Fut>(f: F) -> Handler
where
    T: DeserializeOwned,
    R: Serialize,
    E: Into<HandlerError>,
    F: Fn(T, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    Arc::new(move |args: &[u8], ctx: JobContext| {
        let args: T = serde_json::from_slice(args)?;
        let run = f(args, ctx);
        let fut: HandlerFuture = Box::pin(async move {
            let value = run.await.map_err(Into::into)?;
            serde_json::to_vec(&value).map_err(|e| {
                HandlerError::permanent(format!("cannot serialize the handler's result: {e}"))
            })
        });
        Ok(fut)
    })
}

/// Configures a [`Worker`]: see [`Worker::builder`].
pub struct WorkerBuilder {
    addr: String,
    worker_id: Option<String>,
    concurrency: usize,
    handlers: HashMap<String, Handler>,
    problem: Option<WorkerError>,
    drain_timeout: Duration,
    cancel_grace: Duration,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("addr", &self.addr)
            .field("worker_id", &self.worker_id)
            .field("concurrency", &self.concurrency)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("drain_timeout", &self.drain_timeout)
            .field("cancel_grace", &self.cancel_grace)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// How many attempts run at once (default 10, at most 10 000). The server never pushes more
    /// than this, and the worker never runs more.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, MAX_CONCURRENCY);
        self
    }

    /// The worker's name in the server's logs (default `rust-<pid>-<random>`).
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// How long [`Worker::run`] may take to stop after its shutdown future resolves (default
    /// 30 s): running handlers finish and their acks are delivered within it.
    #[must_use]
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// How long a handler may keep running after it is asked to stop (default 5 s); then its task
    /// is aborted.
    #[must_use]
    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.cancel_grace = d;
        self
    }

    /// Runs `f` for jobs named `name`, with the job's arguments deserialized into `T`. The handler
    /// returns a result serialized to JSON, or a [`HandlerError`]. Arguments that do not
    /// deserialize fail the job without retries (bad input never gets better).
    #[must_use]
    pub fn handler<T, R, E, F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        T: DeserializeOwned + 'static,
        R: Serialize + 'static,
        E: Into<HandlerError> + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        self.add(name.into(), erase(move |args: T, _ctx: JobContext| f(args)))
    }

    /// Like [`WorkerBuilder::handler`], with a [`JobContext`] for the attempt (its id, attempt
    /// number and cancellation).
    #[must_use]
    pub fn handler_with_context<T, R, E, F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        T: DeserializeOwned + 'static,
        R: Serialize + 'static,
        E: Into<HandlerError> + 'static,
        F: Fn(T, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        self.add(name.into(), erase(f))
    }

    fn add(mut self, name: String, handler: Handler) -> Self {
        if self.problem.is_none() {
            if name.is_empty() || name.len() > NAME_BYTES {
                self.problem = Some(WorkerError::InvalidHandlerName(name));
            } else {
                match self.handlers.entry(name) {
                    Entry::Occupied(e) => {
                        self.problem = Some(WorkerError::DuplicateHandler(e.key().clone()));
                    }
                    Entry::Vacant(e) => {
                        e.insert(handler);
                    }
                }
            }
        }
        self
    }

    /// The worker. Nothing connects until [`Worker::run`].
    pub fn build(self) -> Result<Worker, WorkerError> {
        if let Some(problem) = self.problem {
            return Err(problem);
        }
        if self.handlers.is_empty() {
            return Err(WorkerError::NoHandlers);
        }
        let endpoint =
            crate::endpoint(&self.addr).map_err(|source| WorkerError::InvalidAddress {
                addr: self.addr.clone(),
                source,
            })?;
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
        names.sort();
        let worker_id = self.worker_id.unwrap_or_else(|| {
            format!(
                "rust-{}-{:08x}",
                std::process::id(),
                reconnect::random_u64() as u32
            )
        });
        Ok(Worker {
            config: Arc::new(Config {
                worker_id,
                names,
                concurrency: self.concurrency,
                handlers: self.handlers,
                drain_timeout: self.drain_timeout,
                cancel_grace: self.cancel_grace,
            }),
            endpoint,
        })
    }
}

struct Config {
    worker_id: String,
    names: Vec<String>,
    concurrency: usize,
    handlers: HashMap<String, Handler>,
    drain_timeout: Duration,
    cancel_grace: Duration,
}

/// Runs handlers for named jobs: connects to the server's `Work` stream, runs at most
/// `concurrency` attempts at once, heartbeats them, acks their outcomes, survives server restarts
/// and drains on shutdown.
///
/// ```no_run
/// use gantry_jobs_client::{HandlerError, JobContext, Worker};
///
/// # async fn demo() -> Result<(), gantry_jobs_client::WorkerError> {
/// let worker = Worker::builder("127.0.0.1:50051")
///     .concurrency(8)
///     .handler("math:add", |args: (i64, i64)| async move {
///         Ok::<_, HandlerError>(args.0 + args.1)
///     })
///     .handler_with_context("report:build", |(id,): (u64,), ctx: JobContext| async move {
///         tokio::select! {
///             () = ctx.cancelled() => Err(HandlerError::new("cancelled")),
///             () = tokio::time::sleep(std::time::Duration::from_secs(60)) => Ok(format!("report {id}")),
///         }
///     })
///     .build()?;
/// // Runs until Ctrl-C, then finishes running handlers before returning.
/// worker
///     .run(async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await
/// # }
/// ```
pub struct Worker {
    config: Arc<Config>,
    endpoint: tonic::transport::Endpoint,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.config.worker_id)
            .field("names", &self.config.names)
            .field("concurrency", &self.config.concurrency)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker for the server at `addr` (`host:port` or `http://host:port`).
    pub fn builder(addr: &str) -> WorkerBuilder {
        WorkerBuilder {
            addr: addr.to_owned(),
            worker_id: None,
            concurrency: DEFAULT_CONCURRENCY,
            handlers: HashMap::new(),
            problem: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            cancel_grace: DEFAULT_CANCEL_GRACE,
        }
    }

    /// The id this worker registers with.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// Works until `shutdown` resolves, then drains: no new jobs, running handlers finish and are
    /// acked, all within the drain timeout. Connection failures are not errors: the worker keeps
    /// reconnecting until shut down.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        // Made here, not in `build`: a channel needs the Tokio runtime that `run` is polled on.
        let channel = self.endpoint.connect_lazy();
        let mut session = Session::new(self.config, channel);
        let out = session.run(shutdown.as_mut()).await;
        tracing::info!(worker_id = %session.config.worker_id, "worker stopped");
        out
    }
}

/// A running attempt's handles.
struct Running {
    cancel: watch::Sender<bool>,
    abort: AbortHandle,
    /// Set once the handler is asked to stop: it is aborted if still running then.
    stop_by: Option<Instant>,
}

impl Running {
    fn stop(&mut self, by: Instant) {
        self.cancel.send_replace(true);
        self.stop_by.get_or_insert(by);
    }
}

/// One open `Work` stream.
struct Conn {
    tx: mpsc::Sender<v1::WorkRequest>,
    rx: tonic::Streaming<v1::WorkResponse>,
    registered: bool,
    drain_sent: bool,
    drained: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Beaten = (Vec<Key>, Result<v1::HeartbeatResponse, tonic::Status>);
type TaskOutput = Result<Vec<u8>, HandlerError>;

enum Event {
    Shutdown,
    Inbound(Result<Option<v1::WorkResponse>, tonic::Status>),
    Connected(Result<Conn, tonic::Status>),
    Reconnect,
    Finished(Result<(Id, TaskOutput), JoinError>),
    Flush,
    Beat,
    Beaten(Beaten),
    Grace,
    DrainDeadline,
}

struct Session {
    config: Arc<Config>,
    client: JobsClient<Channel>,
    ledger: Ledger<Running>,
    tasks: JoinSet<TaskOutput>,
    task_keys: HashMap<Id, Key>,
    permits: Arc<Semaphore>,
    conn: Option<Conn>,
    connecting: Option<BoxFuture<Result<Conn, tonic::Status>>>,
    reconnect_at: Option<Instant>,
    backoff: reconnect::Backoff,
    flush_at: Option<Instant>,
    beating: Option<BoxFuture<Beaten>>,
    draining: bool,
    drain_deadline: Option<Instant>,
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn poll_opt<T>(f: &mut Option<BoxFuture<T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn inbound(conn: &mut Option<Conn>) -> Result<Option<v1::WorkResponse>, tonic::Status> {
    match conn {
        Some(c) => c.rx.message().await,
        None => std::future::pending().await,
    }
}

fn attempt_to_wire(attempt: u32) -> i32 {
    i32::try_from(attempt).unwrap_or(i32::MAX)
}

fn success(key: &Key, result: Vec<u8>) -> v1::WorkAck {
    v1::WorkAck {
        job_id: key.0.clone(),
        attempt: attempt_to_wire(key.1),
        success: true,
        result,
        error: String::new(),
        retry: false,
    }
}

fn failure(key: &Key, error: String, retry: bool) -> v1::WorkAck {
    v1::WorkAck {
        job_id: key.0.clone(),
        attempt: attempt_to_wire(key.1),
        success: false,
        result: Vec::new(),
        error,
        retry,
    }
}

/// The lease the server gave this attempt.
fn lease_of(job: &pb::Job) -> Duration {
    match job.deadline_ms.saturating_sub(job.started_at) {
        ms if ms > 0 && job.started_at > 0 => Duration::from_millis(ms.unsigned_abs()),
        _ => ledger::DEFAULT_LEASE,
    }
}

/// A handler task that did not return: it panicked or was aborted.
fn join_failure(e: JoinError) -> HandlerError {
    if e.is_panic() {
        let payload = e.into_panic();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        HandlerError::new(format!("the handler panicked: {what}"))
    } else {
        HandlerError::new("the handler was stopped: it did not return after being cancelled")
    }
}

impl Session {
    fn new(config: Arc<Config>, channel: Channel) -> Self {
        let permits = Arc::new(Semaphore::new(config.concurrency));
        Self {
            client: JobsClient::new(channel).max_decoding_message_size(crate::MAX_DECODING),
            ledger: Ledger::new(ACKS_PER_BATCH, BATCH_BYTES),
            tasks: JoinSet::new(),
            task_keys: HashMap::new(),
            permits,
            conn: None,
            connecting: None,
            reconnect_at: Some(Instant::now()),
            backoff: reconnect::Backoff::new(reconnect::FIRST, reconnect::MAX),
            flush_at: None,
            beating: None,
            draining: false,
            drain_deadline: None,
            config,
        }
    }

    async fn run<S: Future<Output = ()>>(
        &mut self,
        mut shutdown: Pin<&mut S>,
    ) -> Result<(), WorkerError> {
        loop {
            if self.draining
                && self.tasks.is_empty()
                && self.ledger.is_empty()
                && self.conn.as_ref().is_none_or(|c| c.drained)
            {
                return Ok(());
            }
            let beat_at = if self.beating.is_none() {
                self.ledger.next_beat_at()
            } else {
                None
            };
            let grace_at = self
                .ledger
                .handles_mut()
                .filter_map(|(_, r)| r.stop_by)
                .min();
            let event = tokio::select! {
                () = shutdown.as_mut(), if !self.draining => Event::Shutdown,
                msg = inbound(&mut self.conn) => Event::Inbound(msg),
                r = poll_opt(&mut self.connecting) => Event::Connected(r),
                () = sleep_opt(self.reconnect_at) => Event::Reconnect,
                Some(r) = self.tasks.join_next_with_id() => Event::Finished(r),
                () = sleep_opt(self.flush_at) => Event::Flush,
                () = sleep_opt(beat_at) => Event::Beat,
                r = poll_opt(&mut self.beating) => Event::Beaten(r),
                () = sleep_opt(grace_at) => Event::Grace,
                () = sleep_opt(self.drain_deadline) => Event::DrainDeadline,
            };
            let now = Instant::now();
            match event {
                Event::Shutdown => self.begin_drain(now),
                Event::Inbound(Ok(Some(msg))) => self.on_message(msg, now),
                Event::Inbound(Ok(None)) => self.on_stream_end(None, now),
                Event::Inbound(Err(status)) => self.on_stream_end(Some(status), now),
                Event::Connected(r) => self.on_connected(r, now),
                Event::Reconnect => self.connect(),
                Event::Finished(r) => self.on_finished(r, now),
                Event::Flush => {
                    self.flush_at = None;
                    self.flush(now);
                }
                Event::Beat => self.beat(now),
                Event::Beaten(r) => self.on_beaten(r, now),
                Event::Grace => self.abort_overdue(now),
                Event::DrainDeadline => {
                    let abandoned = self.ledger.len().max(self.tasks.len());
                    tracing::warn!(
                        worker_id = %self.config.worker_id,
                        abandoned,
                        "drain timeout passed; aborting running handlers"
                    );
                    self.tasks.abort_all();
                    return Err(WorkerError::DrainTimedOut {
                        timeout: self.config.drain_timeout,
                        abandoned,
                    });
                }
            }
        }
    }

    fn begin_drain(&mut self, now: Instant) {
        tracing::info!(
            worker_id = %self.config.worker_id,
            running = self.tasks.len(),
            "worker draining"
        );
        self.draining = true;
        self.drain_deadline = Some(now + self.config.drain_timeout);
        self.send_drain(now);
    }

    /// Sends `Drain` on the open stream if it has not been (retried from `flush` if the queue is
    /// full).
    fn send_drain(&mut self, now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !self.draining || conn.drain_sent {
            return;
        }
        let drain = v1::WorkRequest {
            msg: Some(work_request::Msg::Drain(v1::Drain {})),
        };
        match conn.tx.try_send(drain) {
            Ok(()) => conn.drain_sent = true,
            Err(TrySendError::Full(_)) => {
                self.flush_at.get_or_insert(now + RETRY_SEND);
            }
            // The stream is going away; the next one is opened with a Drain.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Opens a new `Work` stream, registering the attempts still held.
    fn connect(&mut self) {
        self.reconnect_at = None;
        let config = Arc::clone(&self.config);
        let held = self.ledger.held();
        let draining = self.draining;
        let mut client = self.client.clone();
        self.connecting = Some(Box::pin(async move {
            let (tx, rx) = mpsc::channel(OUTBOUND);
            let register = v1::WorkRequest {
                msg: Some(work_request::Msg::Register(v1::Register {
                    worker_id: config.worker_id.clone(),
                    names: config.names.clone(),
                    concurrency: i32::try_from(config.concurrency).unwrap_or(i32::MAX),
                    held,
                })),
            };
            let queued = tx.try_send(register).is_ok()
                && (!draining
                    || tx
                        .try_send(v1::WorkRequest {
                            msg: Some(work_request::Msg::Drain(v1::Drain {})),
                        })
                        .is_ok());
            if !queued {
                return Err(tonic::Status::internal("cannot queue the Register message"));
            }
            let rx = tokio::time::timeout(CONNECT_TIMEOUT, client.work(ReceiverStream::new(rx)))
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("no answer to Register"))??
                .into_inner();
            Ok(Conn {
                tx,
                rx,
                registered: false,
                drain_sent: draining,
                drained: false,
            })
        }));
    }

    fn on_connected(&mut self, r: Result<Conn, tonic::Status>, now: Instant) {
        self.connecting = None;
        match r {
            Ok(conn) => {
                self.conn = Some(conn);
                self.send_drain(now);
            }
            Err(status) => self.schedule_reconnect(&status, now),
        }
    }

    fn schedule_reconnect(&mut self, status: &tonic::Status, now: Instant) {
        let pause = self.backoff.next_pause(reconnect::random_u64());
        self.reconnect_at = Some(now + pause);
        tracing::warn!(
            worker_id = %self.config.worker_id,
            code = ?status.code(),
            error = %status.message(),
            retry_in = ?pause,
            held = self.ledger.len(),
            "jobs server unavailable; reconnecting"
        );
    }

    fn on_stream_end(&mut self, status: Option<tonic::Status>, now: Instant) {
        let drained = self.conn.take().is_some_and(|c| c.drained);
        self.ledger.disconnected();
        // After `Drained` the server holds nothing of ours; only lost handlers may still be
        // stopping, and they need no stream.
        if drained && self.ledger.held().is_empty() {
            return;
        }
        let status = status.unwrap_or_else(|| tonic::Status::unavailable("the stream ended"));
        self.schedule_reconnect(&status, now);
    }

    fn on_message(&mut self, msg: v1::WorkResponse, now: Instant) {
        use work_response::Msg;
        match msg.msg {
            Some(Msg::Registered(r)) => self.on_registered(r, now),
            Some(Msg::Job(job)) => self.start(job, now),
            Some(Msg::Acks(results)) => match self.ledger.answered(results.results) {
                Ok(settled) => {
                    for ((job_id, attempt), r) in settled {
                        if r.ok {
                            tracing::debug!(job_id = %job_id, attempt, status = r.new_status, "ack applied");
                        } else {
                            tracing::warn!(job_id = %job_id, attempt, error = %r.error, "ack refused");
                        }
                    }
                }
                Err(problem) => tracing::warn!(error = %problem, "unexpected ack results"),
            },
            Some(Msg::Cancel(c)) => {
                let key = (c.job_id, u32::try_from(c.attempt).unwrap_or(0));
                let grace = self.config.cancel_grace;
                if let Some(running) = self.ledger.running_mut(&key) {
                    tracing::info!(job_id = %key.0, attempt = key.1, "cancel requested; stopping the handler");
                    running.stop(now + grace);
                }
            }
            Some(Msg::Drained(_)) => {
                if let Some(conn) = self.conn.as_mut() {
                    conn.drained = true;
                }
            }
            None => {}
        }
    }

    fn on_registered(&mut self, r: v1::Registered, now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        conn.registered = true;
        self.backoff.reset();
        let grace = self.config.cancel_grace;
        for held in &r.lost {
            let key = (
                held.job_id.clone(),
                u32::try_from(held.attempt).unwrap_or(0),
            );
            if let Some(running) = self.ledger.lose(&key) {
                tracing::warn!(job_id = %key.0, attempt = key.1, "attempt lost while disconnected; stopping its handler");
                running.stop(now + grace);
            }
        }
        tracing::info!(
            worker_id = %self.config.worker_id,
            adopted = r.adopted.len(),
            lost = r.lost.len(),
            "worker connected"
        );
        if self.ledger.has_unsent() {
            self.flush_at = Some(now);
        }
    }

    fn start(&mut self, job: pb::Job, now: Instant) {
        let Some(attempt) = u32::try_from(job.attempt).ok().filter(|a| *a > 0) else {
            tracing::warn!(job_id = %job.id, attempt = job.attempt, "pushed job without an attempt number; ignored");
            return;
        };
        let key = (job.id.clone(), attempt);
        if self.ledger.contains(&key) {
            tracing::warn!(job_id = %key.0, attempt, "attempt pushed twice; ignored");
            return;
        }
        let lease = lease_of(&job);
        let Some(handler) = self.config.handlers.get(&job.name) else {
            let error = format!(
                "no handler for `{}` on worker {}",
                job.name, self.config.worker_id
            );
            tracing::warn!(job_id = %key.0, attempt, error = %error, "job failed");
            self.ledger
                .start_finished(key.clone(), lease, now, failure(&key, error, true));
            self.flush_soon(now);
            return;
        };
        let (cancel, cancel_rx) = watch::channel(job.cancel_requested);
        let ctx = JobContext {
            job_id: Arc::from(job.id.as_str()),
            name: Arc::from(job.name.as_str()),
            attempt,
            max_attempts: u32::try_from(job.max_attempts).unwrap_or(0),
            cancel: cancel_rx,
        };
        match handler(&job.args, ctx) {
            Err(e) => {
                let error = format!("invalid arguments for `{}`: {e}", job.name);
                tracing::warn!(job_id = %key.0, attempt, error = %error, "job failed without retry");
                self.ledger
                    .start_finished(key.clone(), lease, now, failure(&key, error, false));
                self.flush_soon(now);
            }
            Ok(fut) => {
                let permits = Arc::clone(&self.permits);
                let abort = self.tasks.spawn(async move {
                    // The server pushes no more than the concurrency; this also holds it while
                    // handlers of lost attempts are still stopping.
                    let _permit = permits.acquire_owned().await.ok();
                    fut.await
                });
                self.task_keys.insert(abort.id(), key.clone());
                self.ledger.start(
                    key,
                    lease,
                    now,
                    Running {
                        cancel,
                        abort,
                        stop_by: None,
                    },
                );
            }
        }
    }

    fn on_finished(&mut self, r: Result<(Id, TaskOutput), JoinError>, now: Instant) {
        let (id, out) = match r {
            Ok((id, out)) => (id, out),
            Err(e) => (e.id(), Err(join_failure(e))),
        };
        let Some(key) = self.task_keys.remove(&id) else {
            return;
        };
        let ack = match out {
            Ok(result) if result.len() > PAYLOAD_BYTES => {
                let error = format!(
                    "the result is {} bytes, the limit is {PAYLOAD_BYTES}",
                    result.len()
                );
                tracing::warn!(job_id = %key.0, attempt = key.1, error = %error, "job failed without retry");
                failure(&key, error, false)
            }
            Ok(result) => success(&key, result),
            Err(e) => {
                tracing::warn!(job_id = %key.0, attempt = key.1, error = %e.message, retry = e.retry, "job attempt failed");
                failure(&key, e.message, e.retry)
            }
        };
        match self.ledger.finish(&key, ack).0 {
            Finish::Queued => self.flush_soon(now),
            Finish::Dropped => {
                tracing::debug!(job_id = %key.0, attempt = key.1, "handler of a lost attempt returned; not acked");
            }
        }
    }

    fn flush_soon(&mut self, now: Instant) {
        self.flush_at.get_or_insert(now + ACK_LINGER);
    }

    /// Sends queued acks on the open stream once it is registered.
    fn flush(&mut self, now: Instant) {
        self.send_drain(now);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if !conn.registered {
            return;
        }
        while let Some(acks) = self.ledger.take_batch() {
            let batch = v1::WorkRequest {
                msg: Some(work_request::Msg::Acks(v1::AckBatch { acks })),
            };
            match conn.tx.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.ledger.put_back();
                    self.flush_at = Some(now + RETRY_SEND);
                    break;
                }
                // The stream is going away; the acks go out on the next one.
                Err(TrySendError::Closed(_)) => {
                    self.ledger.put_back();
                    break;
                }
            }
        }
    }

    /// One `Heartbeat` call for every attempt due (or nearly due).
    fn beat(&mut self, now: Instant) {
        let keys = self.ledger.due_beats(now, MAX_BATCH);
        if keys.is_empty() {
            return;
        }
        let beats = keys
            .iter()
            .map(|(job_id, attempt)| v1::Beat {
                job_id: job_id.clone(),
                attempt: attempt_to_wire(*attempt),
            })
            .collect();
        let mut client = self.client.clone();
        self.beating = Some(Box::pin(async move {
            let request = v1::HeartbeatRequest {
                beats,
                extend_ms: 0,
            };
            let r = match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(request)).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded("heartbeat timed out")),
            };
            (keys, r)
        }));
    }

    fn on_beaten(&mut self, (keys, r): Beaten, now: Instant) {
        self.beating = None;
        let results = match r {
            Ok(resp) if resp.results.len() == keys.len() => resp.results,
            Ok(resp) => {
                tracing::warn!(
                    beats = keys.len(),
                    results = resp.results.len(),
                    "heartbeat answered the wrong number of results"
                );
                for key in &keys {
                    self.ledger.beat_failed(key, now);
                }
                return;
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), error = %status.message(), "heartbeat failed; retrying");
                for key in &keys {
                    self.ledger.beat_failed(key, now);
                }
                return;
            }
        };
        let grace = self.config.cancel_grace;
        for (key, r) in keys.iter().zip(results) {
            if r.ok {
                self.ledger.beat_ok(key, now);
                continue;
            }
            // Refused: the attempt is no longer this worker's (timed out, re-claimed, finished).
            if self.ledger.is_running(key) {
                tracing::warn!(job_id = %key.0, attempt = key.1, error = %r.error, "heartbeat refused; stopping the handler");
            }
            if let Some(running) = self.ledger.lose(key) {
                running.stop(now + grace);
            }
        }
    }

    /// Aborts handlers still running past their cancel grace.
    fn abort_overdue(&mut self, now: Instant) {
        for (key, running) in self.ledger.handles_mut() {
            if running.stop_by.is_some_and(|by| by <= now) {
                tracing::warn!(job_id = %key.0, attempt = key.1, "handler did not stop after its cancel grace; aborting it");
                running.abort.abort();
                running.stop_by = None;
            }
        }
    }
}
