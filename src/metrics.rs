//! Metric names of the relay and the worker (Prometheus conventions:
//! `outbox_` prefix, base units, `_total` counters, `_seconds` histograms),
//! the [`Health`] flags, and the `/metrics` + `/health` HTTP endpoint.
//!
//! The library records through the `metrics` facade; nothing is exported
//! until a binary installs a recorder with [`install_recorder`] and serves
//! it with [`serve`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Result};

/// Events marked published.
pub const PUBLISHED_TOTAL: &str = "outbox_published_total";
/// Failed publish attempts, by `reason` (nack, unroutable, timeout,
/// connection, encode).
pub const PUBLISH_FAILURES_TOTAL: &str = "outbox_publish_failures_total";
/// Time from an event's recording to the broker's confirm.
pub const PUBLISH_LATENCY_SECONDS: &str = "outbox_publish_latency_seconds";
/// Events the broker returned because no queue was bound to their type,
/// by `event_type`; kept as unroutable (see `RelayConfig::strict_routing`).
pub const UNROUTABLE_TOTAL: &str = "outbox_unroutable_total";
/// Kept unroutable rows in the outbox (refreshed with the backlog).
pub const UNROUTABLE_EVENTS: &str = "outbox_unroutable_events";
/// Rows claimed by this relay.
pub const CLAIMED_TOTAL: &str = "outbox_claimed_total";
/// Rows this relay held (publishing or queued behind their aggregate).
pub const IN_FLIGHT: &str = "outbox_in_flight";
/// Confirmed rows that could not be marked because the lease had run out.
pub const LEASES_LOST_TOTAL: &str = "outbox_leases_lost_total";
/// Broker sessions lost and reconnected (the relay's and the worker's).
pub const BROKER_RECONNECTS_TOTAL: &str = "outbox_broker_reconnects_total";
/// `/health`'s `broker` flag: 1 while the process is connected to the
/// broker, 0 while not (relay and worker).
pub const HEALTH_BROKER: &str = "outbox_health_broker";
/// `/health`'s `database` flag: 1 while the last database work succeeded,
/// 0 after it failed (relay and worker).
pub const HEALTH_DATABASE: &str = "outbox_health_database";
/// Unpublished rows.
pub const BACKLOG: &str = "outbox_backlog";
/// Age of the oldest unpublished row that has not failed (failed rows are
/// [`FAILED_EVENTS`], with their own alert).
pub const OLDEST_UNPUBLISHED_AGE_SECONDS: &str = "outbox_oldest_unpublished_age_seconds";
/// Rows that exhausted their publish attempts.
pub const FAILED_EVENTS: &str = "outbox_failed_events";
/// 1 while relays are paused.
pub const PAUSED: &str = "outbox_paused";
/// Published rows deleted past retention (the relay's published pruner).
pub const PRUNED_TOTAL: &str = "outbox_pruned_total";
/// Expired leases of dead relays deleted (the relay's lease cleaner).
pub const EXPIRED_LEASES_DELETED_TOTAL: &str = "outbox_expired_leases_deleted_total";
/// Failed steps of a maintenance service, by `service` (`published_pruner`,
/// `lease_cleaner`, `backlog_gauges`, `inbox_pruner`, `attempts_pruner`);
/// each is tried again next period.
pub const MAINTENANCE_FAILURES_TOTAL: &str = "outbox_maintenance_failures_total";

