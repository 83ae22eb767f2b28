//! The rollout state machine (pure): which devices to push next, what a push's outcome does to
//! the wave and the rollout, pause, resume and abort, and recovery after a crash.
//!
//! A rollout holds its ordered targets, its waves ([`crate::waves`]) and one [`DeviceState`]
//! per target. The orchestrator asks [`Rollout::take_work`] for devices to start (never beyond the
//! current wave, never more than `concurrency` in flight, none while paused or finished), marks
//! them started, and reports each outcome with [`Rollout::finish`]. When the last device of a
//! wave has an outcome, the wave is judged against the error threshold: the rollout aborts, or
//! the next wave opens. Every change returns the [`Change`]s to write to the audit trail —
//! before acting on them — and replaying those changes rebuilds the rollout
//! ([`Rollout::replay`]).
//!
//! **Invariants** (property-tested against a model): a device that succeeded is never started
//! again; nothing starts while paused, after an abort or beyond the current wave; a wave whose
//! failure rate exceeds the threshold stops the rollout before the next wave starts; resume
//! runs exactly the devices that never ended. After a crash, devices that were in flight are
//! [`DeviceState::Unknown`]: the orchestrator must check them (ask the device its version)
//! before pushing again — [`Rollout::take_work`] offers them as checks, not pushes.

use std::ops::Range;

use crate::waves::{self, Verdict, WavePlan};

/// Where one target device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not started.
    Pending,
    /// A push (or a check) is in flight.
    InFlight,
    /// It runs the new version and is healthy.
    Succeeded,
    /// Pushing failed for good (transient failures until attempts ran out, or unhealthy).
    Failed,
    /// The device refused the artifact.
    Rejected,
    /// It was in flight when the orchestrator stopped: check before pushing again.
    Unknown,
}

impl DeviceState {
    fn ended(self) -> bool {
        matches!(
            self,
            DeviceState::Succeeded | DeviceState::Failed | DeviceState::Rejected
        )
    }

    fn failed(self) -> bool {
        matches!(self, DeviceState::Failed | DeviceState::Rejected)
    }

    fn slot(self) -> usize {
        match self {
            DeviceState::Pending => 0,
            DeviceState::InFlight => 1,
            DeviceState::Succeeded => 2,
            DeviceState::Failed => 3,
            DeviceState::Rejected => 4,
            DeviceState::Unknown => 5,
        }
    }
}

/// Device counts by state, kept as states change (no scan of the devices).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Not started.
    pub pending: usize,
    /// In flight.
    pub in_flight: usize,
    /// Succeeded.
    pub succeeded: usize,
    /// Failed.
    pub failed: usize,
    /// Rejected.
    pub rejected: usize,
    /// In flight at a crash, to be checked.
    pub unknown: usize,
}

/// The rollout as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Pushing the wave `wave`.
    Running,
    /// Asked to pause: nothing new starts; in-flight pushes finish.
    Paused,
    /// Stopped for good (by the threshold or by hand).
    Aborted,
    /// Every wave ended.
    Completed,
}

/// What the orchestrator should do for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Push the artifact.
    Push(usize),
    /// Find out whether it already runs the new version (it was in flight at a crash).
    Check(usize),
}

/// An outcome reported for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered and healthy (or a check found the new version running).
    Succeeded,
    /// Failed for good.
    Failed,
    /// Refused by the device.
    Rejected,
    /// A check found the old version: push it.
    NotYet,
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A device's state changed.
    Device {
        /// Its index in the targets.
        index: usize,
        /// The new state.
        state: DeviceState,
    },
    /// Work started on these devices (pushes, or checks after a crash): one entry for all the
    /// devices started together.
    Started {
        /// Their indexes in the targets.
        indexes: Vec<usize>,
    },
    /// A wave opened.
    WaveOpened {
        /// Its number (0 = canary).
        wave: usize,
    },
    /// Devices registered after creation joined a dynamic rollout, as a new wave at the end.
    Joined {
        /// How many (their indexes follow the existing targets).
        count: usize,
    },
    /// A dynamic rollout takes in no more devices: it completes when its waves have ended.
    Closed,
    /// The rollout's phase changed.
    Phase {
        /// The new phase.
        phase: Phase,
        /// Why (threshold exceeded, by hand, ...).
        reason: String,
    },
}

