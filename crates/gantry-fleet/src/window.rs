//! Maintenance windows (pure): a cron expression in an IANA time zone opens a window, which
//! stays open for a duration. A rollout starts new pushes only inside one (pushes already in
//! flight finish).

use std::time::Duration;

use gantry_runtime::cron::{CronError, CronSpec};
use serde::{Deserialize, Serialize};

/// A window as configured (and stored with the rollout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// When windows open, e.g. `0 2 * * *` (02:00 every day).
    pub cron: String,
    /// How long each stays open, ms.
    pub duration_ms: u64,
    /// The IANA zone the expression is read in (`""`: UTC).
    pub timezone: String,
}

/// A parsed window.
#[derive(Debug, Clone)]
pub struct Window {
    spec: CronSpec,
    duration_ms: i64,
}

impl Window {
    /// Parses `spec`; the duration must be at least a second.
    pub fn parse(spec: &WindowSpec) -> Result<Self, String> {
        if spec.duration_ms < 1000 {
            return Err(format!(
                "a maintenance window of {} is too short (at least 1s)",
                humantime::format_duration(Duration::from_millis(spec.duration_ms))
            ));
        }
        let cron =
            CronSpec::parse(&spec.cron, &spec.timezone).map_err(|e: CronError| e.to_string())?;
        Ok(Self {
            spec: cron,
            duration_ms: i64::try_from(spec.duration_ms).unwrap_or(i64::MAX),
        })
    }

    /// Whether a window is open at `now` (ms).
    pub fn is_open(&self, now: i64) -> bool {
        self.spec
            .latest_at_or_before(now)
            .is_some_and(|opened| now < opened.saturating_add(self.duration_ms))
    }

    /// When the next window opens after `now`, if ever.
    pub fn next_open(&self, now: i64) -> Option<i64> {
        self.spec.next_after(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(cron: &str, minutes: u64, tz: &str) -> Window {
        Window::parse(&WindowSpec {
            cron: cron.into(),
            duration_ms: minutes * 60_000,
            timezone: tz.into(),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn open_from_each_tick_for_the_duration_in_its_zone() {
        // 02:00 in Berlin for two hours; 2024-01-15 is winter time (UTC+1).
        let w = window("0 2 * * *", 120, "Europe/Berlin");
        let at = |h: i64, m: i64| 1_705_276_800_000 + (h * 60 + m) * 60_000; // 2024-01-15 00:00 UTC
        assert!(!w.is_open(at(0, 59)), "00:59 UTC = 01:59 Berlin");
        assert!(w.is_open(at(1, 0)), "02:00 Berlin");
        assert!(w.is_open(at(2, 59)));
        assert!(!w.is_open(at(3, 0)), "04:00 Berlin: closed");
        assert_eq!(w.next_open(at(3, 0)), Some(at(25, 0)));
    }

    #[test]
    fn bad_windows_are_refused() {
        let bad = |cron: &str, ms: u64, tz: &str| {
            Window::parse(&WindowSpec {
                cron: cron.into(),
                duration_ms: ms,
                timezone: tz.into(),
            })
            .is_err()
        };
        assert!(bad("61 * * * *", 60_000, ""));
        assert!(bad("0 2 * * *", 60_000, "Mars/Olympus"));
        assert!(bad("0 2 * * *", 10, ""));
    }
}
