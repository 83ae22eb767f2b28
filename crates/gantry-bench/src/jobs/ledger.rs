//! The ledger: what the harness saw happen to each job, and what follows from it — latencies,
//! duplicates, lost jobs, attempts and backoff. Pure: no I/O, no clock; times are [`Micros`] on
//! the harness's clock.
//!
//! Definitions (the harness's, applied the same way to every server):
//! - A **run** is one job pushed to one worker: it starts when the worker receives the job and
//!   ends when the worker first sends its ack (or abandons it, when its stream is dropped).
//! - A **concurrent duplicate** is a job with two runs whose `start..end` intervals overlap: the
//!   job was running twice at once.
//! - A **rerun after success** is a run that started after the server had confirmed (`AckJob`
//!   returned OK) a success ack of an earlier run of the same job.
//! - A job is **lost** when its `EnqueueJob` returned OK but at the end the server does not report
//!   it SUCCESS, DEAD or CANCELLED.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::stats::{Micros, Summary};

/// An `EnqueueJob` that returned OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The id the server gave.
    pub id: String,
    /// Which of the scenario's job kinds (an index into its [`KindRules`]).
    pub kind: usize,
    /// When the (first) `EnqueueJob` call for it was made.
    pub at: Micros,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The worker sent an ack.
    Acked {
        /// When the ack was first sent: the end of the run.
        sent: Micros,
        /// When the ack call finally returned (after retries).
        done: Micros,
        /// A success ack (else a failure ack).
        success: bool,
        /// The server answered OK (else it refused the ack, or it could not be delivered).
        accepted: bool,
        /// The ack finished the job (accepted, and SUCCESS or DEAD by it).
        terminal: bool,
    },
    /// The worker gave the job up without an ack (its stream was dropped while it ran).
    Abandoned {
        /// When it stopped working on it.
        at: Micros,
    },
}

impl RunEnd {
    /// When the worker stopped running the job.
    pub fn end(&self) -> Micros {
        match *self {
            RunEnd::Acked { sent, .. } => sent,
            RunEnd::Abandoned { at } => at,
        }
    }
}

/// One job pushed to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The job.
    pub job_id: String,
    /// The attempt number the server pushed.
    pub attempt: i32,
    /// The harness worker (its index; stable across its reconnects).
    pub worker: u32,
    /// When the worker received it.
    pub start: Micros,
    /// How it ended.
    pub end: RunEnd,
}

/// A job's status as the server reports it at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Final {
    /// SUCCESS.
    Success,
    /// DEAD.
    Dead,
    /// CANCELLED.
    Cancelled,
    /// PENDING or RUNNING (or FAILED, which no server should leave).
    Unfinished,
    /// The server does not know the id (or could not be asked).
    Missing,
}

impl Final {
    /// SUCCESS, DEAD or CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(self, Final::Success | Final::Dead | Final::Cancelled)
    }
}

/// The outcome a job kind is meant to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Its handler succeeds.
    Success,
    /// Its handler always fails (or times out): DEAD after its last attempt.
    Dead,
}

/// Retry backoff a job kind was enqueued with (Reseolio's options).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// `fixed`, `linear` or `exponential`.
    pub policy: Policy,
    /// Base delay.
    pub initial_ms: u64,
    /// Cap before jitter.
    pub max_ms: u64,
    /// ± fraction of the delay.
    pub jitter: f64,
}

/// Backoff growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The same delay every time.
    Fixed,
    /// `initial × attempt`.
    Linear,
    /// `initial × 2^(attempt-1)`.
    Exponential,
}

impl Backoff {
    /// The shortest delay a correct server may wait after attempt `failed` (counted from 1)
    /// failed: the capped delay less its jitter, less 1 ms for rounding to milliseconds.
    pub fn min_delay_us(&self, failed: u32) -> Micros {
        let n = u64::from(failed.max(1));
        let base = match self.policy {
            Policy::Fixed => self.initial_ms,
            Policy::Linear => self.initial_ms.saturating_mul(n),
            Policy::Exponential => self
                .initial_ms
                .saturating_mul(1u64.checked_shl((n - 1) as u32).unwrap_or(u64::MAX)),
        };
        let capped = base.min(self.max_ms) as f64;
        let low_ms = capped * (1.0 - self.jitter.clamp(0.0, 1.0)) - 1.0;
        (low_ms.max(0.0) * 1000.0) as Micros
    }
}