/// A refused operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// The operation does not apply in this phase.
    #[error("the rollout is {0:?}")]
    Phase(Phase),
    /// The device is not in a state this operation applies to.
    #[error("device {index} is {state:?}")]
    Device {
        /// Its index.
        index: usize,
        /// Its state.
        state: DeviceState,
    },
    /// The wave plan does not work.
    #[error(transparent)]
    Plan(#[from] waves::PlanError),
}

/// A rollout over `targets.len()` devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    devices: Vec<DeviceState>,
    waves: Vec<Range<usize>>,
    wave: usize,
    phase: Phase,
    threshold_percent: f64,
    concurrency: usize,
    /// Dynamic and not closed: when its waves have ended it waits for devices to join
    /// instead of completing.
    open: bool,
    /// Devices by state (`DeviceState::slot`).
    tally: [usize; 6],
    /// In the current wave: every device before this index has been started or has ended.
    cursor: usize,
    /// Devices of the current wave without an outcome.
    wave_open: usize,
    /// Devices of the current wave that failed or were rejected.
    wave_failed: usize,
}

impl Rollout {
    /// A new rollout over `targets` devices, opening its first wave.
    pub fn new(
        targets: usize,
        plan: WavePlan,
        threshold_percent: f64,
        concurrency: usize,
    ) -> Result<(Self, Vec<Change>), RolloutError> {
        Self::with_joining(targets, plan, threshold_percent, concurrency, false)
    }

