//! Durations on the command line: `500ms`, `30s`, `5m`, `7d`, or `0`.

use std::time::Duration;

/// Parses a human duration; a bare `0` means zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 500ms, 30s, 5m or 7d ({e})"))
}
