//! Wave planning (pure): how a rollout's ordered targets are cut into waves, and when a wave's
//! failures abort the rollout.
//!
//! The first wave is the canary — a count, or a percentage of the targets (rounded up, at least
//! one device) — and the rest follow in fixed-size batches or growing by a factor (each wave
//! `ceil(previous × factor)` devices); the last wave takes what is left. Waves are contiguous
//! ranges over the target list, so a rollout's position is just an index.

use std::ops::Range;

/// The canary wave's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Canary {
    /// This many devices.
    Count(u32),
    /// This share of the targets, in percent (0 < p ≤ 100).
    Percent(f64),
}

/// How the waves after the canary grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Growth {
    /// Every wave this many devices (≥ 1).
    Fixed(u32),
    /// Each wave this factor (> 1) times the previous one, rounded up.
    Exponential(f64),
}

/// A rollout's wave shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WavePlan {
    /// The first wave.
    pub canary: Canary,
    /// The waves after it.
    pub growth: Growth,
}

/// A wave plan that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(String);

impl WavePlan {
    /// Checks the numbers.
    pub fn check(&self) -> Result<(), PlanError> {
        match self.canary {
            Canary::Count(0) => return Err(PlanError("the canary needs at least 1 device".into())),
            Canary::Percent(p) if !(p > 0.0 && p <= 100.0) => {
                return Err(PlanError(format!(
                    "canary {p}% is not more than 0% and at most 100%"
                )));
            }
            _ => {}
        }
        match self.growth {
            Growth::Fixed(0) => Err(PlanError("a batch needs at least 1 device".into())),
            Growth::Exponential(f) if !(f > 1.0 && f.is_finite()) => {
                Err(PlanError(format!("growth factor {f} is not more than 1")))
            }
            _ => Ok(()),
        }
    }

    /// The waves over `total` targets: contiguous, non-empty, covering `0..total` in order.
    pub fn waves(&self, total: usize) -> Result<Vec<Range<usize>>, PlanError> {
        self.check()?;
        let mut out = Vec::new();
        if total == 0 {
            return Ok(out);
        }
        let canary = match self.canary {
            Canary::Count(n) => n as usize,
            // The epsilon keeps exact fractions exact: 1.1 % of 100 000 is 1 100, not 1 101.
            Canary::Percent(p) => ((total as f64) * p / 100.0 - 1e-9).ceil() as usize,
        }
        .clamp(1, total);
        out.push(0..canary);
        let mut at = canary;
        let mut previous = canary;
        while at < total {
            let size = match self.growth {
                Growth::Fixed(n) => n as usize,
                Growth::Exponential(f) => {
                    // At least one more than before, so growth never stalls on rounding.
                    (((previous as f64) * f).ceil() as usize).max(previous + 1)
                }
            };
            let end = at.saturating_add(size).min(total);
            out.push(at..end);
            previous = end - at;
            at = end;
        }
        Ok(out)
    }
}

/// What a finished wave means for the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on to the next wave.
    Continue,
    /// The wave's failure rate exceeded the threshold: stop the rollout.
    Abort,
}

