//! Per-key circuit breakers: stop calling a dependency (a host, a queue, a tenant's webhook) that
//! keeps failing, then let a few probe calls through to find out whether it recovered.
//!
//! This module owns the breaker state machine and its config ([`CircuitBreakerConfig`], validated
//! into a [`CircuitBreakerPolicy`]). Each key moves through
//!
//! ```text
//!            trip                 open_duration passed              success_threshold probes ok
//! CLOSED ─────────────▶ OPEN ─────────────────────────▶ HALF_OPEN ────────────────────────▶ CLOSED
//!                        ▲                                  │
//!                        └──────────── a probe failed ──────┘
//! ```
//!
//! where "trip" is `consecutive_failures` failures in a row, or a failure ratio of at least
//! `failure_ratio` over the sliding `window` once it holds `minimum_calls` calls. The move to
//! HALF_OPEN happens lazily, on the first [`CircuitBreaker::acquire`] after `open_duration`.
//!
//! It does no I/O, spawns nothing and never sleeps: callers wrap their own calls in
//! [`CircuitBreaker::acquire`] and report the outcome on the returned [`Permit`]. Time comes from
//! [`tokio::time::Instant`], so tests drive it with paused time (and it falls back to the system
//! clock outside a runtime). The API is synchronous; the internal lock is never held across an
//! `.await` or while calling the transition hook.
//!
//! **Invariant:** in HALF_OPEN at most `half_open_probes` probe permits are outstanding.
//! **Invariant:** a permit only counts in the generation (state epoch) it was issued in: an outcome
//! reported after the key changed state is ignored, so late calls cannot corrupt probe accounting.
//! **Invariant:** memory is bounded: each key holds a fixed ring of window buckets, and idle keys
//! are swept whenever the key map doubles in size since the last sweep.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Buckets in the sliding window ring; the window slides in steps of `window / WINDOW_BUCKETS`.
const WINDOW_BUCKETS: usize = 10;
/// The key map is not swept before it holds this many keys.
const MIN_SWEEP_LEN: usize = 64;

const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
const DEFAULT_FAILURE_RATIO: f64 = 0.5;
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_MINIMUM_CALLS: u32 = 20;
const DEFAULT_OPEN_DURATION: Duration = Duration::from_secs(30);
const DEFAULT_HALF_OPEN_PROBES: u32 = 1;
const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;

/// The state of one key's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls are rejected until `open_duration` has passed.
    Open,
    /// A limited number of probe calls go through; their outcomes close or reopen the breaker.
    HalfOpen,
}

impl State {
    /// `"closed"`, `"open"` or `"half_open"`, e.g. for a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Circuit breaker settings as written in a config file; [`validate`](Self::validate) turns them
/// into a [`CircuitBreakerPolicy`]. Every field has a default.
///
/// ```toml
/// consecutive_failures = 5
/// failure_ratio = 0.5
/// window = "60s"
/// minimum_calls = 20
/// open_duration = "30s"
/// half_open_probes = 1
/// success_threshold = 1
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Open after this many failures in a row (a success resets the count); `0` disables this
    /// trigger. Default: 5.
    pub consecutive_failures: u32,
    /// Open when failures / calls over the sliding `window` reaches this ratio, once the window
    /// holds at least `minimum_calls` calls. Between 0 and 1; `0` disables this trigger (use
    /// `consecutive_failures = 1` to open on any failure). Default: 0.5.
    pub failure_ratio: f64,
    /// The sliding window for `failure_ratio`, e.g. `"60s"`. It slides in steps of a tenth of its
    /// length, so it covers between 90 % and 100 % of this duration. Must be greater than zero.
    /// Default: `"60s"`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Calls the window must hold before `failure_ratio` can open the breaker; at least 1.
    /// Default: 20.
    pub minimum_calls: u32,
    /// How long the breaker stays open before the next call is let through as a probe, e.g.
    /// `"30s"`. Default: `"30s"`.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
    /// Probe calls allowed at the same time while half-open; at least 1. Default: 1.
    pub half_open_probes: u32,
    /// Successful probes needed to close the breaker; at least 1. It may exceed
    /// `half_open_probes`: a finished probe frees its slot for the next one. Default: 1.
    pub success_threshold: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            failure_ratio: DEFAULT_FAILURE_RATIO,
            window: DEFAULT_WINDOW,
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            open_duration: DEFAULT_OPEN_DURATION,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
        }
    }
}

impl CircuitBreakerConfig {
    /// Checks every field and returns the policy, or the first field that is out of range.
    pub fn validate(&self) -> Result<CircuitBreakerPolicy, CircuitBreakerConfigError> {
        // `contains` is false for NaN.
        if !(0.0..=1.0).contains(&self.failure_ratio) {
            return Err(CircuitBreakerConfigError::FailureRatio(self.failure_ratio));
        }
        if self.window.is_zero() {
            return Err(CircuitBreakerConfigError::Window(self.window));
        }
        if self.minimum_calls == 0 {
            return Err(CircuitBreakerConfigError::MinimumCalls(self.minimum_calls));
        }
        if self.half_open_probes == 0 {
            return Err(CircuitBreakerConfigError::HalfOpenProbes(
                self.half_open_probes,
            ));
        }
        if self.success_threshold == 0 {
            return Err(CircuitBreakerConfigError::SuccessThreshold(
                self.success_threshold,
            ));
        }
        Ok(CircuitBreakerPolicy {
            consecutive_failures: self.consecutive_failures,
            failure_ratio: self.failure_ratio,
            window: self.window,
            minimum_calls: self.minimum_calls,
            open_duration: self.open_duration,
            half_open_probes: self.half_open_probes,
            success_threshold: self.success_threshold,
        })
    }
}

