//! Cron schedules: what a schedule is, when it ticks, and what happens when ticks were missed.
//!
//! A schedule enqueues one job named after it for each tick of its cron expression, read in its
//! IANA time zone. This module is pure: it parses expressions and zones, computes ticks, and
//! decides — from the stored `next_run_at`, the time now and the misfire policy — whether to fire
//! and what `next_run_at` becomes. It reads no clock and does no I/O; the stores apply its
//! functions inside their transactions (see `docs/jobs-schedules.md`).
//!
//! Cron syntax ([`gantry_runtime::cron`], the `croner` crate, POSIX/Vixie semantics): 5 fields `min hour dom month dow`,
//! 6 with seconds first, or 7 with a year last; `0` and `7` are Sunday; names (`MON`, `JAN`),
//! ranges, lists, steps (`*/5`, and `0/5` for compatibility), `L`, `W`, `#` and `@daily`-style
//! nicknames. Day of month and day of week combine with OR unless the day of week starts with `+`.
//!
//! Daylight saving time: ticks are wall-clock times in the schedule's zone. A tick that falls in
//! a spring-forward gap fires at the first instant after the gap (02:30 on the night clocks jump
//! from 02:00 to 03:00 fires at 03:00); a fixed-time tick in a fall-back overlap fires once, at
//! the earlier instant; interval patterns (`*/15 * * * *`, every hour) fire on both passes through
//! the repeated hour, because both are real, distinct instants.
//!
//! **Invariant:** the ticks a schedule fires strictly increase: a fired tick is at most `now`, and
//! the new `next_run_at` is the first tick after `now`. So no tick is ever fired twice, whatever
//! the order of restarts, and the job's idempotency key (`schedule:<id>:<tick>`) makes a repeat
//! harmless even if a store broke this.
//!
//! ```
//! use gantry_jobs::schedule::{CronSpec, Misfire, decide};
//!
//! let spec = CronSpec::parse("0 9 * * MON-FRI", "Europe/Berlin").unwrap();
//! // Monday 2024-01-01 08:00 UTC (09:00 in Berlin) is a tick; the next is Tuesday's.
//! let monday = 1_704_096_000_000;
//! assert_eq!(spec.next_after(monday - 1), Some(monday));
//! assert_eq!(spec.next_after(monday), Some(monday + 86_400_000));
//! // The server was down all Monday: the default policy fires once for the missed tick.
//! let d = decide(&spec, monday, monday + 3_600_000, Misfire::Coalesce);
//! assert_eq!((d.fire, d.next_run_at), (Some(monday), Some(monday + 86_400_000)));
//! // `skip` drops it.
//! let d = decide(&spec, monday, monday + 3_600_000, Misfire::Skip);
//! assert_eq!((d.fire, d.late), (None, true));
//! ```

use std::fmt;

use crate::model::{DEFAULT_QUEUE, JobOptions, Millis, NewJob};

pub use gantry_runtime::cron::{
    CronError as SpecError, CronSpec, MAX_EXPRESSION_BYTES, parse_timezone,
};

/// How late a tick may fire and still count as on time: the dispatch loop fires ticks within
/// milliseconds, so anything older was missed (the server was down or stalled).
pub const ON_TIME_GRACE: Millis = 1_000;

/// What to do about ticks that passed while nothing could fire them (the server was down, the
/// database unreachable, the dispatch loop stalled longer than [`ON_TIME_GRACE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Misfire {
    /// Fire one job for all the missed ticks together, as soon as possible, then continue with
    /// the first tick after now. Nothing is silently lost and nothing piles up. The default.
    #[default]
    Coalesce,
    /// Drop missed ticks: nothing fires late; the schedule continues with the first tick after
    /// now (a tick still within [`ON_TIME_GRACE`] fires).
    Skip,
}

impl Misfire {
    /// The name on the wire, in the CLI and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Coalesce => "coalesce",
            Misfire::Skip => "skip",
        }
    }

    /// The policy with this [`Misfire::as_str`] name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "coalesce" => Some(Misfire::Coalesce),
            "skip" => Some(Misfire::Skip),
            _ => None,
        }
    }
}

