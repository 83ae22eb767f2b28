//! Pass criteria: the seed's thresholds (its "acceptable" column), overridable from the command
//! line, turned into PASS / FAIL / SKIP lines. Pure.
//!
//! | metric | seed target | seed acceptable (default bound) |
//! |---|---|---|
//! | throughput, 1 worker | > 100 jobs/s | > 50 |
//! | throughput, 10 workers | > 500 jobs/s | > 200 |
//! | p99 latency | < 100 ms | < 500 ms |
//! | memory growth | 0 MB/h | < 10 MB/h |
//! | success rate | 100 % | > 99.9 % |
//! | duplicate jobs | 0 | 0 |
//!
//! Lost jobs must be 0 in every scenario (an acknowledged enqueue is a promise).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::stats::{fmt_rate, fmt_us};

/// The bounds a run is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Fewest jobs per second (end to end), when the scenario judges throughput.
    pub min_throughput: Option<f64>,
    /// Largest enqueue → start p99, when the scenario judges latency.
    pub max_p99: Duration,
    /// Smallest share of jobs ending as expected.
    pub min_success_rate: f64,
    /// Largest server RSS growth over the run (soak), in MiB per hour of run (and at least this
    /// many MiB for runs shorter than an hour: shorter runs are not extrapolated).
    pub max_rss_growth_mib: f64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            min_throughput: None,
            max_p99: Duration::from_millis(500),
            min_success_rate: 0.999,
            max_rss_growth_mib: 10.0,
        }
    }
}

/// A criterion's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Met.
    Pass,
    /// Missed: the run exits 1.
    Fail,
    /// Could not be measured in this run (e.g. no server pid for memory).
    Skip,
}

/// One criterion, judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What is judged.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// What was measured.
    pub measured: String,
    /// The bound it was held to.
    pub bound: String,
}

impl Check {
    /// A criterion that passes when `ok`.
    pub fn new(
        name: impl Into<String>,
        ok: bool,
        measured: impl Into<String>,
        bound: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            verdict: if ok { Verdict::Pass } else { Verdict::Fail },
            measured: measured.into(),
            bound: bound.into(),
        }
    }

    /// A criterion that could not be measured.
    pub fn skip(name: impl Into<String>, why: impl Into<String>, bound: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            verdict: Verdict::Skip,
            measured: why.into(),
            bound: bound.into(),
        }
    }

    /// `count` of something that must not happen.
    pub fn zero(name: &str, count: u64) -> Self {
        Self::new(name, count == 0, count.to_string(), "= 0")
    }

    /// A throughput of at least `min` jobs/s.
    pub fn throughput(name: &str, per_s: f64, min: f64) -> Self {
        Self::new(
            name,
            per_s >= min,
            fmt_rate(per_s),
            format!(">= {}", fmt_rate(min)),
        )
    }

    /// A latency of at most `max`.
    pub fn latency(name: &str, us: u64, max: Duration) -> Self {
        let max_us = u64::try_from(max.as_micros()).unwrap_or(u64::MAX);
        Self::new(
            name,
            us <= max_us,
            fmt_us(us),
            format!("<= {}", fmt_us(max_us)),
        )
    }

    /// A share of at least `min` (both 0..=1).
    pub fn share(name: &str, share: f64, min: f64) -> Self {
        Self::new(
            name,
            share >= min,
            format!("{:.3} %", share * 100.0),
            format!(">= {:.1} %", min * 100.0),
        )
    }
}

/// `part / whole`, 1 when there is nothing to divide.
pub fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

/// The allowed RSS growth, in bytes, for a run of `run` (see [`Bounds::max_rss_growth_mib`]).
pub fn allowed_rss_growth(bounds: &Bounds, run: Duration) -> u64 {
    let hours = (run.as_secs_f64() / 3600.0).max(1.0);
    (bounds.max_rss_growth_mib * hours * 1024.0 * 1024.0) as u64
}

/// The RSS growth over a soak: the mean of the last tenth of the samples minus the mean of the
/// first tenth after warm-up (the first fifth of the run is warm-up: caches and pools filling).
/// `None` with fewer than 10 samples after warm-up.
pub fn rss_growth(samples: &[u64]) -> Option<i64> {
    let warm = &samples[samples.len() / 5..];
    if warm.len() < 10 {
        return None;
    }
    let tenth = warm.len() / 10;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len() as f64;
    let first = mean(&warm[..tenth]);
    let last = mean(&warm[warm.len() - tenth..]);
    Some((last - first) as i64)
}

/// Renders checks as `PASS  name  measured  (bound)` lines.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        let verdict = match c.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        let _ = writeln!(
            out,
            "{verdict}  {:width$}  {}  ({})",
            c.name, c.measured, c.bound
        );
    }
    out
}

/// True when no check failed (skips do not fail a run).
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.verdict != Verdict::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_judge_their_bounds() {
        assert_eq!(Check::zero("lost", 0).verdict, Verdict::Pass);
        assert_eq!(Check::zero("lost", 1).verdict, Verdict::Fail);
        assert_eq!(Check::throughput("t", 200.0, 200.0).verdict, Verdict::Pass);
        assert_eq!(Check::throughput("t", 199.9, 200.0).verdict, Verdict::Fail);
        let max = Duration::from_millis(10);
        assert_eq!(Check::latency("p99", 10_000, max).verdict, Verdict::Pass);
        assert_eq!(Check::latency("p99", 10_001, max).verdict, Verdict::Fail);
        assert_eq!(Check::share("s", 0.999, 0.999).verdict, Verdict::Pass);
        assert_eq!(Check::share("s", 0.998, 0.999).verdict, Verdict::Fail);
    }

    #[test]
    fn skips_do_not_fail_a_run() {
        let checks = vec![
            Check::zero("lost", 0),
            Check::skip("rss growth", "no server pid", "<= 10 MiB"),
        ];
        assert!(passed(&checks));
        let text = render(&checks);
        assert_eq!(
            text,
            "PASS  lost        0  (= 0)\nSKIP  rss growth  no server pid  (<= 10 MiB)\n"
        );
        assert!(!passed(&[Check::zero("duplicates", 2)]));
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(0, 0), 1.0);
        assert_eq!(ratio(999, 1000), 0.999);
    }

    #[test]
    fn rss_growth_ignores_warm_up_and_needs_samples() {
        assert_eq!(rss_growth(&[1; 11]), None);
        assert_eq!(rss_growth(&[1; 12]), Some(0));
        // 50 samples: the first 10 are warm-up (a big jump there does not count); then 40 flat
        // at 100 except the last 4 at 110.
        let mut s = vec![0u64; 10];
        s.extend([100; 36]);
        s.extend([110; 4]);
        assert_eq!(rss_growth(&s), Some(10));
        let flat = vec![5u64; 100];
        assert_eq!(rss_growth(&flat), Some(0));
    }

    #[test]
    fn rss_allowance_is_per_hour_but_not_below_one_hour() {
        let b = Bounds::default();
        let mib = 1024 * 1024;
        assert_eq!(allowed_rss_growth(&b, Duration::from_secs(60)), 10 * mib);
        assert_eq!(allowed_rss_growth(&b, Duration::from_secs(3600)), 10 * mib);
        assert_eq!(allowed_rss_growth(&b, Duration::from_secs(7200)), 20 * mib);
    }
}
