//! Date parsing for `date` fields: ES format names and a subset of Java-style patterns, plus date
//! math (`now-1d/d`) for range bounds. Pure; every date is epoch milliseconds UTC.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// The default `format` of a date field.
pub const DEFAULT_FORMAT: &str = "strict_date_optional_time||epoch_millis";

/// Checks every `||`-separated alternative of a format is one this module knows.
pub fn check_format(format: &str) -> Result<(), String> {
    for alt in format.split("||") {
        match alt {
            "strict_date_optional_time"
            | "date_optional_time"
            | "epoch_millis"
            | "epoch_second"
            | "strict_date"
            | "date"
            | "basic_date"
            | "strict_date_time"
            | "date_time"
            | "strict_date_hour_minute_second"
            | "date_hour_minute_second" => {}
            pattern => {
                java_to_chrono(pattern)?;
            }
        }
    }
    Ok(())
}

/// Whether a string would be dynamically mapped as a date (ES's `dynamic_date_formats`:
/// `strict_date_optional_time` and `yyyy/MM/dd HH:mm:ss Z||yyyy/MM/dd Z`).
pub fn looks_like_date(s: &str) -> bool {
    let b = s.as_bytes();
    let shape = b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && (b[4] == b'-' || b[4] == b'/')
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b[4]
        && b[8..10].iter().all(u8::is_ascii_digit);
    shape && parse(s, None).is_ok()
}

/// Parses `s` with `format` (the field's, or the default) into epoch milliseconds.
pub fn parse(s: &str, format: Option<&str>) -> Result<i64, String> {
    let format = format.unwrap_or(DEFAULT_FORMAT);
    for alt in format.split("||") {
        let parsed = match alt {
            "strict_date_optional_time"
            | "date_optional_time"
            | "strict_date_time"
            | "date_time"
            | "strict_date"
            | "date"
            | "strict_date_hour_minute_second"
            | "date_hour_minute_second" => optional_time(s),
            "epoch_millis" => s.parse::<i64>().ok(),
            "epoch_second" => s.parse::<i64>().ok().and_then(|n| n.checked_mul(1000)),
            "basic_date" => NaiveDate::parse_from_str(s, "%Y%m%d")
                .ok()
                .and_then(date_millis),
            pattern => java_to_chrono(pattern)
                .ok()
                .and_then(|p| with_pattern(s, &p)),
        };
        if let Some(ms) = parsed {
            return Ok(ms);
        }
    }
    Err(format!(
        "failed to parse date field [{s}] with format [{format}]"
    ))
}

fn date_millis(d: NaiveDate) -> Option<i64> {
    Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

fn optional_time(s: &str) -> Option<i64> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_millis());
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%dT%H:%M%:z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(s, f) {
            return Some(dt.timestamp_millis());
        }
    }
    let naive = s.strip_suffix('Z').unwrap_or(s);
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(naive, f) {
            return Some(dt.and_utc().timestamp_millis());
        }
    }
    for f in ["%Y-%m-%d", "%Y/%m/%d"] {
        if let Ok(d) = NaiveDate::parse_from_str(naive, f) {
            return date_millis(d);
        }
    }
    if let Some(rest) = s.get(..7).filter(|_| s.len() == 7) {
        return NaiveDate::parse_from_str(&format!("{rest}-01"), "%Y-%m-%d")
            .ok()
            .and_then(date_millis);
    }
    if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
        return NaiveDate::parse_from_str(&format!("{s}-01-01"), "%Y-%m-%d")
            .ok()
            .and_then(date_millis);
    }
    None
}

fn with_pattern(s: &str, pattern: &str) -> Option<i64> {
    let has_zone = pattern.contains("%z") || pattern.contains("%:z");
    let has_time = pattern.contains("%H");
    if has_zone {
        return DateTime::parse_from_str(s, pattern)
            .ok()
            .map(|d| d.timestamp_millis());
    }
    if has_time {
        return NaiveDateTime::parse_from_str(s, pattern)
            .ok()
            .map(|d| d.and_utc().timestamp_millis());
    }
    NaiveDate::parse_from_str(s, pattern)
        .ok()
        .and_then(date_millis)
}

