//! Durable job storage: one trait, [`Store`], with an implementation per database.
//!
//! - [`sqlite::SqliteStore`] — the embedded default: WAL, one writer thread with group commit.
//! - PostgreSQL — several servers sharing one database (`FOR UPDATE SKIP LOCKED`).
//!
//! Every status change goes through [`crate::machine`], inside the store's transaction, so the
//! backends differ in how they find and lock rows, never in what a transition means. The
//! conformance suite in `tests/it/store.rs` runs against every backend. Schedules likewise go
//! through [`crate::schedule`]: [`Store::fire_due_schedules`] locks each due schedule, applies
//! [`crate::schedule::fire`], enqueues its job and moves `next_run_at` in one transaction.
//!
//! **Invariant:** a call that returns `Ok` has been committed durably (per the backend's sync
//! setting) before it returns; nothing is acknowledged from memory.

use std::future::Future;
use std::time::Duration;

use crate::machine::{AckEffect, CancelEffect, Rejection};
use crate::model::{Ack, Job, Millis, NewJob, Status};
use crate::schedule::{NewSchedule, Schedule, ScheduleChange, ScheduleRejection, ScheduleStatus};

pub mod postgres;
pub mod sqlite;

/// The storage failed (I/O, corruption, a closed store). Not the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(String),
    /// A stored row does not describe a valid job (or schedule).
    #[error("corrupt row {id}: {reason}")]
    Corrupt {
        /// The job or schedule.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was closed.
    #[error("the job store is closed")]
    Closed,
}

/// Why an operation on one job did not apply. The job is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// No job has this id.
    #[error("job {0} not found")]
    NotFound(String),
    /// The state machine refused the transition.
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// Per-ack results: the job after the transition and what it did, or why it was refused.
pub type AckResults = Vec<Result<(Job, AckEffect), JobError>>;

/// The result of enqueueing one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The new job's id, or the existing job's when deduplicated.
    pub id: String,
    /// True when a job with the same name and idempotency key already existed.
    pub deduplicated: bool,
}

/// Concurrency limits of named queues: at most this many RUNNING jobs per queue, across every
/// worker and (on a shared database) every server. Queues not listed are unlimited.
pub type QueueLimits = std::sync::Arc<std::collections::BTreeMap<String, u32>>;

/// What a worker can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The claiming worker.
    pub worker_id: String,
    /// Job names it handles; empty means any.
    pub names: Vec<String>,
    /// Most jobs to claim.
    pub limit: usize,
}

/// Which jobs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Any of these statuses; empty means all.
    pub statuses: Vec<Status>,
    /// Any of these names; empty means all.
    pub names: Vec<String>,
    /// Only this queue; `None` means all.
    pub queue: Option<String>,
    /// Page size.
    pub limit: usize,
    /// Rows to skip.
    pub offset: usize,
    /// Sort key.
    pub order_by: ListOrder,
    /// Oldest first when true.
    pub ascending: bool,
}

/// Sort key of a listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ListOrder {
    /// Enqueue time.
    #[default]
    CreatedAt,
    /// Next run time.
    RunAt,
}

/// Counts of jobs by status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `(status, count)` for every status, in [`Status::ALL`] order.
    pub by_status: Vec<(Status, u64)>,
}

/// Why an operation on one schedule did not apply. The schedule is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// No schedule has this id, nor (among those not deleted) this name.
    #[error("schedule {0} not found")]
    NotFound(String),
    /// A schedule that is not deleted already has this name.
    #[error("a schedule named {0:?} already exists")]
    NameTaken(String),
    /// The change was refused.
    #[error(transparent)]
    Rejected(#[from] ScheduleRejection),
}

/// Which schedules to list, soonest `next_run_at` first (those without one last).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleFilter {
    /// Only this status; `None` means every schedule not deleted.
    pub status: Option<ScheduleStatus>,
    /// Page size.
    pub limit: usize,
    /// Rows to skip.
    pub offset: usize,
}

/// What one due check of one schedule did.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    /// The schedule.
    pub schedule_id: String,
    /// Its name (and its jobs' name).
    pub name: String,
    /// The tick a job was enqueued for; `None` when late ticks were dropped (misfire `skip`).
    pub tick: Option<Millis>,
    /// The job enqueued for `tick`; `deduplicated` if that tick's job already existed.
    pub job: Option<Enqueued>,
    /// Ticks were missed (coalesced into `tick`, or dropped).
    pub late: bool,
}

/// The result of [`Store::fire_due_schedules`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FireReport {
    /// Every due schedule checked.
    pub fired: Vec<Fired>,
    /// Schedules that could not be checked because their stored cron expression or time zone no
    /// longer parses: `(id, error)`. They are stopped (no next tick) so they are not retried.
    pub broken: Vec<(String, String)>,
    /// The earliest `next_run_at` after `now` of any active schedule, after this call.
    pub next_due: Option<Millis>,
}

