//! The Reseolio gRPC service over the [`Engine`]: wire ↔ domain conversion, input validation and
//! the one mapping from engine errors to gRPC status codes.
//!
//! **Boundary:** everything a client sends is checked here — names, payload sizes, options,
//! negative delays — and refused with `INVALID_ARGUMENT` naming the field, before the engine sees
//! it. Store failures become `INTERNAL` with a generic message; the detail goes to the log.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gantry_runtime::retry::RetryPolicy;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::dispatch::ToWorker;
use crate::engine::{Completion, Engine};
use crate::model::{
    self, Ack, DEFAULT_QUEUE, DEFAULT_TIMEOUT, Job, JobOptions, MAX_PRIORITY, NewJob, Outcome,
    limits, now_millis,
};
use crate::proto;
use crate::proto::gantry::jobs::v1;
use crate::proto::reseolio_server::Reseolio;
use crate::schedule::{
    self, CronSpec, Misfire, NewSchedule, Schedule, ScheduleChange, ScheduleRejection,
    ScheduleStatus, ScheduleUpdate, SpecError,
};
use crate::store::{
    JobError, ListFilter, ListOrder, ScheduleError, ScheduleFilter, Store, StoreError,
};

/// Default worker concurrency when a worker sends 0 (the SDK's default).
const DEFAULT_CONCURRENCY: usize = 10;
/// Most jobs one worker stream may hold at once.
const MAX_CONCURRENCY: usize = 10_000;
/// Default and largest page of `ListJobs`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1_000;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `reseolio.Reseolio` service.
pub struct ReseolioService<S> {
    engine: Engine<S>,
    stop: CancellationToken,
}

impl<S: Store> ReseolioService<S> {
    /// Serves `engine`; streams end with `UNAVAILABLE` when `stop` is cancelled, so clients
    /// reconnect to the next server instead of treating it as a normal end.
    pub fn new(engine: Engine<S>, stop: CancellationToken) -> Self {
        Self { engine, stop }
    }
}

/// The one mapping from store failures to gRPC.
pub(crate) fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "job store failure");
    Status::internal("job store failure; see the server log")
}

/// The one mapping from per-job refusals to gRPC.
pub(crate) fn job_status(e: JobError) -> Status {
    match e {
        JobError::NotFound(id) => Status::not_found(format!("job {id} not found")),
        JobError::Rejected(r) => Status::failed_precondition(r.to_string()),
    }
}

fn invalid(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.contains('\0') {
        return Err(invalid(field, "must not contain NUL bytes"));
    }
    if name.len() > limits::NAME_BYTES {
        return Err(invalid(
            field,
            format!(
                "is {} bytes, the limit is {}",
                name.len(),
                limits::NAME_BYTES
            ),
        ));
    }
    Ok(())
}

