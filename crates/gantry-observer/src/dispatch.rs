//! Handing matched events to the jobs engine, exactly once.
//!
//! A batch read by the [capture cursor](crate::capture) is matched against the observers
//! (entity, operation, condition); each action of each match becomes a job in gantry-jobs'
//! PostgreSQL store — named `observer:<observer>:<action>`, in queue `observer`, its argument
//! the event, its idempotency key `event:<xid>-<id>` ([`Event::key`]), its retry policy the observer's and its lease
//! the action's timeout plus [`LEASE_GRACE`] — and the cursor's new position is saved under the holder's fencing epoch
//! **in the same transaction** ([`PostgresStore::enqueue_with`]). So a batch is handed over
//! once: a crash before the commit hands it over again from the old position, a crash after it
//! finds the new position, and a deposed holder's hand-off is refused whole (its jobs roll back
//! with the refused checkpoint). Retries, backoff, timeouts and dead-lettering of what the jobs
//! then do are the jobs engine's.
//!
//! A condition that cannot be evaluated on an event (see [`crate::condition::EvalError`]) is
//! not a match; it is reported in [`Handed::condition_errors`], never silently dropped.

use std::time::Duration;

use gantry_jobs::model::{JobOptions, Millis, NewJob};
use gantry_jobs::store::postgres::PostgresStore;

use crate::Error;
use crate::capture::{Capture, Event, Position};
use crate::condition::{Condition, EvalError, Row};
use crate::config::{Entity, Observer};

/// How long past its own timeout an action attempt's lease runs: the action times out (and
/// reports it) before the jobs engine would call the attempt lost.
pub const LEASE_GRACE: Duration = Duration::from_secs(5);

/// The job name of an observer's action: `observer:<observer>:<action>`.
pub fn job_name(observer: &str, action: &str) -> String {
    format!("observer:{observer}:{action}")
}

/// An observer ready to match events.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// The observer.
    pub observer: Observer,
    entity: String,
    condition: Option<Condition>,
    /// Per action: its job name and options.
    actions: Vec<(String, JobOptions)>,
}

impl Matcher {
    /// Prepares `observer` (its config was checked at load).
    pub fn new(observer: Observer) -> Self {
        let entity =
            Entity::parse(&observer.entity).map_or_else(|| observer.entity.clone(), |e| e.name());
        let condition = observer.parsed_condition();
        let retry = observer.retry.validate().unwrap_or_default();
        let actions = observer
            .actions
            .iter()
            .map(|a| {
                let options = JobOptions {
                    retry: retry.clone(),
                    timeout: a.timeout().unwrap_or(observer.timeout) + LEASE_GRACE,
                };
                (job_name(&observer.name, a.name()), options)
            })
            .collect();
        Self {
            observer,
            entity,
            condition,
            actions,
        }
    }

    /// Whether `event` is for this observer.
    pub fn matches(&self, event: &Event) -> Result<bool, EvalError> {
        match self.verdict(event) {
            Verdict::Matched => Ok(true),
            Verdict::ConditionError(e) => Err(e),
            _ => Ok(false),
        }
    }

    /// Whether `event` is for this observer, and if not, why not.
    pub fn verdict(&self, event: &Event) -> Verdict {
        if event.entity != self.entity {
            return Verdict::OtherEntity(self.entity.clone());
        }
        if !self.observer.events.contains(&event.op) {
            return Verdict::OtherOperation(self.observer.events.clone());
        }
        match &self.condition {
            None => Verdict::Matched,
            Some(c) => match c.eval(Row {
                op: event.op,
                before: event.before.as_ref(),
                after: event.after.as_ref(),
            }) {
                Ok(true) => Verdict::Matched,
                Ok(false) => Verdict::ConditionFalse,
                Err(e) => Verdict::ConditionError(e),
            },
        }
    }

    /// The job names of its actions, in config order.
    pub fn job_names(&self) -> impl Iterator<Item = &str> {
        self.actions.iter().map(|(name, _)| name.as_str())
    }