/// What the analysis needs to know about a job kind.
#[derive(Debug, Clone, PartialEq)]
pub struct KindRules {
    /// Its name, for the report.
    pub label: String,
    /// The status it should end in.
    pub expect: Expect,
    /// Its `max_attempts`.
    pub max_attempts: u32,
    /// Its backoff, when retries are part of the scenario and the gaps should be checked.
    pub backoff: Option<Backoff>,
}

/// Figures for one job kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KindFigures {
    /// The kind's label.
    pub label: String,
    /// Acknowledged enqueues of this kind.
    pub jobs: u64,
    /// Those that ended as the kind expects.
    pub as_expected: u64,
    /// Enqueue → first start.
    pub start_latency: Summary,
    /// Enqueue → the ack that finished it.
    pub done_latency: Summary,
    /// Fewest and most runs of one job.
    pub min_runs: u64,
    /// Most runs of one job.
    pub max_runs: u64,
    /// Jobs expected DEAD whose number of runs was not exactly `max_attempts`.
    pub wrong_attempts: u64,
    /// Retries that started sooner after the failure than the backoff allows.
    pub backoff_violations: u64,
}

/// Everything the ledger says about a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Analysis {
    /// Distinct job ids whose enqueue returned OK.
    pub acknowledged: u64,
    /// Of those, the ones the server reports SUCCESS, DEAD or CANCELLED.
    pub completed: u64,
    /// SUCCESS at the end.
    pub succeeded: u64,
    /// DEAD at the end.
    pub dead: u64,
    /// Ended as their kind expects.
    pub as_expected: u64,
    /// Acknowledged but not finished at the end.
    pub lost: u64,
    /// Of those, PENDING or RUNNING at the end.
    pub lost_unfinished: u64,
    /// Of those, unknown to the server at the end.
    pub lost_missing: u64,
    /// Jobs with a concurrent duplicate or a rerun after success.
    pub duplicates: u64,
    /// Jobs that ran twice at once.
    pub concurrent_duplicates: u64,
    /// Jobs run again after their success was confirmed.
    pub reruns_after_success: u64,
    /// A few of the lost jobs, for the report.
    pub lost_examples: Vec<String>,
    /// A few of the duplicated jobs, for the report.
    pub duplicate_examples: Vec<String>,
    /// Enqueue → first start, every job.
    pub start_latency: Summary,
    /// Enqueue → finishing ack, every job finished by an ack the harness saw.
    pub done_latency: Summary,
    /// Per kind, in the scenario's order.
    pub kinds: Vec<KindFigures>,
    /// Runs (pushes received) in all.
    pub runs: u64,
    /// Runs per harness worker.
    pub runs_by_worker: BTreeMap<u32, u64>,
    /// The first enqueue call.
    pub first_enqueue: Micros,
    /// The last finishing ack.
    pub last_done: Micros,
}

const EXAMPLES: usize = 5;

