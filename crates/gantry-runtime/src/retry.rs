//! Backoff policies for retried work: fixed, linear and exponential delays with a cap and jitter.
//!
//! This module owns the arithmetic of "how long to wait before the next attempt" and the
//! `[retry]`-style config that describes it ([`RetryConfig`], validated into a [`RetryPolicy`]).
//! The defaults mirror Reseolio's job options (3 attempts, exponential from 1 s, capped at 60 s,
//! 10 % jitter), so jobs, the observer and fleet agree on what "retry" means.
//!
//! It does not sleep, schedule or count attempts for anyone: callers keep their own attempt number
//! and ask [`RetryPolicy::next_delay`] (or the pure [`RetryPolicy::delay_after`], which takes the
//! random number as an argument) what to do next.
//!
//! **Invariant:** no input makes these functions panic or overflow — attempt `0` or `u32::MAX`,
//! [`Duration::MAX`] delays, an initial delay above the cap, huge multipliers. Every delay is at
//! most the cap.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_INITIAL_DELAY: Duration = Duration::from_millis(1_000);
const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(60_000);
const DEFAULT_MULTIPLIER: f64 = 2.0;
const DEFAULT_JITTER: f64 = 0.1;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// How the delay grows from one attempt to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// Every delay is the initial delay.
    Fixed,
    /// The delay after attempt `n` is `initial * n`.
    Linear,
    /// The delay after attempt `n` is `initial * multiplier^(n - 1)`.
    #[default]
    Exponential,
}

/// A checked retry policy: how many attempts to make and how long to wait between them.
///
/// Attempts are numbered from 1 (the first try). [`delay_after(n, unit)`](Self::delay_after) is the
/// wait after attempt `n` failed, or `None` when `n` was the last attempt allowed.
///
/// Build one from a [`RetryConfig`] with [`RetryConfig::validate`], or in code with
/// [`RetryPolicy::builder`]; both check the same rules. [`RetryPolicy::default`] is Reseolio's
/// default: 3 attempts, exponential from 1 s doubling up to 60 s, 10 % jitter.
///
/// ```
/// use std::time::Duration;
/// use gantry_runtime::retry::{Backoff, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .backoff(Backoff::Exponential)
///     .initial_delay(Duration::from_secs(1))
///     .max_delay(Duration::from_secs(5))
///     .jitter(0.0)
///     .max_attempts(5)
///     .build()?;
///
/// assert_eq!(policy.delay_after(1, 0.5), Some(Duration::from_secs(1)));
/// assert_eq!(policy.delay_after(2, 0.5), Some(Duration::from_secs(2)));
/// assert_eq!(policy.delay_after(3, 0.5), Some(Duration::from_secs(4)));
/// assert_eq!(policy.delay_after(4, 0.5), Some(Duration::from_secs(5))); // capped
/// assert_eq!(policy.delay_after(5, 0.5), None); // five attempts made, none left
///
/// // With jitter the delay stays within ±jitter of the base delay, and under the cap.
/// let jittered = RetryPolicy::default();
/// let delay = jittered.next_delay(1).unwrap();
/// assert!(delay >= Duration::from_millis(900) && delay <= Duration::from_millis(1100));
/// # Ok::<(), gantry_runtime::retry::RetryConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    backoff: Backoff,
    initial_delay: Duration,
    max_delay: Duration,
    multiplier: f64,
    jitter: f64,
    max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            backoff: Backoff::Exponential,
            initial_delay: DEFAULT_INITIAL_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            multiplier: DEFAULT_MULTIPLIER,
            jitter: DEFAULT_JITTER,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }
}