    /// The jobs that run this observer's actions for `event`, one per action.
    pub fn jobs(&self, event: &Event, now: Millis) -> impl Iterator<Item = NewJob> {
        // Written from the event's own images, without copying them.
        #[derive(serde::Serialize)]
        struct Arg<'a> {
            id: i64,
            xid: u64,
            entity: &'a str,
            op: &'static str,
            before: &'a Option<serde_json::Value>,
            after: &'a Option<serde_json::Value>,
            changed_at_ms: i64,
        }
        let args = serde_json::to_vec(&[Arg {
            id: event.id,
            xid: event.xid,
            entity: &event.entity,
            op: event.op.as_str(),
            before: &event.before,
            after: &event.after,
            changed_at_ms: event.changed_at_ms,
        }])
        .unwrap_or_default();
        let key = format!("event:{}", event.key());
        self.actions.iter().map(move |(name, options)| NewJob {
            name: name.clone(),
            queue: "observer".into(),
            priority: 0,
            args: args.clone(),
            options: options.clone(),
            idempotency_key: Some(key.clone()),
            run_at: now,
        })
    }
}

/// Whether an event is for an observer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It is.
    Matched,
    /// The observer watches another table (this one).
    OtherEntity(String),
    /// The observer reacts to other operations (these).
    OtherOperation(Vec<crate::config::EventType>),
    /// The condition does not hold.
    ConditionFalse,
    /// The condition cannot be evaluated on this event (not a match).
    ConditionError(EvalError),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Matched => f.write_str("matched"),
            Verdict::OtherEntity(e) => write!(f, "not matched: it watches {e}"),
            Verdict::OtherOperation(ops) => {
                let ops: Vec<&str> = ops.iter().map(|o| o.as_str()).collect();
                write!(f, "not matched: it reacts to {} only", ops.join(", "))
            }
            Verdict::ConditionFalse => f.write_str("not matched: the condition is false"),
            Verdict::ConditionError(e) => {
                write!(f, "not matched: the condition cannot be evaluated: {e}")
            }
        }
    }
}

/// What a hand-off did.
#[derive(Debug, Clone, PartialEq)]
pub struct Handed {
    /// Events in the batch.
    pub events: usize,
    /// Jobs enqueued (one per action of each matching observer and event; a repeated hand-off
    /// of the same event deduplicates by its idempotency key).
    pub jobs: usize,
    /// Conditions that could not be evaluated: (event id, observer, why).
    pub condition_errors: Vec<(i64, String, EvalError)>,
    /// Events matched, by observer.
    pub matched: std::collections::BTreeMap<String, u64>,
    /// The position saved.
    pub position: Position,
}

/// Matches `events` (read from `capture` up to `next`) and, in one transaction, enqueues a job
/// per match and saves `next` under `epoch`. [`Error::Fenced`] when another holder took the
/// checkpoint: then nothing was enqueued.
pub async fn hand_off(
    store: &PostgresStore,
    capture: &Capture,
    matchers: &[Matcher],
    events: &[Event],
    next: Position,
    epoch: i64,
    now: Millis,
) -> Result<Handed, Error> {
    let mut jobs = Vec::new();
    let mut condition_errors = Vec::new();
    let mut matched = std::collections::BTreeMap::<String, u64>::new();
    for event in events {
        for m in matchers {
            match m.matches(event) {
                Ok(true) => {
                    *matched.entry(m.observer.name.clone()).or_default() += 1;
                    jobs.extend(m.jobs(event, now));
                }
                Ok(false) => {}
                Err(e) => condition_errors.push((event.id, m.observer.name.clone(), e)),
            }
        }
    }
    let (enqueued, ()) = store
        .enqueue_with(jobs, now, async |tx| capture.save(tx, next, epoch).await)
        .await?;
    Ok(Handed {
        events: events.len(),
        jobs: enqueued.iter().filter(|e| !e.deduplicated).count(),
        condition_errors,
        matched,
        position: next,
    })
}