impl fmt::Display for Misfire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a due check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The tick to enqueue a job for (it names the job's idempotency key), if any.
    pub fire: Option<Millis>,
    /// Ticks were missed: more than one was due, or the due one is older than [`ON_TIME_GRACE`].
    /// They were coalesced into `fire`, or dropped by [`Misfire::Skip`].
    pub late: bool,
    /// The new `next_run_at`: unchanged when nothing was due, else the first tick after `now`
    /// (`None`: the expression never fires again).
    pub next_run_at: Option<Millis>,
}

/// Decides a due check of a schedule whose next tick is `next_run_at`, at time `now`.
///
/// Nothing is due while `now < next_run_at` (also when the clock went back). Otherwise the ticks
/// `next_run_at ..= now` are due: [`Misfire::Coalesce`] fires `next_run_at` once for all of them;
/// [`Misfire::Skip`] fires the latest of them only if it is on time, and none otherwise. Either
/// way `next_run_at` moves to the first tick after `now`, so a tick is never fired twice.
pub fn decide(spec: &CronSpec, next_run_at: Millis, now: Millis, misfire: Misfire) -> Decision {
    if now < next_run_at {
        return Decision {
            fire: None,
            late: false,
            next_run_at: Some(next_run_at),
        };
    }
    let latest = spec
        .latest_at_or_before(now)
        .map_or(next_run_at, |l| l.max(next_run_at));
    let late = latest > next_run_at || now - next_run_at > ON_TIME_GRACE;
    let fire = match misfire {
        Misfire::Coalesce => Some(next_run_at),
        Misfire::Skip => (now - latest <= ON_TIME_GRACE).then_some(latest),
    };
    Decision {
        fire,
        late,
        next_run_at: spec.next_after(now),
    }
}

/// Where a schedule is in its life.
///
/// ```text
///          pause                delete
/// ACTIVE ─────────▶ PAUSED ─────────────▶ DELETED (kept, never fires)
///    ▲ ◀─────────────┘ resume                 ▲
///    └────────────────────────────────────────┘ delete
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleStatus {
    /// Fires at its ticks.
    Active,
    /// Does not fire; ticks passing meanwhile are not misfires and never fire.
    Paused,
    /// Soft-deleted: kept for reference, never fires, its name is free again.
    Deleted,
}

impl ScheduleStatus {
    /// The integer stored in the database; equal to the Reseolio wire enum value.
    pub fn code(self) -> i32 {
        match self {
            ScheduleStatus::Active => 1,
            ScheduleStatus::Paused => 2,
            ScheduleStatus::Deleted => 3,
        }
    }

    /// The status with the given [`ScheduleStatus::code`].
    pub fn from_code(code: i32) -> Option<Self> {
        [
            ScheduleStatus::Active,
            ScheduleStatus::Paused,
            ScheduleStatus::Deleted,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }

    /// Lowercase name, as the CLI shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleStatus::Active => "active",
            ScheduleStatus::Paused => "paused",
            ScheduleStatus::Deleted => "deleted",
        }
    }
}

impl fmt::Display for ScheduleStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A schedule to create. The grpc boundary has checked the name, args and options.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSchedule {
    /// Name of the jobs it enqueues; unique among schedules not deleted.
    pub name: String,
    /// The cron expression.
    pub cron: String,
    /// IANA zone the expression is read in (`""` means UTC).
    pub timezone: String,
    /// What to do about missed ticks.
    pub misfire: Misfire,
    /// JSON args of every job it enqueues.
    pub args: Vec<u8>,
    /// Options of every job it enqueues.
    pub options: JobOptions,
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// UUID (v7).
    pub id: String,
    /// Name of the jobs it enqueues.
    pub name: String,
    /// The cron expression.
    pub cron: String,
    /// Canonical IANA zone name.
    pub timezone: String,
    /// What to do about missed ticks.
    pub misfire: Misfire,
    /// Where it is in its life.
    pub status: ScheduleStatus,
    /// JSON args of every job it enqueues.
    pub args: Vec<u8>,
    /// Options of every job it enqueues.
    pub options: JobOptions,
    /// The next tick that will enqueue a job; `None` while paused or deleted, or when the
    /// expression has no future tick.
    pub next_run_at: Option<Millis>,
    /// When it last enqueued a job.
    pub last_run_at: Option<Millis>,
    /// When it was created.
    pub created_at: Millis,
    /// When it was last changed (fired, updated, paused, resumed, deleted).
    pub updated_at: Millis,
}