/// A [`CircuitBreakerConfig`] field out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CircuitBreakerConfigError {
    /// `failure_ratio` was outside `[0, 1]` or NaN.
    #[error("failure_ratio must be between 0 and 1, got {0}")]
    FailureRatio(f64),
    /// `window` was zero.
    #[error("window must be greater than zero, got {0:?}")]
    Window(Duration),
    /// `minimum_calls` was 0.
    #[error("minimum_calls must be at least 1, got {0}")]
    MinimumCalls(u32),
    /// `half_open_probes` was 0.
    #[error("half_open_probes must be at least 1, got {0}")]
    HalfOpenProbes(u32),
    /// `success_threshold` was 0.
    #[error("success_threshold must be at least 1, got {0}")]
    SuccessThreshold(u32),
}

/// Checked circuit breaker settings; see [`CircuitBreakerConfig`] for what each one means.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerPolicy {
    consecutive_failures: u32,
    failure_ratio: f64,
    window: Duration,
    minimum_calls: u32,
    open_duration: Duration,
    half_open_probes: u32,
    success_threshold: u32,
}

impl Default for CircuitBreakerPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            failure_ratio: DEFAULT_FAILURE_RATIO,
            window: DEFAULT_WINDOW,
            minimum_calls: DEFAULT_MINIMUM_CALLS,
            open_duration: DEFAULT_OPEN_DURATION,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
        }
    }
}

impl CircuitBreakerPolicy {
    /// Failures in a row that open the breaker; `0` when that trigger is off.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Failure ratio over the window that opens the breaker; `0` when that trigger is off.
    pub fn failure_ratio(&self) -> f64 {
        self.failure_ratio
    }

    /// The sliding window for the failure ratio.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Calls the window must hold before the ratio counts.
    pub fn minimum_calls(&self) -> u32 {
        self.minimum_calls
    }

    /// How long the breaker stays open.
    pub fn open_duration(&self) -> Duration {
        self.open_duration
    }

    /// Probe calls allowed at the same time while half-open.
    pub fn half_open_probes(&self) -> u32 {
        self.half_open_probes
    }

    /// Successful probes needed to close.
    pub fn success_threshold(&self) -> u32 {
        self.success_threshold
    }

    fn bucket_width_nanos(&self) -> u128 {
        (self.window.as_nanos() / WINDOW_BUCKETS as u128).max(1)
    }

    /// How long a key must be left alone before the sweep may forget it (see `Entry::is_idle`).
    fn idle_after(&self) -> Duration {
        self.open_duration.saturating_add(self.window)
    }
}

/// A call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open, retry after {}", humantime::format_duration(*.retry_after))]
pub struct Rejected {
    /// When to try again: the rest of `open_duration` if the breaker is open, or the whole
    /// `open_duration` if it is half-open with every probe slot taken (the probes' outcome is
    /// unknown; if one fails the breaker reopens for that long).
    pub retry_after: Duration,
    /// [`State::Open`] or [`State::HalfOpen`].
    pub state: State,
}

type TransitionHook<K> = Box<dyn Fn(&K, State, State) + Send + Sync>;

/// A state change: (from, to).
type Transition = (State, State);

/// What a permit needs to know about the call it was issued for.
#[derive(Debug, Clone, Copy)]
struct Grant {
    generation: u64,
    probe: bool,
}

/// Circuit breakers for any number of keys, sharing one [`CircuitBreakerPolicy`].
///
/// Cloning is cheap and clones share state; it is `Send + Sync` when `K` is. Keys are independent:
/// a failing key never affects another.
///
/// ```
/// use gantry_runtime::circuit_breaker::{CircuitBreaker, CircuitBreakerConfig, State};
///
/// let policy = CircuitBreakerConfig {
///     consecutive_failures: 2,
///     ..CircuitBreakerConfig::default()
/// }
/// .validate()?;
/// let breaker = CircuitBreaker::new(policy);
///
/// for _ in 0..2 {
///     let permit = breaker.acquire(&"billing.example.com").expect("closed breakers let calls through");
///     // ... make the call, then report how it went:
///     permit.failure();
/// }
/// assert_eq!(breaker.state(&"billing.example.com"), State::Open);
/// let rejected = breaker.acquire(&"billing.example.com").unwrap_err();
/// assert!(rejected.retry_after <= breaker.policy().open_duration());
///
/// // Other keys are unaffected.
/// assert!(breaker.acquire(&"search.example.com").is_ok());
/// # Ok::<(), gantry_runtime::circuit_breaker::CircuitBreakerConfigError>(())
/// ```
pub struct CircuitBreaker<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    policy: CircuitBreakerPolicy,
    table: Mutex<Table<K>>,
    hook: Option<TransitionHook<K>>,
}

impl<K> Clone for CircuitBreaker<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for CircuitBreaker<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("policy", &self.inner.policy)
            .field("keys", &self.inner.lock().entries.len())
            .finish_non_exhaustive()
    }
}

impl<K> Inner<K> {
    fn lock(&self) -> MutexGuard<'_, Table<K>> {
        // Every critical section leaves the table consistent, so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Hash + Eq + Clone> CircuitBreaker<K> {
    /// Breakers for every key, all starting closed.
    pub fn new(policy: CircuitBreakerPolicy) -> Self {
        Self::build(policy, None)
    }

    /// Like [`new`](Self::new), calling `hook(key, from, to)` after every state change (for logs
    /// and metrics). The hook runs outside the breaker's lock, so it may call the breaker. Keys
    /// forgotten by the idle sweep or unknown to the breaker report no transition.
    pub fn with_transition_hook(
        policy: CircuitBreakerPolicy,
        hook: impl Fn(&K, State, State) + Send + Sync + 'static,
    ) -> Self {
        Self::build(policy, Some(Box::new(hook)))
    }

