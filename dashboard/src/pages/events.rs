//! "Where is my event?": search by event id, aggregate id or correlation
//! id, and an aggregate's timeline: every retained event in commit order,
//! whether and when it was published, and per listener bound to its type
//! whether it was handled, is being retried or failed.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use outbox::timeline::{ListenerState, StoredEvent, TimelineEntry};
use serde::Deserialize;
use uuid::Uuid;

use crate::audit::OperatorRetry;
use crate::auth::Viewer;
use crate::error::{DashboardError, Result};
use crate::layout::{Refresh, link, page, time};
use crate::state::AppState;

const SHOWN: i64 = 200;

#[derive(Debug, Deserialize)]
pub(crate) struct SearchQuery {
    #[serde(default)]
    q: Option<String>,
}

/// `GET /events?q=`.
pub(crate) async fn search(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<SearchQuery>,
) -> Result<Response> {
    let text = query.q.as_deref().map(str::trim).unwrap_or_default().to_owned();
    let found = if text.is_empty() {
        None
    } else {
        let wanted = text.clone();
        Some(
            state
                .db(move |conn| outbox::timeline::search(conn, &wanted, SHOWN))
                .await?,
        )
    };
    let body = html! {
        h1 { "Where is my event?" }
        form.filters #event-search method="get" action="/events" {
            label { "Event id, aggregate id or correlation id"
                input type="search" name="q" value=(text) required maxlength="255" autofocus; }
            button type="submit" { "Find" }
        }
        @match &found {
            None => { p.hint { "Events are kept for the relay's retention; older ones are gone." } }
            Some(events) if events.is_empty() => { p.empty #no-events { "No retained event matches " code { (text) } "." } }
            Some(events) => {
                table #events {
                    thead { tr { th.num { "seq" } th { "event" } th { "type" } th { "aggregate" } th { "correlation" } th { "recorded" } th { "published" } } }
                    tbody {
                        @for event in events {
                            tr {
                                td.num { (event.seq) }
                                td { code { (event.event_id) } }
                                td { (event.event_type) }
                                td { a href=(timeline_link(event)) { (event.aggregate_type) " " (event.aggregate_id) } }
                                td { (event.correlation_id.as_deref().unwrap_or("")) }
                                td { (time(event.recorded_at)) }
                                td { (publish_state(event)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Where is my event?", &viewer, None, body).into_response())
}

fn timeline_link(event: &StoredEvent) -> String {
    link(
        "/timeline",
        &[
            ("aggregate_type", Some(&event.aggregate_type)),
            ("aggregate_id", Some(&event.aggregate_id)),
        ],
    )
}

fn publish_state(event: &StoredEvent) -> Markup {
    html! {
        @if let Some(at) = event.published_at {
            span.ok { "published " } (time(at))
            @if event.unroutable_at.is_some() { " " span.warn { "(unroutable: no queue was bound)" } }
        } @else if event.failed_at.is_some() {
            span.bad { "failed at the relay" } @if let Some(e) = &event.last_error { ": " (e) }
        } @else if event.attempts > 0 {
            span.warn { "retrying publish (" (event.attempts) " attempts)" }
        } @else {
            span.pending { "waiting to be published" }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct TimelineQuery {
    #[serde(default)]
    aggregate_type: Option<String>,
    #[serde(default)]
    aggregate_id: Option<String>,
}

/// `GET /timeline?aggregate_type=&aggregate_id=`.
pub(crate) async fn timeline(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    uri: Uri,
    Query(query): Query<TimelineQuery>,
) -> Result<Response> {
    let (Some(kind), Some(id)) = (
        query.aggregate_type.filter(|t| !t.trim().is_empty()),
        query.aggregate_id.filter(|t| !t.trim().is_empty()),
    ) else {
        return Err(DashboardError::BadRequest(
            "a timeline needs aggregate_type and aggregate_id".into(),
        ));
    };
    if kind.len() > 255 || id.len() > 255 {
        return Err(DashboardError::BadRequest(
            "aggregate type and id are at most 255 characters".into(),
        ));
    }
    let (k, i) = (kind.clone(), id.clone());
    let (entries, retries) = state
        .db(move |conn| {
            let entries = outbox::timeline::aggregate_timeline(conn, &k, &i, outbox::timeline::MAX_EVENTS)?;
            let ids: Vec<_> = entries.iter().map(|e| e.event.event_id).collect();
            let retries = crate::audit::retries_of(conn, &ids)?;
            Ok((entries, retries))
        })
        .await?;
    let idle = idle_queues(&state, &entries).await;
    let body = html! {
        h1 { "Timeline of " (kind) " " code { (id) } }
        @if entries.is_empty() {
            p.empty { "No retained event of this aggregate." }
        } @else {
            ol.timeline #timeline {
                @for entry in &entries {
                    li.event data-event-type=(entry.event.event_type) {
                        div.head {
                            span.seq { "#" (entry.event.seq) } " "
                            strong { (entry.event.event_type) } " "
                            code { (entry.event.event_id) }
                        }
                        div { "occurred " (time(entry.event.occurred_at)) " · recorded " (time(entry.event.recorded_at))
                            @if let Some(actor) = &entry.event.actor { " · by " (actor) } }
                        div.publish { (publish_state(&entry.event)) }
                        @if entry.listeners.is_empty() {
                            p.hint { "No registered listener is bound to this type." }
                        } @else {
                            ul.listeners {
                                @for outcome in &entry.listeners {
                                    li data-listener=(outcome.listener) {
                                        code { (outcome.app) "." (outcome.listener) } ": "
                                        @match &outcome.state {
                                            ListenerState::Handled { at } => { span.ok { "handled" } " " (time(*at)) }
                                            ListenerState::Failed { failed_job, at, error } => {
                                                span.bad { "failed" } " " (time(*at)) " · "
                                                a href=(format!("/failed/{failed_job}")) { "failed job " (failed_job) }
                                                " · " span.error { (outbox::text::bounded_text(error, 200)) }
                                            }
                                            ListenerState::Retrying { attempts, at } => {
                                                span.warn { "retrying (" (attempts) " failed tries, last " } (time(*at)) span.warn { ")" }
                                            }
                                            ListenerState::Pending if idle.contains(&outcome.queue) => {
                                                span.bad.not-running { "not running" } ": no worker consumes " code { (outcome.queue) }
                                            }
                                            ListenerState::Pending => { span.pending { "not handled yet" } }
                                            ListenerState::Untracked => { span.pending { "delivered; this listener keeps no inbox, so its handling is not recorded" } }
                                        }
                                        (retried_by(&retries, entry.event.event_id, &outcome.listener))
                                    }
                                }
                            }
                        }
                        details { summary { "payload" } pre.json { (serde_json::to_string_pretty(&entry.event.payload).unwrap_or_default()) } }
                    }
                }
            }
            @if entries.len() as i64 >= outbox::timeline::MAX_EVENTS {
                p.hint { "The first " (outbox::timeline::MAX_EVENTS) " events are shown." }
            }
        }
    };
    Ok(page(
        "Timeline",
        &viewer,
        Some(Refresh::of(state.config.refresh, &uri)),
        body,
    )
    .into_response())
}

/// The queues of listeners still waiting for an event that no worker
/// consumes (a passive declare's consumer count is 0, or the queue is
/// gone): those listeners are registered but not running. Best effort:
/// with the broker away none is named, and the page says "not handled yet".
async fn idle_queues(state: &AppState, entries: &[TimelineEntry]) -> Vec<String> {
    let mut waiting: Vec<&str> = entries
        .iter()
        .flat_map(|e| &e.listeners)
        .filter(|o| o.state == ListenerState::Pending)
        .map(|o| o.queue.as_str())
        .collect();
    waiting.sort_unstable();
    waiting.dedup();
    if waiting.is_empty() {
        return Vec::new();
    }
    let Ok((connection, _)) = state.broker().await else {
        return Vec::new();
    };
    let mut idle = Vec::new();
    for queue in waiting {
        match outbox::amqp::queue_consumers(&connection, queue).await {
            Ok(Some(0) | None) => idle.push(queue.to_owned()),
            Ok(Some(_)) => {}
            Err(error) => {
                tracing::debug!(queue, error = %outbox::error_chain(&error), "cannot count a queue's consumers");
            }
        }
    }
    idle
}

/// The operators' retries of `listener`'s failed job for `event_id`: who
/// and when, and the failed tries the job had.
fn retried_by(retries: &[OperatorRetry], event_id: Uuid, listener: &str) -> Markup {
    html! {
        @for retry in retries.iter().filter(|r| r.event_id == event_id && r.listener == listener) {
            div.retried data-failed-job=(retry.failed_job) {
                "failed job " (retry.failed_job)
                @if let Some(at) = retry.failed_at { " failed " (time(at)) }
                " after " (retry.tries.len()) " tries · " span.operator { "retried by " strong { (retry.operator) } } " " (time(retry.at))
                @if !retry.error.is_empty() { " · " span.error { (outbox::text::bounded_text(&retry.error, 200)) } }
                @if !retry.tries.is_empty() {
                    details { summary { "failed tries" }
                        ol.tries { @for attempt in &retry.tries {
                            li { "try " (attempt.attempt) " " (time(attempt.at)) ": " (outbox::text::bounded_text(&attempt.error, 200)) }
                        } }
                    }
                }
            }
        }
    }
}
