//! Conversions between the SDK's types and the generated wire types. Pure: no I/O.
//!
//! **Boundary:** the SDK checks only what the wire cannot say (durations beyond `i32`
//! milliseconds, times before 1970); everything else (names, priorities, sizes) is validated by
//! the server, in one place, and comes back as `INVALID_ARGUMENT` naming the field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::{ClientError, Job, JobStatus, ListFilter, ListOrder, NewJob, Stats};
use crate::proto::gantry::jobs::v1;
use crate::proto::reseolio as pb;

pub(crate) fn status_from_wire(code: i32) -> JobStatus {
    match pb::JobStatus::try_from(code) {
        Ok(pb::JobStatus::Pending) => JobStatus::Pending,
        Ok(pb::JobStatus::Running) => JobStatus::Running,
        Ok(pb::JobStatus::Success) => JobStatus::Success,
        Ok(pb::JobStatus::Failed) => JobStatus::Failed,
        Ok(pb::JobStatus::Dead) => JobStatus::Dead,
        Ok(pb::JobStatus::Cancelled) => JobStatus::Cancelled,
        Ok(pb::JobStatus::Unspecified) | Err(_) => JobStatus::Unknown(code),
    }
}

pub(crate) fn status_to_wire(s: JobStatus) -> i32 {
    match s {
        JobStatus::Pending => pb::JobStatus::Pending as i32,
        JobStatus::Running => pb::JobStatus::Running as i32,
        JobStatus::Success => pb::JobStatus::Success as i32,
        JobStatus::Failed => pb::JobStatus::Failed as i32,
        JobStatus::Dead => pb::JobStatus::Dead as i32,
        JobStatus::Cancelled => pb::JobStatus::Cancelled as i32,
        JobStatus::Unknown(code) => code,
    }
}

/// Epoch milliseconds (0 = unset) as a time.
pub(crate) fn time_from_wire(ms: i64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs()))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub(crate) fn job_from_wire(j: pb::Job) -> Job {
    Job {
        status: status_from_wire(j.status),
        attempt: u32::try_from(j.attempt).unwrap_or(0),
        max_attempts: u32::try_from(j.max_attempts).unwrap_or(0),
        priority: u8::try_from(j.priority).unwrap_or(u8::MAX),
        result: (!j.result.is_empty()).then_some(j.result),
        error: non_empty(j.error),
        created_at: time_from_wire(j.created_at).unwrap_or(UNIX_EPOCH),
        scheduled_at: time_from_wire(j.scheduled_at).unwrap_or(UNIX_EPOCH),
        started_at: time_from_wire(j.started_at),
        completed_at: time_from_wire(j.completed_at),
        deadline: time_from_wire(j.deadline_ms),
        cancel_requested: j.cancel_requested,
        idempotency_key: non_empty(j.idempotency_key),
        id: j.id,
        name: j.name,
        queue: j.queue,
        args: j.args,
    }
}

/// A duration as wire milliseconds; 0 means "default" on the wire, so a non-zero duration below
/// one millisecond rounds up to 1.
fn ms_i32(field: &'static str, d: Duration) -> Result<i32, ClientError> {
    let ms = d.as_millis().max(u128::from(!d.is_zero()));
    i32::try_from(ms).map_err(|_| ClientError::InvalidOptions {
        field,
        problem: format!("{d:?} is more than {} ms", i32::MAX),
    })
}

fn ms_i64(field: &'static str, d: Duration) -> Result<i64, ClientError> {
    let ms = d.as_millis().max(u128::from(!d.is_zero()));
    i64::try_from(ms).map_err(|_| ClientError::InvalidOptions {
        field,
        problem: format!("{d:?} is too far away"),
    })
}

pub(crate) fn enqueue_request(job: NewJob) -> Result<pb::EnqueueRequest, ClientError> {
    let o = job.options;
    let run_at_ms = match o.run_at {
        None => 0,
        Some(t) => {
            let since = t
                .duration_since(UNIX_EPOCH)
                .map_err(|_| ClientError::InvalidOptions {
                    field: "run_at",
                    problem: "is before 1970".into(),
                })?;
            ms_i64("run_at", since)?
        }
    };
    let delay_ms = o
        .delay
        .map(|d| ms_i64("delay", d))
        .transpose()?
        .unwrap_or(0);
    let has_job_options = o.max_attempts.is_some()
        || o.backoff.is_some()
        || o.initial_delay.is_some()
        || o.max_delay.is_some()
        || o.timeout.is_some()
        || o.jitter.is_some();
    let options = if has_job_options {
        let ms = |field, d: Option<Duration>| d.map(|d| ms_i32(field, d)).transpose();
        Some(pb::JobOptions {
            max_attempts: match o.max_attempts {
                None => 0,
                Some(n) => i32::try_from(n).map_err(|_| ClientError::InvalidOptions {
                    field: "max_attempts",
                    problem: format!("{n} is too large"),
                })?,
            },
            backoff: o.backoff.map(|b| b.as_str().to_owned()).unwrap_or_default(),
            initial_delay_ms: ms("initial_delay", o.initial_delay)?.unwrap_or(0),
            max_delay_ms: ms("max_delay", o.max_delay)?.unwrap_or(0),
            timeout_ms: ms("timeout", o.timeout)?.unwrap_or(0),
            // The wire's 0 means "the default jitter", so "none" is sent as the smallest positive
            // value, which is no jitter in effect.
            jitter: match o.jitter {
                None => 0.0,
                Some(0.0) => f32::MIN_POSITIVE,
                Some(j) => j,
            },
        })
    } else {
        None
    };
    Ok(pb::EnqueueRequest {
        name: job.name,
        args: job.args,
        options,
        idempotency_key: o.idempotency_key.unwrap_or_default(),
        run_at_ms,
        delay_ms,
        priority: o.priority.map_or(0, i32::from),
        queue: o.queue.unwrap_or_default(),
    })
}