impl RetryPolicy {
    /// A builder starting from the defaults; [`RetryPolicyBuilder::build`] validates.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder::default()
    }

    /// How the delay grows.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The delay after the first attempt, before jitter and the cap.
    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// The cap: no delay is ever longer, jitter included.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The growth factor of [`Backoff::Exponential`] (ignored by the other backoffs).
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The jitter fraction in `[0, 1]`.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Total attempts allowed, the first one included; at least 1.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay after attempt `attempt` failed, without jitter, clamped to the cap.
    ///
    /// Attempt `0` is treated as attempt `1`. This does not look at `max_attempts`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let attempt = attempt.max(1);
        let raw = match self.backoff {
            Backoff::Fixed => self.initial_delay,
            Backoff::Linear => self.initial_delay.saturating_mul(attempt),
            Backoff::Exponential => {
                // `powf` of a finite base >= 1 is finite or +inf, never NaN or negative.
                let factor = self.multiplier.powf(f64::from(attempt - 1));
                scale_capped(self.initial_delay, factor, self.max_delay)
            }
        };
        raw.min(self.max_delay)
    }

    /// The delay before the next attempt after attempt `attempt` failed, or `None` when
    /// `attempt >= max_attempts` (no attempts left).
    ///
    /// `unit` is a random number in `[0, 1)` that places the delay within
    /// `[base * (1 - jitter), base * (1 + jitter)]`; values outside `[0, 1]` are clamped and NaN
    /// counts as `0`. The result is clamped to the cap. This function is pure: the same inputs
    /// always give the same delay.
    pub fn delay_after(&self, attempt: u32, unit: f64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        Some(self.jittered(self.base_delay(attempt), unit))
    }

    /// [`delay_after`](Self::delay_after) with a unit drawn from the thread-local generator.
    pub fn next_delay(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let unit: f64 = rand::rng().random();
        self.delay_after(attempt, unit)
    }

    fn jittered(&self, base: Duration, unit: f64) -> Duration {
        if self.jitter == 0.0 || base.is_zero() {
            return base;
        }
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        let base = nanos_f64(base);
        let low = base * (1.0 - self.jitter);
        let high = base * (1.0 + self.jitter);
        let nanos = low + unit * (high - low);
        if nanos.is_nan() || nanos >= nanos_f64(self.max_delay) {
            return self.max_delay;
        }
        duration_from_nanos_f64(nanos).min(self.max_delay)
    }
}

/// Builds a [`RetryPolicy`] in code, starting from the defaults.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RetryPolicyBuilder {
    config: RetryConfig,
}

impl RetryPolicyBuilder {
    /// Sets how the delay grows.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Sets the delay after the first attempt.
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.config.initial_delay = delay;
        self
    }

    /// Sets the cap on every delay.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.config.max_delay = delay;
        self
    }

    /// Sets the exponential growth factor (finite, at least 1).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.config.multiplier = multiplier;
        self
    }

    /// Sets the jitter fraction (in `[0, 1]`).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.config.jitter = jitter;
        self
    }

    /// Sets the total number of attempts, the first included (at least 1).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.config.max_attempts = max_attempts;
        self
    }

    /// Checks the settings, as [`RetryConfig::validate`] does.
    pub fn build(&self) -> Result<RetryPolicy, RetryConfigError> {
        self.config.validate()
    }
}

/// Retry settings as written in a config file; [`validate`](Self::validate) turns them into a
/// [`RetryPolicy`]. Every field has a default (Reseolio's job options).
///
/// ```toml
/// max_attempts = 5
/// backoff = "exponential"
/// initial_delay = "500ms"
/// max_delay = "30s"
/// multiplier = 2.0
/// jitter = 0.1
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Total attempts, the first one included; at least 1. `1` means "never retry".
    /// Default: 3.
    pub max_attempts: u32,
    /// How the delay grows: `"fixed"`, `"linear"` or `"exponential"`. Default: `"exponential"`.
    pub backoff: Backoff,
    /// The delay after the first attempt, e.g. `"1s"` or `"250ms"`. Default: `"1s"`.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// The cap on every delay, jitter included; it wins over a larger `initial_delay`.
    /// Default: `"60s"`.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// The growth factor of exponential backoff; finite and at least 1 (checked for every
    /// backoff so a typo cannot hide). Default: 2.0.
    pub multiplier: f64,
    /// The jitter fraction in `[0, 1]`: a delay `d` becomes uniformly random in
    /// `[d * (1 - jitter), d * (1 + jitter)]`, then is clamped to `max_delay`. Default: 0.1.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: Backoff::Exponential,
            initial_delay: DEFAULT_INITIAL_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            multiplier: DEFAULT_MULTIPLIER,
            jitter: DEFAULT_JITTER,
        }
    }
}