    fn build(policy: CircuitBreakerPolicy, hook: Option<TransitionHook<K>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                policy,
                table: Mutex::new(Table {
                    entries: HashMap::new(),
                    sweep_at: MIN_SWEEP_LEN,
                }),
                hook,
            }),
        }
    }

    /// The policy every key follows.
    pub fn policy(&self) -> &CircuitBreakerPolicy {
        &self.inner.policy
    }

    /// Asks to make one call for `key`: a [`Permit`] to report the outcome on, or [`Rejected`]
    /// while the breaker is open (or half-open with every probe slot taken).
    ///
    /// The first call after `open_duration` moves an open breaker to half-open and is a probe.
    pub fn acquire(&self, key: &K) -> Result<Permit<K>, Rejected> {
        let now = Instant::now();
        let policy = &self.inner.policy;
        let (result, transition) = {
            let mut table = self.inner.lock();
            match table.entries.get_mut(key) {
                Some(entry) => entry.acquire(policy, now),
                None => {
                    table.sweep_if_grown(policy, now);
                    let mut entry = Entry::new(now);
                    let outcome = entry.acquire(policy, now);
                    table.entries.insert(key.clone(), entry);
                    outcome
                }
            }
        };
        self.notify(key, transition);
        result.map(|grant| Permit {
            breaker: self.clone(),
            key: key.clone(),
            generation: grant.generation,
            probe: grant.probe,
            done: false,
        })
    }

    /// The state of `key`'s breaker ([`State::Closed`] for a key never seen or forgotten).
    ///
    /// This only looks: an open breaker whose `open_duration` has passed still reports
    /// [`State::Open`] until the next [`acquire`](Self::acquire) turns it half-open.
    pub fn state(&self, key: &K) -> State {
        self.inner
            .lock()
            .entries
            .get(key)
            .map_or(State::Closed, Entry::state)
    }

    /// Closes `key`'s breaker and forgets its history. Permits issued before the reset still
    /// release cleanly but their outcomes are ignored.
    pub fn reset(&self, key: &K) {
        let now = Instant::now();
        let transition = {
            let mut table = self.inner.lock();
            table
                .entries
                .get_mut(key)
                .and_then(|entry| entry.transition(Phase::Closed, now))
        };
        self.notify(key, transition);
    }

    /// Every key the breaker currently tracks, with its state (for metrics). Keys never seen or
    /// already forgotten are closed and not listed.
    pub fn snapshot(&self) -> Vec<(K, State)> {
        self.inner
            .lock()
            .entries
            .iter()
            .map(|(key, entry)| (key.clone(), entry.state()))
            .collect()
    }

    fn complete(&self, key: &K, generation: u64, probe: bool, outcome: Option<Outcome>) {
        let now = Instant::now();
        let transition = {
            let mut table = self.inner.lock();
            table.entries.get_mut(key).and_then(|entry| {
                entry.complete(&self.inner.policy, now, generation, probe, outcome)
            })
        };
        self.notify(key, transition);
    }

    fn notify(&self, key: &K, transition: Option<Transition>) {
        if let (Some(hook), Some((from, to))) = (&self.inner.hook, transition) {
            hook(key, from, to);
        }
    }
}

/// Leave to make one call; report how it went with [`success`](Self::success) or
/// [`failure`](Self::failure).
///
/// Dropping a permit without reporting (say, the call was cancelled) records nothing and frees its
/// probe slot if it was a probe.
#[must_use = "report the call's outcome with `success()` or `failure()`"]
pub struct Permit<K: Hash + Eq + Clone> {
    breaker: CircuitBreaker<K>,
    key: K,
    generation: u64,
    probe: bool,
    done: bool,
}

impl<K: Hash + Eq + Clone> Permit<K> {
    /// The call succeeded.
    pub fn success(mut self) {
        self.finish(Some(Outcome::Success));
    }

    /// The call failed.
    pub fn failure(mut self) {
        self.finish(Some(Outcome::Failure));
    }