/// Changes to a schedule's definition; `None` keeps a field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduleUpdate {
    /// A new cron expression.
    pub cron: Option<String>,
    /// A new time zone.
    pub timezone: Option<String>,
    /// New job options.
    pub options: Option<JobOptions>,
    /// A new misfire policy.
    pub misfire: Option<Misfire>,
}

/// A change to a stored schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleChange {
    /// Redefine it; a new cron or zone restarts its ticks from now.
    Update(ScheduleUpdate),
    /// ACTIVE → PAUSED.
    Pause,
    /// PAUSED → ACTIVE, ticking from now (ticks passed while paused never fire).
    Resume,
    /// ACTIVE or PAUSED → DELETED.
    Delete,
}

/// Why a change was refused. The schedule is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleRejection {
    /// The schedule is not in a status that allows it.
    #[error("schedule is {status}, expected {expected}")]
    WrongStatus {
        /// Its status.
        status: ScheduleStatus,
        /// What the change needs.
        expected: &'static str,
    },
    /// The new cron expression or zone cannot be used.
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl Schedule {
    /// A new ACTIVE schedule with the given id, created at `now`, first firing at its first tick
    /// after `now`.
    pub fn create(id: String, new: NewSchedule, now: Millis) -> Result<Self, SpecError> {
        let spec = CronSpec::parse(&new.cron, &new.timezone)?;
        let next = spec
            .next_after(now)
            .ok_or_else(|| SpecError::NeverFires(new.cron.clone()))?;
        Ok(Self {
            id,
            name: new.name,
            cron: new.cron,
            timezone: spec.timezone().to_owned(),
            misfire: new.misfire,
            status: ScheduleStatus::Active,
            args: new.args,
            options: new.options,
            next_run_at: Some(next),
            last_run_at: None,
            created_at: now,
            updated_at: now,
        })
    }

    /// Its cron expression in its zone.
    pub fn spec(&self) -> Result<CronSpec, SpecError> {
        CronSpec::parse(&self.cron, &self.timezone)
    }

    /// The job it enqueues for `tick`, due at `now`.
    pub fn job_for(&self, tick: Millis, now: Millis) -> NewJob {
        NewJob {
            name: self.name.clone(),
            queue: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            args: self.args.clone(),
            options: self.options.clone(),
            idempotency_key: Some(idempotency_key(&self.id, tick)),
            run_at: now,
        }
    }
}

/// The idempotency key of the job a schedule enqueues for one tick: a tick's job is created at
/// most once while it is retained.
pub fn idempotency_key(schedule_id: &str, tick: Millis) -> String {
    format!("schedule:{schedule_id}:{tick}")
}

/// The tick a [`idempotency_key`] names, if it is one of this schedule's.
pub fn tick_of_key(schedule_id: &str, key: &str) -> Option<Millis> {
    key.strip_prefix("schedule:")?
        .strip_prefix(schedule_id)?
        .strip_prefix(':')?
        .parse()
        .ok()
}

/// Applies `change` at `now`. On refusal the schedule is unchanged.
pub fn change(
    s: &mut Schedule,
    change: ScheduleChange,
    now: Millis,
) -> Result<(), ScheduleRejection> {
    let wrong = |status, expected| ScheduleRejection::WrongStatus { status, expected };
    match change {
        ScheduleChange::Update(u) => {
            if s.status == ScheduleStatus::Deleted {
                return Err(wrong(s.status, "active or paused"));
            }
            let retick = u.cron.is_some() || u.timezone.is_some();
            let cron = u.cron.unwrap_or_else(|| s.cron.clone());
            let timezone = u.timezone.unwrap_or_else(|| s.timezone.clone());
            let spec = CronSpec::parse(&cron, &timezone)?;
            let next = if retick && s.status == ScheduleStatus::Active {
                Some(
                    spec.next_after(now)
                        .ok_or_else(|| SpecError::NeverFires(cron.clone()))?,
                )
            } else {
                s.next_run_at
            };
            s.cron = cron;
            s.timezone = spec.timezone().to_owned();
            s.next_run_at = next;
            if let Some(options) = u.options {
                s.options = options;
            }
            if let Some(misfire) = u.misfire {
                s.misfire = misfire;
            }
        }
        ScheduleChange::Pause => {
            if s.status != ScheduleStatus::Active {
                return Err(wrong(s.status, "active"));
            }
            s.status = ScheduleStatus::Paused;
            s.next_run_at = None;
        }
        ScheduleChange::Resume => {
            if s.status != ScheduleStatus::Paused {
                return Err(wrong(s.status, "paused"));
            }
            s.next_run_at = s.spec()?.next_after(now);
            s.status = ScheduleStatus::Active;
        }
        ScheduleChange::Delete => {
            if s.status == ScheduleStatus::Deleted {
                return Err(wrong(s.status, "active or paused"));
            }
            s.status = ScheduleStatus::Deleted;
            s.next_run_at = None;
        }
    }
    s.updated_at = now;
    Ok(())
}

