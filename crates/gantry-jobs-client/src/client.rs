//! [`Client`]: everything but running jobs — enqueue, read, wait, cancel, retry, list, count.
//!
//! The SDK's own types ([`Job`], [`JobStatus`], [`EnqueueOptions`], ...) stand at this edge; the
//! generated wire types stay inside the crate (`wire` converts).

use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::proto::gantry::jobs::v1;
use crate::proto::gantry::jobs::v1::jobs_client::JobsClient;
use crate::proto::reseolio as pb;
use crate::proto::reseolio::reseolio_client::ReseolioClient;
use crate::wire;

/// What went wrong with a [`Client`] call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not a valid `host:port` or URL.
    #[error("invalid jobs server address `{addr}`: {source}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// No connection could be made.
    #[error("cannot connect to the jobs server at {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The transport failure.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered a call with an error status (unavailable, invalid argument, ...).
    #[error("{call} failed: {code:?}: {message}", code = .status.code(), message = .status.message())]
    Rpc {
        /// The gRPC method, e.g. `EnqueueJob`.
        call: &'static str,
        /// The status the server (or the transport) answered.
        #[source]
        status: tonic::Status,
    },
    /// No job has this id (or it was purged).
    #[error("job {0} not found")]
    NotFound(String),
    /// The arguments could not be serialized to JSON.
    #[error("cannot serialize the arguments of `{name}`: {source}")]
    SerializeArgs {
        /// The job name.
        name: String,
        /// The serde failure.
        #[source]
        source: serde_json::Error,
    },
    /// An option cannot be said on the wire (e.g. a delay beyond `i32::MAX` milliseconds).
    #[error("invalid enqueue option {field}: {problem}")]
    InvalidOptions {
        /// The option, e.g. `timeout`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// [`Client::wait`] or [`Client::result`] gave up before the job finished.
    #[error("job {id} did not finish within {timeout:?}")]
    Timeout {
        /// The job.
        id: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The job ended DEAD: out of attempts, or a handler said not to retry.
    #[error("job {id} is dead after {attempts} attempts: {error}")]
    Dead {
        /// The job.
        id: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        error: String,
    },
    /// The job was cancelled before it succeeded.
    #[error("job {id} was cancelled")]
    Cancelled {
        /// The job.
        id: String,
    },
    /// The job succeeded but its result is not a `T`.
    #[error("cannot deserialize the result of job {id}: {source}")]
    DeserializeResult {
        /// The job.
        id: String,
        /// The serde failure.
        #[source]
        source: serde_json::Error,
    },
    /// The server answered something this SDK does not understand.
    #[error("unexpected answer from the jobs server: {0}")]
    Protocol(String),
}

impl ClientError {
    pub(crate) fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Rpc { call, status }
    }
}

/// A job's state, as the server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobStatus {
    /// Waiting to run (new, or waiting out a retry delay).
    Pending,
    /// An attempt is running on a worker.
    Running,
    /// Finished with a result. Terminal.
    Success,
    /// Reseolio's legacy status; Gantry never produces it.
    Failed,
    /// Out of attempts, or a handler said not to retry. Terminal; [`Client::retry`] revives it.
    Dead,
    /// Cancelled before it succeeded. Terminal.
    Cancelled,
    /// A status this SDK does not know (its wire number).
    Unknown(i32),
}

impl JobStatus {
    /// True for SUCCESS, DEAD and CANCELLED: the job will not change again on its own.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Dead | Self::Cancelled)
    }

    /// Lower-case name: `pending`, `running`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Unknown(_) => "unknown",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job as the server stores it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Job {
    /// Its id (a UUID).
    pub id: String,
    /// The handler name.
    pub name: String,
    /// The queue it waits in.
    pub queue: String,
    /// Its state.
    pub status: JobStatus,
    /// Attempts started so far (0 until first claimed).
    pub attempt: u32,
    /// Attempts allowed in total.
    pub max_attempts: u32,
    /// 0 (most urgent) to 9.
    pub priority: u8,
    /// The arguments, as JSON bytes (see [`Job::args`]).
    pub args: Vec<u8>,
    /// The result as JSON bytes, once SUCCESS (see [`Job::result`]).
    pub result: Option<Vec<u8>>,
    /// The latest failure message.
    pub error: Option<String>,
    /// When it was enqueued.
    pub created_at: SystemTime,
    /// The earliest time it may (next) run.
    pub scheduled_at: SystemTime,
    /// When the current or last attempt started.
    pub started_at: Option<SystemTime>,
    /// When it became terminal.
    pub completed_at: Option<SystemTime>,
    /// When the running attempt's lease ends (heartbeats push it on).
    pub deadline: Option<SystemTime>,
    /// RUNNING and asked to stop.
    pub cancel_requested: bool,
    /// The idempotency key it was enqueued with.
    pub idempotency_key: Option<String>,
}

