//! The overview: the backlog by event type and its oldest row, events
//! published per minute over the last hour, the relays alive and what they
//! hold, the pause switch (with a reason), and rows the relay gave up on
//! (with a retry button).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::Form;
use maud::html;
use serde::Deserialize;

use crate::audit::Entry;
use crate::auth::{Operator, Viewer, audit};
use crate::chart;
use crate::error::{DashboardError, Result};
use crate::layout::{Refresh, age, csrf_field, link, notice, page, time};
use crate::role::Role;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub(crate) struct NoticeQuery {
    #[serde(default)]
    notice: Option<String>,
}

/// `GET /`.
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    uri: Uri,
    Query(query): Query<NoticeQuery>,
) -> Result<Response> {
    let (stats, by_type, minutes, relays, paused_by) = state
        .db(|conn| {
            Ok((
                outbox::relay::backlog_stats(conn)?,
                outbox::relay::backlog_by_event_type(conn)?,
                outbox::relay::history::published_per_minute(conn, 60)?,
                outbox::relay::presence::relays(conn)?,
                outbox::control::paused_by(conn)?,
            ))
        })
        .await?;
    let body = html! {
        h1 { "Overview" }
        (notice(query.notice.as_deref()))
        section.figures {
            div.figure { span.value #backlog { (stats.backlog) } span.label { "unpublished" } }
            div.figure { span.value #oldest { (age(stats.oldest_unpublished_age_seconds)) } span.label { "oldest unpublished" } }
            div.figure { span.value { (stats.in_flight) } span.label { "in flight" } }
            div.figure { span.value { (stats.retrying) } span.label { "retrying" } }
            div.figure.warn[stats.failed > 0] { span.value #relay-failed { (stats.failed) } span.label { "failed at the relay" } }
            div.figure { span.value { (stats.unroutable) } span.label { "unroutable" } }
        }
        section {
            h2 { "Published per minute" }
            (chart::published_per_minute(&minutes))
        }
        section #pause {
            h2 { "Relays" }
            @if stats.paused {
                p.paused #paused-state { "Paused" @if let Some(by) = &paused_by { ": " (by) } }
                @if let Some(operator) = viewer.may(Role::Operator) {
                    form method="post" action="/resume" {
                        (csrf_field(operator))
                        button type="submit" { "Resume relays" }
                    }
                }
            } @else {
                p #paused-state { "Running: relays claim and publish." }
                @if let Some(operator) = viewer.may(Role::Operator) {
                    form.row method="post" action="/pause" {
                        (csrf_field(operator))
                        label { "Reason " input type="text" name="reason" required maxlength="200" placeholder="incident 42"; }
                        button.danger type="submit" { "Pause relays" }
                    }
                }
            }
            @if relays.is_empty() {
                p.empty { "No relay is running." }
            } @else {
                table #relays {
                    thead { tr { th { "relay" } th { "host" } th { "pid" } th { "version" } th { "started" } th { "last heartbeat" } th { "state" } th.num { "leases" } th.num { "rows held" } } }
                    tbody {
                        @for relay in &relays {
                            tr {
                                td { code { (relay.relay_id) } }
                                td { (relay.hostname.as_deref().unwrap_or("?")) }
                                td { @if let Some(pid) = relay.pid { (pid) } }
                                td { (relay.version.as_deref().unwrap_or("?")) }
                                td { @if let Some(at) = relay.started_at { (time(at)) } }
                                td { @if let Some(at) = relay.heartbeat_at { (time(at)) } }
                                td { @if relay.alive { span.ok { "alive" } } @else { span.bad { "gone" } } }
                                td.num { (relay.leases) }
                                td.num { (relay.leased_rows) }
                            }
                        }
                    }
                }
            }
            @if stats.failed > 0 {
                p.warn { (stats.failed) " rows exhausted their publish attempts; their aggregates wait behind them." }
                @if let Some(operator) = viewer.may(Role::Operator) {
                    form method="post" action="/relay-failed/retry" {
                        (csrf_field(operator))
                        button type="submit" { "Retry rows failed at the relay" }
                    }
                }
            }
        }
        section {
            h2 { "Backlog by event type" }
            @if by_type.is_empty() {
                p.empty { "Nothing waits to be published." }
            } @else {
                table #backlog-by-type {
                    thead { tr { th { "event type" } th.num { "unpublished" } th { "oldest" } th.num { "failed" } } }
                    tbody {
                        @for row in &by_type {
                            tr { td { code { (row.event_type) } } td.num { (row.backlog) } td { (age(row.oldest_unpublished_age_seconds)) } td.num { (row.failed) } }
                        }
                    }
                }
            }
        }
    };
    Ok(page(
        "Overview",
        &viewer,
        Some(Refresh::of(state.config.refresh, &uri)),
        body,
    )
    .into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct PauseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// `POST /pause`.
pub(crate) async fn pause(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<PauseForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    let reason = form.reason.trim();
    if reason.is_empty() || reason.chars().count() > 200 {
        return Err(DashboardError::BadRequest(
            "reason: say why, in 1 to 200 characters".into(),
        ));
    }
    let by = format!("{} (by {})", reason, operator.name);
    audit(
        &state,
        &operator,
        Role::Operator,
        Entry::new("pause").detail(reason),
    )
    .await?;
    state
        .db(move |conn| outbox::control::pause(conn, Some(&by)))
        .await?;
    Ok(Redirect::to(&link(
        "/",
        &[(
            "notice",
            Some("Relays paused: they stop claiming within one poll interval."),
        )],
    ))
    .into_response())
}

/// `POST /resume`.
pub(crate) async fn resume(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<crate::auth::CsrfForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    audit(&state, &operator, Role::Operator, Entry::new("resume")).await?;
    state.db(outbox::control::resume).await?;
    Ok(Redirect::to(&link("/", &[("notice", Some("Relays resumed."))])).into_response())
}

/// `POST /relay-failed/retry`.
pub(crate) async fn retry_relay_failed(
    State(state): State<Arc<AppState>>,
    operator: Operator,
    Form(form): Form<crate::auth::CsrfForm>,
) -> Result<Response> {
    operator.check_csrf(&form.csrf)?;
    audit(
        &state,
        &operator,
        Role::Operator,
        Entry::new("retry_relay_failed"),
    )
    .await?;
    let rows = state.db(outbox::control::retry_failed_events).await?;
    tracing::info!(target: "outbox_dashboard::audit", operator = %operator.name, rows, "rows failed at the relay retried");
    let text = format!("{rows} rows failed at the relay are back in line.");
    Ok(Redirect::to(&link("/", &[("notice", Some(&text))])).into_response())
}
