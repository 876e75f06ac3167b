//! Reading failed jobs by filter: [`list`] a page at a time, newest first,
//! with a keyset [`Cursor`] that stays fast at any depth (an index on
//! `(failed_at, id)`, and one per filter column, migration 000005),
//! [`count`] of everything a filter matches, [`forget_matching`], and
//! [`error_groups`]: failed jobs grouped by their error with what varies
//! masked (the generated column `error_group`, migration 000019).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use diesel::dsl::sql;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Timestamptz};

use super::{COLUMNS, FailedJob, MAX_LIST_LIMIT, Row, from_row};
use crate::error::{Error, Result};
use crate::schema::failed_jobs;

/// Which failed jobs [`list`] and [`count`] take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this listener's.
    pub listener: Option<String>,
    /// Only this event type's.
    pub event_type: Option<String>,
    /// Only jobs that failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only jobs that failed before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only jobs whose final error contains this text (case-insensitive;
    /// `%` and `_` are matched literally).
    pub error_contains: Option<String>,
    /// Only jobs whose normalised error (`error_group`, see
    /// [`error_groups`]) is exactly this.
    pub error_group: Option<String>,
    /// Only jobs after this position in the newest-first order (the
    /// [`Page::next`] of the previous page).
    pub after: Option<Cursor>,
    /// At most this many rows. Default (`None`) 100; at most
    /// [`MAX_LIST_LIMIT`]. [`count`] ignores it.
    pub limit: Option<i64>,
}

/// A position in the newest-first order of failed jobs: the `(failed_at,
/// id)` of the last row of a page. Printed and parsed as
/// `<microseconds since the epoch>.<id>` for links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `failed_at` of the last row seen.
    pub failed_at: DateTime<Utc>,
    /// `id` of the last row seen.
    pub id: i64,
}

impl Cursor {
    /// The position of `job`.
    pub fn of(job: &FailedJob) -> Self {
        Self {
            failed_at: job.failed_at,
            id: job.id,
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.failed_at.timestamp_micros(), self.id)
    }
}

impl FromStr for Cursor {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || Error::InvalidInput(format!("not a page cursor (<microseconds>.<id>): {text:?}"));
        let (micros, id) = text.split_once('.').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        let id: i64 = id.parse().map_err(|_| bad())?;
        let failed_at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
        Ok(Self { failed_at, id })
    }
}

/// One page of [`list`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The rows, newest first.
    pub jobs: Vec<FailedJob>,
    /// Where the next page starts, when there is one.
    pub next: Option<Cursor>,
}

type Boxed<'a> = failed_jobs::BoxedQuery<'a, Pg>;

/// The filter's conditions (all but the cursor and the limit).
pub(super) fn matching(filter: &Filter) -> Boxed<'_> {
    let mut query = failed_jobs::table.into_boxed();
    if let Some(listener) = &filter.listener {
        query = query.filter(failed_jobs::listener.eq(listener));
    }
    if let Some(event_type) = &filter.event_type {
        query = query.filter(failed_jobs::event_type.eq(event_type));
    }
    if let Some(since) = filter.since {
        query = query.filter(failed_jobs::failed_at.ge(since));
    }
    if let Some(until) = filter.until {
        query = query.filter(failed_jobs::failed_at.lt(until));
    }
    if let Some(text) = filter.error_contains.as_deref().filter(|t| !t.is_empty()) {
        query = query.filter(failed_jobs::exception.ilike(format!("%{}%", like_escaped(text))));
    }
    if let Some(group) = &filter.error_group {
        query = query.filter(failed_jobs::error_group.eq(group));
    }
    query
}