impl Job {
    /// The arguments as a `T` (a tuple for Reseolio's positional arguments, or
    /// `serde_json::Value`).
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.args)
    }

    /// The result as a `T`, if the job has one.
    pub fn result<T: DeserializeOwned>(&self) -> Option<Result<T, serde_json::Error>> {
        self.result.as_deref().map(serde_json::from_slice)
    }
}

/// Retry backoff shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// The initial delay every time.
    Fixed,
    /// The initial delay times the attempt number.
    Linear,
    /// The initial delay doubled per attempt.
    Exponential,
}

impl Backoff {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Linear => "linear",
            Self::Exponential => "exponential",
        }
    }
}

/// How to enqueue a job. Every `None` leaves the server's default.
///
/// ```
/// use std::time::Duration;
/// use gantry_jobs_client::{Backoff, EnqueueOptions};
///
/// let options = EnqueueOptions {
///     delay: Some(Duration::from_secs(10)),
///     max_attempts: Some(5),
///     backoff: Some(Backoff::Exponential),
///     idempotency_key: Some("order-7".into()),
///     ..Default::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnqueueOptions {
    /// Run no earlier than this long from now. Exclusive with `run_at`.
    pub delay: Option<Duration>,
    /// Run no earlier than this time. Exclusive with `delay`.
    pub run_at: Option<SystemTime>,
    /// 0 (most urgent, the default) to 9.
    pub priority: Option<u8>,
    /// The queue (default `default`).
    pub queue: Option<String>,
    /// Enqueue at most once per (name, key) while the job is retained; a repeat answers the
    /// existing job with `deduplicated = true`.
    pub idempotency_key: Option<String>,
    /// Attempts in total, counting the first (default 3).
    pub max_attempts: Option<u32>,
    /// Backoff between attempts (default exponential).
    pub backoff: Option<Backoff>,
    /// Base retry delay (default 1 s).
    pub initial_delay: Option<Duration>,
    /// Cap on the retry delay before jitter (default 60 s).
    pub max_delay: Option<Duration>,
    /// How long one attempt may run without a heartbeat: the lease (default 30 s). The
    /// [`Worker`](crate::Worker) heartbeats every third of it, so a handler may run longer.
    pub timeout: Option<Duration>,
    /// ± fraction of each retry delay picked at random, 0 to 1 (default 0.1). `Some(0.0)` means no
    /// jitter (the wire's 0 means "default", so the SDK sends the smallest positive value).
    pub jitter: Option<f32>,
}

/// One job of a batch: see [`Client::enqueue_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub(crate) name: String,
    pub(crate) args: Vec<u8>,
    pub(crate) options: EnqueueOptions,
}

impl NewJob {
    /// A job named `name` with `args` serialized to JSON and default options.
    pub fn new<A: Serialize + ?Sized>(
        name: impl Into<String>,
        args: &A,
    ) -> Result<Self, ClientError> {
        let name = name.into();
        let args = serde_json::to_vec(args).map_err(|source| ClientError::SerializeArgs {
            name: name.clone(),
            source,
        })?;
        Ok(Self {
            name,
            args,
            options: EnqueueOptions::default(),
        })
    }

    /// Sets its options.
    #[must_use]
    pub fn options(mut self, options: EnqueueOptions) -> Self {
        self.options = options;
        self
    }
}

/// The answer to an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The new job's id, or the existing job's when deduplicated.
    pub id: String,
    /// True when the idempotency key matched an existing job and nothing was created.
    pub deduplicated: bool,
}

/// The answer to [`Client::cancel`] and [`Client::retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the server did (or, for a running job's cancel, requested) the change.
    pub accepted: bool,
    /// The server's explanation, e.g. `job ... is already success`.
    pub message: String,
}

/// Sort order of [`Client::list`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ListOrder {
    /// By enqueue time (the default).
    #[default]
    CreatedAt,
    /// By the time the job may (next) run.
    ScheduledAt,
}

/// Which jobs [`Client::list`] returns. The default: every job, newest first, 100 per page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    /// Any of these statuses; empty = all.
    pub statuses: Vec<JobStatus>,
    /// Any of these names; empty = all.
    pub names: Vec<String>,
    /// Page size, 1 to 1000; 0 = 100.
    pub limit: u32,
    /// Jobs to skip.
    pub offset: u32,
    /// Sort key.
    pub order: ListOrder,
    /// Oldest first instead of newest first.
    pub ascending: bool,
}

/// A page of [`Client::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// The jobs of this page.
    pub jobs: Vec<Job>,
    /// Jobs matching the filter, ignoring limit and offset.
    pub total: u64,
}