/// Analyzes a run. `finals` holds the server's final status per job id (ids missing from it
/// count as [`Final::Missing`]); `rules` is indexed by [`Enqueued::kind`].
pub fn analyze(
    enqueued: &[Enqueued],
    mut runs: Vec<Run>,
    finals: &HashMap<String, Final>,
    rules: &[KindRules],
) -> Analysis {
    let mut a = Analysis {
        kinds: rules
            .iter()
            .map(|r| KindFigures {
                label: r.label.clone(),
                min_runs: u64::MAX,
                ..KindFigures::default()
            })
            .collect(),
        first_enqueue: Micros::MAX,
        runs: runs.len() as u64,
        ..Analysis::default()
    };

    // One entry per id (idempotent retries return the same id): kind, earliest call.
    let mut jobs: HashMap<&str, (usize, Micros)> = HashMap::with_capacity(enqueued.len());
    for e in enqueued {
        let entry = jobs.entry(e.id.as_str()).or_insert((e.kind, e.at));
        entry.1 = entry.1.min(e.at);
        a.first_enqueue = a.first_enqueue.min(e.at);
    }
    if jobs.is_empty() {
        a.first_enqueue = 0;
    }
    a.acknowledged = jobs.len() as u64;

    for r in &runs {
        *a.runs_by_worker.entry(r.worker).or_default() += 1;
    }

    let mut start_all = Vec::with_capacity(jobs.len());
    let mut done_all = Vec::with_capacity(jobs.len());
    let mut start_kind: Vec<Vec<u64>> = vec![Vec::new(); rules.len()];
    let mut done_kind: Vec<Vec<u64>> = vec![Vec::new(); rules.len()];
    let mut runs_of: HashMap<&str, u64> = HashMap::new();

    runs.sort_by(|x, y| x.job_id.cmp(&y.job_id).then(x.start.cmp(&y.start)));
    for group in runs.chunk_by(|x, y| x.job_id == y.job_id) {
        let id = group[0].job_id.as_str();
        let Some(&(kind, at)) = jobs.get(id) else {
            // Pushed but never acknowledged to the harness (an enqueue whose reply was lost):
            // it counts for duplicates, not for latencies.
            note_duplicates(&mut a, group);
            continue;
        };
        runs_of.insert(id, group.len() as u64);
        start_all.push(group[0].start.saturating_sub(at));
        if let Some(k) = start_kind.get_mut(kind) {
            k.push(group[0].start.saturating_sub(at));
        }
        let finished_at = group
            .iter()
            .filter_map(|r| match r.end {
                RunEnd::Acked {
                    done,
                    terminal: true,
                    ..
                } => Some(done),
                _ => None,
            })
            .min();
        if let Some(done) = finished_at {
            a.last_done = a.last_done.max(done);
            done_all.push(done.saturating_sub(at));
            if let Some(k) = done_kind.get_mut(kind) {
                k.push(done.saturating_sub(at));
            }
        }
        note_duplicates(&mut a, group);
        if let (Some(rule), Some(fig)) = (rules.get(kind), a.kinds.get_mut(kind)) {
            if let Some(backoff) = rule.backoff {
                fig.backoff_violations += backoff_violations(group, &backoff);
            }
        }
    }

    for (id, &(kind, _)) in &jobs {
        let status = finals.get(*id).copied().unwrap_or(Final::Missing);
        let n_runs = runs_of.get(id).copied().unwrap_or(0);
        match status {
            Final::Success => a.succeeded += 1,
            Final::Dead => a.dead += 1,
            _ => {}
        }
        if status.is_terminal() {
            a.completed += 1;
        } else {
            a.lost += 1;
            if status == Final::Missing {
                a.lost_missing += 1;
            } else {
                a.lost_unfinished += 1;
            }
            if a.lost_examples.len() < EXAMPLES {
                a.lost_examples.push((*id).to_owned());
            }
        }
        let (Some(rule), Some(fig)) = (rules.get(kind), a.kinds.get_mut(kind)) else {
            continue;
        };
        fig.jobs += 1;
        fig.min_runs = fig.min_runs.min(n_runs);
        fig.max_runs = fig.max_runs.max(n_runs);
        let expected = matches!(
            (rule.expect, status),
            (Expect::Success, Final::Success) | (Expect::Dead, Final::Dead)
        );
        if expected {
            fig.as_expected += 1;
            a.as_expected += 1;
        }
        if rule.expect == Expect::Dead && n_runs != u64::from(rule.max_attempts) {
            fig.wrong_attempts += 1;
        }
    }

    for (fig, (starts, dones)) in a
        .kinds
        .iter_mut()
        .zip(start_kind.into_iter().zip(done_kind))
    {
        fig.start_latency = Summary::of(starts);
        fig.done_latency = Summary::of(dones);
        if fig.min_runs == u64::MAX {
            fig.min_runs = 0;
        }
    }
    a.start_latency = Summary::of(start_all);
    a.done_latency = Summary::of(done_all);
    a.lost_examples.sort();
    a
}

