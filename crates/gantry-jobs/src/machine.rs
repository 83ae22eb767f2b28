//! The job state machine: every status change a job can make, as pure functions on [`Job`].
//!
//! Storage backends load a job, call one of these, and write the job back in the same
//! transaction, so SQLite and PostgreSQL share one set of semantics. Nothing here does I/O or
//! reads the clock: `now` and the random `unit` for jitter are arguments.
//!
//! **Invariant:** a job is RUNNING only with a lease (`lease_until`) and a worker; every other
//! status has neither.
//! **Invariant:** `attempt` only grows, so an ack or heartbeat naming an attempt other than the
//! current one is [`Rejection::Stale`] — even across a `retry`, which grants a fresh run of
//! attempts by moving `attempt_base` up to `attempt` instead of resetting the counter.
//! **Invariant:** a terminal job (SUCCESS, DEAD, CANCELLED) changes only through `retry` (DEAD
//! only).

use std::time::Duration;

use crate::model::{Job, Millis, Outcome, Status};

/// Why a transition was refused. The job is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The job is not in a status that allows it.
    #[error("job is {status}, expected {expected}")]
    WrongStatus {
        /// Its status.
        status: Status,
        /// What the transition needs.
        expected: &'static str,
    },
    /// The named attempt is not the current one (fencing).
    #[error("attempt {given} is stale: the job is on attempt {current}")]
    Stale {
        /// The attempt the caller named.
        given: u32,
        /// The job's current attempt.
        current: u32,
    },
    /// Not due yet.
    #[error("job is not due until {run_at}")]
    NotDue {
        /// When it is due.
        run_at: Millis,
    },
}

/// What an ack (or an expired lease, or a lost worker) did to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckEffect {
    /// The status it is in now.
    pub status: Status,
    /// When it runs again, if it does.
    pub next_run_at: Option<Millis>,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelEffect {
    /// It was pending and is now CANCELLED.
    Cancelled,
    /// It is running; the worker is asked to stop. It ends CANCELLED if the attempt fails,
    /// SUCCESS if it completes anyway.
    Requested,
    /// It is already terminal.
    AlreadyFinished(Status),
}

fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Claims a due pending job for `worker`: the next attempt begins and a lease is taken.
pub fn claim(job: &mut Job, worker: &str, now: Millis) -> Result<(), Rejection> {
    if job.status != Status::Pending {
        return Err(Rejection::WrongStatus {
            status: job.status,
            expected: "pending",
        });
    }
    if job.run_at > now {
        return Err(Rejection::NotDue { run_at: job.run_at });
    }
    job.status = Status::Running;
    job.attempt = job.attempt.saturating_add(1);
    job.started_at = Some(now);
    job.lease_until = Some(now.saturating_add(millis(job.options.timeout)));
    job.worker_id = Some(worker.to_owned());
    job.cancel_requested = false;
    Ok(())
}

fn check_running(job: &Job, attempt: Option<u32>) -> Result<(), Rejection> {
    if job.status != Status::Running {
        return Err(Rejection::WrongStatus {
            status: job.status,
            expected: "running",
        });
    }
    match attempt {
        Some(given) if given != job.attempt => Err(Rejection::Stale {
            given,
            current: job.attempt,
        }),
        _ => Ok(()),
    }
}

fn finish(job: &mut Job, status: Status, now: Millis) -> AckEffect {
    job.status = status;
    job.completed_at = Some(now);
    job.lease_until = None;
    job.worker_id = None;
    job.cancel_requested = false;
    AckEffect {
        status,
        next_run_at: None,
    }
}

