//! Reconnection backoff for the worker stream: 100 ms doubling to 5 s, each pause jittered
//! ("equal jitter": half fixed, half random) so workers that lost the same server do not all
//! come back in the same instant. Pure apart from the random source, which is a parameter.

use std::hash::{BuildHasher as _, Hasher as _};
use std::time::Duration;

/// First pause after a failure.
pub(crate) const FIRST: Duration = Duration::from_millis(100);
/// Longest pause.
pub(crate) const MAX: Duration = Duration::from_secs(5);

/// Pauses between reconnection attempts.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        let first = first.min(max);
        Self {
            next: first,
            first,
            max,
        }
    }

    /// The pause before the next attempt, given a random number; doubles the one after.
    pub(crate) fn next_pause(&mut self, random: u64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = base / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(random % spread.saturating_add(1))
    }

    /// After a successful connection: start from the first pause again.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A random number from the standard library's per-process random hash keys (no RNG crate
/// needed: this only spreads reconnections and names workers).
pub(crate) fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_the_cap_within_their_jitter() {
        let mut b = Backoff::new(FIRST, MAX);
        let mut expected = FIRST;
        for i in 0..12 {
            for random in [0, u64::MAX, 12_345] {
                let mut probe = b.clone();
                let pause = probe.next_pause(random);
                assert!(
                    pause >= expected / 2 && pause <= expected,
                    "attempt {i}: {pause:?} outside {expected:?}/2..={expected:?}"
                );
            }
            b.next_pause(random_u64());
            expected = (expected * 2).min(MAX);
        }
        b.reset();
        assert!(b.next_pause(0) <= FIRST);
    }

    #[test]
    fn random_numbers_differ() {
        assert_ne!(random_u64(), random_u64());
    }
}