/// Records whether the runs of one job (sorted by start) overlap, or rerun a confirmed success.
fn note_duplicates(a: &mut Analysis, runs: &[Run]) {
    let mut busy_until: Option<Micros> = None;
    let mut success_confirmed: Option<Micros> = None;
    let (mut concurrent, mut rerun) = (false, false);
    for r in runs {
        if busy_until.is_some_and(|until| r.start < until) {
            concurrent = true;
        }
        if success_confirmed.is_some_and(|at| r.start > at) {
            rerun = true;
        }
        let end = r.end.end();
        busy_until = Some(busy_until.map_or(end, |u| u.max(end)));
        if let RunEnd::Acked {
            success: true,
            accepted: true,
            done,
            ..
        } = r.end
        {
            success_confirmed = Some(success_confirmed.map_or(done, |c| c.min(done)));
        }
    }
    a.concurrent_duplicates += u64::from(concurrent);
    a.reruns_after_success += u64::from(rerun);
    if concurrent || rerun {
        a.duplicates += 1;
        if a.duplicate_examples.len() < EXAMPLES {
            a.duplicate_examples.push(runs[0].job_id.clone());
        }
    }
}

/// Retries of one job that started sooner after the failed attempt's ack than `backoff` allows.
fn backoff_violations(runs: &[Run], backoff: &Backoff) -> u64 {
    let mut by_attempt: Vec<&Run> = runs.iter().collect();
    by_attempt.sort_by_key(|r| (r.attempt, r.start));
    by_attempt
        .windows(2)
        .filter(|w| {
            let (prev, next) = (w[0], w[1]);
            let RunEnd::Acked {
                sent,
                success: false,
                accepted: true,
                ..
            } = prev.end
            else {
                return false;
            };
            next.attempt == prev.attempt + 1
                && next.start.saturating_sub(sent)
                    < backoff.min_delay_us(prev.attempt.max(1).unsigned_abs())
        })
        .count() as u64
}