// The worker's.
/// Messages handled, by `listener` and `outcome`: `success`, `duplicate`
/// (inbox hit, handler skipped), `foreign` (a source the worker does not
/// accept: dead-lettered unapplied), `retry` (sent to a retry queue),
/// `deferred` (sent to a retry queue without counting a try: the listener
/// returned `ListenerError::Deferred`), `failed`
/// (failed job + dead-letter queue), `returned` (left unacknowledged at
/// shutdown or connection loss, back to the queue).
pub const LISTENER_OUTCOMES_TOTAL: &str = "outbox_listener_outcomes_total";
/// Handler run time, by `listener`.
pub const LISTENER_DURATION_SECONDS: &str = "outbox_listener_duration_seconds";
/// Events a worker did not apply because their CloudEvents `source` is
/// not one it accepts, by `listener` and `source`; dead-lettered.
pub const FOREIGN_EVENTS_TOTAL: &str = "outbox_foreign_events_total";
/// Failed jobs recorded, by `listener`.
pub const FAILED_JOBS_TOTAL: &str = "outbox_failed_jobs_total";
/// Inbox (`processed_events`) rows deleted past the inbox retention (the
/// worker's inbox pruner).
pub const INBOX_PRUNED_TOTAL: &str = "outbox_inbox_pruned_total";
/// `listener_attempts` rows deleted past the attempts retention (the
/// worker's attempts pruner).
pub const ATTEMPTS_PRUNED_TOTAL: &str = "outbox_attempts_pruned_total";
/// Retry copies past their delay plus the worker's repair grace, by
/// `listener` and `queue` (the retry queue): copies the broker did not
/// hand back (see `src/maintenance/retry_repairer.rs`).
pub const RETRY_COPIES_OVERDUE: &str = "outbox_retry_copies_overdue";
/// Overdue retry copies the worker published to their listener's queue
/// itself, by `listener` and `queue` (the retry queue they were stuck in).
pub const RETRY_COPIES_REPAIRED_TOTAL: &str = "outbox_retry_copies_repaired_total";
/// Counter: webhook delivery log rows pruned past retention.
pub const WEBHOOK_LOG_PRUNED_TOTAL: &str = "outbox_webhook_log_pruned_total";

/// Registers descriptions and units (idempotent).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        PUBLISHED_TOTAL,
        "Events marked published after the broker's confirm"
    );
    describe_counter!(PUBLISH_FAILURES_TOTAL, "Failed publish attempts by reason");
    describe_histogram!(
        PUBLISH_LATENCY_SECONDS,
        Unit::Seconds,
        "Recording to broker confirm"
    );
    describe_counter!(
        UNROUTABLE_TOTAL,
        "Events no queue was bound to, kept as unroutable, by event type"
    );
    describe_gauge!(UNROUTABLE_EVENTS, "Kept unroutable rows");
    describe_counter!(CLAIMED_TOTAL, "Rows claimed");
    describe_gauge!(IN_FLIGHT, "Rows held by this relay");
    describe_counter!(
        LEASES_LOST_TOTAL,
        "Confirmed rows not marked because the lease ran out"
    );
    describe_counter!(BROKER_RECONNECTS_TOTAL, "Broker connections lost");
    describe_gauge!(
        HEALTH_BROKER,
        "1 while connected to the broker (/health's broker flag)"
    );
    describe_gauge!(
        HEALTH_DATABASE,
        "1 while the last database work succeeded (/health's database flag)"
    );
    describe_gauge!(BACKLOG, "Unpublished rows");
    describe_gauge!(
        OLDEST_UNPUBLISHED_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest unpublished row that has not failed"
    );
    describe_gauge!(FAILED_EVENTS, "Rows that exhausted their publish attempts");
    describe_gauge!(PAUSED, "1 while relays are paused");
    describe_counter!(PRUNED_TOTAL, "Published rows pruned");
    describe_counter!(
        EXPIRED_LEASES_DELETED_TOTAL,
        "Expired leases of dead relays deleted"
    );
    describe_counter!(
        MAINTENANCE_FAILURES_TOTAL,
        "Failed maintenance steps by service, tried again next period"
    );
    describe_counter!(
        LISTENER_OUTCOMES_TOTAL,
        "Messages handled by listener and outcome"
    );
    describe_histogram!(
        LISTENER_DURATION_SECONDS,
        Unit::Seconds,
        "Listener handler run time"
    );
    describe_counter!(FAILED_JOBS_TOTAL, "Failed jobs recorded by listener");
    describe_counter!(
        FOREIGN_EVENTS_TOTAL,
        "Events from sources a worker does not accept, dead-lettered unapplied"
    );
    describe_counter!(INBOX_PRUNED_TOTAL, "Inbox rows pruned past retention");
    describe_counter!(ATTEMPTS_PRUNED_TOTAL, "Attempt counts pruned past retention");
    describe_gauge!(
        RETRY_COPIES_OVERDUE,
        "Retry copies past their delay plus the repair grace, by listener and retry queue"
    );
    describe_counter!(
        RETRY_COPIES_REPAIRED_TOTAL,
        "Overdue retry copies the worker moved to their listener's queue itself"
    );
    describe_counter!(
        WEBHOOK_LOG_PRUNED_TOTAL,
        "Webhook delivery log rows pruned past retention"
    );
}

