//! Cron expressions in IANA time zones, shared by the systems that schedule: job schedules,
//! rollout maintenance windows.
//!
//! Syntax (the [`croner`] crate, POSIX/Vixie semantics): 5 fields `min hour dom month dow`, 6 with
//! seconds first, or 7 with a year last; names, ranges, lists, steps, `L`, `W`, `#` and
//! `@daily`-style nicknames. Times are milliseconds since the Unix epoch; ticks are wall-clock
//! times in the zone (a tick in a spring-forward gap fires at the first instant after it).

use std::str::FromStr;

use chrono::TimeZone as _;
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Longest cron expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 256;

/// A cron expression or time zone that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// The expression does not parse.
    #[error("invalid cron expression {expression:?}: {reason}")]
    Cron {
        /// What was given.
        expression: String,
        /// Why it is wrong.
        reason: String,
    },
    /// Not an IANA time zone name.
    #[error("unknown time zone {0:?}: expected an IANA name such as Europe/Berlin or UTC")]
    TimeZone(String),
    /// The expression has no tick after the given time (e.g. `0 0 30 2 *`, or a past year).
    #[error("cron expression {0:?} never fires after now")]
    NeverFires(String),
}

/// A parsed cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    tz: Tz,
}

impl CronSpec {
    /// Parses `expression` (5, 6 or 7 fields, see the module docs) read in the IANA zone
    /// `timezone` (`""` means UTC). An unknown zone is an error, never a silent UTC.
    pub fn parse(expression: &str, timezone: &str) -> Result<Self, CronError> {
        let cron_error = |reason: String| CronError::Cron {
            expression: expression.to_owned(),
            reason,
        };
        if expression.len() > MAX_EXPRESSION_BYTES {
            return Err(cron_error(format!(
                "is {} bytes, the limit is {MAX_EXPRESSION_BYTES}",
                expression.len()
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Optional)
            .sloppy_ranges(true)
            .build()
            .parse(expression)
            .map_err(|e| cron_error(e.to_string()))?;
        let tz = parse_timezone(timezone)?;
        Ok(Self { cron, tz })
    }

    /// The zone's canonical name (`UTC` for `""`).
    pub fn timezone(&self) -> &'static str {
        self.tz.name()
    }

    /// The first tick strictly after `t`, or `None` if there is none (or it is out of range).
    pub fn next_after(&self, t: i64) -> Option<i64> {
        // Ticks are whole seconds: the first one after t's second is the first one after t.
        let start = self
            .tz
            .timestamp_millis_opt(t.div_euclid(1000) * 1000)
            .single()?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// The last tick at or before `t`, if any (searching back about a year at most).
    pub fn latest_at_or_before(&self, t: i64) -> Option<i64> {
        let start = self
            .tz
            .timestamp_millis_opt(t.div_euclid(1000) * 1000)
            .single()?;
        let prev = self.cron.find_previous_occurrence(&start, true).ok()?;
        Some(prev.timestamp_millis())
    }
}

/// An IANA zone name (`""` means UTC).
pub fn parse_timezone(name: &str) -> Result<Tz, CronError> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| CronError::TimeZone(name.to_owned()))
}
