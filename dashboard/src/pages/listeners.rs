//! Listeners: every listener workers registered (`outbox_listeners`), with
//! its queue, retry and dead-letter depths and its consumers (passive
//! declares over AMQP; no consumer: not running),
//! the events it is retrying and its failed jobs.

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use maud::html;

use crate::auth::Viewer;
use crate::error::Result;
use crate::layout::{Refresh, link, page, time};
use crate::state::AppState;

/// `GET /listeners`.
pub(crate) async fn show(State(state): State<Arc<AppState>>, viewer: Viewer, uri: Uri) -> Result<Response> {
    let (registered, failed, retrying) = state
        .db(|conn| {
            Ok((
                outbox::consumer::registered_listeners(conn)?,
                outbox::failed_jobs::count_by_listener(conn)?,
                outbox::consumer::retrying_by_listener(conn)?,
            ))
        })
        .await?;
    // Depths are best effort: the page still lists the listeners when the
    // broker is away, and says so.
    let mut depths = Vec::with_capacity(registered.len());
    // Consumers on each listener's queue: a worker running it is one, so
    // none means registered but not running.
    let mut consumers: Vec<Option<u32>> = Vec::with_capacity(registered.len());
    let mut broker_error = None;
    if !registered.is_empty() {
        match state.broker().await {
            Ok((connection, _)) => {
                for listener in &registered {
                    consumers.push(
                        outbox::amqp::queue_consumers(&connection, &listener.queue)
                            .await
                            .ok()
                            .map(|n| n.unwrap_or(0)),
                    );
                    match outbox::consumer::topology::measure_depths(
                        &connection,
                        &listener.queue,
                        &listener.retry_queues,
                        &listener.dead_queue,
                    )
                    .await
                    {
                        Ok(measured) => depths.push(Some(measured)),
                        Err(error) => {
                            broker_error.get_or_insert_with(|| outbox::error_chain(&error));
                            depths.push(None);
                        }
                    }
                }
            }
            Err(error) => broker_error = Some(error.to_string()),
        }
    }
    let body = html! {
        h1 { "Listeners" }
        @if let Some(error) = &broker_error {
            p.warn { "Queue depths unavailable: " (error) }
        }
        @if registered.is_empty() {
            p.empty { "No worker has registered a listener in this database yet (workers register theirs when they start)." }
        } @else {
            table #listeners {
                thead { tr {
                    th { "app" } th { "listener" } th { "queue" } th.num { "ready" } th.num { "in retry queues" }
                    th.num { "dead-lettered" } th.num { "retrying" } th.num { "failed jobs" } th { "event types" } th { "running" } th { "registered" }
                } }
                tbody {
                    @for (i, listener) in registered.iter().enumerate() {
                        @let measured = depths.get(i).and_then(Option::as_ref);
                        @let failures: i64 = failed.iter().filter(|(l, q, _)| *l == listener.listener && *q == listener.queue).map(|(_, _, n)| *n).sum();
                        @let retries: i64 = retrying.iter().filter(|(l, _)| *l == listener.listener).map(|(_, n)| *n).sum();
                        tr data-listener=(listener.listener) {
                            td { (listener.app) }
                            td { code { (listener.listener) } }
                            td { code { (listener.queue) } }
                            td.num { (depth(measured.and_then(|m| m.depth))) }
                            td.num { (measured.map_or_else(|| "?".to_owned(), |m| m.retry_depth.to_string())) }
                            td.num { (depth(measured.and_then(|m| m.dead_depth))) }
                            td.num { (retries) }
                            td.num.failures {
                                @if failures > 0 {
                                    a href=(link("/failed", &[("listener", Some(&listener.listener))])) { (failures) }
                                } @else { "0" }
                            }
                            td { (listener.event_types.join(", ")) }
                            td.running {
                                @match consumers.get(i).copied().flatten() {
                                    Some(0) => { span.bad { "not running" } }
                                    Some(n) => { span.ok { (n) " consumer" @if n > 1 { "s" } } }
                                    None => { "?" }
                                }
                            }
                            td { (time(listener.registered_at)) " by " code { (listener.worker_id) } }
                        }
                    }
                }
            }
            p.hint { "Dead-lettered counts the copies kept in " code { "<queue>.dead" } "; retrying or forgetting a failed job leaves its copy (" code { "outbox topology purge-dead" } " empties them)." }
        }
    };
    Ok(page(
        "Listeners",
        &viewer,
        Some(Refresh::of(state.config.refresh, &uri)),
        body,
    )
    .into_response())
}

fn depth(depth: Option<u32>) -> String {
    depth.map_or_else(|| "no queue".to_owned(), |d| d.to_string())
}