/// Applies a worker's report on the attempt `attempt` (`None`: the current one, unfenced).
/// `unit` is a random number in `[0, 1)` for the retry jitter.
pub fn ack(
    job: &mut Job,
    attempt: Option<u32>,
    outcome: Outcome,
    now: Millis,
    unit: f64,
) -> Result<AckEffect, Rejection> {
    check_running(job, attempt)?;
    Ok(match outcome {
        Outcome::Success(result) => {
            job.result = Some(result);
            finish(job, Status::Success, now)
        }
        Outcome::Failure { error, retry } => {
            job.error = Some(error);
            if job.cancel_requested {
                finish(job, Status::Cancelled, now)
            } else if retry {
                fail_attempt(job, now, unit, false)
            } else {
                finish(job, Status::Dead, now)
            }
        }
        Outcome::Defer { error, after_ms } => {
            job.error = Some(error);
            if job.cancel_requested {
                finish(job, Status::Cancelled, now)
            } else {
                // Not an attempt: the base moves up with it, so the tries counted stay the same.
                job.attempt_base = job.attempt_base.saturating_add(1).min(job.attempt);
                let run_at = now.saturating_add(after_ms.max(0));
                job.status = Status::Pending;
                job.run_at = run_at;
                job.lease_until = None;
                job.worker_id = None;
                AckEffect {
                    status: Status::Pending,
                    next_run_at: Some(run_at),
                }
            }
        }
        Outcome::RetryAfter { error, after_ms } => {
            job.error = Some(error);
            if job.cancel_requested {
                finish(job, Status::Cancelled, now)
            } else {
                let effect = fail_attempt(job, now, unit, false);
                match effect.next_run_at {
                    Some(at) if effect.status == Status::Pending => {
                        let at = at.max(now.saturating_add(after_ms));
                        job.run_at = at;
                        AckEffect {
                            status: Status::Pending,
                            next_run_at: Some(at),
                        }
                    }
                    _ => effect,
                }
            }
        }
    })
}

/// A failed attempt that may be retried: PENDING after the backoff delay (or at once), or DEAD
/// when it was the last attempt.
fn fail_attempt(job: &mut Job, now: Millis, unit: f64, at_once: bool) -> AckEffect {
    let tries = job.attempt.saturating_sub(job.attempt_base);
    match job.options.retry.delay_after(tries, unit) {
        Some(delay) => {
            let run_at = if at_once {
                now
            } else {
                now.saturating_add(millis(delay))
            };
            job.status = Status::Pending;
            job.run_at = run_at;
            job.lease_until = None;
            job.worker_id = None;
            job.cancel_requested = false;
            AckEffect {
                status: Status::Pending,
                next_run_at: Some(run_at),
            }
        }
        None => finish(job, Status::Dead, now),
    }
}

/// The lease ran out with no ack: the attempt failed by timeout and goes through backoff.
pub fn expire(job: &mut Job, now: Millis, unit: f64) -> Result<AckEffect, Rejection> {
    check_running(job, None)?;
    match job.lease_until {
        Some(until) if until <= now => {}
        Some(until) => return Err(Rejection::NotDue { run_at: until }),
        None => {}
    }
    job.error = Some(format!(
        "attempt {} timed out: no ack within {} ms",
        job.attempt,
        millis(job.options.timeout)
    ));
    Ok(if job.cancel_requested {
        finish(job, Status::Cancelled, now)
    } else {
        fail_attempt(job, now, unit, false)
    })
}

/// The worker holding the job went away: the attempt counts as failed and the job is pending
/// again at once (no backoff), or DEAD if that was its last attempt — so a job that crashes its
/// workers cannot loop forever.
pub fn abandon(job: &mut Job, reason: &str, now: Millis) -> Result<AckEffect, Rejection> {
    check_running(job, None)?;
    job.error = Some(format!("attempt {} abandoned: {reason}", job.attempt));
    Ok(if job.cancel_requested {
        finish(job, Status::Cancelled, now)
    } else {
        fail_attempt(job, now, 0.0, true)
    })
}

/// Extends the lease of attempt `attempt` to `now + extend` (the job's timeout when `None`).
pub fn heartbeat(
    job: &mut Job,
    attempt: Option<u32>,
    extend: Option<Duration>,
    now: Millis,
) -> Result<Millis, Rejection> {
    check_running(job, attempt)?;
    let until = now.saturating_add(millis(extend.unwrap_or(job.options.timeout)));
    job.lease_until = Some(until);
    Ok(until)
}

/// Cancels a pending job, or asks the worker of a running one to stop.
pub fn cancel(job: &mut Job, now: Millis) -> CancelEffect {
    match job.status {
        Status::Pending => {
            finish(job, Status::Cancelled, now);
            CancelEffect::Cancelled
        }
        Status::Running => {
            job.cancel_requested = true;
            CancelEffect::Requested
        }
        status => CancelEffect::AlreadyFinished(status),
    }
}