/// Liveness of a relay or a worker, as `/health` reports it; each flag is
/// also the gauge [`HEALTH_BROKER`] or [`HEALTH_DATABASE`].
#[derive(Debug, Default)]
pub struct Health {
    broker: AtomicBool,
    database: AtomicBool,
    broker_exported: AtomicBool,
    database_exported: AtomicBool,
}

/// Stores `ok` in `flag`, and in the gauge `name` when it changed (or was
/// never exported): the flags are set on every delivery, the gauge only
/// on a change.
fn store_flag(flag: &AtomicBool, exported: &AtomicBool, name: &'static str, ok: bool) {
    let before = flag.swap(ok, Ordering::Relaxed);
    if before != ok || !exported.swap(true, Ordering::Relaxed) {
        let now = flag.load(Ordering::Relaxed);
        metrics::gauge!(name).set(if now { 1.0 } else { 0.0 });
    }
}

impl Health {
    /// Connected to the broker, and the last database work succeeded.
    pub fn is_healthy(&self) -> bool {
        self.broker_ok() && self.database_ok()
    }

    /// Whether the broker connection is up.
    pub fn broker_ok(&self) -> bool {
        self.broker.load(Ordering::Relaxed)
    }

    /// Whether the last database work succeeded.
    pub fn database_ok(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }

    pub(crate) fn set_broker_ok(&self, ok: bool) {
        store_flag(&self.broker, &self.broker_exported, HEALTH_BROKER, ok);
    }

    pub(crate) fn set_database_ok(&self, ok: bool) {
        store_flag(&self.database, &self.database_exported, HEALTH_DATABASE, ok);
    }
}

/// Latency buckets from 0.5 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle).
pub fn install_recorder() -> Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| Error::Config(format!("metrics buckets: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Another recorder was installed first (by the embedding service):
        // serve what this one sees, which is nothing of ours.
        tracing::warn!("a metrics recorder was already installed; /metrics shows only this handle's view");
    }
    let _ = HANDLE.set(handle.clone());
    describe();
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// Answers `/health`: healthy or not, and a short JSON body.
pub type HealthCheck = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

/// Serves `GET /metrics` (Prometheus text) and `GET /health` (200 or 503
/// with a JSON body) on `addr` until `shutdown` resolves. Returns the bound
/// address (use port 0 to pick a free one) once listening.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: HealthCheck,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
    serve_on(listener, handle, health, shutdown)
}

/// [`serve`] on a listener the caller bound (to choose what to do when an
/// address is taken).
pub fn serve_on(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    health: HealthCheck,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the bound address: {e}")))?;
    let task = tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else { continue };
            let handle = handle.clone();
            let health = Arc::clone(&health);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = respond(&request, &handle, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((bound, task))
}

fn respond(
    request: &Request<Incoming>,
    handle: &PrometheusHandle,
    health: &HealthCheck,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
        "/health" => {
            let (ok, body) = health();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/health`'s flags are exported as gauges, 1 ok and 0 not, and follow
    /// every change.
    #[test]
    fn health_flags_are_gauges() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let health = Health::default();
        metrics::with_local_recorder(&recorder, || {
            health.set_broker_ok(false);
            health.set_database_ok(true);
        });
        let text = handle.render();
        assert!(text.contains("outbox_health_broker 0"), "{text}");
        assert!(text.contains("outbox_health_database 1"), "{text}");
        metrics::with_local_recorder(&recorder, || {
            health.set_broker_ok(true);
            health.set_broker_ok(true);
            health.set_database_ok(false);
        });
        let text = handle.render();
        assert!(text.contains("outbox_health_broker 1"), "{text}");
        assert!(text.contains("outbox_health_database 0"), "{text}");
        assert!(!health.is_healthy());
    }
}