/// A due check of a stored schedule at `now`: applies [`decide`] to an ACTIVE schedule, moves
/// `next_run_at`, and when it fires records the time and returns the job to enqueue (in the same
/// transaction as the schedule's update). Nothing changes while the schedule is not due.
///
/// A schedule whose stored expression no longer parses gets no next tick (it stops; the caller
/// logs the error) rather than being retried forever.
pub fn fire(s: &mut Schedule, now: Millis) -> Result<(Decision, Option<NewJob>), SpecError> {
    let (ScheduleStatus::Active, Some(next_run_at)) = (s.status, s.next_run_at) else {
        let idle = Decision {
            fire: None,
            late: false,
            next_run_at: s.next_run_at,
        };
        return Ok((idle, None));
    };
    let spec = match s.spec() {
        Ok(spec) => spec,
        Err(e) => {
            s.next_run_at = None;
            s.updated_at = now;
            return Err(e);
        }
    };
    let d = decide(&spec, next_run_at, now, s.misfire);
    if now < next_run_at {
        return Ok((d, None));
    }
    s.next_run_at = d.next_run_at;
    s.updated_at = now;
    let job = d.fire.map(|tick| {
        s.last_run_at = Some(now);
        s.job_for(tick, now)
    });
    Ok((d, job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Millis = 1000;
    const MIN: Millis = 60 * SEC;
    const HOUR: Millis = 60 * MIN;
    const DAY: Millis = 24 * HOUR;
    /// 2024-03-31 00:00 Europe/Berlin (CET): clocks jump 02:00 → 03:00 that night.
    const BERLIN_SPRING: Millis = 1_711_839_600_000;
    /// 2024-10-27 00:00 Europe/Berlin (CEST): clocks fall back 03:00 → 02:00 that night.
    const BERLIN_FALL: Millis = 1_729_980_000_000;

    fn spec(cron: &str, tz: &str) -> CronSpec {
        CronSpec::parse(cron, tz).unwrap()
    }

    /// Every tick in `(from, to]`.
    fn ticks(s: &CronSpec, from: Millis, to: Millis) -> Vec<Millis> {
        let mut out = Vec::new();
        let mut t = from;
        while let Some(n) = s.next_after(t).filter(|n| *n <= to) {
            out.push(n);
            t = n;
        }
        out
    }

    fn check_parse(cron: &str, tz: &str, expected: Result<(), &str>) {
        let got = CronSpec::parse(cron, tz)
            .map(|_| ())
            .map_err(|e| e.to_string());
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.contains(want), "{cron:?} {tz:?}: {e}"),
            (got, want) => panic!("{cron:?} {tz:?}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn parsing() {
        check_parse("*/5 * * * *", "", Ok(()));
        check_parse("0 9 * * MON-FRI", "America/New_York", Ok(()));
        check_parse("*/10 * * * * *", "UTC", Ok(()));
        check_parse("0 0 0 1 1 * 2099", "UTC", Ok(()));
        check_parse("0/5 * * * * *", "UTC", Ok(()));
        check_parse("@daily", "Asia/Kolkata", Ok(()));
        check_parse("0 0 * * 7", "UTC", Ok(()));
        check_parse("", "UTC", Err("invalid cron expression"));
        check_parse("* * * *", "UTC", Err("invalid cron expression"));
        check_parse("61 * * * *", "UTC", Err("invalid cron expression"));
        check_parse("* * * * * * * *", "UTC", Err("invalid cron expression"));
        check_parse(&"1,".repeat(200), "UTC", Err("the limit is 256"));
        check_parse(
            "* * * * *",
            "Mars/Olympus",
            Err("unknown time zone \"Mars/Olympus\""),
        );
        check_parse("* * * * *", "europe/berlin", Err("unknown time zone"));
        check_parse("* * * * *", " UTC", Err("unknown time zone"));
    }

    #[test]
    fn empty_zone_is_utc_and_names_are_canonical() {
        assert_eq!(spec("* * * * *", "").timezone(), "UTC");
        assert_eq!(
            spec("* * * * *", "Europe/Berlin").timezone(),
            "Europe/Berlin"
        );
    }

    #[test]
    fn sunday_is_0_and_7() {
        // 2024-01-07 was a Sunday.
        let sunday = 1_704_585_600_000;
        for cron in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN"] {
            assert_eq!(
                spec(cron, "UTC").next_after(sunday - 1),
                Some(sunday),
                "{cron}"
            );
        }
        // And 1 is Monday (the original Reseolio server read 1 as Sunday).
        assert_eq!(
            spec("0 0 * * 1", "UTC").next_after(sunday - 1),
            Some(sunday + DAY)
        );
    }

    #[test]
    fn next_after_is_strictly_after_and_whole_seconds() {
        let s = spec("* * * * * *", "UTC");
        assert_eq!(s.next_after(10_500), Some(11_000));
        assert_eq!(s.next_after(11_000), Some(12_000));
        assert_eq!(s.next_after(10_999), Some(11_000));
        assert_eq!(s.latest_at_or_before(10_500), Some(10_000));
        assert_eq!(s.latest_at_or_before(11_000), Some(11_000));
    }

    #[test]
    fn impossible_expressions_never_fire() {
        let s = spec("0 0 30 2 *", "UTC");
        assert_eq!(s.next_after(BERLIN_SPRING), None);
        let past = spec("0 0 0 1 1 * 2020", "UTC");
        assert_eq!(past.next_after(BERLIN_SPRING), None);
        let new = NewSchedule {
            name: "n".into(),
            cron: "0 0 0 1 1 * 2020".into(),
            timezone: String::new(),
            misfire: Misfire::Coalesce,
            args: b"[]".to_vec(),
            options: JobOptions::default(),
        };
        assert_eq!(
            Schedule::create("s".into(), new, BERLIN_SPRING),
            Err(SpecError::NeverFires("0 0 0 1 1 * 2020".into()))
        );
    }

    #[test]
    fn dst_spring_forward_in_berlin() {
        let day = (BERLIN_SPRING, BERLIN_SPRING + DAY - HOUR);
        // 02:30 does not exist that night: it fires once, at 03:00 CEST (01:00 UTC).
        let s = spec("30 2 * * *", "Europe/Berlin");
        assert_eq!(ticks(&s, day.0, day.1), [BERLIN_SPRING + 2 * HOUR]);
        // The next day it is back at 02:30 CEST (00:30 UTC).
        assert_eq!(s.next_after(day.1), Some(day.1 + 2 * HOUR + 30 * MIN));
        // Hourly: a 23-hour day has 23 ticks, an hour apart in real time.
        let hourly = ticks(&spec("0 * * * *", "Europe/Berlin"), day.0 - 1, day.1 - 1);
        assert_eq!(hourly.len(), 23);
        assert!(hourly.windows(2).all(|w| w[1] - w[0] == HOUR));
    }

    #[test]
    fn dst_fall_back_in_berlin() {
        let day = (BERLIN_FALL, BERLIN_FALL + DAY + HOUR);
        // 02:30 happens twice that night: a fixed-time job fires once, at the first (CEST).
        let s = spec("30 2 * * *", "Europe/Berlin");
        assert_eq!(ticks(&s, day.0, day.1), [BERLIN_FALL + 2 * HOUR + 30 * MIN]);
        // Hourly: a 25-hour day has 25 ticks, an hour apart in real time.
        let hourly = ticks(&spec("0 * * * *", "Europe/Berlin"), day.0 - 1, day.1 - 1);
        assert_eq!(hourly.len(), 25);
        assert!(hourly.windows(2).all(|w| w[1] - w[0] == HOUR));
        // Every 15 minutes: evenly spaced through both passes of the repeated hour.
        let quarter = ticks(&spec("*/15 * * * *", "Europe/Berlin"), day.0 - 1, day.1 - 1);
        assert_eq!(quarter.len(), 25 * 4);
        assert!(quarter.windows(2).all(|w| w[1] - w[0] == 15 * MIN));
    }

    #[test]
    fn decisions() {
        let s = spec("0 * * * *", "UTC");
        let t = 1_704_067_200_000; // 2024-01-01 00:00 UTC, a tick
        let check = |next: Millis, now: Millis, misfire, fire, late, next_run_at| {
            let d = decide(&s, next, now, misfire);
            assert_eq!(
                d,
                Decision {
                    fire,
                    late,
                    next_run_at
                },
                "next {next} now {now} {misfire}"
            );
        };
        for m in [Misfire::Coalesce, Misfire::Skip] {
            // Not due.
            check(t, t - 1, m, None, false, Some(t));
            // On time.
            check(t, t, m, Some(t), false, Some(t + HOUR));
            check(t, t + ON_TIME_GRACE, m, Some(t), false, Some(t + HOUR));
        }
        // Late by more than the grace, one tick missed.
        check(
            t,
            t + 5 * MIN,
            Misfire::Coalesce,
            Some(t),
            true,
            Some(t + HOUR),
        );
        check(t, t + 5 * MIN, Misfire::Skip, None, true, Some(t + HOUR));
        // Three ticks missed: coalesced into one, or dropped.
        let now = t + 2 * HOUR + 30 * MIN;
        check(t, now, Misfire::Coalesce, Some(t), true, Some(t + 3 * HOUR));
        check(t, now, Misfire::Skip, None, true, Some(t + 3 * HOUR));
        // Skip still fires the latest tick when that one is on time.
        let now = t + 2 * HOUR + 200;
        check(
            t,
            now,
            Misfire::Skip,
            Some(t + 2 * HOUR),
            true,
            Some(t + 3 * HOUR),
        );
    }

    fn schedule(cron: &str, misfire: Misfire, now: Millis) -> Schedule {
        Schedule::create(
            "sid".into(),
            NewSchedule {
                name: "report".into(),
                cron: cron.into(),
                timezone: "Europe/Berlin".into(),
                misfire,
                args: b"[1]".to_vec(),
                options: JobOptions::default(),
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn fire_enqueues_the_tick_with_its_key() {
        let mut s = schedule("* * * * * *", Misfire::Coalesce, 10_500);
        assert_eq!(s.next_run_at, Some(11_000));
        let (d, job) = fire(&mut s, 10_900).unwrap();
        assert_eq!((d.fire, job), (None, None));
        let (d, job) = fire(&mut s, 11_020).unwrap();
        let job = job.unwrap();
        assert_eq!(d.fire, Some(11_000));
        assert_eq!(job.idempotency_key.as_deref(), Some("schedule:sid:11000"));
        assert_eq!(tick_of_key("sid", "schedule:sid:11000"), Some(11_000));
        assert_eq!(tick_of_key("other", "schedule:sid:11000"), None);
        assert_eq!(
            (job.name.as_str(), job.args.as_slice(), job.run_at),
            ("report", &b"[1]"[..], 11_020)
        );
        assert_eq!((s.next_run_at, s.last_run_at), (Some(12_000), Some(11_020)));
        // The same moment again (a second server, a restart): nothing more.
        assert_eq!(fire(&mut s, 11_020).unwrap().1, None);
    }

    #[test]
    fn status_changes() {
        let mut s = schedule("0 * * * *", Misfire::Coalesce, 0);
        let wrong = |status, expected| ScheduleRejection::WrongStatus { status, expected };
        assert_eq!(
            change(&mut s, ScheduleChange::Resume, 1),
            Err(wrong(ScheduleStatus::Active, "paused"))
        );
        change(&mut s, ScheduleChange::Pause, 1).unwrap();
        assert_eq!((s.status, s.next_run_at), (ScheduleStatus::Paused, None));
        assert_eq!(fire(&mut s, 10 * HOUR).unwrap().1, None);
        assert_eq!(
            change(&mut s, ScheduleChange::Pause, 2),
            Err(wrong(ScheduleStatus::Paused, "active"))
        );
        // Ticks passed while paused do not fire: it resumes from now.
        change(&mut s, ScheduleChange::Resume, 5 * HOUR + 1).unwrap();
        assert_eq!(
            (s.status, s.next_run_at),
            (ScheduleStatus::Active, Some(6 * HOUR))
        );
        // A new cron restarts the ticks from now; a bad one changes nothing.
        let before = s.clone();
        let update = |cron: &str| {
            ScheduleChange::Update(ScheduleUpdate {
                cron: Some(cron.into()),
                ..Default::default()
            })
        };
        assert!(matches!(
            change(&mut s, update("nope"), 5 * HOUR + 2),
            Err(ScheduleRejection::Spec(SpecError::Cron { .. }))
        ));
        assert_eq!(s, before);
        change(&mut s, update("*/30 * * * *"), 5 * HOUR + 2).unwrap();
        assert_eq!(s.next_run_at, Some(5 * HOUR + 30 * MIN));
        change(&mut s, ScheduleChange::Delete, 5 * HOUR + 3).unwrap();
        assert_eq!((s.status, s.next_run_at), (ScheduleStatus::Deleted, None));
        for c in [
            ScheduleChange::Delete,
            ScheduleChange::Pause,
            update("* * * * *"),
        ] {
            assert!(change(&mut s, c, 6 * HOUR).is_err());
        }
        assert_eq!(fire(&mut s, 10 * HOUR).unwrap().1, None);
    }

    const CRONS: &[&str] = &[
        "* * * * * *",
        "*/7 * * * * *",
        "*/15 * * * *",
        "0 * * * *",
        "30 2 * * *",
        "0 3 * * *",
        "15 1-3 * * *",
        "0 9 * * MON-FRI",
        "0 0 1 * *",
        "0 0 29 2 *",
        "0 0 L * *",
        "@weekly",
    ];
    const ZONES: &[&str] = &[
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
    ];

    fn any_spec() -> impl Strategy<Value = (&'static str, &'static str)> {
        (
            proptest::sample::select(CRONS),
            proptest::sample::select(ZONES),
        )
    }

    /// 2020–2030, with extra weight around the Berlin transitions of 2024.
    fn any_time() -> impl Strategy<Value = Millis> {
        prop_oneof![
            1_577_836_800_000..1_893_456_000_000i64,
            (BERLIN_SPRING - DAY)..(BERLIN_SPRING + DAY),
            (BERLIN_FALL - DAY)..(BERLIN_FALL + DAY),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// next_after is the first tick strictly after t: later than t, nothing in between, and
        /// so strictly increasing along its own sequence.
        #[test]
        fn next_after_is_the_first_later_tick((cron, tz) in any_spec(), t in any_time()) {
            let s = spec(cron, tz);
            let n = s.next_after(t).expect("every sample expression ticks again");
            prop_assert!(n > t);
            prop_assert_eq!(n % 1000, 0);
            // Nothing between t and n: from any later point before n, n is still next.
            prop_assert_eq!(s.next_after(n - 1), Some(n));
            prop_assert_eq!(s.next_after(t + (n - t) / 2), Some(n));
            prop_assert_eq!(s.latest_at_or_before(n), Some(n));
            let n2 = s.next_after(n).expect("ticks again");
            prop_assert!(n2 > n);
        }

        /// Due checks at arbitrary (even backwards-jumping) times never fire a tick twice and
        /// never fire a tick not yet due; coalesce fires for every check that found a tick due,
        /// skip never fires late.
        #[test]
        fn decisions_never_fire_a_tick_twice(
            (cron, tz) in any_spec(),
            start in any_time(),
            steps in proptest::collection::vec(-HOUR..(3 * DAY), 1..40),
            skip in any::<bool>(),
        ) {
            let misfire = if skip { Misfire::Skip } else { Misfire::Coalesce };
            let s = spec(cron, tz);
            let mut next = s.next_after(start).expect("ticks");
            let mut now = start;
            let mut fired: Vec<Millis> = Vec::new();
            for step in steps {
                now += step;
                let d = decide(&s, next, now, misfire);
                if now < next {
                    prop_assert_eq!(d, Decision { fire: None, late: false, next_run_at: Some(next) });
                    continue;
                }
                match (misfire, d.fire) {
                    (Misfire::Coalesce, fire) => prop_assert_eq!(fire, Some(next)),
                    (Misfire::Skip, Some(tick)) => {
                        prop_assert!(now - tick <= ON_TIME_GRACE);
                        prop_assert!(tick >= next);
                    }
                    (Misfire::Skip, None) => prop_assert!(d.late),
                }
                if let Some(tick) = d.fire {
                    prop_assert!(tick <= now);
                    prop_assert!(fired.last().is_none_or(|last| tick > *last), "tick {} fired twice or out of order", tick);
                    fired.push(tick);
                }
                let n = d.next_run_at.expect("ticks");
                prop_assert!(n > now);
                next = n;
            }
        }
    }
}