pub(crate) fn list_request(f: ListFilter) -> pb::ListJobsRequest {
    pb::ListJobsRequest {
        statuses: f.statuses.into_iter().map(status_to_wire).collect(),
        names: f.names,
        limit: i32::try_from(f.limit).unwrap_or(i32::MAX),
        offset: i32::try_from(f.offset).unwrap_or(i32::MAX),
        order_by: match f.order {
            ListOrder::CreatedAt => "created_at",
            ListOrder::ScheduledAt => "scheduled_at",
        }
        .to_owned(),
        ascending: f.ascending,
    }
}

pub(crate) fn stats_from_wire(r: v1::StatsResponse) -> Stats {
    let mut stats = Stats::default();
    for c in r.counts {
        let n = u64::try_from(c.count).unwrap_or(0);
        match status_from_wire(c.status) {
            JobStatus::Pending => stats.pending += n,
            JobStatus::Running => stats.running += n,
            JobStatus::Success => stats.success += n,
            JobStatus::Dead => stats.dead += n,
            JobStatus::Cancelled => stats.cancelled += n,
            JobStatus::Failed | JobStatus::Unknown(_) => {}
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Backoff, EnqueueOptions};

    fn request(options: EnqueueOptions) -> Result<pb::EnqueueRequest, ClientError> {
        enqueue_request(NewJob::new("n", &(1, "a")).unwrap().options(options))
    }

    #[test]
    fn default_options_send_nothing_but_name_and_args() {
        let r = request(EnqueueOptions::default()).unwrap();
        assert_eq!(r.args, br#"[1,"a"]"#);
        assert_eq!(r.options, None);
        assert_eq!((r.run_at_ms, r.delay_ms, r.priority), (0, 0, 0));
        assert!(r.queue.is_empty() && r.idempotency_key.is_empty());
    }

    #[test]
    fn options_map_to_wire_fields() {
        let r = request(EnqueueOptions {
            delay: Some(Duration::from_micros(10)),
            priority: Some(4),
            queue: Some("q".into()),
            idempotency_key: Some("k".into()),
            max_attempts: Some(5),
            backoff: Some(Backoff::Linear),
            initial_delay: Some(Duration::from_millis(20)),
            max_delay: Some(Duration::from_secs(2)),
            timeout: Some(Duration::from_millis(300)),
            jitter: Some(0.0),
            run_at: None,
        })
        .unwrap();
        assert_eq!(r.delay_ms, 1, "a sub-millisecond delay is not 'no delay'");
        assert_eq!((r.priority, r.queue.as_str()), (4, "q"));
        assert_eq!(r.idempotency_key, "k");
        let o = r.options.unwrap();
        assert_eq!((o.max_attempts, o.backoff.as_str()), (5, "linear"));
        assert_eq!(
            (o.initial_delay_ms, o.max_delay_ms, o.timeout_ms),
            (20, 2000, 300)
        );
        assert!(o.jitter > 0.0 && o.jitter < 1e-30, "no jitter is not 0");
    }

    #[test]
    fn unsayable_options_are_refused_by_name() {
        let e = request(EnqueueOptions {
            timeout: Some(Duration::from_secs(u64::from(u32::MAX))),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
        let e = request(EnqueueOptions {
            run_at: UNIX_EPOCH.checked_sub(Duration::from_secs(1)),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("run_at"), "{e}");
    }

    #[test]
    fn jobs_and_statuses_from_wire() {
        let job = job_from_wire(pb::Job {
            id: "j".into(),
            status: pb::JobStatus::Dead as i32,
            attempt: 3,
            max_attempts: 3,
            error: "boom".into(),
            created_at: 1_000,
            started_at: 0,
            args: b"[1]".to_vec(),
            ..Default::default()
        });
        assert_eq!(job.status, JobStatus::Dead);
        assert_eq!(job.error.as_deref(), Some("boom"));
        assert_eq!(job.result, None);
        assert_eq!(job.started_at, None);
        assert_eq!(job.created_at, UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(job.args::<(i32,)>().unwrap(), (1,));
        assert_eq!(status_from_wire(42), JobStatus::Unknown(42));
        for s in [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Success,
            JobStatus::Failed,
            JobStatus::Dead,
            JobStatus::Cancelled,
            JobStatus::Unknown(77),
        ] {
            assert_eq!(status_from_wire(status_to_wire(s)), s);
        }
    }

    #[test]
    fn stats_sum_by_status() {
        let stats = stats_from_wire(v1::StatsResponse {
            counts: vec![
                v1::StatusCount {
                    status: pb::JobStatus::Pending as i32,
                    count: 2,
                },
                v1::StatusCount {
                    status: pb::JobStatus::Dead as i32,
                    count: 1,
                },
            ],
        });
        assert_eq!((stats.pending, stats.dead, stats.total()), (2, 1, 3));
    }
}