fn check_json(field: &str, bytes: &[u8]) -> Result<(), Status> {
    if bytes.len() > limits::PAYLOAD_BYTES {
        return Err(invalid(
            field,
            format!(
                "is {} bytes, the limit is {}",
                bytes.len(),
                limits::PAYLOAD_BYTES
            ),
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(|_| ())
        .map_err(|e| invalid(field, format!("is not valid JSON: {e}")))
}

fn ms(field: &str, value: i32, default: Duration) -> Result<Duration, Status> {
    match value {
        0 => Ok(default),
        v if v < 0 => Err(invalid(field, format!("must not be negative, got {v}"))),
        v => Ok(Duration::from_millis(u64::from(v.unsigned_abs()))),
    }
}

/// Reseolio job options (0 / "" = default) into checked [`JobOptions`].
pub(crate) fn options_from_wire(o: Option<proto::JobOptions>) -> Result<JobOptions, Status> {
    let Some(o) = o else {
        return Ok(JobOptions::default());
    };
    let d = RetryPolicy::default();
    let max_attempts = match o.max_attempts {
        0 => d.max_attempts(),
        n if n < 0 => {
            return Err(invalid(
                "options.max_attempts",
                format!("must be positive, got {n}"),
            ));
        }
        n if n.unsigned_abs() > limits::MAX_ATTEMPTS => {
            return Err(invalid(
                "options.max_attempts",
                format!("must be at most {}, got {n}", limits::MAX_ATTEMPTS),
            ));
        }
        n => n.unsigned_abs(),
    };
    let backoff = match o.backoff.as_str() {
        "" => d.backoff(),
        name => model::parse_backoff(name).ok_or_else(|| {
            invalid(
                "options.backoff",
                format!("unknown backoff `{name}`, expected fixed, linear or exponential"),
            )
        })?,
    };
    let jitter = match o.jitter {
        0.0 => d.jitter(),
        j if !(0.0..=1.0).contains(&j) => {
            return Err(invalid(
                "options.jitter",
                format!("must be between 0 and 1, got {j}"),
            ));
        }
        j => f64::from(j),
    };
    let retry = RetryPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(backoff)
        .initial_delay(ms(
            "options.initial_delay_ms",
            o.initial_delay_ms,
            d.initial_delay(),
        )?)
        .max_delay(ms("options.max_delay_ms", o.max_delay_ms, d.max_delay())?)
        .jitter(jitter)
        .build()
        .map_err(|e| invalid("options", e))?;
    Ok(JobOptions {
        retry,
        timeout: ms("options.timeout_ms", o.timeout_ms, DEFAULT_TIMEOUT)?,
    })
}

fn options_to_wire(o: &JobOptions) -> proto::JobOptions {
    let clamp = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    proto::JobOptions {
        max_attempts: i32::try_from(o.retry.max_attempts()).unwrap_or(i32::MAX),
        backoff: model::backoff_name(o.retry.backoff()).to_owned(),
        initial_delay_ms: clamp(o.retry.initial_delay()),
        max_delay_ms: clamp(o.retry.max_delay()),
        timeout_ms: clamp(o.timeout),
        jitter: o.retry.jitter() as f32,
    }
}

/// A checked `EnqueueRequest`.
pub(crate) fn new_job_from_wire(r: proto::EnqueueRequest) -> Result<NewJob, Status> {
    check_name("name", &r.name)?;
    let args = if r.args.is_empty() {
        b"[]".to_vec()
    } else {
        r.args
    };
    check_json("args", &args)?;
    if r.idempotency_key.contains('\0') {
        return Err(invalid("idempotency_key", "must not contain NUL bytes"));
    }
    if r.idempotency_key.len() > limits::IDEMPOTENCY_KEY_BYTES {
        return Err(invalid(
            "idempotency_key",
            format!(
                "is {} bytes, the limit is {}",
                r.idempotency_key.len(),
                limits::IDEMPOTENCY_KEY_BYTES
            ),
        ));
    }
    let now = now_millis();
    let run_at = match (r.run_at_ms, r.delay_ms) {
        (0, 0) => now,
        (at, 0) if at > 0 => at,
        (0, d) if d > 0 => now.saturating_add(d),
        (at, d) if at < 0 || d < 0 => {
            return Err(invalid("run_at_ms/delay_ms", "must not be negative"));
        }
        _ => {
            return Err(invalid(
                "run_at_ms/delay_ms",
                "give one or the other, not both",
            ));
        }
    };
    let priority = u8::try_from(r.priority)
        .ok()
        .filter(|p| *p <= MAX_PRIORITY)
        .ok_or_else(|| {
            invalid(
                "priority",
                format!("must be 0 to {MAX_PRIORITY}, got {}", r.priority),
            )
        })?;
    let queue = if r.queue.is_empty() {
        DEFAULT_QUEUE.to_owned()
    } else {
        check_name("queue", &r.queue)?;
        r.queue
    };
    Ok(NewJob {
        name: r.name,
        queue,
        priority,
        args,
        options: options_from_wire(r.options)?,
        idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
        run_at,
    })
}

/// A domain job as the wire shows it.
pub(crate) fn job_to_wire(j: Job) -> proto::Job {
    let options = options_to_wire(&j.options);
    proto::Job {
        deadline_ms: j.lease_until.unwrap_or(0),
        status: status_to_wire(j.status) as i32,
        error: j.error.unwrap_or_default(),
        result: j.result.unwrap_or_default(),
        created_at: j.created_at,
        scheduled_at: j.run_at,
        started_at: j.started_at.unwrap_or(0),
        completed_at: j.completed_at.unwrap_or(0),
        max_attempts: options.max_attempts,
        attempt: i32::try_from(j.attempt).unwrap_or(i32::MAX),
        priority: i32::from(j.priority),
        queue: j.queue,
        cancel_requested: j.cancel_requested,
        idempotency_key: j.idempotency_key.unwrap_or_default(),
        id: j.id,
        name: j.name,
        args: j.args,
    }
}

pub(crate) fn status_to_wire(s: model::Status) -> proto::JobStatus {
    match s {
        model::Status::Pending => proto::JobStatus::Pending,
        model::Status::Running => proto::JobStatus::Running,
        model::Status::Success => proto::JobStatus::Success,
        model::Status::Dead => proto::JobStatus::Dead,
        model::Status::Cancelled => proto::JobStatus::Cancelled,
    }
}

fn completion_to_wire(c: Completion) -> proto::JobCompletion {
    proto::JobCompletion {
        job_id: c.job_id,
        status: status_to_wire(c.status) as i32,
        result: c.result.unwrap_or_default(),
        error: c.error.unwrap_or_default(),
    }
}

/// A worker's report into an [`Outcome`]: empty results become JSON `null`, long errors are cut.
fn outcome_from_wire(
    success: bool,
    value: Vec<u8>,
    mut error: String,
    retry: bool,
) -> Result<Outcome, Status> {
    if success {
        let value = if value.is_empty() {
            b"null".to_vec()
        } else {
            value
        };
        if value.len() > limits::PAYLOAD_BYTES {
            return Err(invalid(
                "result",
                format!(
                    "is {} bytes, the limit is {}",
                    value.len(),
                    limits::PAYLOAD_BYTES
                ),
            ));
        }
        return Ok(Outcome::Success(value));
    }
    if error.len() > limits::ERROR_BYTES {
        let mut cut = limits::ERROR_BYTES;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    Ok(Outcome::Failure { error, retry })
}

fn registration(r: &proto::PollRequest) -> Result<(Vec<String>, usize), Status> {
    worker_shape(&r.names, r.concurrency)
}

fn worker_shape(names: &[String], concurrency: i32) -> Result<(Vec<String>, usize), Status> {
    for name in names {
        check_name("names[]", name)?;
    }
    let concurrency = match concurrency {
        0 => DEFAULT_CONCURRENCY,
        n if n < 0 => return Err(invalid("concurrency", format!("must be positive, got {n}"))),
        n => usize::try_from(n)
            .unwrap_or(MAX_CONCURRENCY)
            .min(MAX_CONCURRENCY),
    };
    Ok((names.to_vec(), concurrency))
}

fn attempt_from_wire(field: &str, attempt: i32) -> Result<u32, Status> {
    u32::try_from(attempt)
        .ok()
        .filter(|a| *a > 0)
        .ok_or_else(|| {
            invalid(
                field,
                format!("must be a positive attempt number, got {attempt}"),
            )
        })
}

fn held_from_wire(held: &[v1::Held]) -> Result<Vec<(String, u32)>, Status> {
    if held.len() > MAX_CONCURRENCY {
        return Err(invalid(
            "held",
            format!("at most {MAX_CONCURRENCY} attempts"),
        ));
    }
    held.iter()
        .enumerate()
        .map(|(i, h)| {
            let attempt = attempt_from_wire(&format!("held[{i}].attempt"), h.attempt)?;
            Ok((h.job_id.clone(), attempt))
        })
        .collect()
}

fn held_to_wire(held: Vec<(String, u32)>) -> Vec<v1::Held> {
    held.into_iter()
        .map(|(job_id, attempt)| v1::Held {
            job_id,
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
        })
        .collect()
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down; reconnect")
}

#[tonic::async_trait]
impl<S: Store> Reseolio for ReseolioService<S> {
    async fn enqueue_job(
        &self,
        request: Request<proto::EnqueueRequest>,
    ) -> Result<Response<proto::EnqueueResponse>, Status> {
        let job = new_job_from_wire(request.into_inner())?;
        let mut out = self.engine.enqueue(vec![job]).await.map_err(store_status)?;
        let e = out
            .pop()
            .ok_or_else(|| Status::internal("enqueue returned nothing"))?;
        Ok(Response::new(proto::EnqueueResponse {
            job_id: e.id,
            deduplicated: e.deduplicated,
        }))
    }

    type PollJobsStream = BoxStream<proto::Job>;

    async fn poll_jobs(
        &self,
        request: Request<Streaming<proto::PollRequest>>,
    ) -> Result<Response<Self::PollJobsStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid("PollJobs", "the stream closed before the first PollRequest"))?;
        let (names, concurrency) = registration(&first)?;
        let worker_id = first.worker_id.clone();
        let (conn, mut jobs) = self
            .engine
            .connect_worker(worker_id.clone(), names, concurrency);
        tracing::info!(worker_id = %worker_id, conn, concurrency, "worker connected");

        let (tx, rx) = mpsc::channel::<Result<proto::Job, Status>>(concurrency.max(1));
        let engine = self.engine.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        let _ = tx.send(Err(shutting_down())).await;
                        break;
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(update)) => match registration(&update) {
                            Ok((names, concurrency)) => engine.update_worker(conn, names, concurrency),
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                        },
                        // The worker closed its side or the connection dropped.
                        Ok(None) | Err(_) => break,
                    },
                    next = jobs.recv() => match next {
                        Some(ToWorker::Job(job)) => {
                            if tx.send(Ok(job_to_wire(*job))).await.is_err() {
                                break;
                            }
                        }
                        // Reseolio's stream has no message for a cancel; the worker learns of it
                        // when it acks (a failure ack ends the job CANCELLED).
                        Some(ToWorker::Cancel { .. }) => {}
                        None => break,
                    },
                    () = tx.closed() => break,
                }
            }
            engine.disconnect_worker(conn).await;
            tracing::info!(worker_id = %worker_id, conn, "worker disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_job(
        &self,
        request: Request<proto::AckRequest>,
    ) -> Result<Response<proto::AckResponse>, Status> {
        let r = request.into_inner();
        let result = r.result.ok_or_else(|| invalid("result", "is required"))?;
        let outcome = outcome_from_wire(
            result.success,
            result.return_value,
            result.error,
            result.should_retry,
        )?;
        let attempt = match r.attempt {
            0 => None,
            n if n < 0 => return Err(invalid("attempt", format!("must be positive, got {n}"))),
            n => Some(n.unsigned_abs()),
        };
        let ack = Ack {
            job_id: r.job_id,
            attempt,
            outcome,
        };
        let mut out = self.engine.ack(vec![ack]).await.map_err(store_status)?;
        let result = out
            .pop()
            .ok_or_else(|| Status::internal("ack returned nothing"))?;
        let (job, effect) = result.map_err(job_status)?;
        Ok(Response::new(proto::AckResponse {
            new_status: status_to_wire(effect.status) as i32,
            next_attempt: if effect.status == model::Status::Pending {
                i32::try_from(job.attempt.saturating_add(1)).unwrap_or(i32::MAX)
            } else {
                0
            },
            next_run_at: effect.next_run_at.unwrap_or(0),
        }))
    }

    async fn get_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let id = request.into_inner().job_id;
        match self.engine.get(id.clone()).await.map_err(store_status)? {
            Some(job) => Ok(Response::new(job_to_wire(job))),
            None => Err(job_status(JobError::NotFound(id))),
        }
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelRequest>,
    ) -> Result<Response<proto::CancelResponse>, Status> {
        let id = request.into_inner().job_id;
        let (success, message) = match self.engine.cancel(id.clone()).await.map_err(store_status)? {
            Ok((_, crate::machine::CancelEffect::Cancelled)) => {
                (true, format!("job {id} cancelled"))
            }
            Ok((_, crate::machine::CancelEffect::Requested)) => (
                true,
                format!("job {id} is running; cancellation requested from its worker"),
            ),
            Ok((_, crate::machine::CancelEffect::AlreadyFinished(s))) => {
                (false, format!("job {id} is already {s}"))
            }
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(proto::CancelResponse { success, message }))
    }

    async fn retry_job(
        &self,
        request: Request<proto::RetryRequest>,
    ) -> Result<Response<proto::RetryResponse>, Status> {
        let id = request.into_inner().job_id;
        let (success, message) = match self.engine.retry(id.clone()).await.map_err(store_status)? {
            Ok(_) => (true, format!("job {id} is pending again")),
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(proto::RetryResponse { success, message }))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let r = request.into_inner();
        let mut statuses = Vec::new();
        for code in &r.statuses {
            match proto::JobStatus::try_from(*code) {
                Ok(proto::JobStatus::Unspecified | proto::JobStatus::Failed) => {}
                Ok(_) => statuses.extend(model::Status::from_code(*code)),
                Err(_) => return Err(invalid("statuses", format!("unknown status {code}"))),
            }
        }
        // Asked only for statuses Gantry never produces (FAILED): nothing matches.
        if statuses.is_empty() && !r.statuses.is_empty() && r.statuses.iter().any(|c| *c != 0) {
            return Ok(Response::new(proto::ListJobsResponse {
                jobs: vec![],
                total: 0,
            }));
        }
        let limit = match r.limit {
            0 => DEFAULT_PAGE,
            n if n < 0 => return Err(invalid("limit", format!("must not be negative, got {n}"))),
            n => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
        };
        let offset = usize::try_from(r.offset)
            .map_err(|_| invalid("offset", format!("must not be negative, got {}", r.offset)))?;
        let order_by = match r.order_by.as_str() {
            "" | "created_at" => ListOrder::CreatedAt,
            "scheduled_at" | "run_at" => ListOrder::RunAt,
            other => {
                return Err(invalid(
                    "order_by",
                    format!("unknown column `{other}`, expected created_at or scheduled_at"),
                ));
            }
        };
        let (jobs, total) = self
            .engine
            .list(ListFilter {
                statuses,
                names: r.names,
                queue: None,
                limit,
                offset,
                order_by,
                ascending: r.ascending,
            })
            .await
            .map_err(store_status)?;
        Ok(Response::new(proto::ListJobsResponse {
            jobs: jobs.into_iter().map(job_to_wire).collect(),
            total: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }

    type SubscribeToJobsStream = BoxStream<proto::JobCompletion>;

    async fn subscribe_to_jobs(
        &self,
        request: Request<Streaming<proto::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeToJobsStream>, Status> {
        let mut inbound = request.into_inner();
        // Subscribe before reading any id, so no completion can fall between a check and the wait.
        let mut events = self.engine.subscribe();
        let (tx, rx) = mpsc::channel::<Result<proto::JobCompletion, Status>>(256);
        let engine = self.engine.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut watched: HashSet<String> = HashSet::new();
            let mut inbound_open = true;
            loop {
                if !inbound_open && watched.is_empty() {
                    break;
                }
                tokio::select! {
                    () = stop.cancelled() => {
                        let _ = tx.send(Err(shutting_down())).await;
                        break;
                    }
                    () = tx.closed() => break,
                    msg = inbound.message(), if inbound_open => match msg {
                        Ok(Some(req)) if req.unsubscribe => {
                            for id in &req.job_ids {
                                watched.remove(id);
                            }
                        }
                        Ok(Some(req)) => {
                            if req.job_ids.len() > limits::BATCH {
                                let _ = tx.send(Err(invalid("job_ids", format!("at most {} per message", limits::BATCH)))).await;
                                break;
                            }
                            watched.extend(req.job_ids.iter().cloned());
                            if !send_finished(&engine, &mut watched, req.job_ids, &tx).await {
                                break;
                            }
                        }
                        Ok(None) | Err(_) => inbound_open = false,
                    },
                    event = events.recv() => match event {
                        Ok(c) => {
                            if watched.remove(&c.job_id) && tx.send(Ok(completion_to_wire(c))).await.is_err() {
                                break;
                            }
                        }
                        Err(RecvError::Lagged(missed)) => {
                            tracing::warn!(missed, "completion subscriber lagged; re-reading its jobs");
                            let ids: Vec<String> = watched.iter().cloned().collect();
                            if !send_finished(&engine, &mut watched, ids, &tx).await {
                                break;
                            }
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_schedule(
        &self,
        request: Request<proto::CreateScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let new = new_schedule_from_wire(request.into_inner())?;
        let s = self
            .engine
            .create_schedule(new)
            .await
            .map_err(store_status)?
            .map_err(schedule_status)?;
        tracing::info!(schedule = %s.name, schedule_id = %s.id, cron = %s.cron, timezone = %s.timezone, "schedule created");
        Ok(Response::new(schedule_to_wire(s)))
    }

    async fn get_schedule(
        &self,
        request: Request<proto::GetScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let key = schedule_key(request.into_inner().schedule_id)?;
        match self
            .engine
            .get_schedule(key.clone())
            .await
            .map_err(store_status)?
        {
            Some(s) => Ok(Response::new(schedule_to_wire(s))),
            None => Err(schedule_status(ScheduleError::NotFound(key))),
        }
    }

    async fn list_schedules(
        &self,
        request: Request<proto::ListSchedulesRequest>,
    ) -> Result<Response<proto::ListSchedulesResponse>, Status> {
        let r = request.into_inner();
        let status = match r.status_filter.to_ascii_lowercase().as_str() {
            "" | "all" => None,
            "active" => Some(ScheduleStatus::Active),
            "paused" => Some(ScheduleStatus::Paused),
            "deleted" => Some(ScheduleStatus::Deleted),
            other => {
                return Err(invalid(
                    "status_filter",
                    format!("unknown status `{other}`, expected active, paused, deleted or all"),
                ));
            }
        };
        let limit = match r.limit {
            0 => DEFAULT_PAGE,
            n if n < 0 => return Err(invalid("limit", format!("must not be negative, got {n}"))),
            n => usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
        };
        let offset = usize::try_from(r.offset)
            .map_err(|_| invalid("offset", format!("must not be negative, got {}", r.offset)))?;
        let (schedules, total) = self
            .engine
            .list_schedules(ScheduleFilter {
                status,
                limit,
                offset,
            })
            .await
            .map_err(store_status)?;
        Ok(Response::new(proto::ListSchedulesResponse {
            schedules: schedules.into_iter().map(schedule_to_wire).collect(),
            total: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }

    async fn update_schedule(
        &self,
        request: Request<proto::UpdateScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let r = request.into_inner();
        let key = schedule_key(r.schedule_id)?;
        let cron = match r.cron_expression.as_str() {
            "" => None,
            cron => {
                check_cron(cron)?;
                Some(r.cron_expression)
            }
        };
        let timezone = match r.timezone.as_str() {
            "" => None,
            tz => {
                check_timezone(tz)?;
                Some(r.timezone)
            }
        };
        let options = r
            .handler_options
            .map(|o| handler_options_from_wire(Some(o)))
            .transpose()?;
        let misfire = match r.misfire.as_str() {
            "" => None,
            name => Some(misfire_from_wire(name)?),
        };
        let change = ScheduleChange::Update(ScheduleUpdate {
            cron,
            timezone,
            options,
            misfire,
        });
        self.change_schedule(key, change).await
    }

    async fn pause_schedule(
        &self,
        request: Request<proto::PauseScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let key = schedule_key(request.into_inner().schedule_id)?;
        self.change_schedule(key, ScheduleChange::Pause).await
    }

    async fn resume_schedule(
        &self,
        request: Request<proto::ResumeScheduleRequest>,
    ) -> Result<Response<proto::Schedule>, Status> {
        let key = schedule_key(request.into_inner().schedule_id)?;
        self.change_schedule(key, ScheduleChange::Resume).await
    }

    async fn delete_schedule(
        &self,
        request: Request<proto::DeleteScheduleRequest>,
    ) -> Result<Response<proto::DeleteScheduleResponse>, Status> {
        let key = schedule_key(request.into_inner().schedule_id)?;
        // Reseolio's contract answers success = false, not an RPC error, for an unknown or
        // already deleted schedule (its SDK returns that boolean).
        let (success, message) = match self
            .engine
            .change_schedule(key.clone(), ScheduleChange::Delete)
            .await
            .map_err(store_status)?
        {
            Ok(s) => {
                tracing::info!(schedule = %s.name, schedule_id = %s.id, "schedule deleted");
                (true, format!("schedule {} deleted", s.id))
            }
            Err(ScheduleError::Rejected(_)) => {
                (false, format!("schedule {key} is already deleted"))
            }
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(proto::DeleteScheduleResponse {
            success,
            message,
        }))
    }
}

impl<S: Store> ReseolioService<S> {
    async fn change_schedule(
        &self,
        key: String,
        change: ScheduleChange,
    ) -> Result<Response<proto::Schedule>, Status> {
        let what = match &change {
            ScheduleChange::Update(_) => "updated",
            ScheduleChange::Pause => "paused",
            ScheduleChange::Resume => "resumed",
            ScheduleChange::Delete => "deleted",
        };
        let s = self
            .engine
            .change_schedule(key, change)
            .await
            .map_err(store_status)?
            .map_err(schedule_status)?;
        tracing::info!(schedule = %s.name, schedule_id = %s.id, "schedule {what}");
        Ok(Response::new(schedule_to_wire(s)))
    }
}

/// The one mapping from per-schedule refusals to gRPC.
pub(crate) fn schedule_status(e: ScheduleError) -> Status {
    match e {
        ScheduleError::NotFound(key) => Status::not_found(format!("schedule {key} not found")),
        ScheduleError::NameTaken(_) => Status::already_exists(format!("name: {e}")),
        ScheduleError::Rejected(ScheduleRejection::Spec(e)) => spec_status(e),
        ScheduleError::Rejected(r) => Status::failed_precondition(r.to_string()),
    }
}

fn spec_status(e: SpecError) -> Status {
    match e {
        SpecError::TimeZone(_) => invalid("timezone", e),
        SpecError::Cron { .. } | SpecError::NeverFires(_) => invalid("cron_expression", e),
    }
}

/// Longest time zone name accepted, in bytes (the longest IANA name is about 30).
const MAX_TIMEZONE_BYTES: usize = 64;

fn check_cron(cron: &str) -> Result<(), Status> {
    if cron.trim().is_empty() {
        return Err(invalid("cron_expression", "is required"));
    }
    if cron.len() > schedule::MAX_EXPRESSION_BYTES {
        return Err(invalid(
            "cron_expression",
            format!(
                "is {} bytes, the limit is {}",
                cron.len(),
                schedule::MAX_EXPRESSION_BYTES
            ),
        ));
    }
    CronSpec::parse(cron, "").map(|_| ()).map_err(spec_status)
}

fn check_timezone(tz: &str) -> Result<(), Status> {
    if tz.len() > MAX_TIMEZONE_BYTES {
        return Err(invalid(
            "timezone",
            format!("is {} bytes, the limit is {MAX_TIMEZONE_BYTES}", tz.len()),
        ));
    }
    schedule::parse_timezone(tz)
        .map(|_| ())
        .map_err(spec_status)
}

fn misfire_from_wire(name: &str) -> Result<Misfire, Status> {
    Misfire::from_name(name).ok_or_else(|| {
        invalid(
            "misfire",
            format!("unknown misfire policy `{name}`, expected coalesce or skip"),
        )
    })
}

/// Job options of a schedule; errors name `handler_options.*`.
fn handler_options_from_wire(o: Option<proto::JobOptions>) -> Result<JobOptions, Status> {
    options_from_wire(o).map_err(|s| Status::invalid_argument(format!("handler_{}", s.message())))
}

fn schedule_key(key: String) -> Result<String, Status> {
    if key.is_empty() {
        return Err(invalid("schedule_id", "is required"));
    }
    Ok(key)
}

/// A checked `CreateScheduleRequest`.
fn new_schedule_from_wire(r: proto::CreateScheduleRequest) -> Result<NewSchedule, Status> {
    check_name("name", &r.name)?;
    check_cron(&r.cron_expression)?;
    check_timezone(&r.timezone)?;
    let args = if r.args.is_empty() {
        b"[]".to_vec()
    } else {
        r.args
    };
    check_json("args", &args)?;
    let misfire = match r.misfire.as_str() {
        "" => Misfire::default(),
        name => misfire_from_wire(name)?,
    };
    Ok(NewSchedule {
        name: r.name,
        cron: r.cron_expression,
        timezone: r.timezone,
        misfire,
        args,
        options: handler_options_from_wire(r.handler_options)?,
    })
}

/// A domain schedule as the wire shows it.
fn schedule_to_wire(s: Schedule) -> proto::Schedule {
    proto::Schedule {
        status: match s.status {
            ScheduleStatus::Active => proto::ScheduleStatus::Active,
            ScheduleStatus::Paused => proto::ScheduleStatus::Paused,
            ScheduleStatus::Deleted => proto::ScheduleStatus::Deleted,
        } as i32,
        next_run_at: s.next_run_at.unwrap_or(0),
        last_run_at: s.last_run_at.unwrap_or(0),
        created_at: s.created_at,
        updated_at: s.updated_at,
        handler_options: Some(options_to_wire(&s.options)),
        misfire: s.misfire.as_str().to_owned(),
        id: s.id,
        name: s.name,
        cron_expression: s.cron,
        timezone: s.timezone,
        args: s.args,
    }
}

/// Sends a completion for each of `ids` that is already terminal (or unknown: NOT_FOUND ends
/// nothing, the id is just dropped) and stops watching it. False when the client is gone.
async fn send_finished<S: Store>(
    engine: &Engine<S>,
    watched: &mut HashSet<String>,
    ids: Vec<String>,
    tx: &mpsc::Sender<Result<proto::JobCompletion, Status>>,
) -> bool {
    for id in ids {
        match engine.get(id.clone()).await {
            Ok(Some(job)) if job.status.is_terminal() => {
                if !watched.remove(&id) {
                    continue;
                }
                let c = Completion {
                    job_id: job.id,
                    status: job.status,
                    result: job.result,
                    error: job.error,
                };
                if tx.send(Ok(completion_to_wire(c))).await.is_err() {
                    return false;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                watched.remove(&id);
            }
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                return false;
            }
        }
    }
    true
}

/// The `gantry.jobs.v1.Jobs` service: the worker channel, batch enqueue, heartbeats, stats and
/// purge.
pub struct GantryJobsService<S> {
    engine: Engine<S>,
    stop: CancellationToken,
}

impl<S: Store> GantryJobsService<S> {
    /// Serves `engine`; `Work` streams end with `UNAVAILABLE` when `stop` is cancelled.
    pub fn new(engine: Engine<S>, stop: CancellationToken) -> Self {
        Self { engine, stop }
    }
}

fn work_msg(msg: v1::work_response::Msg) -> Result<v1::WorkResponse, Status> {
    Ok(v1::WorkResponse { msg: Some(msg) })
}

/// Ack batches a `Work` stream may have queued for the store.
const ACK_QUEUE: usize = 64;

/// How long a `Work` stream whose worker hung up is still read for acks sent just before.
const HANG_UP_GRACE: Duration = Duration::from_millis(50);

/// One `AckBatch` from a `Work` stream, checked: the acks the store is to apply, and the answer
/// lines of those refused already (no attempt, an oversized result).
struct CheckedAcks {
    results: Vec<Option<v1::AckResult>>,
    /// For each ack to apply: its line in `results`, job id and attempt.
    slots: Vec<(usize, String, u32)>,
    acks: Vec<Ack>,
}

fn refused_ack(job_id: String, attempt: i32, status: &Status) -> v1::AckResult {
    v1::AckResult {
        job_id,
        attempt,
        ok: false,
        new_status: 0,
        next_run_at: 0,
        error: status.message().to_owned(),
    }
}

/// Checks one `AckBatch`. Only a batch over the size limit is an error (it ends the stream); an
/// ack the server cannot take is refused on its own line of the answer, so it does not cost the
/// worker every attempt it holds.
fn check_acks(batch: v1::AckBatch) -> Result<CheckedAcks, Status> {
    if batch.acks.len() > limits::BATCH {
        return Err(invalid(
            "acks",
            format!("at most {} per batch", limits::BATCH),
        ));
    }
    let n = batch.acks.len();
    let mut checked = CheckedAcks {
        results: Vec::with_capacity(n),
        slots: Vec::with_capacity(n),
        acks: Vec::with_capacity(n),
    };
    for (i, a) in batch.acks.into_iter().enumerate() {
        let parsed =
            attempt_from_wire(&format!("acks[{i}].attempt"), a.attempt).and_then(|attempt| {
                Ok((
                    attempt,
                    outcome_from_wire(a.success, a.result, a.error, a.retry)?,
                ))
            });
        match parsed {
            Ok((attempt, outcome)) => {
                checked.slots.push((i, a.job_id.clone(), attempt));
                checked.acks.push(Ack {
                    job_id: a.job_id,
                    attempt: Some(attempt),
                    outcome,
                });
                checked.results.push(None);
            }
            Err(status) => checked
                .results
                .push(Some(refused_ack(a.job_id, a.attempt, &status))),
        }
    }
    Ok(checked)
}

/// The answer to one checked batch, from the store's results for its acks (in order).
fn answer_acks(
    checked: CheckedAcks,
    out: impl Iterator<Item = Result<(crate::model::Job, crate::machine::AckEffect), JobError>>,
) -> v1::AckResults {
    let mut results = checked.results;
    for ((i, job_id, attempt), r) in checked.slots.into_iter().zip(out) {
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        results[i] = Some(match r {
            Ok((_, effect)) => v1::AckResult {
                job_id,
                attempt,
                ok: true,
                new_status: status_to_wire(effect.status) as i32,
                next_run_at: effect.next_run_at.unwrap_or(0),
                error: String::new(),
            },
            Err(e) => refused_ack(job_id, attempt, &Status::failed_precondition(e.to_string())),
        });
    }
    v1::AckResults {
        results: results.into_iter().flatten().collect(),
    }
}

/// Applies a `Work` stream's ack batches in the order they came, beside the stream's loop so
/// that jobs keep flowing to the worker while acks commit. Batches that arrive while one is
/// being committed go to the store together in the next call; each still gets its own answer,
/// in order. Acks received before the stream ended are applied even when the answer can no
/// longer be sent (so the attempts they finish are not abandoned as held).
async fn apply_acks<S: Store>(
    engine: Engine<S>,
    mut batches: mpsc::Receiver<CheckedAcks>,
    tx: mpsc::Sender<Result<v1::WorkResponse, Status>>,
    applied: Arc<tokio::sync::Notify>,
    outstanding: Arc<AtomicUsize>,
    failed: CancellationToken,
) {
    let mut answering = true;
    while let Some(first) = batches.recv().await {
        let mut group = vec![first];
        let mut total = group[0].acks.len();
        while total < limits::BATCH {
            match batches.try_recv() {
                Ok(more) => {
                    total += more.acks.len();
                    group.push(more);
                }
                Err(_) => break,
            }
        }
        let acks: Vec<Ack> = group
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.acks))
            .collect();
        match engine.ack(acks).await {
            Ok(out) => {
                let mut out = out.into_iter();
                for checked in group {
                    let n = checked.slots.len();
                    let answer = answer_acks(checked, out.by_ref().take(n));
                    if answering
                        && tx
                            .send(work_msg(v1::work_response::Msg::Acks(answer)))
                            .await
                            .is_err()
                    {
                        answering = false;
                    }
                    outstanding.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                failed.cancel();
                return;
            }
        }
        applied.notify_one();
    }
}

#[tonic::async_trait]
impl<S: Store> v1::jobs_server::Jobs for GantryJobsService<S> {
    type WorkStream = BoxStream<v1::WorkResponse>;

    async fn work(
        &self,
        request: Request<Streaming<v1::WorkRequest>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        use v1::work_request::Msg as In;
        use v1::work_response::Msg as Out;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid("Work", "the stream closed before the Register message"))?;
        let Some(In::Register(register)) = first.msg else {
            return Err(invalid("Work", "the first message must be Register"));
        };
        let (names, concurrency) = worker_shape(&register.names, register.concurrency)?;
        let held = held_from_wire(&register.held)?;
        let worker_id = register.worker_id;
        let (conn, mut jobs) = self
            .engine
            .connect_worker(worker_id.clone(), names, concurrency);
        let (adopted, lost) = match self.engine.adopt(conn, held).await {
            Ok(v) => v,
            Err(e) => {
                self.engine.disconnect_worker(conn).await;
                return Err(store_status(e));
            }
        };
        tracing::info!(worker_id = %worker_id, conn, concurrency, adopted = adopted.len(), "worker connected");

        let (tx, rx) =
            mpsc::channel::<Result<v1::WorkResponse, Status>>(concurrency.saturating_add(16));
        // Capacity above holds the first message.
        let _ = tx
            .send(work_msg(Out::Registered(v1::Registered {
                adopted: held_to_wire(adopted),
                lost: held_to_wire(lost),
            })))
            .await;
        let engine = self.engine.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            // Bounded: a worker acking faster than the store commits waits here (backpressure).
            let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
            let applied = Arc::new(tokio::sync::Notify::new());
            let ack_failed = CancellationToken::new();
            // Batches queued whose answers are not sent yet.
            let outstanding = Arc::new(AtomicUsize::new(0));
            let acker = tokio::spawn(apply_acks(
                engine.clone(),
                ack_rx,
                tx.clone(),
                Arc::clone(&applied),
                Arc::clone(&outstanding),
                ack_failed.clone(),
            ));
            let mut draining = false;
            // The stream's last message (an error), sent after every pending ack is answered.
            let mut last: Option<Result<v1::WorkResponse, Status>> = None;
            loop {
                if draining
                    && engine.worker_in_flight(conn) == 0
                    && outstanding.load(Ordering::Acquire) == 0
                {
                    last = Some(work_msg(Out::Drained(v1::Drained {})));
                    break;
                }
                tokio::select! {
                    () = stop.cancelled() => {
                        last = Some(Err(shutting_down()));
                        break;
                    }
                    () = tx.closed() => {
                        // The worker hung up: acks it sent just before are still buffered here.
                        while let Ok(Ok(Some(m))) =
                            tokio::time::timeout(HANG_UP_GRACE, inbound.message()).await
                        {
                            if let Some(In::Acks(batch)) = m.msg
                                && let Ok(checked) = check_acks(batch)
                            {
                                outstanding.fetch_add(1, Ordering::AcqRel);
                                let _ = ack_tx.send(checked).await;
                            }
                        }
                        break;
                    }
                    () = ack_failed.cancelled() => break,
                    () = applied.notified(), if draining => {}
                    msg = inbound.message() => match msg {
                        Ok(Some(v1::WorkRequest { msg: Some(In::Register(r)) })) => {
                            let shape = worker_shape(&r.names, r.concurrency)
                                .and_then(|shape| Ok((shape, held_from_wire(&r.held)?)));
                            match shape {
                                Ok(((names, concurrency), held)) => {
                                    engine.update_worker(conn, names, concurrency);
                                    let reply = match engine.adopt(conn, held).await {
                                        Ok((adopted, lost)) => work_msg(Out::Registered(v1::Registered {
                                            adopted: held_to_wire(adopted),
                                            lost: held_to_wire(lost),
                                        })),
                                        Err(e) => {
                                            last = Some(Err(store_status(e)));
                                            break;
                                        }
                                    };
                                    if tx.send(reply).await.is_err() {
                                        break;
                                    }
                                }
                                Err(status) => {
                                    last = Some(Err(status));
                                    break;
                                }
                            }
                        }
                        Ok(Some(v1::WorkRequest { msg: Some(In::Acks(batch)) })) => {
                            match check_acks(batch) {
                                Ok(checked) => {
                                    outstanding.fetch_add(1, Ordering::AcqRel);
                                    if ack_tx.send(checked).await.is_err() {
                                        break;
                                    }
                                }
                                Err(status) => {
                                    last = Some(Err(status));
                                    break;
                                }
                            }
                        }
                        Ok(Some(v1::WorkRequest { msg: Some(In::Drain(_)) })) => {
                            engine.drain_worker(conn);
                            draining = true;
                        }
                        Ok(Some(v1::WorkRequest { msg: None })) => {
                            last = Some(Err(invalid("WorkRequest", "empty message")));
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                    next = jobs.recv() => {
                        let msg = match next {
                            Some(ToWorker::Job(job)) => Out::Job(job_to_wire(*job)),
                            Some(ToWorker::Cancel { job_id, attempt }) => Out::Cancel(v1::CancelAttempt {
                                job_id,
                                attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
                            }),
                            None => break,
                        };
                        if tx.send(work_msg(msg)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Acks that came before the end are applied, and answered, before the last message
            // and before the held attempts are let go.
            drop(ack_tx);
            let _ = acker.await;
            if let Some(m) = last {
                let _ = tx.send(m).await;
            }
            engine.disconnect_worker(conn).await;
            tracing::info!(worker_id = %worker_id, conn, "worker disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn enqueue_batch(
        &self,
        request: Request<v1::EnqueueBatchRequest>,
    ) -> Result<Response<v1::EnqueueBatchResponse>, Status> {
        let jobs = request.into_inner().jobs;
        if jobs.len() > limits::BATCH {
            return Err(invalid(
                "jobs",
                format!(
                    "{} jobs in one batch, the limit is {}",
                    jobs.len(),
                    limits::BATCH
                ),
            ));
        }
        let jobs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                new_job_from_wire(r)
                    .map_err(|s| Status::invalid_argument(format!("jobs[{i}].{}", s.message())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let results = self.engine.enqueue(jobs).await.map_err(store_status)?;
        Ok(Response::new(v1::EnqueueBatchResponse {
            results: results
                .into_iter()
                .map(|e| proto::EnqueueResponse {
                    job_id: e.id,
                    deduplicated: e.deduplicated,
                })
                .collect(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        if r.beats.len() > limits::BATCH {
            return Err(invalid(
                "beats",
                format!("at most {} per call", limits::BATCH),
            ));
        }
        let extend = match r.extend_ms {
            0 => None,
            n if n < 0 => {
                return Err(invalid(
                    "extend_ms",
                    format!("must not be negative, got {n}"),
                ));
            }
            n => Some(Duration::from_millis(n.unsigned_abs())),
        };
        let mut beats = Vec::with_capacity(r.beats.len());
        for (i, b) in r.beats.iter().enumerate() {
            let attempt = match b.attempt {
                0 => None,
                n if n < 0 => {
                    return Err(invalid(
                        &format!("beats[{i}].attempt"),
                        format!("must be positive, got {n}"),
                    ));
                }
                n => Some(n.unsigned_abs()),
            };
            beats.push((b.job_id.clone(), attempt));
        }
        let ids: Vec<String> = beats.iter().map(|(id, _)| id.clone()).collect();
        let out = self
            .engine
            .heartbeat(beats, extend)
            .await
            .map_err(store_status)?;
        Ok(Response::new(v1::HeartbeatResponse {
            results: ids
                .into_iter()
                .zip(out)
                .map(|(job_id, r)| match r {
                    Ok(until) => v1::BeatResult {
                        job_id,
                        ok: true,
                        lease_until: until,
                        error: String::new(),
                    },
                    Err(e) => v1::BeatResult {
                        job_id,
                        ok: false,
                        lease_until: 0,
                        error: e.to_string(),
                    },
                })
                .collect(),
        }))
    }

    async fn stats(
        &self,
        _request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let stats = self.engine.stats().await.map_err(store_status)?;
        Ok(Response::new(v1::StatsResponse {
            counts: stats
                .by_status
                .into_iter()
                .map(|(s, n)| v1::StatusCount {
                    status: status_to_wire(s) as i32,
                    count: i64::try_from(n).unwrap_or(i64::MAX),
                })
                .collect(),
        }))
    }

    async fn purge(
        &self,
        request: Request<v1::PurgeRequest>,
    ) -> Result<Response<v1::PurgeResponse>, Status> {
        let r = request.into_inner();
        if r.completed_before <= 0 {
            return Err(invalid(
                "completed_before",
                "is required (epoch milliseconds)",
            ));
        }
        let mut statuses = Vec::new();
        for code in &r.statuses {
            match model::Status::from_code(*code) {
                Some(s) if s.is_terminal() => statuses.push(s),
                _ => {
                    return Err(invalid(
                        "statuses",
                        format!("{code} is not a finished status (SUCCESS, DEAD or CANCELLED)"),
                    ));
                }
            }
        }
        let deleted = self
            .engine
            .purge(r.completed_before, statuses)
            .await
            .map_err(store_status)?;
        Ok(Response::new(v1::PurgeResponse {
            deleted: i64::try_from(deleted).unwrap_or(i64::MAX),
        }))
    }
}