    /// The key this permit is for.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Whether this is a half-open probe, whose outcome decides whether the breaker closes.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    fn finish(&mut self, outcome: Option<Outcome>) {
        if !self.done {
            self.done = true;
            self.breaker
                .complete(&self.key, self.generation, self.probe, outcome);
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for Permit<K> {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl<K: Hash + Eq + Clone> fmt::Debug for Permit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("generation", &self.generation)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
}

struct Table<K> {
    entries: HashMap<K, Entry>,
    /// Sweep idle keys before inserting once the map holds this many.
    sweep_at: usize,
}

impl<K: Hash + Eq> Table<K> {
    /// Forgets idle keys once the map has doubled since the last sweep, so the cost is amortised
    /// O(1) per new key and the map stays within twice the number of keys in use.
    fn sweep_if_grown(&mut self, policy: &CircuitBreakerPolicy, now: Instant) {
        if self.entries.len() < self.sweep_at {
            return;
        }
        self.entries.retain(|_, entry| !entry.is_idle(policy, now));
        self.sweep_at = self.entries.len().saturating_mul(2).max(MIN_SWEEP_LEN);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { since: Instant },
    HalfOpen { probes: u32, successes: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    phase: Phase,
    /// Bumped on every state change; permits carry the generation they were issued in.
    generation: u64,
    consecutive_failures: u32,
    window: Window,
    /// Permits for this key not yet finished, from any generation. The entry is never swept while
    /// any are out, so a finishing permit always finds its entry.
    outstanding: usize,
    last_activity: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            phase: Phase::Closed,
            generation: 0,
            consecutive_failures: 0,
            window: Window::new(now),
            outstanding: 0,
            last_activity: now,
        }
    }

    fn state(&self) -> State {
        match self.phase {
            Phase::Closed => State::Closed,
            Phase::Open { .. } => State::Open,
            Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Returns the permit's grant or the rejection, and the state change it caused, if any.
    fn acquire(
        &mut self,
        policy: &CircuitBreakerPolicy,
        now: Instant,
    ) -> (Result<Grant, Rejected>, Option<Transition>) {
        let mut transition = None;
        if let Phase::Open { since } = self.phase {
            let elapsed = now.saturating_duration_since(since);
            if elapsed < policy.open_duration {
                let rejected = Rejected {
                    retry_after: policy.open_duration - elapsed,
                    state: State::Open,
                };
                return (Err(rejected), None);
            }
            transition = self.transition(
                Phase::HalfOpen {
                    probes: 0,
                    successes: 0,
                },
                now,
            );
        }
        let probe = match &mut self.phase {
            Phase::Closed => false,
            Phase::HalfOpen { probes, .. } if *probes < policy.half_open_probes => {
                *probes += 1;
                true
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => {
                let rejected = Rejected {
                    retry_after: policy.open_duration,
                    state: self.state(),
                };
                return (Err(rejected), transition);
            }
        };
        self.outstanding = self.outstanding.saturating_add(1);
        self.last_activity = now;
        let grant = Grant {
            generation: self.generation,
            probe,
        };
        (Ok(grant), transition)
    }

    /// Finishes a permit; `outcome` is `None` when it was dropped unreported.
    fn complete(
        &mut self,
        policy: &CircuitBreakerPolicy,
        now: Instant,
        generation: u64,
        probe: bool,
        outcome: Option<Outcome>,
    ) -> Option<Transition> {
        self.outstanding = self.outstanding.saturating_sub(1);
        if generation != self.generation {
            // Issued before the last state change: it must not count in the new state.
            return None;
        }
        self.last_activity = now;
        match (&mut self.phase, outcome) {
            (Phase::Closed, Some(outcome)) => {
                let failed = outcome == Outcome::Failure;
                self.window.record(policy, now, failed);
                self.consecutive_failures = if failed {
                    self.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                if self.should_trip(policy, now) {
                    self.transition(Phase::Open { since: now }, now)
                } else {
                    None
                }
            }
            (Phase::HalfOpen { probes, successes }, outcome) if probe => {
                *probes = probes.saturating_sub(1);
                match outcome {
                    None => None,
                    Some(Outcome::Failure) => self.transition(Phase::Open { since: now }, now),
                    Some(Outcome::Success) => {
                        *successes = successes.saturating_add(1);
                        if *successes >= policy.success_threshold {
                            self.transition(Phase::Closed, now)
                        } else {
                            None
                        }
                    }
                }
            }
            _ => None,
        }
    }

    fn should_trip(&self, policy: &CircuitBreakerPolicy, now: Instant) -> bool {
        if policy.consecutive_failures > 0
            && self.consecutive_failures >= policy.consecutive_failures
        {
            return true;
        }
        if policy.failure_ratio > 0.0 {
            let (calls, failures) = self.window.totals(policy, now);
            if calls >= u64::from(policy.minimum_calls)
                && failures as f64 >= policy.failure_ratio * calls as f64
            {
                return true;
            }
        }
        false
    }

    /// Moves to `phase` with a new generation and a clean history. Returns the state change, or
    /// `None` if the state stayed the same (a reset of a closed breaker).
    fn transition(&mut self, phase: Phase, now: Instant) -> Option<Transition> {
        let from = self.state();
        self.phase = phase;
        self.generation = self.generation.wrapping_add(1);
        self.consecutive_failures = 0;
        self.window = Window::new(now);
        self.last_activity = now;
        let to = self.state();
        (from != to).then_some((from, to))
    }

    /// Whether the sweep may forget this key without changing behaviour much: nothing in flight,
    /// and either closed with an empty window (only a stale consecutive-failure count is lost) or
    /// untouched for `open_duration + window` (the next call then starts closed instead of as a
    /// probe).
    fn is_idle(&self, policy: &CircuitBreakerPolicy, now: Instant) -> bool {
        if self.outstanding > 0 {
            return false;
        }
        match self.phase {
            Phase::Closed => self.window.totals(policy, now).0 == 0,
            Phase::Open { .. } | Phase::HalfOpen { .. } => {
                now.saturating_duration_since(self.last_activity) >= policy.idle_after()
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-width slice of time since the window's origin this bucket counts.
    index: u64,
    calls: u32,
    failures: u32,
}

/// A sliding window of call outcomes as a fixed ring of time buckets: bounded memory at any call
/// rate.
#[derive(Debug, Clone)]
struct Window {
    origin: Instant,
    buckets: [Bucket; WINDOW_BUCKETS],
}

impl Window {
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            buckets: [Bucket::default(); WINDOW_BUCKETS],
        }
    }

    fn index(&self, policy: &CircuitBreakerPolicy, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / policy.bucket_width_nanos()).unwrap_or(u64::MAX)
    }

    fn record(&mut self, policy: &CircuitBreakerPolicy, now: Instant, failed: bool) {
        let index = self.index(policy, now);
        let bucket = &mut self.buckets[(index % WINDOW_BUCKETS as u64) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        if failed {
            bucket.failures = bucket.failures.saturating_add(1);
        }
    }

    /// (calls, failures) in the buckets covering the last `window` up to `now`.
    fn totals(&self, policy: &CircuitBreakerPolicy, now: Instant) -> (u64, u64) {
        let current = self.index(policy, now);
        self.buckets
            .iter()
            .filter(|b| b.index <= current && current - b.index < WINDOW_BUCKETS as u64)
            .fold((0, 0), |(calls, failures), b| {
                (calls + u64::from(b.calls), failures + u64::from(b.failures))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::time::advance;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            consecutive_failures: 3,
            failure_ratio: 0.0,
            window: secs(60),
            minimum_calls: 10,
            open_duration: secs(30),
            half_open_probes: 1,
            success_threshold: 1,
        }
    }

    fn breaker(config: CircuitBreakerConfig) -> CircuitBreaker<&'static str> {
        CircuitBreaker::new(config.validate().unwrap())
    }

    fn fail(b: &CircuitBreaker<&'static str>, key: &'static str, times: usize) {
        for _ in 0..times {
            b.acquire(&key).unwrap().failure();
        }
    }

    fn succeed(b: &CircuitBreaker<&'static str>, key: &'static str, times: usize) {
        for _ in 0..times {
            b.acquire(&key).unwrap().success();
        }
    }

    fn trip(b: &CircuitBreaker<&'static str>, key: &'static str) {
        fail(b, key, 3);
        assert_eq!(b.state(&key), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures() {
        let b = breaker(config());
        fail(&b, "a", 2);
        assert_eq!(b.state(&"a"), State::Closed);
        succeed(&b, "a", 1);
        fail(&b, "a", 2);
        assert_eq!(b.state(&"a"), State::Closed, "a success resets the count");
        fail(&b, "a", 1);
        assert_eq!(b.state(&"a"), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_ratio_only_after_minimum_calls() {
        let b = breaker(CircuitBreakerConfig {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            minimum_calls: 10,
            ..config()
        });
        // 9 calls, 8 failures: far over the ratio but under minimum_calls.
        succeed(&b, "a", 1);
        fail(&b, "a", 8);
        assert_eq!(b.state(&"a"), State::Closed);
        // The tenth call makes the window count; 9/10 >= 0.5.
        fail(&b, "a", 1);
        assert_eq!(b.state(&"a"), State::Open);

        // Under the ratio it stays closed however many calls there are.
        succeed(&b, "b", 6);
        fail(&b, "b", 5);
        assert_eq!(b.state(&"b"), State::Closed);
        fail(&b, "b", 1);
        assert_eq!(b.state(&"b"), State::Open, "6/12 reaches 0.5");
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_while_open_with_retry_after() {
        let b = breaker(config());
        trip(&b, "a");
        let rejected = b.acquire(&"a").unwrap_err();
        assert_eq!(
            rejected,
            Rejected {
                retry_after: secs(30),
                state: State::Open
            }
        );
        assert_eq!(rejected.to_string(), "circuit open, retry after 30s");
        advance(Duration::from_millis(12_500)).await;
        assert_eq!(
            b.acquire(&"a").unwrap_err().retry_after,
            Duration::from_millis(17_500)
        );
        advance(Duration::from_millis(17_499)).await;
        assert_eq!(
            b.acquire(&"a").unwrap_err().retry_after,
            Duration::from_millis(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn moves_to_half_open_after_open_duration() {
        let b = breaker(config());
        trip(&b, "a");
        advance(secs(30)).await;
        assert_eq!(b.state(&"a"), State::Open, "state() does not move it");
        let probe = b.acquire(&"a").unwrap();
        assert!(probe.is_probe());
        assert_eq!(b.state(&"a"), State::HalfOpen);
        probe.success();
        assert_eq!(b.state(&"a"), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_allows_only_the_configured_probes() {
        let b = breaker(CircuitBreakerConfig {
            half_open_probes: 2,
            success_threshold: 3,
            ..config()
        });
        trip(&b, "a");
        advance(secs(30)).await;
        let first = b.acquire(&"a").unwrap();
        let second = b.acquire(&"a").unwrap();
        let rejected = b.acquire(&"a").unwrap_err();
        assert_eq!(rejected.state, State::HalfOpen);
        assert_eq!(rejected.retry_after, secs(30));

        // Dropping a probe unreported frees its slot and records nothing.
        drop(first);
        let third = b.acquire(&"a").unwrap();
        assert!(b.acquire(&"a").is_err());
        second.success();
        third.success();
        assert_eq!(b.state(&"a"), State::HalfOpen, "2 of 3 successes");
        b.acquire(&"a").unwrap().success();
        assert_eq!(b.state(&"a"), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_a_fresh_open_duration() {
        let b = breaker(CircuitBreakerConfig {
            success_threshold: 2,
            ..config()
        });
        trip(&b, "a");
        advance(secs(30)).await;
        b.acquire(&"a").unwrap().success();
        assert_eq!(b.state(&"a"), State::HalfOpen);
        advance(secs(5)).await;
        b.acquire(&"a").unwrap().failure();
        assert_eq!(b.state(&"a"), State::Open);
        assert_eq!(b.acquire(&"a").unwrap_err().retry_after, secs(30));
        advance(secs(30)).await;
        // The successes before the reopen are forgotten: two more are needed.
        b.acquire(&"a").unwrap().success();
        assert_eq!(b.state(&"a"), State::HalfOpen);
        b.acquire(&"a").unwrap().success();
        assert_eq!(b.state(&"a"), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_permits_do_not_touch_the_new_generation() {
        let b = breaker(CircuitBreakerConfig {
            half_open_probes: 1,
            ..config()
        });
        let slow_success = b.acquire(&"a").unwrap();
        let slow_failure = b.acquire(&"a").unwrap();
        let slow_dropped = b.acquire(&"a").unwrap();
        trip(&b, "a");
        advance(secs(30)).await;
        let probe = b.acquire(&"a").unwrap();

        // Closed-era permits finishing now neither free the probe slot nor close or reopen.
        slow_success.success();
        drop(slow_dropped);
        assert!(b.acquire(&"a").is_err(), "probe slot still taken");
        slow_failure.failure();
        assert_eq!(b.state(&"a"), State::HalfOpen);

        probe.success();
        assert_eq!(b.state(&"a"), State::Closed);

        // A probe from a half-open period that ended is stale too.
        trip(&b, "a");
        advance(secs(30)).await;
        let old_probe = b.acquire(&"a").unwrap();
        b.reset(&"a");
        assert_eq!(b.state(&"a"), State::Closed);
        old_probe.failure();
        assert_eq!(b.state(&"a"), State::Closed);
        fail(&b, "a", 2);
        assert_eq!(
            b.state(&"a"),
            State::Closed,
            "the stale failure did not count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_slide_out_of_the_window() {
        let b = breaker(CircuitBreakerConfig {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            window: secs(60),
            minimum_calls: 4,
            ..config()
        });
        fail(&b, "a", 3);
        advance(secs(61)).await;
        // Had the 3 old failures counted, 3/4 would open it.
        succeed(&b, "a", 2);
        fail(&b, "a", 1);
        assert_eq!(
            b.state(&"a"),
            State::Closed,
            "1 failure in 3 calls, window short"
        );
        succeed(&b, "a", 1);
        assert_eq!(b.state(&"a"), State::Closed, "1/4 is under 0.5");
        fail(&b, "a", 1);
        assert_eq!(b.state(&"a"), State::Closed, "2/5 is under 0.5");
        fail(&b, "a", 1);
        assert_eq!(b.state(&"a"), State::Open, "3/6 reaches 0.5");
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides_in_bucket_steps() {
        let b = breaker(CircuitBreakerConfig {
            consecutive_failures: 0,
            failure_ratio: 1.0,
            window: secs(10),
            minimum_calls: 2,
            ..config()
        });
        fail(&b, "a", 1);
        advance(secs(9)).await;
        fail(&b, "a", 1);
        assert_eq!(
            b.state(&"a"),
            State::Open,
            "both failures within the window"
        );

        fail(&b, "b", 1);
        advance(secs(10)).await;
        fail(&b, "b", 1);
        assert_eq!(b.state(&"b"), State::Closed, "the first failure slid out");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent() {
        let b = breaker(config());
        trip(&b, "a");
        fail(&b, "b", 2);
        assert_eq!(b.state(&"b"), State::Closed);
        assert!(b.acquire(&"b").is_ok());
        assert!(b.acquire(&"a").is_err());
        let mut snapshot = b.snapshot();
        snapshot.sort_by_key(|(key, _)| *key);
        assert_eq!(snapshot, vec![("a", State::Open), ("b", State::Closed)]);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_closes_and_forgets() {
        let b = breaker(config());
        trip(&b, "a");
        b.reset(&"a");
        assert_eq!(b.state(&"a"), State::Closed);
        fail(&b, "a", 2);
        assert_eq!(b.state(&"a"), State::Closed);
        b.reset(&"unknown");
        assert_eq!(b.state(&"unknown"), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_forgets_idle_keys_and_keeps_working_state() {
        let b: CircuitBreaker<String> = CircuitBreaker::new(config().validate().unwrap());
        let len = |b: &CircuitBreaker<String>| b.inner.lock().entries.len();
        let touch = |b: &CircuitBreaker<String>, keys: std::ops::Range<usize>| {
            for i in keys {
                b.acquire(&format!("key-{i}")).unwrap().success();
            }
        };
        let (open, in_flight, failing) = (
            "open".to_owned(),
            "in-flight".to_owned(),
            "failing".to_owned(),
        );

        // t=0: an open key, a call in flight, and 100 keys with one success each.
        for _ in 0..3 {
            b.acquire(&open).unwrap().failure();
        }
        let in_flight_permit = b.acquire(&in_flight).unwrap();
        touch(&b, 0..100);
        assert_eq!(len(&b), 102, "nothing idle yet at the first sweep");

        // t=61s: the successes have slid out of the window; new keys make the map double.
        advance(secs(61)).await;
        b.acquire(&failing).unwrap().failure();
        b.acquire(&failing).unwrap().failure();
        touch(&b, 100..130);
        assert!(len(&b) < 64, "idle keys swept, {} left", len(&b));

        // The keys with state kept it.
        assert_eq!(b.state(&open), State::Open);
        let probe = b.acquire(&open).unwrap();
        assert!(
            probe.is_probe(),
            "still open, so the call after open_duration is a probe"
        );
        drop(probe);
        b.acquire(&failing).unwrap().failure();
        assert_eq!(b.state(&failing), State::Open, "its two failures were kept");
        in_flight_permit.failure();
        assert_eq!(b.inner.lock().entries[&in_flight].consecutive_failures, 1);

        // t=152s: keys untouched for open_duration + window are forgotten, open ones included.
        advance(secs(91)).await;
        touch(&b, 130..230);
        assert_eq!(b.state(&open), State::Closed);
        assert_eq!(b.state(&failing), State::Closed);
        assert_eq!(len(&b), 100, "only the keys touched just now are left");
    }

    #[tokio::test(start_paused = true)]
    async fn transition_hook_sees_every_change() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let b = CircuitBreaker::with_transition_hook(
            config().validate().unwrap(),
            move |key: &&'static str, from, to| sink.lock().unwrap().push((*key, from, to)),
        );
        trip(&b, "a");
        advance(secs(30)).await;
        b.acquire(&"a").unwrap().failure();
        advance(secs(30)).await;
        b.acquire(&"a").unwrap().success();
        trip(&b, "a");
        b.reset(&"a");
        b.reset(&"a");
        use State::{Closed, HalfOpen, Open};
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("a", Closed, Open),
                ("a", Open, HalfOpen),
                ("a", HalfOpen, Open),
                ("a", Open, HalfOpen),
                ("a", HalfOpen, Closed),
                ("a", Closed, Open),
                ("a", Open, Closed),
            ]
        );
    }

    #[test]
    fn works_across_threads_without_a_runtime() {
        let b = breaker(CircuitBreakerConfig {
            consecutive_failures: 0,
            ..config()
        });
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        b.acquire(&"shared").unwrap().success();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(b.state(&"shared"), State::Closed);
        assert_eq!(b.inner.lock().entries[&"shared"].outstanding, 0);
    }

    /// Checks a TOML config: the policy's fields as a config, or the error message.
    fn check_config(toml: &str, expected: Result<CircuitBreakerConfig, &str>) {
        let actual = toml::from_str::<CircuitBreakerConfig>(toml)
            .map_err(|e| e.message().to_owned())
            .and_then(|c| c.validate().map(|_| c).map_err(|e| e.to_string()));
        assert_eq!(actual, expected.map_err(str::to_owned), "config {toml:?}");
    }

    #[test]
    fn config_parses_and_validates() {
        check_config("", Ok(CircuitBreakerConfig::default()));
        assert_eq!(
            CircuitBreakerConfig::default().validate(),
            Ok(CircuitBreakerPolicy::default())
        );
        check_config(
            r#"
            consecutive_failures = 0
            failure_ratio = 0.25
            window = "2m"
            minimum_calls = 50
            open_duration = "10s"
            half_open_probes = 3
            success_threshold = 5
            "#,
            Ok(CircuitBreakerConfig {
                consecutive_failures: 0,
                failure_ratio: 0.25,
                window: secs(120),
                minimum_calls: 50,
                open_duration: secs(10),
                half_open_probes: 3,
                success_threshold: 5,
            }),
        );
        check_config(
            "failure_ratio = 1.5",
            Err("failure_ratio must be between 0 and 1, got 1.5"),
        );
        check_config(
            "failure_ratio = nan",
            Err("failure_ratio must be between 0 and 1, got NaN"),
        );
        check_config(
            r#"window = "0s""#,
            Err("window must be greater than zero, got 0ns"),
        );
        check_config(
            "minimum_calls = 0",
            Err("minimum_calls must be at least 1, got 0"),
        );
        check_config(
            "half_open_probes = 0",
            Err("half_open_probes must be at least 1, got 0"),
        );
        check_config(
            "success_threshold = 0",
            Err("success_threshold must be at least 1, got 0"),
        );
        assert!(toml::from_str::<CircuitBreakerConfig>("failures = 3").is_err());
        assert!(toml::from_str::<CircuitBreakerConfig>(r#"window = "a while""#).is_err());
    }

    #[test]
    fn extreme_durations_do_not_panic() {
        let b = breaker(CircuitBreakerConfig {
            failure_ratio: 0.5,
            minimum_calls: 1,
            window: Duration::MAX,
            open_duration: Duration::MAX,
            ..config()
        });
        fail(&b, "a", 1);
        // Real time passes in this test, so allow for a little of it.
        let retry_after = b.acquire(&"a").unwrap_err().retry_after;
        assert!(retry_after > Duration::MAX - secs(60), "{retry_after:?}");
        let tiny = breaker(CircuitBreakerConfig {
            failure_ratio: 0.5,
            window: Duration::from_nanos(1),
            open_duration: Duration::ZERO,
            ..config()
        });
        trip(&tiny, "a");
        assert!(tiny.acquire(&"a").unwrap().is_probe());
    }

    // Property tests: random operation sequences against a small reference model.

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(usize),
        Success(usize),
        Failure(usize),
        Drop(usize),
        Advance(u64),
        Reset(usize),
    }

    fn op(keys: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..keys).prop_map(Op::Acquire),
            3 => any::<usize>().prop_map(Op::Success),
            3 => any::<usize>().prop_map(Op::Failure),
            1 => any::<usize>().prop_map(Op::Drop),
            2 => (0u64..40_000).prop_map(Op::Advance),
            1 => (0..keys).prop_map(Op::Reset),
        ]
    }

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// The reference model for one key: consecutive failures only (no ratio, no sweep).
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum ModelPhase {
        Closed { failures: u32 },
        Open { since_ms: u64 },
        HalfOpen { probes: u32, successes: u32 },
    }

    impl ModelPhase {
        fn state(self) -> State {
            match self {
                ModelPhase::Closed { .. } => State::Closed,
                ModelPhase::Open { .. } => State::Open,
                ModelPhase::HalfOpen { .. } => State::HalfOpen,
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    struct ModelKey {
        phase: ModelPhase,
        epoch: u64,
    }

    struct ModelPermit {
        key: usize,
        epoch: u64,
        probe: bool,
    }

    const KEYS: [&str; 3] = ["a", "b", "c"];

    fn legal(from: State, to: State) -> bool {
        matches!(
            (from, to),
            (State::Closed, State::Open)
                | (State::Open, State::HalfOpen)
                | (State::HalfOpen, State::Closed)
                | (State::HalfOpen, State::Open)
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_the_reference_model(
            threshold in 1u32..4,
            probes in 1u32..4,
            successes_needed in 1u32..4,
            ops in prop::collection::vec(op(KEYS.len()), 1..200),
        ) {
            let open_ms = 30_000u64;
            let policy = CircuitBreakerConfig {
                consecutive_failures: threshold,
                failure_ratio: 0.0,
                open_duration: Duration::from_millis(open_ms),
                half_open_probes: probes,
                success_threshold: successes_needed,
                ..config()
            }
            .validate()
            .unwrap();
            let transitions = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&transitions);
            let b = CircuitBreaker::with_transition_hook(policy, move |k: &&'static str, from, to| {
                sink.lock().unwrap().push((*k, from, to));
            });
            let mut model = [ModelKey { phase: ModelPhase::Closed { failures: 0 }, epoch: 0 }; 3];
            let mut permits: Vec<(Permit<&'static str>, ModelPermit)> = Vec::new();
            let mut now_ms = 0u64;

            let result: Result<(), TestCaseError> = paused_runtime().block_on(async {
                for op in ops {
                    let mut is_reset = false;
                    match op {
                        Op::Acquire(k) => {
                            let m = &mut model[k];
                            if let ModelPhase::Open { since_ms } = m.phase {
                                if now_ms - since_ms >= open_ms {
                                    m.phase = ModelPhase::HalfOpen { probes: 0, successes: 0 };
                                    m.epoch += 1;
                                }
                            }
                            let expected = match &mut m.phase {
                                ModelPhase::Closed { .. } => Ok(false),
                                ModelPhase::HalfOpen { probes: p, .. } if *p < probes => {
                                    *p += 1;
                                    Ok(true)
                                }
                                ModelPhase::HalfOpen { .. } => Err((State::HalfOpen, open_ms)),
                                ModelPhase::Open { since_ms } => {
                                    Err((State::Open, open_ms - (now_ms - *since_ms)))
                                }
                            };
                            match (b.acquire(&KEYS[k]), expected) {
                                (Ok(permit), Ok(probe)) => {
                                    prop_assert_eq!(permit.is_probe(), probe);
                                    permits.push((permit, ModelPermit { key: k, epoch: m.epoch, probe }));
                                }
                                (Err(rejected), Err((state, after_ms))) => {
                                    prop_assert_eq!(rejected.state, state);
                                    prop_assert_eq!(rejected.retry_after, Duration::from_millis(after_ms));
                                }
                                (actual, expected) => {
                                    prop_assert!(false, "acquire: {actual:?}, model {expected:?}");
                                }
                            }
                        }
                        Op::Success(i) | Op::Failure(i) | Op::Drop(i) => {
                            if permits.is_empty() {
                                continue;
                            }
                            let (permit, mp) = permits.swap_remove(i % permits.len());
                            let m = &mut model[mp.key];
                            let outcome = match op {
                                Op::Success(_) => Some(true),
                                Op::Failure(_) => Some(false),
                                _ => None,
                            };
                            match outcome {
                                Some(true) => permit.success(),
                                Some(false) => permit.failure(),
                                None => drop(permit),
                            }
                            if mp.epoch == m.epoch {
                                match (&mut m.phase, outcome) {
                                    (ModelPhase::Closed { failures }, Some(true)) => *failures = 0,
                                    (ModelPhase::Closed { failures }, Some(false)) => {
                                        *failures += 1;
                                        if *failures >= threshold {
                                            m.phase = ModelPhase::Open { since_ms: now_ms };
                                            m.epoch += 1;
                                        }
                                    }
                                    (ModelPhase::HalfOpen { probes: p, successes }, outcome) if mp.probe => {
                                        *p -= 1;
                                        match outcome {
                                            Some(true) => {
                                                *successes += 1;
                                                if *successes >= successes_needed {
                                                    m.phase = ModelPhase::Closed { failures: 0 };
                                                    m.epoch += 1;
                                                }
                                            }
                                            Some(false) => {
                                                m.phase = ModelPhase::Open { since_ms: now_ms };
                                                m.epoch += 1;
                                            }
                                            None => {}
                                        }
                                    }
                                    _ => {}
                                }
                            }
                        }
                        Op::Advance(ms) => {
                            advance(Duration::from_millis(ms)).await;
                            now_ms += ms;
                        }
                        Op::Reset(k) => {
                            is_reset = true;
                            b.reset(&KEYS[k]);
                            model[k] = ModelKey {
                                phase: ModelPhase::Closed { failures: 0 },
                                epoch: model[k].epoch + 1,
                            };
                        }
                    }

                    for (k, m) in model.iter().enumerate() {
                        prop_assert_eq!(b.state(&KEYS[k]), m.phase.state(), "key {}", KEYS[k]);
                        let outstanding_probes = permits
                            .iter()
                            .filter(|(p, mp)| mp.key == k && mp.epoch == m.epoch && p.is_probe())
                            .count();
                        prop_assert!(outstanding_probes <= probes as usize);
                    }
                    for (_, from, to) in transitions.lock().unwrap().drain(..) {
                        prop_assert!(
                            legal(from, to) || (is_reset && to == State::Closed),
                            "illegal transition {from} -> {to}"
                        );
                    }
                }
                Ok(())
            });
            result?;
        }

        #[test]
        fn invariants_hold_with_ratio_and_sweeping(
            ratio in 0.1f64..=1.0,
            minimum_calls in 1u32..10,
            probes in 1u32..4,
            ops in prop::collection::vec(op(100), 1..400),
        ) {
            let policy = CircuitBreakerConfig {
                consecutive_failures: 4,
                failure_ratio: ratio,
                window: secs(20),
                minimum_calls,
                open_duration: secs(10),
                half_open_probes: probes,
                success_threshold: 2,
            }
            .validate()
            .unwrap();
            let transitions = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&transitions);
            let b = CircuitBreaker::with_transition_hook(policy, move |k: &usize, from, to| {
                sink.lock().unwrap().push((*k, from, to));
            });
            let mut permits: Vec<Permit<usize>> = Vec::new();

            let result: Result<(), TestCaseError> = paused_runtime().block_on(async {
                for op in ops {
                    let mut reset_key = None;
                    match op {
                        Op::Acquire(k) => {
                            let before = b.state(&k);
                            match b.acquire(&k) {
                                Ok(permit) => {
                                    prop_assert_eq!(permit.is_probe(), b.state(&k) == State::HalfOpen);
                                    permits.push(permit);
                                }
                                Err(rejected) => {
                                    prop_assert_ne!(before, State::Closed, "rejected while closed");
                                    prop_assert_ne!(rejected.state, State::Closed);
                                    prop_assert!(rejected.retry_after <= secs(10));
                                }
                            }
                        }
                        Op::Success(i) | Op::Failure(i) | Op::Drop(i) => {
                            if permits.is_empty() {
                                continue;
                            }
                            let permit = permits.swap_remove(i % permits.len());
                            match op {
                                Op::Success(_) => permit.success(),
                                Op::Failure(_) => permit.failure(),
                                _ => drop(permit),
                            }
                        }
                        Op::Advance(ms) => advance(Duration::from_millis(ms)).await,
                        Op::Reset(k) => {
                            reset_key = Some(k);
                            b.reset(&k);
                        }
                    }

                    // Never more probes outstanding than allowed, counting only the current
                    // half-open period's probes (the entry's own accounting).
                    let table = b.inner.lock();
                    for (k, entry) in &table.entries {
                        if let Phase::HalfOpen { probes: p, .. } = entry.phase {
                            prop_assert!(p <= probes);
                        }
                        let live_probes = permits
                            .iter()
                            .filter(|p| p.key == *k && p.probe && p.generation == entry.generation)
                            .count();
                        prop_assert!(live_probes <= probes as usize);
                    }
                    let outstanding: usize = table.entries.values().map(|e| e.outstanding).sum();
                    prop_assert_eq!(outstanding, permits.len());
                    drop(table);
                    for (k, from, to) in transitions.lock().unwrap().drain(..) {
                        prop_assert!(
                            legal(from, to) || (reset_key == Some(k) && to == State::Closed),
                            "illegal transition {from} -> {to}"
                        );
                    }
                }
                Ok(())
            });
            result?;
        }
    }
}