/// Judges a finished wave: abort when `failed / size` exceeds `threshold_percent`
/// (failures = devices that ended failed, rejected or unhealthy).
pub fn judge(failed: usize, size: usize, threshold_percent: f64) -> Verdict {
    if size == 0 {
        return Verdict::Continue;
    }
    let rate = failed as f64 * 100.0 / size as f64;
    if rate > threshold_percent {
        Verdict::Abort
    } else {
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sizes(plan: WavePlan, total: usize) -> Vec<usize> {
        plan.waves(total)
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|w| w.len())
            .collect()
    }

    #[test]
    fn canary_then_fixed_batches() {
        let plan = WavePlan {
            canary: Canary::Count(5),
            growth: Growth::Fixed(20),
        };
        assert_eq!(sizes(plan, 50), vec![5, 20, 20, 5]);
        assert_eq!(sizes(plan, 3), vec![3]);
        assert!(sizes(plan, 0).is_empty());
    }

    #[test]
    fn percent_canary_rounds_up_and_exponential_growth() {
        let plan = WavePlan {
            canary: Canary::Percent(1.0),
            growth: Growth::Exponential(2.0),
        };
        assert_eq!(sizes(plan, 1000), vec![10, 20, 40, 80, 160, 320, 370]);
        assert_eq!(sizes(plan, 7), vec![1, 2, 4]);
        let exact = |p: f64, total: usize| {
            WavePlan {
                canary: Canary::Percent(p),
                growth: Growth::Fixed(1),
            }
            .waves(total)
            .map(|w| w[0].len())
            .unwrap_or(0)
        };
        assert_eq!(exact(1.1, 100_000), 1_100);
        assert_eq!(exact(2.2, 1_500), 33);
        assert_eq!(exact(0.5, 3), 1);
        let slow = WavePlan {
            canary: Canary::Count(1),
            growth: Growth::Exponential(1.1),
        };
        assert_eq!(
            sizes(slow, 10),
            vec![1, 2, 3, 4],
            "growth never stalls on rounding"
        );
    }

    #[test]
    fn bad_plans_are_refused() {
        let bad = |canary, growth| WavePlan { canary, growth }.check().is_err();
        assert!(bad(Canary::Count(0), Growth::Fixed(1)));
        assert!(bad(Canary::Percent(0.0), Growth::Fixed(1)));
        assert!(bad(Canary::Percent(101.0), Growth::Fixed(1)));
        assert!(bad(Canary::Percent(f64::NAN), Growth::Fixed(1)));
        assert!(bad(Canary::Count(1), Growth::Fixed(0)));
        assert!(bad(Canary::Count(1), Growth::Exponential(1.0)));
        assert!(bad(Canary::Count(1), Growth::Exponential(f64::INFINITY)));
    }

    #[test]
    fn threshold_aborts_only_above_it() {
        assert_eq!(judge(1, 10, 10.0), Verdict::Continue);
        assert_eq!(judge(2, 10, 10.0), Verdict::Abort);
        assert_eq!(judge(0, 10, 0.0), Verdict::Continue);
        assert_eq!(judge(1, 1000, 0.0), Verdict::Abort);
        assert_eq!(judge(0, 0, 0.0), Verdict::Continue);
    }

    fn plans() -> impl Strategy<Value = WavePlan> {
        let canary = prop_oneof![
            (1u32..500).prop_map(Canary::Count),
            (0.01f64..=100.0).prop_map(Canary::Percent),
        ];
        let growth = prop_oneof![
            (1u32..500).prop_map(Growth::Fixed),
            (1.01f64..10.0).prop_map(Growth::Exponential),
        ];
        (canary, growth).prop_map(|(canary, growth)| WavePlan { canary, growth })
    }

    proptest! {
        #[test]
        fn waves_partition_the_targets_in_order(plan in plans(), total in 0usize..20_000) {
            let waves = plan.waves(total).unwrap();
            let mut at = 0;
            for w in &waves {
                prop_assert_eq!(w.start, at);
                prop_assert!(w.end > w.start);
                at = w.end;
            }
            prop_assert_eq!(at, total);
            if let (Some(first), Canary::Count(n)) = (waves.first(), plan.canary) {
                prop_assert_eq!(first.len(), (n as usize).min(total));
            }
            match plan.growth {
                Growth::Fixed(n) => {
                    for w in waves.iter().skip(1) {
                        prop_assert!(w.len() <= n as usize);
                    }
                    if waves.len() > 2 {
                        for w in &waves[1..waves.len() - 1] {
                            prop_assert_eq!(w.len(), n as usize);
                        }
                    }
                }
                Growth::Exponential(_) => {
                    if waves.len() > 2 {
                        for pair in waves[..waves.len() - 1].windows(2) {
                            prop_assert!(pair[1].len() > pair[0].len());
                        }
                    }
                }
            }
        }
    }
}