/// Translates a Java `DateTimeFormatter` pattern (the common letters) to chrono's syntax.
fn java_to_chrono(pattern: &str) -> Result<String, String> {
    let mut out = String::new();
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut n = 1;
        while i + n < chars.len() && chars[i + n] == c {
            n += 1;
        }
        let piece = match (c, n) {
            ('y' | 'u', 4) => "%Y",
            ('y' | 'u', 2) => "%y",
            ('M', 2) => "%m",
            ('M', 3) => "%b",
            ('d', 2) => "%d",
            ('H', 2) => "%H",
            ('m', 2) => "%M",
            ('s', 2) => "%S",
            ('S', 3) => "%3f",
            ('Z', _) | ('X', 1 | 2) => "%z",
            ('X', 3) => "%:z",
            ('\'', _) => {
                i += n;
                continue;
            }
            (c, _) if c.is_ascii_alphabetic() => {
                return Err(format!("unsupported pattern letter [{c}]"));
            }
            (c, _) => {
                for _ in 0..n {
                    out.push(c);
                }
                i += n;
                continue;
            }
        };
        out.push_str(piece);
        i += n;
    }
    Ok(out)
}

/// Formats epoch milliseconds with the first alternative of `format` (ES's default when `None`).
pub fn format_millis(ms: i64, format: Option<&str>) -> String {
    let first = format
        .unwrap_or(DEFAULT_FORMAT)
        .split("||")
        .next()
        .unwrap_or_default();
    let Some(dt) = chrono::DateTime::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    let pattern = match first {
        "strict_date_optional_time" | "date_optional_time" | "strict_date_time" | "date_time" => {
            "%Y-%m-%dT%H:%M:%S%.3fZ".to_owned()
        }
        "epoch_millis" => return ms.to_string(),
        "epoch_second" => return ms.div_euclid(1000).to_string(),
        "strict_date" | "date" => "%Y-%m-%d".to_owned(),
        "basic_date" => "%Y%m%d".to_owned(),
        "strict_date_hour_minute_second" | "date_hour_minute_second" => {
            "%Y-%m-%dT%H:%M:%S".to_owned()
        }
        pattern => match java_to_chrono(pattern) {
            Ok(p) => p,
            Err(_) => return ms.to_string(),
        },
    };
    dt.format(&pattern).to_string()
}

/// Evaluates a range bound: date math (`now`, `now-1d/d`, `2024-01-01||+1M`) or a date in
/// `format`. `now` is a parameter so tests are deterministic. With `round_up` (ES does this for
/// `gt` and `lte`), a rounding `/unit` goes to the last millisecond of the unit instead of its
/// first.
pub fn parse_bound_rounding(
    s: &str,
    format: Option<&str>,
    now: i64,
    round_up: bool,
) -> Result<i64, String> {
    let (anchor, math) = if let Some(rest) = s.strip_prefix("now") {
        (now, rest)
    } else if let Some((date, math)) = s.split_once("||") {
        (parse(date, format)?, math)
    } else {
        return parse(s, format);
    };
    apply_math(anchor, math, round_up).ok_or_else(|| format!("invalid date math [{s}]"))
}

/// [`parse_bound_rounding`] rounding down.
pub fn parse_bound(s: &str, format: Option<&str>, now: i64) -> Result<i64, String> {
    parse_bound_rounding(s, format, now, false)
}