/// Gaps between a worker's acks and its next job: with concurrency 1 this is how long the server
/// takes to claim and push the next job once capacity frees ("claim latency").
pub fn claim_gaps(runs: &[Run], worker: u32) -> Vec<u64> {
    let mut mine: Vec<&Run> = runs.iter().filter(|r| r.worker == worker).collect();
    mine.sort_by_key(|r| r.start);
    mine.windows(2)
        .filter_map(|w| match w[0].end {
            RunEnd::Acked { done, .. } => Some(w[1].start.saturating_sub(done)),
            RunEnd::Abandoned { .. } => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enq(id: &str, kind: usize, at: Micros) -> Enqueued {
        Enqueued {
            id: id.to_owned(),
            kind,
            at,
        }
    }

    fn acked(id: &str, attempt: i32, worker: u32, start: Micros, sent: Micros) -> Run {
        Run {
            job_id: id.to_owned(),
            attempt,
            worker,
            start,
            end: RunEnd::Acked {
                sent,
                done: sent + 10,
                success: true,
                accepted: true,
                terminal: true,
            },
        }
    }

    fn failed(id: &str, attempt: i32, start: Micros, sent: Micros, terminal: bool) -> Run {
        Run {
            job_id: id.to_owned(),
            attempt,
            worker: 0,
            start,
            end: RunEnd::Acked {
                sent,
                done: sent + 10,
                success: false,
                accepted: true,
                terminal,
            },
        }
    }

    fn abandoned(id: &str, attempt: i32, worker: u32, start: Micros, at: Micros) -> Run {
        Run {
            job_id: id.to_owned(),
            attempt,
            worker,
            start,
            end: RunEnd::Abandoned { at },
        }
    }

    fn success_rules() -> Vec<KindRules> {
        vec![KindRules {
            label: "noop".into(),
            expect: Expect::Success,
            max_attempts: 3,
            backoff: None,
        }]
    }

    fn finals(pairs: &[(&str, Final)]) -> HashMap<String, Final> {
        pairs.iter().map(|(id, f)| ((*id).to_owned(), *f)).collect()
    }

    /// Runs `runs` of jobs "a" (and "b", "c" when named) and returns (duplicates, concurrent,
    /// reruns).
    fn check_dups(runs: Vec<Run>, expected: (u64, u64, u64)) {
        let e = vec![enq("a", 0, 0), enq("b", 0, 0), enq("c", 0, 0)];
        let f = finals(&[
            ("a", Final::Success),
            ("b", Final::Success),
            ("c", Final::Success),
        ]);
        let a = analyze(&e, runs.clone(), &f, &success_rules());
        assert_eq!(
            (
                a.duplicates,
                a.concurrent_duplicates,
                a.reruns_after_success
            ),
            expected,
            "{runs:?}"
        );
    }

    #[test]
    fn duplicate_detection() {
        // One clean run each.
        check_dups(
            vec![acked("a", 1, 0, 10, 20), acked("b", 1, 1, 10, 20)],
            (0, 0, 0),
        );
        // Two workers at once.
        check_dups(
            vec![acked("a", 1, 0, 10, 50), acked("a", 2, 1, 30, 60)],
            (1, 1, 0),
        );
        // The same worker twice at once counts too.
        check_dups(
            vec![acked("a", 1, 0, 10, 50), acked("a", 1, 0, 49, 60)],
            (1, 1, 0),
        );
        // Back to back after an abandon: redelivery, not a duplicate.
        check_dups(
            vec![abandoned("a", 1, 0, 10, 40), acked("a", 2, 1, 41, 60)],
            (0, 0, 0),
        );
        // A retry after a failure ack is not a duplicate.
        check_dups(
            vec![failed("a", 1, 10, 20, false), acked("a", 2, 1, 25, 30)],
            (0, 0, 0),
        );
        // Run again after the success was confirmed (done = sent + 10 = 30).
        check_dups(
            vec![acked("a", 1, 0, 10, 20), acked("a", 2, 1, 31, 40)],
            (1, 0, 1),
        );
        // Received while the success ack was in flight (sent 20, confirmed 30): not a rerun after
        // success, and not concurrent either (the first run had ended at 20).
        check_dups(
            vec![acked("a", 1, 0, 10, 20), acked("a", 2, 1, 25, 40)],
            (0, 0, 0),
        );
        // Both kinds on one job count the job once.
        check_dups(
            vec![
                acked("a", 1, 0, 10, 20),
                acked("a", 2, 1, 31, 50),
                acked("a", 3, 2, 40, 60),
            ],
            (1, 1, 1),
        );
        // A long run with a later one inside it; another job's runs back to back stay clean.
        check_dups(
            vec![
                abandoned("a", 1, 0, 0, 100),
                abandoned("a", 2, 1, 20, 30),
                abandoned("b", 1, 0, 0, 10),
                abandoned("b", 2, 1, 20, 30),
            ],
            (1, 1, 0),
        );
    }

    #[test]
    fn lost_completed_and_success_rate() {
        let e = vec![
            enq("a", 0, 0),
            enq("b", 0, 0),
            enq("c", 0, 0),
            enq("d", 0, 0),
            // An idempotent retry returning the same id.
            enq("a", 0, 5),
        ];
        let f = finals(&[
            ("a", Final::Success),
            ("b", Final::Dead),
            ("c", Final::Unfinished),
        ]);
        let a = analyze(&e, vec![], &f, &success_rules());
        assert_eq!(a.acknowledged, 4);
        assert_eq!((a.completed, a.succeeded, a.dead), (2, 1, 1));
        assert_eq!(a.lost, 2, "c is unfinished and d is missing");
        assert_eq!((a.lost_unfinished, a.lost_missing), (1, 1));
        assert_eq!(a.lost_examples, vec!["c".to_owned(), "d".to_owned()]);
        assert_eq!(a.as_expected, 1);
    }

    #[test]
    fn latencies_use_first_start_and_finishing_ack() {
        let e = vec![enq("a", 0, 100), enq("b", 0, 200)];
        let runs = vec![
            failed("a", 1, 150, 160, false),
            acked("a", 2, 0, 400, 450),
            acked("b", 1, 0, 210, 220),
        ];
        let f = finals(&[("a", Final::Success), ("b", Final::Success)]);
        let a = analyze(&e, runs, &f, &success_rules());
        // Starts: a 50, b 10. Done: a 460-100 = 360, b 230-200 = 30.
        assert_eq!(a.start_latency.count, 2);
        assert_eq!((a.start_latency.p50_us, a.start_latency.max_us), (10, 50));
        assert_eq!((a.done_latency.p50_us, a.done_latency.max_us), (30, 360));
        assert_eq!((a.first_enqueue, a.last_done), (100, 460));
        assert_eq!(a.runs_by_worker.get(&0), Some(&3));
    }

    #[test]
    fn attempts_and_backoff_of_dead_jobs() {
        let backoff = Backoff {
            policy: Policy::Exponential,
            initial_ms: 100,
            max_ms: 1_000,
            jitter: 0.1,
        };
        let rules = vec![KindRules {
            label: "fail".into(),
            expect: Expect::Dead,
            max_attempts: 3,
            backoff: Some(backoff),
        }];
        let e = vec![enq("a", 0, 0), enq("b", 0, 0)];
        // a: gaps 100 ms then 200 ms — fine. b: retried after 50 ms (too soon), and only twice.
        let runs = vec![
            failed("a", 1, 0, 1_000, false),
            failed("a", 2, 101_000, 102_000, false),
            failed("a", 3, 302_000, 303_000, true),
            failed("b", 1, 0, 1_000, false),
            failed("b", 2, 51_000, 52_000, true),
        ];
        let f = finals(&[("a", Final::Dead), ("b", Final::Dead)]);
        let a = analyze(&e, runs, &f, &rules);
        let k = &a.kinds[0];
        assert_eq!((k.jobs, k.as_expected), (2, 2));
        assert_eq!((k.min_runs, k.max_runs, k.wrong_attempts), (2, 3, 1));
        assert_eq!(k.backoff_violations, 1);
        assert_eq!(a.duplicates, 0);
    }

    #[test]
    fn backoff_lower_bounds() {
        let b = |policy, jitter| Backoff {
            policy,
            initial_ms: 200,
            max_ms: 1_000,
            jitter,
        };
        assert_eq!(b(Policy::Fixed, 0.0).min_delay_us(5), 199_000);
        assert_eq!(b(Policy::Linear, 0.0).min_delay_us(3), 599_000);
        assert_eq!(b(Policy::Exponential, 0.0).min_delay_us(1), 199_000);
        assert_eq!(b(Policy::Exponential, 0.0).min_delay_us(3), 799_000);
        // Capped, then less the jitter.
        assert_eq!(b(Policy::Exponential, 0.1).min_delay_us(4), 899_000);
        // Huge attempt numbers neither overflow nor panic.
        assert_eq!(b(Policy::Exponential, 0.0).min_delay_us(u32::MAX), 999_000);
        assert_eq!(b(Policy::Linear, 0.0).min_delay_us(u32::MAX), 999_000);
    }

    #[test]
    fn claim_gaps_follow_one_worker() {
        let runs = vec![
            acked("a", 1, 0, 0, 10),      // done 20
            acked("b", 1, 0, 25, 30),     // done 40, gap 5
            acked("c", 1, 1, 26, 27),     // other worker
            abandoned("d", 1, 0, 47, 50), // gap 7
            acked("e", 1, 0, 60, 70),     // after an abandon: no gap
        ];
        assert_eq!(claim_gaps(&runs, 0), vec![5, 7]);
        assert_eq!(claim_gaps(&runs, 1), Vec::<u64>::new());
    }
}