/// Durable storage of jobs. See the module docs for the contract every backend keeps.
pub trait Store: Send + Sync + 'static {
    /// Creates jobs (atomically as a batch), deduplicating by `(name, idempotency_key)`.
    fn enqueue(
        &self,
        jobs: Vec<NewJob>,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<Enqueued>, StoreError>> + Send;

    /// Claims due pending jobs for each request, most urgent first (priority, then run time,
    /// then enqueue order), never taking a queue past its limit in `limits`. One transaction for
    /// all requests.
    fn claim(
        &self,
        requests: Vec<ClaimRequest>,
        limits: QueueLimits,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<Vec<Job>>, StoreError>> + Send;

    /// Applies acks in one transaction; each gets its own result.
    fn ack(
        &self,
        acks: Vec<Ack>,
        now: Millis,
    ) -> impl Future<Output = Result<AckResults, StoreError>> + Send;

    /// Gives up the listed attempts (`(job id, attempt)`) of a worker that went away; attempts no
    /// longer current are skipped. Returns the jobs changed.
    fn abandon(
        &self,
        attempts: Vec<(String, u32)>,
        reason: String,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<(Job, AckEffect)>, StoreError>> + Send;

    /// Fails every running attempt whose lease ended at or before `now`. Returns the jobs changed.
    fn expire_leases(
        &self,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<(Job, AckEffect)>, StoreError>> + Send;

    /// Extends leases; each `(job id, attempt)` gets the new lease end or why not.
    fn heartbeat(
        &self,
        beats: Vec<(String, Option<u32>)>,
        extend: Option<Duration>,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<Result<Millis, JobError>>, StoreError>> + Send;

    /// Cancels a job (or requests it, when running).
    fn cancel(
        &self,
        id: String,
        now: Millis,
    ) -> impl Future<Output = Result<Result<(Job, CancelEffect), JobError>, StoreError>> + Send;

    /// Revives a DEAD job.
    fn retry(
        &self,
        id: String,
        now: Millis,
    ) -> impl Future<Output = Result<Result<Job, JobError>, StoreError>> + Send;

    /// One job.
    fn get(&self, id: String) -> impl Future<Output = Result<Option<Job>, StoreError>> + Send;

    /// A page of jobs and the number matching the filter.
    fn list(
        &self,
        filter: ListFilter,
    ) -> impl Future<Output = Result<(Vec<Job>, u64), StoreError>> + Send;

    /// Job counts by status.
    fn stats(&self) -> impl Future<Output = Result<Stats, StoreError>> + Send;

    /// Deletes finished jobs (of `statuses`, all terminal ones when empty) completed before
    /// `before`. Returns how many were deleted.
    fn purge(
        &self,
        before: Millis,
        statuses: Vec<Status>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The earliest future moment something becomes due: a pending job's run time after `now`,
    /// a running job's lease end, or an active schedule's next tick. The dispatcher sleeps until
    /// then.
    fn next_wakeup(
        &self,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Millis>, StoreError>> + Send;

    /// Creates an ACTIVE schedule ([`Schedule::create`]); its name must be free among schedules
    /// not deleted.
    fn create_schedule(
        &self,
        new: NewSchedule,
        now: Millis,
    ) -> impl Future<Output = Result<Result<Schedule, ScheduleError>, StoreError>> + Send;

    /// The schedule with this id (deleted ones too), or else the schedule not deleted with this
    /// name.
    fn get_schedule(
        &self,
        id_or_name: String,
    ) -> impl Future<Output = Result<Option<Schedule>, StoreError>> + Send;

    /// A page of schedules and the number matching the filter.
    fn list_schedules(
        &self,
        filter: ScheduleFilter,
    ) -> impl Future<Output = Result<(Vec<Schedule>, u64), StoreError>> + Send;

    /// Applies [`crate::schedule::change`] to the schedule found as by [`Store::get_schedule`], under its
    /// row lock.
    fn change_schedule(
        &self,
        id_or_name: String,
        change: ScheduleChange,
        now: Millis,
    ) -> impl Future<Output = Result<Result<Schedule, ScheduleError>, StoreError>> + Send;

    /// Checks up to `limit` active schedules whose `next_run_at` has come, each locked so that
    /// no other server checks it at once: applies [`crate::schedule::fire`], enqueues the job (with the
    /// tick's idempotency key) and stores the new `next_run_at`, all in one transaction.
    fn fire_due_schedules(
        &self,
        now: Millis,
        limit: usize,
    ) -> impl Future<Output = Result<FireReport, StoreError>> + Send;
}

/// Job options as stored in columns: `(max_attempts, backoff, initial_delay_ms, max_delay_ms,
/// multiplier, jitter, timeout_ms)`.
type OptionColumns = (u32, &'static str, i64, i64, f64, f64, i64);

fn option_columns(o: &crate::model::JobOptions) -> OptionColumns {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let r = &o.retry;
    (
        r.max_attempts(),
        crate::model::backoff_name(r.backoff()),
        ms(r.initial_delay()),
        ms(r.max_delay()),
        r.multiplier(),
        r.jitter(),
        ms(o.timeout),
    )
}

/// Job options from their stored columns (see [`OptionColumns`]); `Err` says what is wrong.
fn options_from_columns(
    max_attempts: i64,
    backoff: &str,
    initial_delay_ms: i64,
    max_delay_ms: i64,
    multiplier: f64,
    jitter: f64,
    timeout_ms: i64,
) -> Result<crate::model::JobOptions, String> {
    let backoff =
        crate::model::parse_backoff(backoff).ok_or_else(|| format!("unknown backoff {backoff}"))?;
    let max_attempts = u32::try_from(max_attempts)
        .map_err(|_| format!("max_attempts {max_attempts} out of range"))?;
    let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
    let retry = gantry_runtime::retry::RetryPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(backoff)
        .initial_delay(ms(initial_delay_ms))
        .max_delay(ms(max_delay_ms))
        .multiplier(multiplier)
        .jitter(jitter)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(crate::model::JobOptions {
        retry,
        timeout: ms(timeout_ms),
    })
}