impl RetryConfig {
    /// Checks every field and returns the policy, or the first field that is out of range.
    pub fn validate(&self) -> Result<RetryPolicy, RetryConfigError> {
        if self.max_attempts == 0 {
            return Err(RetryConfigError::MaxAttempts(self.max_attempts));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(RetryConfigError::Multiplier(self.multiplier));
        }
        // `contains` is false for NaN.
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(RetryConfigError::Jitter(self.jitter));
        }
        Ok(RetryPolicy {
            backoff: self.backoff,
            initial_delay: self.initial_delay,
            max_delay: self.max_delay,
            multiplier: self.multiplier,
            jitter: self.jitter,
            max_attempts: self.max_attempts,
        })
    }
}

/// A [`RetryConfig`] field out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RetryConfigError {
    /// `max_attempts` was 0.
    #[error("max_attempts must be at least 1, got {0}")]
    MaxAttempts(u32),
    /// `multiplier` was below 1, infinite or NaN.
    #[error("multiplier must be a finite number of at least 1, got {0}")]
    Multiplier(f64),
    /// `jitter` was outside `[0, 1]` or NaN.
    #[error("jitter must be between 0 and 1, got {0}")]
    Jitter(f64),
}

fn nanos_f64(duration: Duration) -> f64 {
    duration.as_nanos() as f64
}

/// Converts a nanosecond count to a `Duration`, saturating: NaN and negatives become zero,
/// anything too large becomes (close to) `Duration::MAX`. Callers clamp the result to their cap.
fn duration_from_nanos_f64(nanos: f64) -> Duration {
    // Float-to-int `as` saturates and maps NaN to 0.
    let nanos = nanos as u128;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    let subsec = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, subsec)
}

