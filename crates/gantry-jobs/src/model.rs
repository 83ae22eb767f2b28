//! The job domain: what a job is, its options and its statuses. Wire types live in [`crate::proto`]
//! and convert at the gRPC boundary; storage rows convert in [`crate::store`].

use std::fmt;
use std::time::Duration;

use gantry_runtime::retry::{Backoff, RetryPolicy};

/// Milliseconds since the Unix epoch, the one time unit of the jobs engine (and of the wire).
pub type Millis = i64;

/// The current time in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Where a job is in its life.
///
/// ```text
///            claim                 ack success
/// PENDING ─────────▶ RUNNING ─────────────────▶ SUCCESS
///    ▲  │              │  ack failure / lease expired / worker gone:
///    │  │ cancel       ├──── attempts left ───▶ PENDING (after backoff; at once when the worker left)
///    │  ▼              └──── none left ───────▶ DEAD ──── retry ───▶ PENDING
/// CANCELLED ◀── cancel requested + failure ack
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Waiting to be claimed once `run_at` has passed.
    Pending,
    /// Claimed by a worker holding a lease.
    Running,
    /// Finished with a result. Terminal.
    Success,
    /// Out of attempts or failed without retry: the dead-letter queue. Terminal until retried.
    Dead,
    /// Cancelled before it ran to an outcome. Terminal.
    Cancelled,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 5] = [
        Status::Pending,
        Status::Running,
        Status::Success,
        Status::Dead,
        Status::Cancelled,
    ];

    /// The integer stored in the database; equal to the Reseolio wire enum value.
    pub fn code(self) -> i32 {
        match self {
            Status::Pending => 1,
            Status::Running => 2,
            Status::Success => 3,
            Status::Dead => 5,
            Status::Cancelled => 6,
        }
    }

    /// The status with the given [`Status::code`].
    pub fn from_code(code: i32) -> Option<Self> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Lowercase name, as the CLI and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Success => "success",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }

    /// True for statuses a job never leaves by itself.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Success | Status::Dead | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-job execution options. Defaults are Reseolio's.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOptions {
    /// Retry policy: attempts, backoff, delays and jitter.
    pub retry: RetryPolicy,
    /// How long one attempt may run before its lease expires (heartbeats extend it).
    pub timeout: Duration,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Reseolio's default per-attempt timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default queue.
pub const DEFAULT_QUEUE: &str = "default";
/// Lowest priority value; 0 is the most urgent.
pub const MAX_PRIORITY: u8 = 9;

/// Limits on what a client may submit.
pub mod limits {
    /// Longest job or queue name, in bytes.
    pub const NAME_BYTES: usize = 256;
    /// Longest idempotency key, in bytes.
    pub const IDEMPOTENCY_KEY_BYTES: usize = 512;
    /// Largest args or result payload, in bytes (1 MiB).
    pub const PAYLOAD_BYTES: usize = 1 << 20;
    /// Largest error message kept, in bytes; longer ones are truncated.
    pub const ERROR_BYTES: usize = 16 << 10;
    /// Most jobs in one batch enqueue.
    pub const BATCH: usize = 10_000;
    /// Most attempts a job may be given.
    pub const MAX_ATTEMPTS: u32 = 1_000;
}

