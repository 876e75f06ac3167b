//! Reading operators' input: every malformed filter or form value is a 400
//! naming the field and what it accepts, never a 500.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use outbox::failed_jobs::{Cursor, Filter};
use serde::Deserialize;

use crate::error::{DashboardError, Result};

/// Rows a failed-jobs page shows by default, and at most.
pub(crate) const DEFAULT_PAGE: i64 = 50;
pub(crate) const MAX_PAGE: i64 = 500;

/// The failed-jobs filter as the query string (or a form) gives it.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct FilterQuery {
    #[serde(default)]
    pub(crate) listener: Option<String>,
    #[serde(default)]
    pub(crate) event_type: Option<String>,
    #[serde(default)]
    pub(crate) since: Option<String>,
    #[serde(default)]
    pub(crate) until: Option<String>,
    /// Text in the final error.
    #[serde(default)]
    pub(crate) error: Option<String>,
    /// An error group's normalised text (see `/failed/groups`).
    #[serde(default)]
    pub(crate) group: Option<String>,
    #[serde(default)]
    pub(crate) after: Option<String>,
    #[serde(default)]
    pub(crate) limit: Option<String>,
    #[serde(default)]
    pub(crate) notice: Option<String>,
}

fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Like [`set`] but untrimmed: an error group's text is matched exactly.
fn exact(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

fn bounded(field: &str, value: Option<&str>) -> Result<Option<String>> {
    match value {
        Some(v) if v.len() > 255 => Err(DashboardError::BadRequest(format!(
            "{field}: at most 255 characters"
        ))),
        other => Ok(other.map(str::to_owned)),
    }
}

impl FilterQuery {
    /// The library's filter, or a 400 saying which field is wrong.
    pub(crate) fn filter(&self) -> Result<Filter> {
        let limit = match set(&self.limit) {
            None => DEFAULT_PAGE,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| {
                    DashboardError::BadRequest(format!(
                        "limit: a whole number from 1 to {MAX_PAGE}, not {text:?}"
                    ))
                })?,
        };
        let since = set(&self.since).map(|t| parse_time("since", t)).transpose()?;
        let until = set(&self.until).map(|t| parse_time("until", t)).transpose()?;
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(DashboardError::BadRequest("since must be before until".into()));
        }
        let after = set(&self.after)
            .map(|t| {
                t.parse::<Cursor>()
                    .map_err(|e| DashboardError::BadRequest(format!("after: {e}")))
            })
            .transpose()?;
        Ok(Filter {
            listener: bounded("listener", set(&self.listener))?,
            event_type: bounded("event type", set(&self.event_type))?,
            since,
            until,
            error_contains: bounded("error text", set(&self.error))?,
            error_group: match exact(&self.group) {
                Some(group) if group.chars().count() > 500 => {
                    return Err(DashboardError::BadRequest(
                        "group: at most 500 characters (an error group's text)".into(),
                    ));
                }
                other => other.map(str::to_owned),
            },
            after,
            limit: Some(limit),
        })
    }

    /// The filter's own fields as link pairs (no cursor, no notice).
    pub(crate) fn pairs(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("listener", set(&self.listener)),
            ("event_type", set(&self.event_type)),
            ("since", set(&self.since)),
            ("until", set(&self.until)),
            ("error", set(&self.error)),
            ("group", exact(&self.group)),
            ("limit", set(&self.limit)),
        ]
    }

    /// Whether any condition is set (retrying "everything" is allowed, but
    /// the confirmation says so).
    pub(crate) fn is_empty(&self) -> bool {
        self.pairs().iter().take(6).all(|(_, v)| v.is_none())
    }
}

/// A time: RFC 3339, a date and time in UTC as a `datetime-local` input
/// sends it (`2026-12-01T10:00`), or a duration ago (`2h`, `30m`).
pub(crate) fn parse_time(field: &str, text: &str) -> Result<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(at.and_utc());
        }
    }
    if let Ok(ago) = humantime::parse_duration(text)
        && let Ok(ago) = chrono::Duration::from_std(ago.min(Duration::from_secs(100 * 365 * 86_400)))
    {
        return Ok(Utc::now() - ago);
    }
    Err(DashboardError::BadRequest(format!(
        "{field}: cannot read {text:?} as a time; give RFC 3339 (2026-12-01T10:00:00Z), a UTC date and time (2026-12-01T10:00) or a duration ago (2h)"
    )))
}

/// Failed job ids from a form's repeated `id` fields.
pub(crate) fn ids(values: &[String]) -> Result<Vec<i64>> {
    if values.is_empty() {
        return Err(DashboardError::BadRequest(
            "select at least one failed job".into(),
        ));
    }
    if values.len() > 10_000 {
        return Err(DashboardError::BadRequest(
            "at most 10,000 jobs at once; use retry all matching".into(),
        ));
    }
    values
        .iter()
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| DashboardError::BadRequest(format!("id: not a failed job id: {v:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filters_say_which_field() {
        let query = FilterQuery {
            since: Some("yesterday-ish".into()),
            ..FilterQuery::default()
        };
        let message = query.filter().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.starts_with("since:"), "{message}");
        let query = FilterQuery {
            limit: Some("0".into()),
            ..FilterQuery::default()
        };
        assert!(query.filter().is_err());
        assert!(parse_time("since", "2026-12-01T10:00").is_ok());
        assert!(parse_time("since", "2h").is_ok());
        assert!(ids(&["1".into(), "x".into()]).is_err());
    }
}
