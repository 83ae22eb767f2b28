//! Latency percentiles over exact samples, and how the harness prints durations and rates.
//!
//! Samples are kept whole (one `u64` of microseconds each) and sorted once at the end: a run of a
//! million jobs costs 8 MB per latency kind, and the percentiles are exact rather than bucketed.
//! Percentiles use the nearest-rank method: p99 of 100 samples is the 99th smallest.

use serde::Serialize;

/// Microseconds since the start of a benchmark run (the harness's own monotonic clock).
pub type Micros = u64;

/// The harness's clock: microseconds since it was made.
#[derive(Debug, Clone, Copy)]
pub struct Clock(std::time::Instant);

impl Clock {
    /// A clock reading 0 now.
    pub fn start() -> Self {
        Self(std::time::Instant::now())
    }

    /// Microseconds since [`Clock::start`].
    pub fn now(&self) -> Micros {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The instant `at` microseconds after the start.
    pub fn instant(&self, at: Micros) -> std::time::Instant {
        self.0 + std::time::Duration::from_micros(at)
    }
}

/// Count, percentiles and maximum of a set of latency samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

impl Summary {
    /// Summarizes `samples` (in any order); all zero when there are none.
    pub fn of(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        Self {
            count: samples.len() as u64,
            p50_us: nearest_rank(&samples, 50.0),
            p95_us: nearest_rank(&samples, 95.0),
            p99_us: nearest_rank(&samples, 99.0),
            max_us: samples[samples.len() - 1],
        }
    }
}

/// The nearest-rank `q`th percentile of non-empty, sorted `sorted`: the smallest sample with at
/// least `q` percent of the samples at or below it.
pub fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
    let n = sorted.len();
    if n == 0 {
        return 0;
    }
    let rank = ((q / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// A duration in microseconds for people: `850µs`, `3.21ms`, `1.50s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2}s", us as f64 / 1_000_000.0)
    }
}

/// A byte count for people: `812 KiB`, `35.2 MiB`.
pub fn fmt_bytes(bytes: u64) -> String {
    if bytes < 1024 * 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

/// A rate with thousands separated: `23 456 /s`.
pub fn fmt_rate(per_s: f64) -> String {
    format!("{} /s", group(per_s.round() as u64))
}

/// An integer with thin spaces between thousands: `1 000 000`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(samples: &[u64], expected: (u64, u64, u64, u64, u64)) {
        let s = Summary::of(samples.to_vec());
        assert_eq!(
            (s.count, s.p50_us, s.p95_us, s.p99_us, s.max_us),
            expected,
            "{samples:?}"
        );
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        check(&[], (0, 0, 0, 0, 0));
        check(&[7], (1, 7, 7, 7, 7));
        check(&[3, 1, 2], (3, 2, 3, 3, 3));
        let hundred: Vec<u64> = (1..=100).rev().collect();
        check(&hundred, (100, 50, 95, 99, 100));
        let thousand: Vec<u64> = (1..=1000).collect();
        check(&thousand, (1000, 500, 950, 990, 1000));
        // One slow outlier among 1000 shows only in the maximum.
        let mut skewed = vec![10; 999];
        skewed.push(1_000_000);
        check(&skewed, (1000, 10, 10, 10, 1_000_000));
    }

    #[test]
    fn nearest_rank_edges() {
        assert_eq!(nearest_rank(&[], 50.0), 0);
        assert_eq!(nearest_rank(&[1, 2], 0.0), 1);
        assert_eq!(nearest_rank(&[1, 2], 100.0), 2);
        assert_eq!(nearest_rank(&[1, 2], 50.0), 1);
        assert_eq!(nearest_rank(&[1, 2], 50.1), 2);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(3_210), "3.21ms");
        assert_eq!(fmt_us(1_500_000), "1.50s");
        assert_eq!(fmt_bytes(512 * 1024), "512 KiB");
        assert_eq!(fmt_bytes(35 * 1024 * 1024 + 200 * 1024), "35.2 MiB");
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1_000), "1 000");
        assert_eq!(group(1_000_000), "1 000 000");
        assert_eq!(fmt_rate(23_456.4), "23 456 /s");
    }
}
