//! Failed jobs: a filter (listener, event type, time range, text in the
//! error), pages by keyset cursor (newest first; fast at any depth), and
//! bulk actions: retry or forget the selected, retry everything matching
//! the filter after a confirmation that shows the count.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::Form;
use maud::{Markup, html};
use serde::Deserialize;

use crate::audit::{DESCRIBED_JOBS, Entry};
use crate::auth::{Operator, Viewer, audit};
use crate::error::{DashboardError, Result};
use crate::layout::{csrf_field, link, notice, page, time};
use crate::pages::params::{FilterQuery, ids};
use crate::role::Role;
use crate::state::AppState;

/// `GET /failed`.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<FilterQuery>,
) -> Result<Response> {
    let filter = query.filter()?;
    let (page_rows, listeners) = state
        .db(move |conn| {
            Ok((
                outbox::failed_jobs::list_page(conn, &filter)?,
                outbox::consumer::registered_listeners(conn)?,
            ))
        })
        .await?;
    let mut event_types: Vec<&str> = listeners
        .iter()
        .flat_map(|l| l.event_types.iter().map(String::as_str))
        .collect();
    event_types.sort_unstable();
    event_types.dedup();
    let pairs = query.pairs();
    let next = page_rows.next.map(|cursor| {
        let cursor = cursor.to_string();
        let mut with_cursor = pairs.clone();
        with_cursor.push(("after", Some(&cursor)));
        link("/failed", &with_cursor)
    });
    let body = html! {
        h1 { "Failed jobs" }
        (notice(query.notice.as_deref()))
        p { a #by-error href="/failed/groups" { "Group by error" } }
        (filter_form(&query, &listeners.iter().map(|l| l.listener.as_str()).collect::<Vec<_>>(), &event_types))
        @if page_rows.jobs.is_empty() {
            p.empty #no-failed-jobs { "No failed job matches." }
        } @else {
            form #failed-jobs method="post" action="/failed/retry" {
                @if let Some(operator) = viewer.may(Role::Operator) { (csrf_field(operator)) }
                table {
                    thead { tr {
                        th { span.visually-hidden { "select" } } th { "id" } th { "failed" } th { "listener" } th { "event type" } th { "error" } th.num { "tries" }
                    } }
                    tbody {
                        @for job in &page_rows.jobs {
                            tr data-job=(job.id) {
                                td { input type="checkbox" name="id" value=(job.id) aria-label=(format!("select failed job {}", job.id)); }
                                td { a href=(format!("/failed/{}", job.id)) { (job.id) } }
                                td { (time(job.failed_at)) }
                                td { code { (job.listener) } }
                                td { (job.event_type.as_deref().unwrap_or("?")) }
                                td.error { (outbox::text::bounded_text(&job.exception, 200)) }
                                td.num { (job.attempts) }
                            }
                        }
                    }
                }
                @if viewer.may(Role::Operator).is_some() {
                    div.actions {
                        button type="submit" formaction="/failed/retry" { "Retry selected" }
                        button.danger type="submit" formaction="/failed/forget" { "Forget selected" }
                        a.button href=(link("/failed/retry-matching", &pairs)) { "Retry all matching…" }
                        a.button.danger href=(link("/failed/forget-matching", &pairs)) { "Forget all matching…" }
                    }
                }
            }
            @if let Some(next) = next {
                p.pager { a #next-page href=(next) { "Older →" } }
            }
        }
    };
    Ok(page("Failed jobs", &viewer, None, body).into_response())
}

fn filter_form(query: &FilterQuery, listeners: &[&str], event_types: &[&str]) -> Markup {
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    html! {
        form.filters #filters method="get" action="/failed" {
            label { "Listener" input type="text" name="listener" list="listener-names" value=(value(&query.listener)); }
            datalist #listener-names { @for name in listeners { option value=(name) {} } }
            label { "Event type" input type="text" name="event_type" list="event-types" value=(value(&query.event_type)); }
            datalist #event-types { @for name in event_types { option value=(name) {} } }
            label { "Since" input type="text" name="since" placeholder="2h or 2026-12-01T10:00" value=(value(&query.since)); }
            label { "Until" input type="text" name="until" placeholder="RFC 3339 or UTC" value=(value(&query.until)); }
            label { "Error contains" input type="search" name="error" value=(value(&query.error)); }
            @if let Some(group) = query.group.as_deref().filter(|g| !g.is_empty()) {
                input type="hidden" name="group" value=(group);
                p.group { "Error group " code { (group) } }
            }
            button type="submit" { "Filter" }
            a href="/failed" { "Clear" }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct SelectedForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    id: Vec<String>,
}

/// `POST /failed/retry`: the selected jobs.
pub(crate) async fn retry_selected(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<SelectedForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    let ids = ids(&form.id)?;
    let needed = state.config.role_for_bulk(ids.len() as u64);
    let wanted = ids.clone();
    let jobs = state
        .db(move |conn| {
            wanted
                .iter()
                .take(DESCRIBED_JOBS)
                .filter_map(|id| outbox::failed_jobs::get(conn, *id).transpose())
                .collect::<outbox::Result<Vec<_>>>()
        })
        .await?;
    audit(
        &state,
        &operator,
        needed,
        Entry::new("retry")
            .selection(format!("failed jobs {ids:?}"), ids.len() as i64)
            .retried(&jobs),
    )
    .await?;
    let (_, channel) = state.broker().await?;
    let outcome =
        outbox::failed_jobs::retry_many(&state.pool, &channel, &ids, state.config.confirm_timeout).await?;
    Ok(Redirect::to(&link("/failed", &[("notice", Some(&summary(&outcome)))])).into_response())
}

/// `POST /failed/forget`: the selected jobs.
pub(crate) async fn forget_selected(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<SelectedForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    let ids = ids(&form.id)?;
    let needed = state.config.role_for_bulk(ids.len() as u64);
    audit(
        &state,
        &operator,
        needed,
        Entry::new("forget").selection(format!("failed jobs {ids:?}"), ids.len() as i64),
    )
    .await?;
    let forgotten = state
        .db(move |conn| outbox::failed_jobs::forget_many(conn, &ids))
        .await?;
    let text = format!("Forgot {forgotten} failed jobs.");
    Ok(Redirect::to(&link("/failed", &[("notice", Some(&text))])).into_response())
}

/// An action over everything a filter (or an error group) matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Retry,
    Forget,
}

impl Bulk {
    fn path(self) -> &'static str {
        match self {
            Bulk::Retry => "/failed/retry-matching",
            Bulk::Forget => "/failed/forget-matching",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Bulk::Retry => "Retry all matching",
            Bulk::Forget => "Forget all matching",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Bulk::Retry => "Retry",
            Bulk::Forget => "Forget",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Bulk::Retry => "retry_matching",
            Bulk::Forget => "forget_matching",
        }
    }
}

