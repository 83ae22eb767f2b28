//! Durable job storage: one trait, [`Store`], with an implementation per database.
//!
//! - [`sqlite::SqliteStore`] — the embedded default: WAL, one writer thread with group commit.
//! - PostgreSQL — several servers sharing one database (`FOR UPDATE SKIP LOCKED`).
//!
//! Every status change goes through [`crate::machine`], inside the store's transaction, so the
//! backends differ in how they find and lock rows, never in what a transition means. The
//! conformance suite in `tests/it/store.rs` runs against every backend.
//!
//! **Invariant:** a call that returns `Ok` has been committed durably (per the backend's sync
//! setting) before it returns; nothing is acknowledged from memory.

use std::future::Future;
use std::time::Duration;

use crate::machine::{AckEffect, CancelEffect, Rejection};
use crate::model::{Ack, Job, Millis, NewJob, Status};

pub mod postgres;
pub mod sqlite;

/// The storage failed (I/O, corruption, a closed store). Not the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(String),
    /// A stored row does not describe a valid job.
    #[error("corrupt job row {id}: {reason}")]
    Corrupt {
        /// The job.
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

/// Durable storage of jobs. See the module docs for the contract every backend keeps.
pub trait Store: Send + Sync + 'static {
    /// Creates jobs (atomically as a batch), deduplicating by `(name, idempotency_key)`.
    fn enqueue(
        &self,
        jobs: Vec<NewJob>,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<Enqueued>, StoreError>> + Send;

    /// Claims due pending jobs for each request, most urgent first (priority, then run time,
    /// then enqueue order). One transaction for all requests.
    fn claim(
        &self,
        requests: Vec<ClaimRequest>,
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
    /// or a running job's lease end. The dispatcher sleeps until then.
    fn next_wakeup(
        &self,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Millis>, StoreError>> + Send;
}
