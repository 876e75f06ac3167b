//! The audit trail: every operator action, newest first, filterable by
//! operator, action and time range, a page at a time.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use crate::audit::{AuditFilter, AuditRow, page as audit_page};
use crate::auth::Viewer;
use crate::error::{DashboardError, Result};
use crate::layout::{link, page, time};
use crate::pages::params::parse_time;
use crate::state::AppState;

/// Rows an audit page shows.
const AUDIT_PAGE: i64 = 50;

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    operator: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    /// The last id of the previous page.
    #[serde(default)]
    before: Option<String>,
}

fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl AuditQuery {
    fn filter(&self) -> Result<AuditFilter> {
        let since = set(&self.since).map(|t| parse_time("since", t)).transpose()?;
        let until = set(&self.until).map(|t| parse_time("until", t)).transpose()?;
        let before_id = set(&self.before)
            .map(|t| {
                t.parse::<i64>()
                    .map_err(|_| DashboardError::BadRequest(format!("before: not an audit row id: {t:?}")))
            })
            .transpose()?;
        for (field, value) in [("operator", set(&self.operator)), ("action", set(&self.action))] {
            if value.is_some_and(|v| v.len() > 255) {
                return Err(DashboardError::BadRequest(format!(
                    "{field}: at most 255 characters"
                )));
            }
        }
        Ok(AuditFilter {
            operator: set(&self.operator).map(str::to_owned),
            action: set(&self.action).map(str::to_owned),
            since,
            until,
            before_id,
            limit: AUDIT_PAGE,
        })
    }

    fn pairs(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("operator", set(&self.operator)),
            ("action", set(&self.action)),
            ("since", set(&self.since)),
            ("until", set(&self.until)),
        ]
    }
}

/// The actions the trail records, for the filter's list.
const ACTIONS: &[&str] = &[
    "log_in",
    "log_out",
    "retry",
    "forget",
    "retry_matching",
    "forget_matching",
    "edit_and_retry",
    "pause",
    "resume",
    "retry_relay_failed",
];

/// `GET /audit`.
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<AuditQuery>,
) -> Result<Response> {
    let filter = query.filter()?;
    let (rows, more) = state.db(move |conn| audit_page(conn, &filter)).await?;
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let next = if more {
        rows.last().map(|last| {
            let before = last.id.to_string();
            let mut pairs = query.pairs();
            pairs.push(("before", Some(&before)));
            link("/audit", &pairs)
        })
    } else {
        None
    };
    let body = html! {
        h1 { "Audit trail" }
        p { "Every action taken on this dashboard, newest first. Rows are kept "
            (state.config.audit_retention.as_secs() / 86_400) " days." }
        form.filters #audit-filters method="get" action="/audit" {
            label { "Operator" input type="text" name="operator" value=(value(&query.operator)); }
            label { "Action" input type="text" name="action" list="audit-actions" value=(value(&query.action)); }
            datalist #audit-actions { @for action in ACTIONS { option value=(action) {} } }
            label { "Since" input type="text" name="since" placeholder="24h or 2026-12-01T10:00" value=(value(&query.since)); }
            label { "Until" input type="text" name="until" placeholder="RFC 3339 or UTC" value=(value(&query.until)); }
            button type="submit" { "Filter" }
            a href="/audit" { "Clear" }
        }
        @if rows.is_empty() {
            p.empty #no-audit-rows { "No action matches." }
        } @else {
            table #audit {
                thead { tr { th { "when" } th { "operator" } th { "role" } th { "action" } th { "job or selection" } th.num { "count" } th { "detail" } } }
                tbody { @for row in &rows { (audit_row(row)) } }
            }
            @if let Some(next) = next {
                p.pager { a #next-page href=(next) { "Older →" } }
            }
        }
    };
    Ok(page("Audit trail", &viewer, None, body).into_response())
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn audit_row(row: &AuditRow) -> maud::Markup {
    html! {
        tr data-audit=(row.id) data-action=(row.action) {
            td { (time(row.at)) }
            td.operator { (row.operator) }
            td { (row.role) }
            td.action { code { (row.action) } }
            td.target {
                @if let Some(id) = row.failed_job_id { "failed job " (id) }
                @if let Some(selection) = &row.selection { code { (selection) } }
            }
            td.num.count { @if let Some(count) = row.count { (count) } }
            td {
                (row.detail)
                @if let (Some(before), Some(after)) = (&row.before, &row.after) {
                    details.edit-before { summary { "before" } pre.json { (pretty(before)) } }
                    details.edit-after { summary { "after" } pre.json { (pretty(after)) } }
                } @else if let Some(before) = &row.before {
                    details.retried-jobs { summary { "the jobs as retried" } pre.json { (pretty(before)) } }
                }
            }
        }
    }
}