fn apply_math(mut t: i64, mut math: &str, round_up: bool) -> Option<i64> {
    while !math.is_empty() {
        let op = math.as_bytes()[0];
        math = &math[1..];
        if op == b'/' {
            let unit = math.chars().next()?;
            t = round_down(t, unit)?;
            if round_up {
                t = add(t, 1, unit)?.checked_sub(1)?;
            }
            math = &math[unit.len_utf8()..];
            continue;
        }
        let digits = math.bytes().take_while(u8::is_ascii_digit).count();
        let n: i64 = if digits == 0 {
            1
        } else {
            math[..digits].parse().ok()?
        };
        math = &math[digits..];
        let unit = math.chars().next()?;
        math = &math[unit.len_utf8()..];
        let n = if op == b'-' {
            -n
        } else if op == b'+' {
            n
        } else {
            return None;
        };
        t = add(t, n, unit)?;
    }
    Some(t)
}

/// Most buckets a calendar histogram may produce.
pub const MAX_CALENDAR_BUCKETS: usize = 10_000;

/// The bucket boundaries of a calendar interval (`week`, `month`, `quarter`, `year`, or their
/// `1w`/`1M`/`1q`/`1y` forms) covering `[min, max]` in UTC: each bucket is `[b[i], b[i+1])`.
/// `None` for an unknown unit or more than [`MAX_CALENDAR_BUCKETS`] buckets.
pub fn calendar_buckets(min: i64, max: i64, unit: &str) -> Option<Vec<i64>> {
    let (step, months) = match unit {
        "week" | "1w" => ('w', 1),
        "month" | "1M" => ('M', 1),
        "quarter" | "1q" => ('M', 3),
        "year" | "1y" => ('y', 1),
        _ => return None,
    };
    let mut start = round_down(min, step)?;
    if months == 3 {
        use chrono::Datelike as _;
        let month0 = Utc.timestamp_millis_opt(start).single()?.month0();
        start = add(start, -i64::from(month0 % 3), 'M')?;
    }
    let mut bounds = vec![start];
    while bounds.last().is_some_and(|b| *b <= max) {
        if bounds.len() > MAX_CALENDAR_BUCKETS {
            return None;
        }
        let next = add(*bounds.last()?, months, step)?;
        bounds.push(next);
    }
    Some(bounds)
}

fn add(t: i64, n: i64, unit: char) -> Option<i64> {
    let ms = match unit {
        's' => 1000,
        'm' => 60_000,
        'h' | 'H' => 3_600_000,
        'd' => 86_400_000,
        'w' => 7 * 86_400_000,
        'M' | 'y' => {
            let dt = Utc.timestamp_millis_opt(t).single()?;
            let months = if unit == 'y' { n * 12 } else { n };
            let shifted = if months >= 0 {
                dt.checked_add_months(chrono::Months::new(u32::try_from(months).ok()?))
            } else {
                dt.checked_sub_months(chrono::Months::new(u32::try_from(-months).ok()?))
            }?;
            return Some(shifted.timestamp_millis());
        }
        _ => return None,
    };
    t.checked_add(n.checked_mul(ms)?)
}