/// A job to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// The handler name workers register for.
    pub name: String,
    /// Queue it belongs to (per-queue concurrency limits apply).
    pub queue: String,
    /// 0 (most urgent) to [`MAX_PRIORITY`].
    pub priority: u8,
    /// JSON arguments, opaque to the engine.
    pub args: Vec<u8>,
    /// Execution options.
    pub options: JobOptions,
    /// Unique per `name` while the job is retained.
    pub idempotency_key: Option<String>,
    /// Earliest time it may run.
    pub run_at: Millis,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// UUID (v7, so ids sort by creation time).
    pub id: String,
    /// Handler name.
    pub name: String,
    /// Queue.
    pub queue: String,
    /// 0 (most urgent) to [`MAX_PRIORITY`].
    pub priority: u8,
    /// JSON arguments.
    pub args: Vec<u8>,
    /// Execution options.
    pub options: JobOptions,
    /// Idempotency key, if given.
    pub idempotency_key: Option<String>,
    /// Where it is in its life.
    pub status: Status,
    /// Number of attempts started over the job's whole life. Also the fencing token of the
    /// current attempt: an ack or heartbeat naming another attempt is stale. Never goes back.
    pub attempt: u32,
    /// `attempt` when the job was last revived from DEAD: the attempts of the current run are
    /// `attempt - attempt_base`, counted against `max_attempts` and the backoff.
    pub attempt_base: u32,
    /// The latest failure.
    pub error: Option<String>,
    /// The result, once [`Status::Success`].
    pub result: Option<Vec<u8>>,
    /// When it was enqueued.
    pub created_at: Millis,
    /// Earliest time it may (next) run.
    pub run_at: Millis,
    /// When the current or last attempt started.
    pub started_at: Option<Millis>,
    /// When it reached a terminal status.
    pub completed_at: Option<Millis>,
    /// While running: when the lease ends unless extended.
    pub lease_until: Option<Millis>,
    /// While running: the worker holding it.
    pub worker_id: Option<String>,
    /// While running: a cancel was asked for and is delivered to the worker.
    pub cancel_requested: bool,
}

impl Job {
    /// A pending job made from `new` with the given id at time `now`.
    pub fn create(id: String, new: NewJob, now: Millis) -> Self {
        Self {
            id,
            name: new.name,
            queue: new.queue,
            priority: new.priority,
            args: new.args,
            options: new.options,
            idempotency_key: new.idempotency_key,
            status: Status::Pending,
            attempt: 0,
            attempt_base: 0,
            error: None,
            result: None,
            created_at: now,
            run_at: new.run_at,
            started_at: None,
            completed_at: None,
            lease_until: None,
            worker_id: None,
            cancel_requested: false,
        }
    }
}

/// What a worker reports about one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It returned this JSON result.
    Success(Vec<u8>),
    /// It failed; `retry: false` sends the job straight to DEAD.
    Failure {
        /// The error message.
        error: String,
        /// Whether another attempt may help.
        retry: bool,
    },
    /// It failed and the next attempt must wait at least `after_ms` (an HTTP `Retry-After`, say):
    /// the backoff delay, if longer, still wins, and the last attempt still goes to DEAD.
    RetryAfter {
        /// The error message.
        error: String,
        /// The least delay before the next attempt, in milliseconds.
        after_ms: Millis,
    },
    /// It did not run (say, a circuit breaker refused the call): the job goes back to PENDING
    /// for `after_ms` and this attempt does not count against its `max_attempts`.
    Defer {
        /// Why it did not run.
        error: String,
        /// How long to wait, in milliseconds.
        after_ms: Millis,
    },
}

/// An acknowledgement of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// The job.
    pub job_id: String,
    /// The attempt being acknowledged; `None` (Reseolio's `AckJob` carries none) means the
    /// current one, unfenced.
    pub attempt: Option<u32>,
    /// What happened.
    pub outcome: Outcome,
}

/// Makes a backoff name from the wire into a [`Backoff`]; unknown names are errors.
pub fn parse_backoff(name: &str) -> Option<Backoff> {
    match name {
        "fixed" => Some(Backoff::Fixed),
        "linear" => Some(Backoff::Linear),
        "exponential" => Some(Backoff::Exponential),
        _ => None,
    }
}

/// The wire name of a [`Backoff`].
pub fn backoff_name(backoff: Backoff) -> &'static str {
    match backoff {
        Backoff::Fixed => "fixed",
        Backoff::Linear => "linear",
        Backoff::Exponential => "exponential",
    }
}
