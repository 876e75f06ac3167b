//! "Where is my event?": search by event id, aggregate id or correlation
//! id, and an aggregate's timeline: every retained event in commit order,
//! whether and when it was published, and per listener bound to its type
//! whether it was handled, is being retried or failed.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use outbox::timeline::{ListenerState, StoredEvent};
use serde::Deserialize;

use crate::auth::Viewer;
use crate::error::{DashboardError, Result};
use crate::pages::layout::{link, page, time};
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
    let entries = state
        .db(move |conn| outbox::timeline::aggregate_timeline(conn, &k, &i, outbox::timeline::MAX_EVENTS))
        .await?;
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
                                            ListenerState::Pending => { span.pending { "not handled yet" } }
                                            ListenerState::Untracked => { span.pending { "delivered; this listener keeps no inbox, so its handling is not recorded" } }
                                        }
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
    Ok(page("Timeline", &viewer, Some(state.config.refresh), body).into_response())
}
