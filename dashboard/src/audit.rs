//! The audit trail: one `dashboard_audit` row per operator action, written
//! by [`crate::auth::audit`] (which every action goes through) next to its
//! log line, and read by the `/audit` page. Rows older than
//! [`DashboardConfig::audit_retention`](crate::DashboardConfig::audit_retention)
//! (default 90 days) are deleted in the same transaction as each write, so
//! the table stays bounded without a job of its own.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Double;
use outbox::schema::dashboard_audit;

use outbox::failed_jobs::{AttemptError, FailedJob};
use uuid::Uuid;

use crate::role::Role;

/// The most failed jobs one retry's audit row describes (its count says
/// how many the retry took).
pub(crate) const DESCRIBED_JOBS: usize = 1_000;

/// How many bytes of each error a retry's audit row keeps (the timeline shows
/// 200): a row of [`DESCRIBED_JOBS`] jobs of ten tries each
/// stays under about 4 MB.
const DESCRIBED_ERROR_BYTES: usize = 300;

/// What an action did, as its audit row keeps it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    /// `retry`, `forget`, `edit_and_retry`, `pause`, ...
    pub(crate) action: &'static str,
    /// The failed job acted on, for one-job actions.
    pub(crate) failed_job_id: Option<i64>,
    /// The selection acted on (ids or a filter), for bulk actions.
    pub(crate) selection: Option<String>,
    /// How many jobs (or rows) the action took.
    pub(crate) count: Option<i64>,
    /// Edit-and-retry: the payload before the edit. A retry: the failed
    /// jobs as they were before it deleted them (see [`Entry::retried`]),
    /// which is how an event's timeline keeps its failure and the retry.
    pub(crate) before: Option<serde_json::Value>,
    /// Edit-and-retry: the payload retried.
    pub(crate) after: Option<serde_json::Value>,
    /// Anything else worth keeping (a pause's reason).
    pub(crate) detail: String,
}

impl Entry {
    pub(crate) fn new(action: &'static str) -> Self {
        Self {
            action,
            ..Self::default()
        }
    }

    pub(crate) fn job(mut self, id: i64) -> Self {
        self.failed_job_id = Some(id);
        self.count = Some(1);
        self
    }

    pub(crate) fn selection(mut self, selection: impl Into<String>, count: i64) -> Self {
        self.selection = Some(outbox::text::bounded_text(&selection.into(), 4000));
        self.count = Some(count);
        self
    }

    pub(crate) fn detail(mut self, detail: &str) -> Self {
        self.detail = outbox::text::bounded_text(detail, 1000);
        self
    }

    pub(crate) fn edit(mut self, before: serde_json::Value, after: serde_json::Value) -> Self {
        self.before = Some(before);
        self.after = Some(after);
        self
    }

    /// A retry of `jobs` (the first [`DESCRIBED_JOBS`]): each one's id,
    /// listener, event, failed tries and final error, kept in `before`
    /// because the retry deletes the rows.
    pub(crate) fn retried(mut self, jobs: &[FailedJob]) -> Self {
        let described = jobs
            .iter()
            .take(DESCRIBED_JOBS)
            .map(|job| {
                serde_json::json!({
                    "failed_job": job.id,
                    "listener": job.listener,
                    "event_id": job.event_id,
                    "attempts": job.attempts,
                    "tries": job.errors.iter().map(|t| AttemptError {
                        error: outbox::text::bounded_text(&t.error, DESCRIBED_ERROR_BYTES),
                        ..t.clone()
                    }).collect::<Vec<_>>(),
                    "error": outbox::text::bounded_text(&job.exception, DESCRIBED_ERROR_BYTES),
                    "failed_at": job.failed_at,
                })
            })
            .collect();
        self.before = Some(serde_json::Value::Array(described));
        self
    }

    /// The log line's detail: everything but the payloads.
    pub(crate) fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = self.failed_job_id {
            parts.push(format!("failed job {id}"));
        }
        if let Some(selection) = &self.selection {
            parts.push(selection.clone());
        }
        if let (Some(count), None) = (self.count, self.failed_job_id) {
            parts.push(format!("{count} jobs"));
        }
        if !self.detail.is_empty() {
            parts.push(self.detail.clone());
        }
        parts.join(", ")
    }
}

/// Writes `entry`'s row and deletes rows older than `retention`.
pub(crate) fn write(
    conn: &mut PgConnection,
    operator: &str,
    role: Role,
    entry: &Entry,
    retention: Duration,
) -> outbox::Result<()> {
    conn.transaction(|conn| {
        diesel::insert_into(dashboard_audit::table)
            .values((
                dashboard_audit::operator.eq(operator),
                dashboard_audit::role.eq(role.as_str()),
                dashboard_audit::action.eq(entry.action),
                dashboard_audit::failed_job_id.eq(entry.failed_job_id),
                dashboard_audit::selection.eq(entry.selection.as_deref()),
                dashboard_audit::count.eq(entry.count),
                dashboard_audit::before.eq(entry.before.as_ref()),
                dashboard_audit::after.eq(entry.after.as_ref()),
                dashboard_audit::detail.eq(&entry.detail),
            ))
            .execute(conn)?;
        prune(conn, retention)?;
        Ok(())
    })
}