/// `duration * factor` for a factor >= 1 (possibly +inf), saturating at `cap`.
fn scale_capped(duration: Duration, factor: f64, cap: Duration) -> Duration {
    if duration.is_zero() {
        // Avoids 0 * inf = NaN.
        return Duration::ZERO;
    }
    let nanos = nanos_f64(duration) * factor;
    if nanos.is_nan() || nanos >= nanos_f64(cap) {
        return cap;
    }
    duration_from_nanos_f64(nanos).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn policy(backoff: Backoff, initial: Duration, cap: Duration, attempts: u32) -> RetryPolicy {
        RetryPolicy::builder()
            .backoff(backoff)
            .initial_delay(initial)
            .max_delay(cap)
            .jitter(0.0)
            .max_attempts(attempts)
            .build()
            .unwrap()
    }

    /// Checks `delay_after(1..=expected.len(), unit)` against `expected` (milliseconds, `None` for
    /// "no attempts left").
    fn check(policy: &RetryPolicy, unit: f64, expected: &[Option<u64>]) {
        let actual: Vec<Option<u64>> = (1..=u32::try_from(expected.len()).unwrap())
            .map(|attempt| {
                policy
                    .delay_after(attempt, unit)
                    .map(|d| u64::try_from(d.as_millis()).unwrap())
            })
            .collect();
        assert_eq!(actual, expected, "policy {policy:?}, unit {unit}");
    }

    #[test]
    fn exponential_doubles_up_to_the_cap() {
        let p = policy(Backoff::Exponential, ms(1_000), ms(60_000), 10);
        check(
            &p,
            0.5,
            &[
                Some(1_000),
                Some(2_000),
                Some(4_000),
                Some(8_000),
                Some(16_000),
                Some(32_000),
                Some(60_000),
                Some(60_000),
                Some(60_000),
                None,
            ],
        );
    }

    #[test]
    fn exponential_with_a_custom_multiplier() {
        let p = RetryPolicy::builder()
            .initial_delay(ms(100))
            .multiplier(3.0)
            .jitter(0.0)
            .max_attempts(5)
            .build()
            .unwrap();
        check(
            &p,
            0.0,
            &[Some(100), Some(300), Some(900), Some(2_700), None],
        );
    }

    #[test]
    fn linear_and_fixed() {
        let linear = policy(Backoff::Linear, ms(500), ms(1_800), 6);
        check(
            &linear,
            0.0,
            &[
                Some(500),
                Some(1_000),
                Some(1_500),
                Some(1_800),
                Some(1_800),
                None,
            ],
        );
        let fixed = policy(Backoff::Fixed, ms(250), ms(60_000), 4);
        check(&fixed, 0.9, &[Some(250), Some(250), Some(250), None]);
    }

    #[test]
    fn one_attempt_never_retries() {
        let p = policy(Backoff::Fixed, ms(250), ms(60_000), 1);
        check(&p, 0.0, &[None, None]);
        assert_eq!(p.delay_after(0, 0.0), Some(ms(250)));
    }

    #[test]
    fn initial_delay_above_the_cap_is_capped() {
        let p = policy(Backoff::Exponential, ms(10_000), ms(3_000), 3);
        check(&p, 0.0, &[Some(3_000), Some(3_000), None]);
    }

    #[test]
    fn jitter_spreads_around_the_base_delay() {
        let p = RetryPolicy::builder()
            .backoff(Backoff::Fixed)
            .initial_delay(ms(1_000))
            .jitter(0.2)
            .build()
            .unwrap();
        check(&p, 0.0, &[Some(800), Some(800), None]);
        check(&p, 0.5, &[Some(1_000), Some(1_000), None]);
        check(&p, 1.0, &[Some(1_200), Some(1_200), None]);
        // Out-of-range and NaN units are clamped.
        check(&p, -3.0, &[Some(800), Some(800), None]);
        check(&p, 7.0, &[Some(1_200), Some(1_200), None]);
        check(&p, f64::NAN, &[Some(800), Some(800), None]);
    }

    #[test]
    fn jitter_never_pushes_past_the_cap() {
        let p = RetryPolicy::builder()
            .backoff(Backoff::Fixed)
            .initial_delay(ms(1_000))
            .max_delay(ms(1_100))
            .jitter(0.5)
            .build()
            .unwrap();
        check(&p, 0.0, &[Some(500), Some(500), None]);
        check(&p, 1.0, &[Some(1_100), Some(1_100), None]);
    }

    #[test]
    fn default_policy_is_reseolios() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts(), 3);
        assert_eq!(p.backoff(), Backoff::Exponential);
        assert_eq!(p.initial_delay(), ms(1_000));
        assert_eq!(p.max_delay(), ms(60_000));
        assert_eq!(p.multiplier(), 2.0);
        assert_eq!(p.jitter(), 0.1);
        assert_eq!(RetryConfig::default().validate(), Ok(p.clone()));
        assert_eq!(RetryPolicy::builder().build(), Ok(p));
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        for backoff in [Backoff::Fixed, Backoff::Linear, Backoff::Exponential] {
            let p = RetryPolicy::builder()
                .backoff(backoff)
                .initial_delay(Duration::MAX)
                .max_delay(Duration::MAX)
                .multiplier(f64::MAX)
                .jitter(1.0)
                .max_attempts(u32::MAX)
                .build()
                .unwrap();
            for attempt in [0, 1, 2, 1_000, u32::MAX - 1] {
                for unit in [0.0, 0.5, 1.0, f64::NAN, f64::INFINITY] {
                    let delay = p.delay_after(attempt, unit).unwrap();
                    assert!(delay <= Duration::MAX);
                }
            }
            assert_eq!(p.delay_after(u32::MAX, 0.5), None);
            assert_eq!(p.base_delay(u32::MAX), Duration::MAX);
        }
        let zero = policy(
            Backoff::Exponential,
            Duration::ZERO,
            Duration::MAX,
            u32::MAX,
        );
        assert_eq!(zero.delay_after(u32::MAX - 1, 0.5), Some(Duration::ZERO));
    }

    /// Checks a TOML config: `Ok(policy)` or the error message.
    fn check_config(toml: &str, expected: Result<RetryPolicy, &str>) {
        let actual = toml::from_str::<RetryConfig>(toml)
            .map_err(|e| e.message().to_owned())
            .and_then(|config| config.validate().map_err(|e| e.to_string()));
        assert_eq!(actual, expected.map_err(str::to_owned), "config {toml:?}");
    }

    #[test]
    fn config_parses_and_validates() {
        check_config("", Ok(RetryPolicy::default()));
        check_config(
            r#"
            max_attempts = 5
            backoff = "linear"
            initial_delay = "250ms"
            max_delay = "2m"
            multiplier = 1.5
            jitter = 0
            "#,
            Ok(RetryPolicy {
                backoff: Backoff::Linear,
                initial_delay: ms(250),
                max_delay: ms(120_000),
                multiplier: 1.5,
                jitter: 0.0,
                max_attempts: 5,
            }),
        );
        check_config(
            r#"backoff = "fixed""#,
            Ok(RetryPolicy {
                backoff: Backoff::Fixed,
                ..RetryPolicy::default()
            }),
        );
        check_config(
            "jitter = 1.5",
            Err("jitter must be between 0 and 1, got 1.5"),
        );
        check_config(
            "jitter = -0.1",
            Err("jitter must be between 0 and 1, got -0.1"),
        );
        check_config(
            "jitter = nan",
            Err("jitter must be between 0 and 1, got NaN"),
        );
        check_config(
            "max_attempts = 0",
            Err("max_attempts must be at least 1, got 0"),
        );
        check_config(
            "multiplier = 0.5",
            Err("multiplier must be a finite number of at least 1, got 0.5"),
        );
        check_config(
            "multiplier = inf",
            Err("multiplier must be a finite number of at least 1, got inf"),
        );
    }

    #[test]
    fn config_rejects_unknown_fields_and_bad_values() {
        for toml in [
            "max_retries = 3",
            r#"backoff = "quadratic""#,
            r#"initial_delay = "soon""#,
            "initial_delay = 1000",
        ] {
            assert!(
                toml::from_str::<RetryConfig>(toml).is_err(),
                "{toml:?} should not parse"
            );
        }
    }

    #[test]
    fn config_round_trips_through_toml() {
        let config = RetryConfig {
            max_attempts: 7,
            backoff: Backoff::Linear,
            initial_delay: ms(1_500),
            max_delay: ms(90_000),
            multiplier: 3.0,
            jitter: 0.25,
        };
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<RetryConfig>(&text).unwrap(), config);
    }

    fn any_backoff() -> impl Strategy<Value = Backoff> {
        prop_oneof![
            Just(Backoff::Fixed),
            Just(Backoff::Linear),
            Just(Backoff::Exponential)
        ]
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            (0u64..=10_000_000_000).prop_map(Duration::from_nanos),
            (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            Just(Duration::ZERO),
            Just(Duration::MAX),
        ]
    }

    fn any_multiplier() -> impl Strategy<Value = f64> {
        prop_oneof![1.0f64..=10.0, 1.0f64..=f64::MAX, Just(1.0), Just(f64::MAX)]
    }

    fn any_attempt() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..=100, any::<u32>(), Just(u32::MAX)]
    }

    fn any_unit() -> impl Strategy<Value = f64> {
        prop_oneof![
            0.0f64..1.0,
            any::<f64>(),
            Just(f64::NAN),
            Just(1.0),
            Just(-1.0)
        ]
    }

    prop_compose! {
        fn any_policy()(
            backoff in any_backoff(),
            initial in any_duration(),
            cap in any_duration(),
            multiplier in any_multiplier(),
            jitter in prop_oneof![0.0f64..=1.0, Just(0.0), Just(1.0)],
            attempts in prop_oneof![1u32..=20, 1u32..=u32::MAX],
        ) -> RetryPolicy {
            RetryPolicy::builder()
                .backoff(backoff)
                .initial_delay(initial)
                .max_delay(cap)
                .multiplier(multiplier)
                .jitter(jitter)
                .max_attempts(attempts)
                .build()
                .unwrap()
        }
    }

    proptest! {
        #[test]
        fn never_exceeds_the_cap(p in any_policy(), attempt in any_attempt(), unit in any_unit()) {
            prop_assert!(p.base_delay(attempt) <= p.max_delay());
            if let Some(delay) = p.delay_after(attempt, unit) {
                prop_assert!(delay <= p.max_delay());
            }
            if let Some(delay) = p.next_delay(attempt) {
                prop_assert!(delay <= p.max_delay());
            }
        }

        #[test]
        fn jitter_stays_within_its_band(
            p in any_policy(),
            attempt in any_attempt(),
            unit in 0.0f64..1.0,
        ) {
            let base = nanos_f64(p.base_delay(attempt));
            let cap = nanos_f64(p.max_delay());
            let low = (base * (1.0 - p.jitter())).min(cap);
            let high = (base * (1.0 + p.jitter())).min(cap);
            if let Some(delay) = p.delay_after(attempt, unit) {
                let delay = nanos_f64(delay);
                // One nanosecond for truncation plus f64 rounding on huge durations.
                let slack = |x: f64| 1.0 + x * 1e-12;
                prop_assert!(delay >= low - slack(low), "{delay} < {low}");
                prop_assert!(delay <= high + slack(high), "{delay} > {high}");
            }
        }

        #[test]
        fn never_panics_for_any_input(
            backoff in any_backoff(),
            initial in any_duration(),
            cap in any_duration(),
            multiplier in any::<f64>(),
            jitter in any::<f64>(),
            attempts in any::<u32>(),
            attempt in any::<u32>(),
            unit in any::<f64>(),
        ) {
            let built = RetryPolicy::builder()
                .backoff(backoff)
                .initial_delay(initial)
                .max_delay(cap)
                .multiplier(multiplier)
                .jitter(jitter)
                .max_attempts(attempts)
                .build();
            if let Ok(p) = built {
                let _ = p.base_delay(attempt);
                let _ = p.delay_after(attempt, unit);
                let _ = p.next_delay(attempt);
            }
        }

        #[test]
        fn base_delays_never_shrink(p in any_policy(), attempt in any_attempt()) {
            let next = attempt.saturating_add(1);
            prop_assert!(p.base_delay(attempt) <= p.base_delay(next));
            if p.backoff() == Backoff::Fixed {
                prop_assert_eq!(p.base_delay(attempt), p.initial_delay().min(p.max_delay()));
            }
        }

        #[test]
        fn none_exactly_when_out_of_attempts(
            p in any_policy(),
            attempt in any_attempt(),
            unit in any_unit(),
        ) {
            prop_assert_eq!(p.delay_after(attempt, unit).is_none(), attempt >= p.max_attempts());
            prop_assert_eq!(p.next_delay(attempt).is_none(), attempt >= p.max_attempts());
        }

        #[test]
        fn delay_after_is_pure(p in any_policy(), attempt in any_attempt(), unit in any_unit()) {
            prop_assert_eq!(p.delay_after(attempt, unit), p.delay_after(attempt, unit));
        }
    }
}