/// Job counts by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// PENDING jobs.
    pub pending: u64,
    /// RUNNING jobs.
    pub running: u64,
    /// SUCCESS jobs.
    pub success: u64,
    /// DEAD jobs.
    pub dead: u64,
    /// CANCELLED jobs.
    pub cancelled: u64,
}

impl Stats {
    /// All jobs.
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.success + self.dead + self.cancelled
    }
}

/// First and longest pause between `GetJob` polls when the completion stream is unavailable.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(1);

/// A connection to a jobs server. Cheap to clone; clones share the connection.
///
/// ```no_run
/// use std::time::Duration;
/// use gantry_jobs_client::{Client, EnqueueOptions};
///
/// # async fn demo() -> Result<(), gantry_jobs_client::ClientError> {
/// let client = Client::connect("127.0.0.1:50051").await?;
/// let job = client
///     .enqueue("math:add", &(2, 3), EnqueueOptions::default())
///     .await?;
/// // Err(ClientError::Dead { .. }) if every attempt failed.
/// let sum: i64 = client.result(&job.id, Duration::from_secs(30)).await?;
/// assert_eq!(sum, 5);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    reseolio: ReseolioClient<Channel>,
    jobs: JobsClient<Channel>,
}

impl Client {
    /// Connects to the server at `addr` (`host:port` or `http://host:port`), failing if it cannot
    /// be reached now. A broken connection is re-established on the next call.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let channel = crate::endpoint(addr)
            .map_err(|source| ClientError::InvalidAddress {
                addr: addr.to_owned(),
                source,
            })?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(Self::from_channel(channel))
    }

    /// Like [`Client::connect`], but connects on the first call instead of now.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (the channel's connection task is spawned on it).
    pub fn connect_lazy(addr: &str) -> Result<Self, ClientError> {
        let channel = crate::endpoint(addr)
            .map_err(|source| ClientError::InvalidAddress {
                addr: addr.to_owned(),
                source,
            })?
            .connect_lazy();
        Ok(Self::from_channel(channel))
    }

    /// A client over a channel configured by the caller (TLS, timeouts, ...).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            reseolio: ReseolioClient::new(channel.clone())
                .max_decoding_message_size(crate::MAX_DECODING),
            jobs: JobsClient::new(channel).max_decoding_message_size(crate::MAX_DECODING),
        }
    }

    /// Enqueues one job named `name` with `args` serialized to JSON (a tuple becomes Reseolio's
    /// positional argument array).
    pub async fn enqueue<A: Serialize + ?Sized>(
        &self,
        name: &str,
        args: &A,
        options: EnqueueOptions,
    ) -> Result<Enqueued, ClientError> {
        let job = NewJob::new(name, args)?.options(options);
        let request = wire::enqueue_request(job)?;
        let r = self
            .reseolio
            .clone()
            .enqueue_job(request)
            .await
            .map_err(ClientError::rpc("EnqueueJob"))?
            .into_inner();
        Ok(Enqueued {
            id: r.job_id,
            deduplicated: r.deduplicated,
        })
    }

    /// Enqueues many jobs in one server transaction: all are stored or none is. Answers in order.
    ///
    /// ```no_run
    /// use gantry_jobs_client::{Client, NewJob};
    ///
    /// # async fn demo(client: Client) -> Result<(), gantry_jobs_client::ClientError> {
    /// let jobs = (0..100)
    ///     .map(|i| NewJob::new("math:add", &(i, i)))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// let ids = client.enqueue_batch(jobs).await?;
    /// assert_eq!(ids.len(), 100);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn enqueue_batch(
        &self,
        jobs: impl IntoIterator<Item = NewJob>,
    ) -> Result<Vec<Enqueued>, ClientError> {
        let jobs = jobs
            .into_iter()
            .map(wire::enqueue_request)
            .collect::<Result<Vec<_>, _>>()?;
        let n = jobs.len();
        let r = self
            .jobs
            .clone()
            .enqueue_batch(v1::EnqueueBatchRequest { jobs })
            .await
            .map_err(ClientError::rpc("EnqueueBatch"))?
            .into_inner();
        if r.results.len() != n {
            return Err(ClientError::Protocol(format!(
                "EnqueueBatch answered {} results for {n} jobs",
                r.results.len()
            )));
        }
        Ok(r.results
            .into_iter()
            .map(|e| Enqueued {
                id: e.job_id,
                deduplicated: e.deduplicated,
            })
            .collect())
    }

    /// The job's current state.
    pub async fn get(&self, id: &str) -> Result<Job, ClientError> {
        let r = self
            .reseolio
            .clone()
            .get_job(pb::GetJobRequest {
                job_id: id.to_owned(),
            })
            .await;
        match r {
            Ok(job) => Ok(wire::job_from_wire(job.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(ClientError::NotFound(id.to_owned()))
            }
            Err(status) => Err(ClientError::rpc("GetJob")(status)),
        }
    }

    /// Waits until the job is terminal (SUCCESS, DEAD or CANCELLED) and returns it. Listens on the
    /// server's completion stream (`SubscribeToJobs`), which answers at once for a job that is
    /// already finished; if that stream fails it falls back to polling `GetJob`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Job, ClientError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || ClientError::Timeout {
            id: id.to_owned(),
            timeout,
        };
        // One read first: an unknown id fails fast (the stream would silently drop it) and a
        // finished job needs no stream.
        let job = self.get(id).await?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        match tokio::time::timeout_at(deadline, self.completion(id)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                tracing::debug!(job_id = %id, error = %status, "completion stream failed; polling");
            }
        }
        let mut pause = POLL_FIRST;
        loop {
            let job = match tokio::time::timeout_at(deadline, self.get(id)).await {
                Ok(job) => job,
                Err(_) => return Err(timed_out()),
            };
            match job {
                Ok(job) if job.status.is_terminal() => return Ok(job),
                Ok(_) => {}
                Err(e @ ClientError::NotFound(_)) => return Err(e),
                // The server may be restarting: keep trying until the deadline.
                Err(e) => tracing::debug!(job_id = %id, error = %e, "polling a job failed"),
            }
            if Instant::now() + pause >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Resolves when the server reports `id` finished; fails if the stream does.
    async fn completion(&self, id: &str) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::channel(1);
        tx.send(pb::SubscribeRequest {
            job_ids: vec![id.to_owned()],
            unsubscribe: false,
        })
        .await
        .map_err(|_| tonic::Status::internal("subscription channel closed"))?;
        let mut stream = self
            .reseolio
            .clone()
            .subscribe_to_jobs(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(c) = stream.next().await {
            if c?.job_id == id {
                // `tx` lives until here: closing it early would only stop new subscriptions.
                drop(tx);
                return Ok(());
            }
        }
        Err(tonic::Status::unavailable(
            "the completion stream ended early",
        ))
    }

    /// Waits for the job and returns its result as a `T` when it succeeded; a DEAD or CANCELLED
    /// job is a [`ClientError::Dead`] or [`ClientError::Cancelled`].
    pub async fn result<T: DeserializeOwned>(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let job = self.wait(id, timeout).await?;
        match job.status {
            JobStatus::Success => {
                let bytes = job.result.as_deref().unwrap_or(b"null");
                serde_json::from_slice(bytes)
                    .map_err(|source| ClientError::DeserializeResult { id: job.id, source })
            }
            JobStatus::Dead => Err(ClientError::Dead {
                id: job.id,
                attempts: job.attempt,
                error: job.error.unwrap_or_default(),
            }),
            JobStatus::Cancelled => Err(ClientError::Cancelled { id: job.id }),
            other => Err(ClientError::Protocol(format!(
                "job {} reported finished while {other}",
                job.id
            ))),
        }
    }

    /// Cancels a job: a PENDING job becomes CANCELLED at once; a RUNNING one is asked to stop (its
    /// worker is told, and the job ends CANCELLED when the attempt fails, SUCCESS if it completes
    /// anyway). A finished or unknown job is not accepted.
    pub async fn cancel(&self, id: &str) -> Result<Outcome, ClientError> {
        let r = self
            .reseolio
            .clone()
            .cancel_job(pb::CancelRequest {
                job_id: id.to_owned(),
            })
            .await
            .map_err(ClientError::rpc("CancelJob"))?
            .into_inner();
        Ok(Outcome {
            accepted: r.success,
            message: r.message,
        })
    }

    /// Revives a DEAD job: PENDING again with fresh attempts, runnable now.
    pub async fn retry(&self, id: &str) -> Result<Outcome, ClientError> {
        let r = self
            .reseolio
            .clone()
            .retry_job(pb::RetryRequest {
                job_id: id.to_owned(),
            })
            .await
            .map_err(ClientError::rpc("RetryJob"))?
            .into_inner();
        Ok(Outcome {
            accepted: r.success,
            message: r.message,
        })
    }

    /// A page of jobs matching `filter`.
    pub async fn list(&self, filter: ListFilter) -> Result<JobPage, ClientError> {
        let r = self
            .reseolio
            .clone()
            .list_jobs(wire::list_request(filter))
            .await
            .map_err(ClientError::rpc("ListJobs"))?
            .into_inner();
        Ok(JobPage {
            jobs: r.jobs.into_iter().map(wire::job_from_wire).collect(),
            total: u64::try_from(r.total).unwrap_or(0),
        })
    }

    /// Job counts by status.
    pub async fn stats(&self) -> Result<Stats, ClientError> {
        let r = self
            .jobs
            .clone()
            .stats(v1::StatsRequest {})
            .await
            .map_err(ClientError::rpc("Stats"))?
            .into_inner();
        Ok(wire::stats_from_wire(r))
    }
}