/// Revives a DEAD job: PENDING, due now, with a fresh run of `max_attempts` attempts. The
/// attempt counter keeps growing, so acks from before the revival stay stale.
pub fn retry(job: &mut Job, now: Millis) -> Result<(), Rejection> {
    if job.status != Status::Dead {
        return Err(Rejection::WrongStatus {
            status: job.status,
            expected: "dead",
        });
    }
    job.status = Status::Pending;
    job.attempt_base = job.attempt;
    job.run_at = now;
    job.completed_at = None;
    job.started_at = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobOptions, NewJob};
    use gantry_runtime::retry::{Backoff, RetryPolicy};
    use proptest::prelude::*;

    fn job(max_attempts: u32) -> Job {
        let retry = RetryPolicy::builder()
            .backoff(Backoff::Fixed)
            .initial_delay(Duration::from_millis(100))
            .jitter(0.0)
            .max_attempts(max_attempts)
            .build()
            .unwrap();
        Job::create(
            "j".into(),
            NewJob {
                name: "n".into(),
                queue: "default".into(),
                priority: 0,
                args: b"[]".to_vec(),
                options: JobOptions {
                    retry,
                    timeout: Duration::from_millis(1000),
                },
                idempotency_key: None,
                run_at: 0,
            },
            0,
        )
    }

    fn fail() -> Outcome {
        Outcome::Failure {
            error: "boom".into(),
            retry: true,
        }
    }

    #[test]
    fn success_path() {
        let mut j = job(3);
        claim(&mut j, "w", 10).unwrap();
        assert_eq!(
            (j.status, j.attempt, j.lease_until),
            (Status::Running, 1, Some(1010))
        );
        let e = ack(&mut j, Some(1), Outcome::Success(b"1".to_vec()), 20, 0.5).unwrap();
        assert_eq!(e.status, Status::Success);
        assert_eq!(
            (j.completed_at, j.lease_until, j.worker_id.as_deref()),
            (Some(20), None, None)
        );
    }

    #[test]
    fn failures_back_off_then_die() {
        let mut j = job(2);
        claim(&mut j, "w", 0).unwrap();
        let e = ack(&mut j, None, fail(), 5, 0.5).unwrap();
        assert_eq!(
            e,
            AckEffect {
                status: Status::Pending,
                next_run_at: Some(105)
            }
        );
        assert_eq!(
            claim(&mut j, "w", 104),
            Err(Rejection::NotDue { run_at: 105 })
        );
        claim(&mut j, "w", 105).unwrap();
        let e = ack(&mut j, Some(2), fail(), 110, 0.5).unwrap();
        assert_eq!(e.status, Status::Dead);
        assert_eq!(j.error.as_deref(), Some("boom"));
    }

    #[test]
    fn retry_after_waits_at_least_as_asked_and_still_dies_at_the_end() {
        let mut j = job(2);
        claim(&mut j, "w", 0).unwrap();
        let later = |after_ms| Outcome::RetryAfter {
            error: "busy".into(),
            after_ms,
        };
        // The backoff (100 ms) is shorter than asked: the job waits 5 s.
        let e = ack(&mut j, Some(1), later(5_000), 10, 0.5).unwrap();
        assert_eq!(e.next_run_at, Some(5_010));
        assert_eq!((j.status, j.run_at), (Status::Pending, 5_010));
        claim(&mut j, "w", 5_010).unwrap();
        // The last attempt goes to DEAD whatever the server asked.
        let e = ack(&mut j, Some(2), later(1), 5_020, 0.5).unwrap();
        assert_eq!(e.status, Status::Dead);
        assert_eq!(j.error.as_deref(), Some("busy"));
    }

    #[test]
    fn a_deferred_attempt_does_not_count() {
        let mut j = job(2);
        let defer = |after_ms| Outcome::Defer {
            error: "circuit open".into(),
            after_ms,
        };
        // Deferred ten times, and it still has both attempts.
        let mut now = 0;
        for _ in 0..10 {
            claim(&mut j, "w", now).unwrap();
            let attempt = j.attempt;
            let e = ack(&mut j, Some(attempt), defer(1_000), now, 0.5).unwrap();
            assert_eq!(e.next_run_at, Some(now + 1_000));
            now += 1_000;
        }
        claim(&mut j, "w", now).unwrap();
        let e = ack(&mut j, None, fail(), now, 0.5).unwrap();
        assert_eq!(e.status, Status::Pending);
        claim(&mut j, "w", e.next_run_at.unwrap()).unwrap();
        let e = ack(&mut j, None, fail(), now + 500, 0.5).unwrap();
        assert_eq!(e.status, Status::Dead);
        assert_eq!(j.attempt, 12);
    }

    #[test]
    fn a_short_retry_after_keeps_the_backoff() {
        let mut j = job(3);
        claim(&mut j, "w", 0).unwrap();
        let e = ack(
            &mut j,
            Some(1),
            Outcome::RetryAfter {
                error: "busy".into(),
                after_ms: 1,
            },
            5,
            0.5,
        )
        .unwrap();
        assert_eq!(e.next_run_at, Some(105));
    }

    #[test]
    fn non_retryable_failure_is_dead_at_once() {
        let mut j = job(5);
        claim(&mut j, "w", 0).unwrap();
        let e = ack(
            &mut j,
            Some(1),
            Outcome::Failure {
                error: "bad".into(),
                retry: false,
            },
            1,
            0.0,
        )
        .unwrap();
        assert_eq!(e.status, Status::Dead);
    }

    #[test]
    fn stale_attempts_are_fenced() {
        let mut j = job(3);
        claim(&mut j, "a", 0).unwrap();
        abandon(&mut j, "worker disconnected", 1).unwrap();
        claim(&mut j, "b", 1).unwrap();
        let before = j.clone();
        assert_eq!(
            ack(&mut j, Some(1), Outcome::Success(vec![]), 2, 0.0),
            Err(Rejection::Stale {
                given: 1,
                current: 2
            })
        );
        assert_eq!(
            heartbeat(&mut j, Some(1), None, 2),
            Err(Rejection::Stale {
                given: 1,
                current: 2
            })
        );
        assert_eq!(j, before);
    }

    #[test]
    fn expired_lease_is_a_failed_attempt_with_backoff() {
        let mut j = job(3);
        claim(&mut j, "w", 0).unwrap();
        assert_eq!(
            expire(&mut j, 999, 0.0),
            Err(Rejection::NotDue { run_at: 1000 })
        );
        heartbeat(&mut j, Some(1), None, 500).unwrap();
        assert_eq!(j.lease_until, Some(1500));
        let e = expire(&mut j, 1500, 0.0).unwrap();
        assert_eq!(
            e,
            AckEffect {
                status: Status::Pending,
                next_run_at: Some(1600)
            }
        );
        assert!(j.error.as_deref().unwrap().contains("timed out"));
    }

    #[test]
    fn abandoned_job_is_pending_at_once_until_out_of_attempts() {
        let mut j = job(2);
        claim(&mut j, "w", 0).unwrap();
        assert_eq!(
            abandon(&mut j, "gone", 7).unwrap(),
            AckEffect {
                status: Status::Pending,
                next_run_at: Some(7)
            }
        );
        claim(&mut j, "w", 7).unwrap();
        assert_eq!(abandon(&mut j, "gone", 8).unwrap().status, Status::Dead);
    }

    #[test]
    fn cancel_pending_running_and_finished() {
        let mut j = job(3);
        assert_eq!(cancel(&mut j, 1), CancelEffect::Cancelled);
        assert_eq!(j.status, Status::Cancelled);
        assert_eq!(
            cancel(&mut j, 2),
            CancelEffect::AlreadyFinished(Status::Cancelled)
        );

        let mut j = job(3);
        claim(&mut j, "w", 0).unwrap();
        assert_eq!(cancel(&mut j, 1), CancelEffect::Requested);
        assert_eq!(
            ack(&mut j, Some(1), fail(), 2, 0.0).unwrap().status,
            Status::Cancelled
        );

        let mut j = job(3);
        claim(&mut j, "w", 0).unwrap();
        cancel(&mut j, 1);
        assert_eq!(
            ack(&mut j, Some(1), Outcome::Success(vec![]), 2, 0.0)
                .unwrap()
                .status,
            Status::Success
        );
    }

    #[test]
    fn retry_revives_only_dead_jobs() {
        let mut j = job(1);
        assert!(retry(&mut j, 0).is_err());
        claim(&mut j, "w", 0).unwrap();
        ack(&mut j, None, fail(), 1, 0.0).unwrap();
        assert_eq!(j.status, Status::Dead);
        retry(&mut j, 50).unwrap();
        assert_eq!(
            (j.status, j.attempt, j.run_at, j.completed_at),
            (Status::Pending, 1, 50, None)
        );
        // A fresh run: another attempt is allowed, and the old attempt stays fenced.
        claim(&mut j, "w", 60).unwrap();
        assert_eq!(j.attempt, 2);
        assert_eq!(
            ack(&mut j, Some(1), Outcome::Success(vec![]), 61, 0.0),
            Err(Rejection::Stale {
                given: 1,
                current: 2
            })
        );
        assert_eq!(
            ack(&mut j, Some(2), fail(), 62, 0.0).unwrap().status,
            Status::Dead
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim,
        AckOk(Option<u32>),
        AckFail(Option<u32>, bool),
        Expire,
        Abandon,
        Heartbeat(Option<u32>),
        Cancel,
        Retry,
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        let attempt = proptest::option::of(0u32..6);
        prop_oneof![
            Just(Op::Claim),
            attempt.clone().prop_map(Op::AckOk),
            (attempt.clone(), any::<bool>()).prop_map(|(a, r)| Op::AckFail(a, r)),
            Just(Op::Expire),
            Just(Op::Abandon),
            attempt.prop_map(Op::Heartbeat),
            Just(Op::Cancel),
            Just(Op::Retry),
            (0u16..2000).prop_map(Op::Advance),
        ]
    }

    /// A deliberately small model: status, attempt and cancel flag only, written from the table
    /// in the module docs rather than from the code above.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Model {
        status: Status,
        attempt: u32,
        base: u32,
        cancel_requested: bool,
    }

    proptest! {
        #[test]
        fn matches_the_model_and_keeps_invariants(max in 1u32..5, ops in proptest::collection::vec(op(), 1..60)) {
            let mut j = job(max);
            let mut m = Model { status: Status::Pending, attempt: 0, base: 0, cancel_requested: false };
            let mut now: Millis = 0;
            for op in ops {
                let before = j.clone();
                let fenced = |a: Option<u32>, m: &Model| m.status == Status::Running && a.is_none_or(|a| a == m.attempt);
                let retry_or_dead = |m: &mut Model| {
                    m.status = if m.cancel_requested { Status::Cancelled } else if m.attempt - m.base < max { Status::Pending } else { Status::Dead };
                    m.cancel_requested = false;
                };
                let ok = match op {
                    Op::Advance(ms) => { now += i64::from(ms); true }
                    Op::Claim => {
                        let ok = m.status == Status::Pending && j.run_at <= now;
                        if ok { m.status = Status::Running; m.attempt += 1; m.cancel_requested = false; }
                        prop_assert_eq!(claim(&mut j, "w", now).is_ok(), ok);
                        ok
                    }
                    Op::AckOk(a) => {
                        let ok = fenced(a, &m);
                        if ok { m.status = Status::Success; m.cancel_requested = false; }
                        prop_assert_eq!(ack(&mut j, a, Outcome::Success(vec![1]), now, 0.5).is_ok(), ok);
                        ok
                    }
                    Op::AckFail(a, r) => {
                        let ok = fenced(a, &m);
                        if ok {
                            if r || m.cancel_requested { retry_or_dead(&mut m) } else { m.status = Status::Dead; }
                        }
                        prop_assert_eq!(ack(&mut j, a, Outcome::Failure { error: "e".into(), retry: r }, now, 0.5).is_ok(), ok);
                        ok
                    }
                    Op::Expire => {
                        let ok = m.status == Status::Running && j.lease_until.is_some_and(|u| u <= now);
                        if ok { retry_or_dead(&mut m) }
                        prop_assert_eq!(expire(&mut j, now, 0.5).is_ok(), ok);
                        ok
                    }
                    Op::Abandon => {
                        let ok = m.status == Status::Running;
                        if ok { retry_or_dead(&mut m) }
                        prop_assert_eq!(abandon(&mut j, "gone", now).is_ok(), ok);
                        ok
                    }
                    Op::Heartbeat(a) => {
                        let ok = fenced(a, &m);
                        prop_assert_eq!(heartbeat(&mut j, a, None, now).is_ok(), ok);
                        ok
                    }
                    Op::Cancel => {
                        match m.status {
                            Status::Pending => m.status = Status::Cancelled,
                            Status::Running => m.cancel_requested = true,
                            _ => {}
                        }
                        cancel(&mut j, now);
                        true
                    }
                    Op::Retry => {
                        let ok = m.status == Status::Dead;
                        if ok { m.status = Status::Pending; m.base = m.attempt; }
                        prop_assert_eq!(retry(&mut j, now).is_ok(), ok);
                        ok
                    }
                };
                if !ok {
                    prop_assert_eq!(&j, &before, "a refused transition changed the job");
                }
                prop_assert_eq!(j.status, m.status);
                prop_assert_eq!(j.attempt, m.attempt);
                prop_assert_eq!(j.cancel_requested, m.cancel_requested);
                prop_assert_eq!(j.status == Status::Running, j.lease_until.is_some());
                prop_assert_eq!(j.status == Status::Running, j.worker_id.is_some());
                prop_assert_eq!(j.status.is_terminal(), j.completed_at.is_some());
                prop_assert!(j.attempt - j.attempt_base <= max || j.status != Status::Running);
                prop_assert!(j.attempt >= before.attempt, "attempt went back");
                if j.status == Status::Success { prop_assert!(j.result.is_some()); }
            }
        }
    }
}
