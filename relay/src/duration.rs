//! Durations on the command line: `500ms`, `30s`, `5m`, `7d`, or `0`; and
//! points in time: RFC 3339, or a duration meaning "that long ago".

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Parses a human duration; a bare `0` means zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 500ms, 30s, 5m or 7d ({e})"))
}

/// Parses a point in time: RFC 3339 (`2026-11-27T12:00:00Z`) or a duration
/// meaning that long ago (`2h` is two hours before now).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = parse_duration(text).map_err(|_| {
        format!(
            "{text:?} is neither an RFC 3339 time (2026-11-27T12:00:00Z) nor a duration ago (30m, 2h, 7d)"
        )
    })?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| format!("{text:?} is too long ago"))?;
    Utc::now()
        .checked_sub_signed(ago)
        .ok_or_else(|| format!("{text:?} is too long ago"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let t = parse_time("2026-11-27T12:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-27T12:00:00+00:00");
        let ago = Utc::now() - parse_time("2h").unwrap();
        assert!((ago.num_seconds() - 7200).abs() < 5, "{ago}");
        assert!(parse_time("yesterday-ish").unwrap_err().contains("RFC 3339"));
    }
}