fn round_down(t: i64, unit: char) -> Option<i64> {
    let dt = Utc.timestamp_millis_opt(t).single()?;
    let day = dt.date_naive();
    let ms = |d: NaiveDate| date_millis(d);
    match unit {
        's' => Some(t - t.rem_euclid(1000)),
        'm' => Some(t - t.rem_euclid(60_000)),
        'h' | 'H' => Some(t - t.rem_euclid(3_600_000)),
        'd' => ms(day),
        'w' => {
            use chrono::Datelike as _;
            let back = i64::from(day.weekday().num_days_from_monday());
            ms(day)?.checked_sub(back * 86_400_000)
        }
        'M' => {
            use chrono::Datelike as _;
            ms(day.with_day(1)?)
        }
        'y' => {
            use chrono::Datelike as _;
            ms(NaiveDate::from_ymd_opt(day.year(), 1, 1)?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_accepts_es_shapes() {
        assert_eq!(parse("2024-01-02", None), Ok(1_704_153_600_000));
        assert_eq!(parse("2024-01-02T00:00:01Z", None), Ok(1_704_153_601_000));
        assert_eq!(
            parse("2024-01-02T01:00:00+01:00", None),
            Ok(1_704_153_600_000)
        );
        assert_eq!(
            parse("2024-01-02T00:00:00.250", None),
            Ok(1_704_153_600_250)
        );
        assert_eq!(parse("1704153600000", None), Ok(1_704_153_600_000));
        assert!(parse("yesterday", None).is_err());
    }

    #[test]
    fn java_patterns_translate() {
        assert_eq!(
            parse("2024/01/02 00:00:00", Some("yyyy/MM/dd HH:mm:ss")),
            Ok(1_704_153_600_000)
        );
        assert!(check_format("yyyy-MM-dd||epoch_millis").is_ok());
        assert!(check_format("qqq").is_err());
    }

    #[test]
    fn calendar_bucket_bounds() {
        let d = |s: &str| parse(s, None).expect("date");
        assert_eq!(
            calendar_buckets(d("2024-01-15"), d("2024-03-01"), "month"),
            Some(vec![
                d("2024-01-01"),
                d("2024-02-01"),
                d("2024-03-01"),
                d("2024-04-01")
            ])
        );
        assert_eq!(
            calendar_buckets(d("2024-05-20"), d("2024-05-20"), "quarter"),
            Some(vec![d("2024-04-01"), d("2024-07-01")])
        );
        // 2024-01-03 is a Wednesday; weeks start on Monday.
        assert_eq!(
            calendar_buckets(d("2024-01-03"), d("2024-01-08"), "1w"),
            Some(vec![d("2024-01-01"), d("2024-01-08"), d("2024-01-15")])
        );
        assert_eq!(
            calendar_buckets(d("2023-06-01"), d("2024-01-01"), "year"),
            Some(vec![d("2023-01-01"), d("2024-01-01"), d("2025-01-01")])
        );
        assert_eq!(calendar_buckets(0, 1, "fortnight"), None);
        assert_eq!(calendar_buckets(0, i64::MAX / 2, "week"), None);
    }

    #[test]
    fn formatting() {
        let ms = 1_704_153_601_250;
        assert_eq!(format_millis(ms, None), "2024-01-02T00:00:01.250Z");
        assert_eq!(format_millis(ms, Some("yyyy-MM-dd")), "2024-01-02");
        assert_eq!(
            format_millis(ms, Some("yyyy/MM/dd HH:mm||epoch_millis")),
            "2024/01/02 00:00"
        );
        assert_eq!(format_millis(ms, Some("epoch_millis")), "1704153601250");
        assert_eq!(format_millis(ms, Some("epoch_second")), "1704153601");
    }

    #[test]
    fn date_detection() {
        assert!(looks_like_date("2024-05-01"));
        assert!(looks_like_date("2024/05/01"));
        assert!(looks_like_date("2024-05-01T10:00:00Z"));
        assert!(!looks_like_date("2024-13-01"));
        assert!(!looks_like_date("hello world"));
        assert!(!looks_like_date("12345678901"));
    }

    #[test]
    fn date_math() {
        let now = parse("2024-03-15T12:34:56Z", None).expect("date");
        assert_eq!(parse_bound("now/d", None, now), parse("2024-03-15", None));
        assert_eq!(
            parse_bound("now-1d/d", None, now),
            parse("2024-03-14", None)
        );
        assert_eq!(
            parse_bound("now+1M/M", None, now),
            parse("2024-04-01", None)
        );
        assert_eq!(
            parse_bound("2024-01-31||+1M", None, now),
            parse("2024-02-29", None)
        );
        assert!(parse_bound("now-1x", None, now).is_err());
        assert_eq!(
            parse_bound_rounding("now/d", None, now, true),
            parse("2024-03-15T23:59:59.999Z", None)
        );
    }
}