/// `text` with LIKE's wildcards and escape character escaped.
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One page of failed jobs matching `filter`, newest first.
pub fn list_page(conn: &mut PgConnection, filter: &Filter) -> Result<Page> {
    let limit = filter.limit.unwrap_or(100);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(Error::Config(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}"
        )));
    }
    let mut query = matching(filter).select(COLUMNS);
    if let Some(after) = filter.after {
        // A row comparison, which the (failed_at DESC, id DESC) index
        // answers as one range scan.
        query = query.filter(
            sql::<Bool>("(failed_jobs.failed_at, failed_jobs.id) < (")
                .bind::<Timestamptz, _>(after.failed_at)
                .sql(", ")
                .bind::<BigInt, _>(after.id)
                .sql(")"),
        );
    }
    // One row more than asked tells whether a next page exists.
    let mut rows = query
        .order((failed_jobs::failed_at.desc(), failed_jobs::id.desc()))
        .limit(limit + 1)
        .load::<Row>(conn)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let jobs: Vec<FailedJob> = rows.into_iter().map(from_row).collect();
    let next = if more { jobs.last().map(Cursor::of) } else { None };
    Ok(Page { jobs, next })
}

/// Failed jobs matching `filter`, newest first (one page; see
/// [`list_page`] for the next).
pub fn list(conn: &mut PgConnection, filter: &Filter) -> Result<Vec<FailedJob>> {
    Ok(list_page(conn, filter)?.jobs)
}

/// How many failed jobs match `filter` (its cursor and limit ignored).
pub fn count(conn: &mut PgConnection, filter: &Filter) -> Result<i64> {
    Ok(matching(filter).count().get_result(conn)?)
}

/// Deletes every failed job `filter` matches (its cursor and limit
/// ignored); returns how many.
pub fn forget_matching(conn: &mut PgConnection, filter: &Filter) -> Result<usize> {
    let ids = matching(filter).select(failed_jobs::id);
    Ok(diesel::delete(failed_jobs::table.filter(failed_jobs::id.eq_any(ids))).execute(conn)?)
}

/// Failed jobs of one listener whose errors differ only in what varies:
/// quoted values, UUIDs, numbers and hex ids (masked by the database's
/// `outbox_error_group`, kept in the generated column `error_group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorGroup {
    /// The listener whose jobs failed.
    pub listener: String,
    /// The normalised error (`order N failed for ?`), at most 500
    /// characters; what [`Filter::error_group`] takes.
    pub error_group: String,
    /// How many failed jobs the group holds.
    pub count: i64,
    /// When its oldest job failed.
    pub first_failed_at: DateTime<Utc>,
    /// When its newest job failed.
    pub last_failed_at: DateTime<Utc>,
}

/// The error groups of failed jobs (only `listener`'s when given), largest
/// first, at most `limit` (1 to [`MAX_LIST_LIMIT`]). Reads the stored
/// column: no regex runs at query time.
pub fn error_groups(conn: &mut PgConnection, listener: Option<&str>, limit: i64) -> Result<Vec<ErrorGroup>> {
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(Error::Config(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}"
        )));
    }
    let mut query = failed_jobs::table
        .group_by((failed_jobs::listener, failed_jobs::error_group))
        .select((
            failed_jobs::listener,
            failed_jobs::error_group,
            diesel::dsl::count_star(),
            diesel::dsl::min(failed_jobs::failed_at),
            diesel::dsl::max(failed_jobs::failed_at),
        ))
        .into_boxed();
    if let Some(listener) = listener {
        query = query.filter(failed_jobs::listener.eq(listener));
    }
    type GroupRow = (
        String,
        Option<String>,
        i64,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<GroupRow> = query
        .order((
            diesel::dsl::count_star().desc(),
            diesel::dsl::max(failed_jobs::failed_at).desc(),
        ))
        .limit(limit)
        .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|(listener, group, count, first, last)| {
            Some(ErrorGroup {
                listener,
                error_group: group.unwrap_or_default(),
                count,
                first_failed_at: first?,
                last_failed_at: last?,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let cursor = Cursor {
            failed_at: DateTime::from_timestamp_micros(1_764_600_000_123_456).unwrap_or_default(),
            id: 42,
        };
        assert_eq!(cursor.to_string().parse::<Cursor>().ok(), Some(cursor));
        for bad in ["", "12", "x.1", "1.x", "1.2.3", "99999999999999999999.1"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn like_wildcards_are_literal() {
        assert_eq!(like_escaped(r"50%_a\b"), r"50\%\_a\\b");
    }
}