/// `GET /failed/retry-matching`: the confirmation, with the count.
pub(crate) async fn confirm_retry_matching(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<FilterQuery>,
) -> Result<Response> {
    confirm_matching(&state, &viewer, &query, Bulk::Retry).await
}

/// `GET /failed/forget-matching`: the confirmation, with the count.
pub(crate) async fn confirm_forget_matching(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<FilterQuery>,
) -> Result<Response> {
    confirm_matching(&state, &viewer, &query, Bulk::Forget).await
}

async fn confirm_matching(
    state: &AppState,
    viewer: &Viewer,
    query: &FilterQuery,
    bulk: Bulk,
) -> Result<Response> {
    let filter = query.filter()?;
    let count = state
        .db(move |conn| outbox::failed_jobs::count(conn, &filter))
        .await?;
    let needed = state.config.role_for_bulk(u64::try_from(count).unwrap_or(0));
    let id = format!("confirm-{}-matching", bulk.verb().to_lowercase());
    let body = html! {
        h1 { (bulk.title()) }
        @if let Some(group) = query.group.as_deref().filter(|g| !g.is_empty()) {
            p { "The error group " code #group-text { (group) } }
        }
        p #matching-count { "The filter matches " strong { (count) } " failed jobs"
            @if query.is_empty() { " (no condition: every failed job)" } "." }
        @if count == 0 {
            p { a href=(link("/failed", &query.pairs())) { "Back" } }
        } @else if let Some(operator) = viewer.may(needed) {
            form method="post" action=(bulk.path()) {
                (csrf_field(operator))
                @for (key, value) in query.pairs() {
                    @if let Some(value) = value { input type="hidden" name=(key) value=(value); }
                }
                input type="hidden" name="expected" value=(count);
                button.danger type="submit" id=(id) { (bulk.verb()) " these " (count) " jobs" }
                " "
                a href=(link("/failed", &query.pairs())) { "Cancel" }
            }
        } @else if let Some(operator) = &viewer.operator {
            p.error #role-needed { (bulk.verb()) "ing " (count) " jobs needs the " (needed) " role; you have the " (operator.role) " role." }
        } @else {
            p { a href="/login" { "Log in" } " to " (bulk.verb().to_lowercase()) " them." }
        }
    };
    Ok(page(bulk.title(), viewer, None, body).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct MatchingForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    expected: String,
    #[serde(flatten)]
    filter: FilterQuery,
}

/// The filter a confirmed bulk form acts on, after refusing it when more
/// jobs match now than the operator saw counted (they ask again), and
/// passing the audit door.
async fn confirmed(
    state: &AppState,
    operator: &Operator,
    form: &MatchingForm,
    bulk: Bulk,
) -> Result<outbox::failed_jobs::Filter> {
    operator.check_csrf(&form.csrf)?;
    let expected: i64 = form.expected.trim().parse().map_err(|_| {
        DashboardError::BadRequest("expected: the count the confirmation showed is missing".into())
    })?;
    let mut filter = form.filter.filter()?;
    filter.after = None;
    let counted = filter.clone();
    let now = state
        .db(move |conn| outbox::failed_jobs::count(conn, &counted))
        .await?;
    if now > expected {
        return Err(DashboardError::Conflict(format!(
            "{now} jobs match now, {} more than the {expected} you confirmed: open the confirmation again",
            now - expected
        )));
    }
    let mut entry = Entry::new(bulk.action()).selection(described(&filter), expected);
    if bulk == Bulk::Retry {
        let mut described_jobs = filter.clone();
        described_jobs.limit = Some(DESCRIBED_JOBS as i64);
        let jobs = state
            .db(move |conn| outbox::failed_jobs::list(conn, &described_jobs))
            .await?;
        entry = entry.retried(&jobs);
    }
    audit(
        state,
        operator,
        state.config.role_for_bulk(u64::try_from(expected).unwrap_or(0)),
        entry,
    )
    .await?;
    Ok(filter)
}

/// `POST /failed/retry-matching`: through the order-keeping retry of the
/// library.
pub(crate) async fn retry_matching(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<MatchingForm>,
) -> Result<Response> {
    let filter = confirmed(&state, &operator, &form, Bulk::Retry).await?;
    let (_, channel) = state.broker().await?;
    let outcome =
        outbox::failed_jobs::retry_matching(&state.pool, &channel, &filter, state.config.confirm_timeout)
            .await?;
    let mut pairs = form.filter.pairs();
    let text = summary(&outcome);
    pairs.push(("notice", Some(&text)));
    Ok(Redirect::to(&link("/failed", &pairs)).into_response())
}

/// `POST /failed/forget-matching`.
pub(crate) async fn forget_matching(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<MatchingForm>,
) -> Result<Response> {
    let filter = confirmed(&state, &operator, &form, Bulk::Forget).await?;
    let forgotten = state
        .db(move |conn| outbox::failed_jobs::forget_matching(conn, &filter))
        .await?;
    let mut pairs = form.filter.pairs();
    let text = format!("Forgot {forgotten} failed jobs.");
    pairs.push(("notice", Some(&text)));
    Ok(Redirect::to(&link("/failed", &pairs)).into_response())
}

/// Groups shown on `/failed/groups`, at most.
const GROUPS_SHOWN: i64 = 200;

#[derive(Debug, Deserialize)]
pub(crate) struct GroupsQuery {
    #[serde(default)]
    listener: Option<String>,
}

/// `GET /failed/groups`: failed jobs grouped by their normalised error.
pub(crate) async fn groups(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<GroupsQuery>,
) -> Result<Response> {
    let listener = query
        .listener
        .as_deref()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    if listener.as_ref().is_some_and(|l| l.len() > 255) {
        return Err(DashboardError::BadRequest(
            "listener: at most 255 characters".into(),
        ));
    }
    let shown = listener.clone();
    let groups = state
        .db(move |conn| outbox::failed_jobs::error_groups(conn, shown.as_deref(), GROUPS_SHOWN))
        .await?;
    let body = html! {
        h1 { "Failed jobs by error" }
        p { "Errors that differ only in numbers, ids and quoted values are one group. "
            a href="/failed" { "All failed jobs" } }
        form.filters method="get" action="/failed/groups" {
            label { "Listener" input type="text" name="listener" value=(listener.clone().unwrap_or_default()); }
            button type="submit" { "Filter" }
            a href="/failed/groups" { "Clear" }
        }
        @if groups.is_empty() {
            p.empty #no-error-groups { "No failed job." }
        } @else {
            table #error-groups {
                thead { tr { th.num { "jobs" } th { "listener" } th { "error" } th { "first failed" } th { "last failed" } th { span.visually-hidden { "actions" } } } }
                tbody {
                    @for group in &groups {
                        @let pairs = [("listener", Some(group.listener.as_str())), ("group", Some(group.error_group.as_str()))];
                        tr.error-group {
                            td.num.count { (group.count) }
                            td { code { (group.listener) } }
                            td.error { a href=(link("/failed", &pairs)) { (group.error_group) } }
                            td { (time(group.first_failed_at)) }
                            td { (time(group.last_failed_at)) }
                            td {
                                @if viewer.may(Role::Operator).is_some() {
                                    a.button.retry-group href=(link("/failed/retry-matching", &pairs)) { "Retry group…" }
                                    " "
                                    a.button.danger.forget-group href=(link("/failed/forget-matching", &pairs)) { "Forget group…" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Failed jobs by error", &viewer, None, body).into_response())
}

/// A filter as the audit trail keeps it: its conditions, readable.
pub(crate) fn described(filter: &outbox::failed_jobs::Filter) -> String {
    let mut parts = Vec::new();
    if let Some(listener) = &filter.listener {
        parts.push(format!("listener={listener}"));
    }
    if let Some(event_type) = &filter.event_type {
        parts.push(format!("event_type={event_type}"));
    }
    if let Some(since) = filter.since {
        parts.push(format!("since={}", since.to_rfc3339()));
    }
    if let Some(until) = filter.until {
        parts.push(format!("until={}", until.to_rfc3339()));
    }
    if let Some(text) = &filter.error_contains {
        parts.push(format!("error~{text}"));
    }
    if let Some(group) = &filter.error_group {
        parts.push(format!("group={group}"));
    }
    if parts.is_empty() {
        "every failed job".into()
    } else {
        parts.join(" ")
    }
}

fn summary(outcome: &outbox::failed_jobs::RetryOutcome) -> String {
    let mut text = format!("Retried {} failed jobs.", outcome.retried.len());
    if !outcome.kept.is_empty() {
        text.push_str(&format!(
            " Kept {} (first reason: {}).",
            outcome.kept.len(),
            outcome.kept.first().map(|(_, why)| why.as_str()).unwrap_or("")
        ));
    }
    if !outcome.missing.is_empty() {
        text.push_str(&format!(" {} were already gone.", outcome.missing.len()));
    }
    text
}