/// Deletes audit rows older than `retention`; returns how many.
pub(crate) fn prune(conn: &mut PgConnection, retention: Duration) -> outbox::Result<usize> {
    Ok(diesel::delete(
        dashboard_audit::table.filter(
            dashboard_audit::at.lt(diesel::dsl::sql::<diesel::sql_types::Timestamptz>(
                "now() - make_interval(secs => ",
            )
            .bind::<Double, _>(retention.as_secs_f64())
            .sql(")")),
        ),
    )
    .execute(conn)?)
}

/// A row of the audit trail.
#[derive(Debug, Clone, Queryable)]
pub(crate) struct AuditRow {
    pub(crate) id: i64,
    pub(crate) at: DateTime<Utc>,
    pub(crate) operator: String,
    pub(crate) role: String,
    pub(crate) action: String,
    pub(crate) failed_job_id: Option<i64>,
    pub(crate) selection: Option<String>,
    pub(crate) count: Option<i64>,
    pub(crate) before: Option<serde_json::Value>,
    pub(crate) after: Option<serde_json::Value>,
    pub(crate) detail: String,
}

/// Which rows the audit page shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditFilter {
    pub(crate) operator: Option<String>,
    pub(crate) action: Option<String>,
    pub(crate) since: Option<DateTime<Utc>>,
    pub(crate) until: Option<DateTime<Utc>>,
    /// Only rows with an id below this (the previous page's last).
    pub(crate) before_id: Option<i64>,
    pub(crate) limit: i64,
}

/// One page of rows matching `filter`, newest first, and whether older
/// ones exist.
pub(crate) fn page(conn: &mut PgConnection, filter: &AuditFilter) -> outbox::Result<(Vec<AuditRow>, bool)> {
    let mut query = dashboard_audit::table.into_boxed();
    if let Some(operator) = &filter.operator {
        query = query.filter(dashboard_audit::operator.eq(operator));
    }
    if let Some(action) = &filter.action {
        query = query.filter(dashboard_audit::action.eq(action));
    }
    if let Some(since) = filter.since {
        query = query.filter(dashboard_audit::at.ge(since));
    }
    if let Some(until) = filter.until {
        query = query.filter(dashboard_audit::at.lt(until));
    }
    if let Some(id) = filter.before_id {
        query = query.filter(dashboard_audit::id.lt(id));
    }
    let mut rows: Vec<AuditRow> = query
        .select((
            dashboard_audit::id,
            dashboard_audit::at,
            dashboard_audit::operator,
            dashboard_audit::role,
            dashboard_audit::action,
            dashboard_audit::failed_job_id,
            dashboard_audit::selection,
            dashboard_audit::count,
            dashboard_audit::before,
            dashboard_audit::after,
            dashboard_audit::detail,
        ))
        .order(dashboard_audit::id.desc())
        .limit(filter.limit + 1)
        .load(conn)?;
    let more = rows.len() as i64 > filter.limit;
    rows.truncate(usize::try_from(filter.limit).unwrap_or(usize::MAX));
    Ok((rows, more))
}

/// An operator's retry of a failed job of one event, as its audit row
/// described the job before the retry deleted it.
#[derive(Debug, Clone)]
pub(crate) struct OperatorRetry {
    pub(crate) operator: String,
    pub(crate) at: DateTime<Utc>,
    pub(crate) event_id: Uuid,
    pub(crate) listener: String,
    pub(crate) failed_job: i64,
    pub(crate) failed_at: Option<DateTime<Utc>>,
    pub(crate) error: String,
    pub(crate) tries: Vec<AttemptError>,
}

#[derive(QueryableByName)]
struct RetryRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    operator: String,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    job: serde_json::Value,
}

/// The retries the audit trail recorded of failed jobs of `event_ids`,
/// oldest first. Reads every retry row kept (the audit retention bounds
/// them); a row whose description does not parse is skipped.
pub(crate) fn retries_of(conn: &mut PgConnection, event_ids: &[Uuid]) -> outbox::Result<Vec<OperatorRetry>> {
    if event_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = event_ids.iter().map(Uuid::to_string).collect();
    let rows: Vec<RetryRow> = diesel::sql_query(
        "SELECT a.operator, a.at, job FROM dashboard_audit a, \
         jsonb_array_elements(CASE WHEN jsonb_typeof(a.before) = 'array' THEN a.before ELSE '[]'::jsonb END) job \
         WHERE a.action IN ('retry', 'retry_matching') AND job->>'event_id' = ANY($1) ORDER BY a.at, a.id",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(&ids)
    .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let job = &row.job;
            Some(OperatorRetry {
                operator: row.operator,
                at: row.at,
                event_id: job.get("event_id")?.as_str()?.parse().ok()?,
                listener: job.get("listener")?.as_str()?.to_owned(),
                failed_job: job.get("failed_job")?.as_i64()?,
                failed_at: job
                    .get("failed_at")
                    .and_then(|v| serde_json::from_value(v.clone()).ok()),
                error: job
                    .get("error")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                tries: job
                    .get("tries")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default(),
            })
        })
        .collect())
}