    /// A new rollout that, when `dynamic`, takes in devices registered later ([`Rollout::join`])
    /// and waits for them after its waves end, until [`Rollout::close`].
    pub fn with_joining(
        targets: usize,
        plan: WavePlan,
        threshold_percent: f64,
        concurrency: usize,
        dynamic: bool,
    ) -> Result<(Self, Vec<Change>), RolloutError> {
        let waves = plan.waves(targets)?;
        let mut r = Self {
            devices: vec![DeviceState::Pending; targets],
            waves,
            wave: 0,
            phase: Phase::Running,
            threshold_percent,
            concurrency: concurrency.max(1),
            open: dynamic,
            tally: [targets, 0, 0, 0, 0, 0],
            cursor: 0,
            wave_open: 0,
            wave_failed: 0,
        };
        r.open_wave();
        let mut changes = vec![Change::WaveOpened { wave: 0 }];
        r.settle(&mut changes);
        Ok((r, changes))
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current wave's number.
    pub fn wave(&self) -> usize {
        self.wave
    }

    /// How many waves.
    pub fn waves(&self) -> usize {
        self.waves.len()
    }

    /// Every device's state.
    pub fn devices(&self) -> &[DeviceState] {
        &self.devices
    }

    /// Device counts by state.
    pub fn tally(&self) -> Tally {
        let t = self.tally;
        Tally {
            pending: t[0],
            in_flight: t[1],
            succeeded: t[2],
            failed: t[3],
            rejected: t[4],
            unknown: t[5],
        }
    }

    /// Sets device `index`'s state, keeping the counts.
    fn set(&mut self, index: usize, new: DeviceState) {
        let old = self.devices[index];
        self.devices[index] = new;
        self.tally[old.slot()] -= 1;
        self.tally[new.slot()] += 1;
        if self
            .waves
            .get(self.wave)
            .is_some_and(|r| r.contains(&index))
        {
            if !old.ended() && new.ended() {
                self.wave_open -= 1;
                if new.failed() {
                    self.wave_failed += 1;
                }
            }
            if matches!(new, DeviceState::Pending | DeviceState::Unknown) {
                self.cursor = self.cursor.min(index);
            }
        }
    }

    /// Takes the counts of the current wave (once per wave).
    fn open_wave(&mut self) {
        let Some(range) = self.waves.get(self.wave).cloned() else {
            return;
        };
        let states = &self.devices[range.clone()];
        self.wave_open = states.iter().filter(|s| !s.ended()).count();
        self.wave_failed = states.iter().filter(|s| s.failed()).count();
        self.cursor = range.start;
    }

    /// Whether devices may still join.
    pub fn is_open(&self) -> bool {
        self.open && !matches!(self.phase, Phase::Aborted | Phase::Completed)
    }

    /// Takes `count` more devices in (their indexes follow the existing ones) as one wave after
    /// the others. Refused unless the rollout is dynamic, not closed and not finished.
    pub fn join(&mut self, count: usize) -> Result<Vec<Change>, RolloutError> {
        if !self.is_open() {
            return Err(RolloutError::Phase(self.phase));
        }
        let mut changes = vec![Change::Joined { count }];
        if count == 0 {
            return Ok(changes);
        }
        self.add(count);
        if self.wave == self.waves.len() - 1 {
            // It was waiting past its last wave: the new one opens now.
            self.open_wave();
            changes.push(Change::WaveOpened { wave: self.wave });
        }
        Ok(changes)
    }

    fn add(&mut self, count: usize) {
        let start = self.devices.len();
        self.devices
            .extend(std::iter::repeat_n(DeviceState::Pending, count));
        self.tally[DeviceState::Pending.slot()] += count;
        self.waves.push(start..start + count);
    }

    /// Takes in no more devices: the rollout completes when its waves have ended.
    pub fn close(&mut self) -> Result<Vec<Change>, RolloutError> {
        if !self.is_open() {
            return Err(RolloutError::Phase(self.phase));
        }
        self.open = false;
        let mut changes = vec![Change::Closed];
        self.settle(&mut changes);
        Ok(changes)
    }

    fn in_flight(&self) -> usize {
        self.tally[DeviceState::InFlight.slot()]
    }

    /// Work to start now, at most up to the concurrency limit; each is marked in flight
    /// (the returned changes say so).
    pub fn take_work(&mut self) -> (Vec<Work>, Vec<Change>) {
        let mut work = Vec::new();
        let mut changes = Vec::new();
        if self.phase != Phase::Running {
            return (work, changes);
        }
        let mut free = self.concurrency.saturating_sub(self.in_flight());
        let Some(range) = self.waves.get(self.wave).cloned() else {
            return (work, changes);
        };
        // Everything before the cursor has been started or has ended.
        let mut started = Vec::new();
        let mut index = self.cursor.max(range.start);
        while index < range.end && free > 0 {
            let item = match self.devices[index] {
                DeviceState::Pending => Work::Push(index),
                DeviceState::Unknown => Work::Check(index),
                _ => {
                    index += 1;
                    continue;
                }
            };
            self.set(index, DeviceState::InFlight);
            started.push(index);
            work.push(item);
            free -= 1;
            index += 1;
        }
        self.cursor = index;
        if !started.is_empty() {
            changes.push(Change::Started { indexes: started });
        }
        (work, changes)
    }

    /// Records the outcome of the work in flight for `index`.
    pub fn finish(&mut self, index: usize, outcome: Outcome) -> Result<Vec<Change>, RolloutError> {
        let state = *self.devices.get(index).ok_or(RolloutError::Device {
            index,
            state: DeviceState::Pending,
        })?;
        if state != DeviceState::InFlight {
            return Err(RolloutError::Device { index, state });
        }
        let new = match outcome {
            Outcome::Succeeded => DeviceState::Succeeded,
            Outcome::Failed => DeviceState::Failed,
            Outcome::Rejected => DeviceState::Rejected,
            Outcome::NotYet => DeviceState::Pending,
        };
        self.set(index, new);
        let mut changes = vec![Change::Device { index, state: new }];
        self.settle(&mut changes);
        Ok(changes)
    }

    /// Judges finished waves: abort on the threshold, open the next wave, or complete.
    fn settle(&mut self, changes: &mut Vec<Change>) {
        while matches!(self.phase, Phase::Running | Phase::Paused) {
            let Some(range) = self.waves.get(self.wave).cloned() else {
                if self.open {
                    // Dynamic: wait for devices to join.
                    return;
                }
                self.phase = Phase::Completed;
                changes.push(Change::Phase {
                    phase: Phase::Completed,
                    reason: "every wave ended".into(),
                });
                return;
            };
            if self.wave_open > 0 {
                return;
            }
            let failed = self.wave_failed;
            if waves::judge(failed, range.len(), self.threshold_percent) == Verdict::Abort {
                self.phase = Phase::Aborted;
                changes.push(Change::Phase {
                    phase: Phase::Aborted,
                    reason: format!(
                        "wave {}: {failed} of {} devices failed, over the {}% threshold",
                        self.wave,
                        range.len(),
                        self.threshold_percent
                    ),
                });
                return;
            }
            self.wave += 1;
            if self.wave < self.waves.len() {
                self.open_wave();
                changes.push(Change::WaveOpened { wave: self.wave });
            }
        }
    }

    /// Stops new work; in-flight work finishes and is recorded.
    pub fn pause(&mut self) -> Result<Vec<Change>, RolloutError> {
        if self.phase != Phase::Running {
            return Err(RolloutError::Phase(self.phase));
        }
        self.phase = Phase::Paused;
        Ok(vec![Change::Phase {
            phase: Phase::Paused,
            reason: "paused".into(),
        }])
    }

    /// Lets new work start again.
    pub fn resume(&mut self) -> Result<Vec<Change>, RolloutError> {
        if self.phase != Phase::Paused {
            return Err(RolloutError::Phase(self.phase));
        }
        self.phase = Phase::Running;
        let mut changes = vec![Change::Phase {
            phase: Phase::Running,
            reason: "resumed".into(),
        }];
        self.settle(&mut changes);
        Ok(changes)
    }

    /// Stops the rollout for good.
    pub fn abort(&mut self, reason: &str) -> Result<Vec<Change>, RolloutError> {
        if matches!(self.phase, Phase::Aborted | Phase::Completed) {
            return Err(RolloutError::Phase(self.phase));
        }
        self.phase = Phase::Aborted;
        Ok(vec![Change::Phase {
            phase: Phase::Aborted,
            reason: reason.to_owned(),
        }])
    }

    /// Rebuilds a rollout from its audit trail after the orchestrator stopped (or crashed):
    /// the changes of [`Rollout::new`] and every later call, in order. Devices that were in
    /// flight become [`DeviceState::Unknown`], to be checked before any new push.
    pub fn replay(
        targets: usize,
        plan: WavePlan,
        threshold_percent: f64,
        concurrency: usize,
        trail: &[Change],
    ) -> Result<Self, RolloutError> {
        Self::replay_joining(targets, plan, threshold_percent, concurrency, false, trail)
    }

    /// [`Rollout::replay`] of a rollout made by [`Rollout::with_joining`]; `targets` counts
    /// the devices it was created with, not those that joined later (the trail adds them).
    pub fn replay_joining(
        targets: usize,
        plan: WavePlan,
        threshold_percent: f64,
        concurrency: usize,
        dynamic: bool,
        trail: &[Change],
    ) -> Result<Self, RolloutError> {
        let (mut r, _) =
            Self::with_joining(targets, plan, threshold_percent, concurrency, dynamic)?;
        for change in trail {
            match change {
                Change::Started { indexes } => {
                    for index in indexes {
                        if let Some(d) = r.devices.get_mut(*index) {
                            *d = DeviceState::InFlight;
                        }
                    }
                }
                Change::Joined { count } => {
                    if *count > 0 {
                        r.add(*count);
                    }
                }
                Change::Closed => r.open = false,
                Change::Device { index, state } => {
                    if let Some(d) = r.devices.get_mut(*index) {
                        *d = *state;
                    }
                }
                Change::WaveOpened { wave } => r.wave = *wave,
                Change::Phase { phase, .. } => r.phase = *phase,
            }
        }
        for d in &mut r.devices {
            if *d == DeviceState::InFlight {
                *d = DeviceState::Unknown;
            }
        }
        r.tally = [0; 6];
        for d in &r.devices {
            r.tally[d.slot()] += 1;
        }
        r.open_wave();
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::waves::{Canary, Growth};

    fn plan(canary: u32, batch: u32) -> WavePlan {
        WavePlan {
            canary: Canary::Count(canary),
            growth: Growth::Fixed(batch),
        }
    }

    #[test]
    fn a_clean_rollout_runs_wave_by_wave_and_completes() {
        let (mut r, changes) = Rollout::new(5, plan(1, 2), 0.0, 10).unwrap();
        assert_eq!(changes, vec![Change::WaveOpened { wave: 0 }]);
        let (work, _) = r.take_work();
        assert_eq!(work, vec![Work::Push(0)], "only the canary");
        assert!(
            r.take_work().0.is_empty(),
            "nothing beyond the wave while it runs"
        );
        let changes = r.finish(0, Outcome::Succeeded).unwrap();
        assert!(changes.contains(&Change::WaveOpened { wave: 1 }));
        assert_eq!(r.take_work().0, vec![Work::Push(1), Work::Push(2)]);
        r.finish(1, Outcome::Succeeded).unwrap();
        r.finish(2, Outcome::Succeeded).unwrap();
        assert_eq!(r.take_work().0, vec![Work::Push(3), Work::Push(4)]);
        r.finish(3, Outcome::Succeeded).unwrap();
        let last = r.finish(4, Outcome::Succeeded).unwrap();
        assert_eq!(r.phase(), Phase::Completed);
        assert!(matches!(
            last.last(),
            Some(Change::Phase {
                phase: Phase::Completed,
                ..
            })
        ));
        assert!(r.take_work().0.is_empty());
    }

    #[test]
    fn a_failing_canary_aborts_before_the_next_wave() {
        let (mut r, _) = Rollout::new(10, plan(2, 4), 10.0, 10).unwrap();
        r.take_work();
        r.finish(0, Outcome::Succeeded).unwrap();
        let changes = r.finish(1, Outcome::Rejected).unwrap();
        assert_eq!(r.phase(), Phase::Aborted);
        assert!(matches!(&changes[1], Change::Phase { reason, .. } if reason.contains("1 of 2")));
        assert!(r.take_work().0.is_empty());
        assert_eq!(r.devices()[2], DeviceState::Pending);
    }

    #[test]
    fn a_crash_turns_in_flight_work_into_checks() {
        let p = plan(3, 3);
        let (mut r, mut trail) = Rollout::new(6, p, 50.0, 2).unwrap();
        let (work, c) = r.take_work();
        trail.extend(c);
        assert_eq!(work, vec![Work::Push(0), Work::Push(1)]);
        trail.extend(r.finish(0, Outcome::Succeeded).unwrap());
        // Crash here: device 1 was in flight.
        let mut again = Rollout::replay(6, p, 50.0, 2, &trail).unwrap();
        assert_eq!(again.devices()[0], DeviceState::Succeeded);
        assert_eq!(again.devices()[1], DeviceState::Unknown);
        assert_eq!(again.take_work().0, vec![Work::Check(1), Work::Push(2)]);
        // The check finds it already updated: no second push.
        again.finish(1, Outcome::Succeeded).unwrap();
        again.finish(2, Outcome::Succeeded).unwrap();
        assert_eq!(again.wave(), 1);
    }

    #[test]
    fn a_dynamic_rollout_waits_for_joining_devices_until_closed() {
        let (mut r, _) = Rollout::with_joining(1, plan(1, 5), 0.0, 10, true).unwrap();
        assert_eq!(r.take_work().0, vec![Work::Push(0)]);
        r.finish(0, Outcome::Succeeded).unwrap();
        assert_eq!(r.phase(), Phase::Running, "waits for devices to join");
        assert!(r.take_work().0.is_empty());
        let changes = r.join(2).unwrap();
        assert_eq!(
            changes,
            vec![Change::Joined { count: 2 }, Change::WaveOpened { wave: 1 }]
        );
        assert_eq!(r.take_work().0, vec![Work::Push(1), Work::Push(2)]);
        r.finish(1, Outcome::Succeeded).unwrap();
        r.finish(2, Outcome::Succeeded).unwrap();
        assert_eq!(r.phase(), Phase::Running);
        let changes = r.close().unwrap();
        assert_eq!(r.phase(), Phase::Completed);
        assert_eq!(changes[0], Change::Closed);
        assert!(r.join(1).is_err(), "closed");
        let (fixed, _) = Rollout::new(1, plan(1, 5), 0.0, 10).unwrap();
        let mut fixed = fixed;
        assert!(fixed.join(1).is_err(), "not dynamic");
    }

    #[test]
    fn refusals_of_bad_operations() {
        let (mut r, _) = Rollout::new(3, plan(1, 1), 0.0, 1).unwrap();
        assert!(r.finish(0, Outcome::Succeeded).is_err(), "not in flight");
        assert!(r.finish(9, Outcome::Succeeded).is_err(), "no such device");
        assert!(r.resume().is_err(), "not paused");
        r.pause().unwrap();
        assert!(r.pause().is_err());
        r.abort("by hand").unwrap();
        assert!(r.abort("again").is_err());
        assert!(r.resume().is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Next,
        Finish(usize, u8),
        Pause,
        Resume,
        Crash,
        Join(usize),
        Close,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                4 => Just(Op::Next),
                6 => (0usize..64, 0u8..10).prop_map(|(i, o)| Op::Finish(i, o)),
                1 => Just(Op::Pause),
                1 => Just(Op::Resume),
                1 => Just(Op::Crash),
                1 => (0usize..5).prop_map(Op::Join),
                1 => Just(Op::Close),
            ],
            0..300,
        )
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_sequence(
            targets in 0usize..40,
            canary in 1u32..6,
            batch in 1u32..8,
            threshold in prop_oneof![Just(0.0), Just(25.0), Just(100.0)],
            concurrency in 1usize..6,
            dynamic in any::<bool>(),
            ops in ops(),
        ) {
            let p = plan(canary, batch);
            let (mut r, mut trail) =
                Rollout::with_joining(targets, p, threshold, concurrency, dynamic).unwrap();
            let mut succeeded = vec![false; targets];
            let mut in_flight: Vec<usize> = Vec::new();
            for op in ops {
                match op {
                    Op::Next => {
                        let phase = r.phase();
                        let wave = r.wave();
                        let (work, changes) = r.take_work();
                        trail.extend(changes);
                        if phase != Phase::Running {
                            prop_assert!(work.is_empty(), "work started while {phase:?}");
                        }
                        for w in work {
                            let (Work::Push(i) | Work::Check(i)) = w;
                            if let Work::Push(_) = w {
                                prop_assert!(!succeeded[i], "device {i} pushed again after success");
                            }
                            let range = &r.waves[wave];
                            prop_assert!(range.contains(&i), "device {i} outside wave {wave}");
                            in_flight.push(i);
                        }
                        prop_assert!(r.in_flight() <= concurrency);
                    }
                    Op::Finish(pick, o) => {
                        if in_flight.is_empty() {
                            continue;
                        }
                        let i = in_flight.swap_remove(pick % in_flight.len());
                        let outcome = match o {
                            0 => Outcome::Failed,
                            1 => Outcome::Rejected,
                            2 => Outcome::NotYet,
                            _ => Outcome::Succeeded,
                        };
                        let before_wave = r.wave();
                        let changes = r.finish(i, outcome).unwrap();
                        if outcome == Outcome::Succeeded {
                            succeeded[i] = true;
                        }
                        if r.phase() == Phase::Aborted && before_wave == r.wave() {
                            let range = r.waves[before_wave].clone();
                            let failed = r.devices[range.clone()].iter().filter(|s| s.failed()).count();
                            prop_assert!(failed as f64 * 100.0 / range.len() as f64 > threshold);
                        }
                        trail.extend(changes);
                    }
                    Op::Pause => { if let Ok(c) = r.pause() { trail.extend(c); } }
                    Op::Resume => { if let Ok(c) = r.resume() { trail.extend(c); } }
                    Op::Join(n) => {
                        let open = r.is_open();
                        match r.join(n) {
                            Ok(c) => {
                                prop_assert!(open && dynamic);
                                trail.extend(c);
                                succeeded.extend(std::iter::repeat_n(false, n));
                            }
                            Err(_) => prop_assert!(!open),
                        }
                    }
                    Op::Close => { if let Ok(c) = r.close() { trail.extend(c); } }
                    Op::Crash => {
                        r = Rollout::replay_joining(targets, p, threshold, concurrency, dynamic, &trail)
                            .unwrap();
                        in_flight.clear();
                        prop_assert!(r.devices().iter().all(|s| *s != DeviceState::InFlight));
                    }
                }
                // The kept counts match a recount.
                let mut recount = [0usize; 6];
                for d in &r.devices {
                    recount[d.slot()] += 1;
                }
                prop_assert_eq!(r.tally, recount);
                // Waves never run ahead of an unfinished one.
                for w in 0..r.wave().min(r.waves.len()) {
                    let range = r.waves[w].clone();
                    prop_assert!(r.devices[range].iter().all(|s| s.ended()));
                }
            }
            // Finishing everything in flight, then resuming and running to the end, ends every
            // device exactly when the rollout was not aborted.
            for i in in_flight.drain(..) {
                trail.extend(r.finish(i, Outcome::Succeeded).unwrap());
            }
            let _ = r.resume();
            let _ = r.close();
            for _ in 0..10_000 {
                let (work, _) = r.take_work();
                if work.is_empty() { break; }
                for w in work {
                    let (Work::Push(i) | Work::Check(i)) = w;
                    if let Work::Push(_) = w { prop_assert!(!succeeded[i]); }
                    r.finish(i, Outcome::Succeeded).unwrap();
                    succeeded[i] = true;
                }
            }
            if r.phase() != Phase::Aborted {
                prop_assert_eq!(r.phase(), Phase::Completed);
                prop_assert!(r.devices().iter().all(|s| s.ended()));
            }
        }
    }
}
