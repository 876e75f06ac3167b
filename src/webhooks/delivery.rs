//! Delivery: two queued listeners a worker runs.
//!
//! - [`WebhookFanout`] (`webhook_fanout`, with the inbox) takes each event
//!   of the types it is bound to and, in its inbox transaction, records one
//!   `webhook.delivery_requested` event per subscribed active endpoint
//!   through the outbox itself: the fan-out happens once, and each
//!   endpoint's delivery is a message of its own.
//! - [`WebhookDelivery`] (`webhook_delivery`, no inbox: an HTTP call is
//!   not a database effect) sends one delivery: signed, with a bearer token
//!   when OAuth2 is set, bounded in time and in the answer read. A failed
//!   try is retried on the broker's delay queues like any listener's (no
//!   sleeping in the handler), so one endpoint's retries never hold up
//!   another's deliveries; after the last try the delivery is a failed job
//!   of `webhook_delivery`. An endpoint whose deliveries keep failing is
//!   short-circuited (its deliveries fail at once while it is failing, so
//!   a dead endpoint does not hold concurrency slots for its timeouts), and
//!   disabled after [`WebhookConfig::disable_after_failures`] deliveries
//!   failed in a row or [`WebhookConfig::disable_after`] of failing, with a
//!   `webhook.endpoint_disabled` event recorded in the same transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::endpoints::{self, Endpoint};
use super::rate_limit::EndpointLimiter;
use super::signing::{Secret, signature_header};
use super::try_log::TryLog;
use super::{DELIVERY_REQUESTED, WebhookConfig};
use crate::consumer::{HandlerContext, ListenerOptions, QueuedListener, ReceivedEvent};
use crate::error::{Error, ListenerError};
use crate::event::DomainEvent;

/// The fan-out listener's name.
pub const FANOUT_LISTENER: &str = "webhook_fanout";
/// The delivery listener's name.
pub const DELIVERY_LISTENER: &str = "webhook_delivery";

/// One endpoint's delivery of one event, as the delivery listener gets it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryRequested {
    /// The endpoint.
    pub endpoint_id: i64,
    /// The event (the `webhook-id`).
    pub event_id: Uuid,
    /// Its type.
    pub event_type: String,
    /// The CloudEvents document sent as the body, as the queues carry it.
    pub event: serde_json::Value,
}

/// Each delivery is an aggregate of its own (`<endpoint>.<event>`): the
/// relay keeps order only within an aggregate, and one endpoint's
/// deliveries need none (receivers order by the event's `time`), so they
/// are published in parallel rather than one confirm at a time.
impl DomainEvent for DeliveryRequested {
    fn event_type(&self) -> &'static str {
        DELIVERY_REQUESTED
    }
    fn aggregate_type(&self) -> &'static str {
        "webhook_delivery"
    }
    fn aggregate_id(&self) -> String {
        format!("{}.{}", self.endpoint_id, self.event_id)
    }
}

/// The CloudEvents document of a received event, as the relay encoded it.
pub(crate) fn document_of(event: &ReceivedEvent) -> Result<serde_json::Value, ListenerError> {
    let body = crate::cloudevents::encode_body(
        &crate::cloudevents::EventRef {
            event_id: event.event_id,
            event_type: &event.event_type,
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            tenant_id: event.tenant_id.as_deref(),
            occurred_at: event.occurred_at,
            actor: event.actor.as_deref(),
            correlation_id: event.correlation_id.as_deref(),
            causation_id: event.causation_id.as_deref(),
            traceparent: event.traceparent.as_deref(),
            schema_version: event.schema_version,
            payload_json: event.data.get(),
        },
        &event.source,
    )
    .map_err(ListenerError::permanent)?;
    serde_json::from_slice(&body).map_err(ListenerError::permanent)
}

/// Records a delivery of `document` for each active endpoint subscribed
/// to its type, on `conn` (inside the caller's transaction). Returns how
/// many.
pub(crate) fn request_deliveries(
    conn: &mut PgConnection,
    event_id: Uuid,
    event_type: &str,
    document: &serde_json::Value,
    only: Option<i64>,
) -> crate::Result<usize> {
    let subscribed = endpoints::subscribed(conn, event_type)?;
    let mut requested = 0;
    for endpoint in subscribed.iter().filter(|e| only.is_none_or(|id| e.id == id)) {
        crate::record(
            conn,
            &DeliveryRequested {
                endpoint_id: endpoint.id,
                event_id,
                event_type: event_type.to_owned(),
                event: document.clone(),
            },
        )?;
        requested += 1;
    }
    Ok(requested)
}

/// Fans events out to the subscribed endpoints (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct WebhookFanout;

impl QueuedListener for WebhookFanout {
    fn name(&self) -> &str {
        FANOUT_LISTENER
    }

    fn options(&self) -> ListenerOptions {
        ListenerOptions {
            tries: 5,
            inbox: true,
            ..ListenerOptions::default()
        }
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        if event.event_type == DELIVERY_REQUESTED {
            return Ok(());
        }
        let document = document_of(event)?;
        let conn = ctx.conn()?;
        request_deliveries(conn, event.event_id, &event.event_type, &document, None)
            .map_err(ListenerError::transient)?;
        Ok(())
    }
}

/// Sends deliveries (see the module docs).
#[derive(Clone)]
pub struct WebhookDelivery {
    config: Arc<WebhookConfig>,
    client: reqwest::Client,
    tokens: Arc<Mutex<HashMap<i64, (String, Instant)>>>,
    /// Endpoints and their secrets as read last (see [`ENDPOINT_CACHE`]):
    /// two queries less per delivery.
    endpoints: Arc<Mutex<HashMap<i64, CachedEndpoint>>>,
    /// The delivery log, written for concurrent deliveries together.
    log: Arc<TryLog>,
    /// Endpoints that answered `Retry-After`, until when.
    held: Arc<Mutex<HashMap<i64, Instant>>>,
    /// Send times given to rate-limited endpoints.
    limiter: Arc<EndpointLimiter>,
    /// One token fetch at a time per endpoint.
    fetching: Arc<Mutex<HashMap<i64, Arc<Mutex<()>>>>>,
}

type CachedEndpoint = (Option<Endpoint>, Vec<Secret>, Instant);

/// How long the delivery listener uses an endpoint as it read it: a change
/// (disabled, a rotated secret, a new URL) reaches deliveries within this.
pub const ENDPOINT_CACHE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for WebhookDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookDelivery")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What one HTTP try came to.
struct Answer {
    status: Option<u16>,
    excerpt: Option<String>,
    error: Option<String>,
    /// A `429` or `503` answer's `Retry-After`, at most [`MAX_RETRY_AFTER`].
    retry_after: Option<Duration>,
}

impl Answer {
    fn failed(error: String) -> Self {
        Self {
            status: None,
            excerpt: None,
            error: Some(error),
            retry_after: None,
        }
    }
}

/// The longest `Retry-After` honoured: a longer one (or a date further
/// ahead) waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A `Retry-After` value: delay seconds or an HTTP date, capped at
/// [`MAX_RETRY_AFTER`]; `None` when it is neither.
pub(crate) fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

impl WebhookDelivery {
    /// The delivery listener, its HTTP client made from `config`. It sends
    /// from threads of a tokio runtime's blocking pool (a worker's
    /// handlers run there), blocking on the runtime for each request.
    pub fn new(config: WebhookConfig) -> crate::Result<Self> {
        config.validate()?;
        let client = super::client(&config)?;
        Ok(Self {
            config: Arc::new(config),
            client,
            tokens: Arc::new(Mutex::new(HashMap::new())),
            endpoints: Arc::new(Mutex::new(HashMap::new())),
            log: Arc::default(),
            held: Arc::default(),
            limiter: Arc::default(),
            fetching: Arc::default(),
        })
    }

    /// The endpoint `id` and its signing secrets, read at most
    /// [`ENDPOINT_CACHE`] ago.
    fn endpoint(&self, conn: &mut PgConnection, id: i64) -> crate::Result<(Option<Endpoint>, Vec<Secret>)> {
        if let Some((endpoint, secrets, at)) = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            && at.elapsed() < ENDPOINT_CACHE
        {
            return Ok((endpoint.clone(), secrets.clone()));
        }
        let endpoint = endpoints::get(conn, id)?;
        let secrets = if endpoint.is_some() {
            endpoints::signing_secrets(conn, id)?
        } else {
            Vec::new()
        };
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, (endpoint.clone(), secrets.clone(), Instant::now()));
        Ok((endpoint, secrets))
    }

    /// Holds deliveries to endpoint `id` back for `wait` (its
    /// `Retry-After`), in this process.
    fn hold_off(&self, id: i64, wait: Duration) {
        let until = Instant::now() + wait;
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = held.entry(id).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// How long deliveries to `id` are still held back, if they are.
    fn held_off(&self, id: i64) -> Option<Duration> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let until = *held.get(&id)?;
        let now = Instant::now();
        if until <= now {
            held.remove(&id);
            return None;
        }
        Some(until - now)
    }

    fn forget_endpoint(&self, id: i64) {
        self.endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    /// The endpoint's bearer token: the cached one unless it expired or is
    /// `rejected` (answered 401), else fetched. One fetch at a time per
    /// endpoint: concurrent deliveries wait for it and share its token.
    fn token(&self, endpoint: &Endpoint, rejected: Option<&str>) -> Result<Option<String>, String> {
        let Some(oauth) = &endpoint.oauth else {
            return Ok(None);
        };
        let cached = || {
            self.tokens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&endpoint.id)
                .filter(|(token, until)| *until > Instant::now() && Some(token.as_str()) != rejected)
                .map(|(token, _)| token.clone())
        };
        if let Some(token) = cached() {
            return Ok(Some(token));
        }
        let gate = Arc::clone(
            self.fetching
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(endpoint.id)
                .or_default(),
        );
        // On the blocking pool: waiting here blocks no async thread.
        let _turn = gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(token) = cached() {
            return Ok(Some(token));
        }
        let (token, lifetime) = runtime()?.block_on(super::oauth::fetch_token(&self.client, oauth))?;
        // Cached until shortly before it expires.
        let until = Instant::now()
            + lifetime
                .saturating_sub(Duration::from_secs(30))
                .max(Duration::from_secs(1));
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(endpoint.id, (token.clone(), until));
        Ok(Some(token))
    }

    fn send(&self, endpoint: &Endpoint, secrets: &[Secret], delivery: &DeliveryRequested) -> Answer {
        let failed = Answer::failed;
        if let Err(error) = self.config.policy.check_url(&endpoint.url) {
            return failed(error.to_string());
        }
        let body = match serde_json::to_vec(&delivery.event) {
            Ok(body) => body,
            Err(error) => return failed(format!("cannot encode the body: {error}")),
        };
        let id = delivery.event_id.to_string();
        let timestamp = Utc::now().timestamp();
        let signature = match signature_header(secrets, &id, timestamp, &body) {
            Ok(signature) => signature,
            Err(error) => return failed(error.to_string()),
        };
        let mut rejected: Option<String> = None;
        loop {
            let token = match self.token(endpoint, rejected.as_deref()) {
                Ok(token) => token,
                Err(error) => return failed(format!("OAuth2 token: {error}")),
            };
            let mut request = self
                .client
                .post(&endpoint.url)
                .header("content-type", crate::cloudevents::CONTENT_TYPE)
                .header("webhook-id", &id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", &signature)
                .body(body.clone());
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(error) => return failed(error),
            };
            let answer = runtime.block_on(async {
                match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = if matches!(status, 429 | 503) {
                            response
                                .headers()
                                .get(reqwest::header::RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()))
                        } else {
                            None
                        };
                        let excerpt = super::read_bounded(response, self.config.max_response_bytes).await;
                        Answer {
                            status: Some(status),
                            excerpt: Some(excerpt),
                            error: None,
                            retry_after,
                        }
                    }
                    Err(error) => Answer::failed(super::describe(&error)),
                }
            });
            // A 401 with a cached token: fetch a new one once.
            if answer.status == Some(401) && token.is_some() && rejected.is_none() {
                rejected = token;
                continue;
            }
            return answer;
        }
    }
}

/// The runtime the calling thread belongs to (a blocking-pool thread of
/// the worker's, or of the command's).
fn runtime() -> Result<tokio::runtime::Handle, String> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        "webhooks are sent from a tokio runtime's blocking pool; this thread has none".to_owned()
    })
}

/// What a test delivery ([`WebhookDelivery::send_test`]) came to.
#[derive(Debug, Clone, Serialize)]
pub struct TestOutcome {
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// Whether it counts as delivered (2xx).
    pub delivered: bool,
    /// The start of the answer's body.
    pub excerpt: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
    /// How long it took, ms.
    pub duration_ms: f64,
}

impl WebhookDelivery {
    /// Sends endpoint `id` a `webhook.test` event now, signed as any
    /// delivery, and returns the answer (logged as a try, attempt 0).
    /// Blocks: call it off the async threads.
    pub fn send_test(&self, conn: &mut PgConnection, id: i64) -> crate::Result<TestOutcome> {
        let endpoint =
            endpoints::get(conn, id)?.ok_or_else(|| Error::NotFound(format!("webhook endpoint {id}")))?;
        let secrets = endpoints::signing_secrets(conn, id)?;
        let event_id = Uuid::now_v7();
        let delivery = DeliveryRequested {
            endpoint_id: id,
            event_id,
            event_type: "webhook.test".into(),
            event: serde_json::json!({
                "specversion": "1.0",
                "id": event_id.to_string(),
                "type": "webhook.test",
                "source": "/outbox/webhooks",
                "subject": id.to_string(),
                "time": Utc::now().to_rfc3339(),
                "datacontenttype": "application/json",
                "data": {"endpoint_id": id, "message": "a test delivery from `outbox webhooks test`"},
            }),
        };
        let (at, started) = (Utc::now(), Instant::now());
        let answer = self.send(&endpoint, &secrets, &delivery);
        let took = started.elapsed();
        let delivered = answer.status.is_some_and(|s| (200..300).contains(&s));
        endpoints::log_tries(
            conn,
            &[endpoints::NewTry::new(
                id,
                event_id,
                "webhook.test",
                0,
                at,
                took,
                answer.status,
                answer.excerpt.as_deref(),
                answer.error.as_deref(),
            )],
        )?;
        Ok(TestOutcome {
            status: answer.status,
            delivered,
            excerpt: answer.excerpt,
            error: answer.error,
            duration_ms: took.as_secs_f64() * 1000.0,
        })
    }
}

impl QueuedListener for WebhookDelivery {
    fn name(&self) -> &str {
        DELIVERY_LISTENER
    }

    fn options(&self) -> ListenerOptions {
        ListenerOptions {
            tries: self.config.tries,
            backoff: self.config.backoff.clone(),
            concurrency: self.config.concurrency,
            prefetch: u16::try_from(self.config.concurrency * 2).unwrap_or(u16::MAX),
            timeout: self.config.request_timeout * 3 + Duration::from_secs(5),
            inbox: false,
            ..ListenerOptions::default()
        }
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let delivery: DeliveryRequested = event.data_as()?;
        let (attempt, last_try) = (ctx.attempt(), ctx.is_last_try());
        let conn = ctx.conn()?;
        let (endpoint, secrets) = self
            .endpoint(conn, delivery.endpoint_id)
            .map_err(ListenerError::transient)?;
        let Some(endpoint) = endpoint else {
            tracing::info!(endpoint = delivery.endpoint_id, event_id = %delivery.event_id, "webhook endpoint removed; delivery dropped");
            return Ok(());
        };
        if !endpoint.is_active() {
            tracing::info!(endpoint = endpoint.id, event_id = %delivery.event_id, "webhook endpoint disabled; delivery dropped");
            return Ok(());
        }
        if let Some(wait) = self.held_off(endpoint.id) {
            return Err(ListenerError::deferred(
                format!("endpoint {} asked to wait (Retry-After)", endpoint.id),
                wait,
            ));
        }
        let circuit_open = endpoint.failed_deliveries >= self.config.circuit_after_failures;
        // Held until the answer is in (see rate_limit.rs); waits on the
        // handler's thread (the blocking pool) at most MAX_WAIT.
        let _room = match endpoint.rate_limit {
            Some(per_second) if !circuit_open || last_try => {
                match self.limiter.acquire(endpoint.id, per_second) {
                    Ok(permit) => Some(permit),
                    Err(wait) => {
                        return Err(ListenerError::deferred(
                            format!("endpoint {} is limited to {per_second} deliveries/s", endpoint.id),
                            wait,
                        ));
                    }
                }
            }
            _ => None,
        };
        let (at, started) = (Utc::now(), Instant::now());
        let answer = if circuit_open && !last_try {
            Answer::failed(format!(
                "not sent: the endpoint's last {} deliveries failed (sent again on the last try)",
                endpoint.failed_deliveries
            ))
        } else {
            self.send(&endpoint, &secrets, &delivery)
        };
        let delivered = answer.status.is_some_and(|s| (200..300).contains(&s));
        let error = answer
            .error
            .clone()
            .or_else(|| (!delivered).then(|| format!("HTTP {}", answer.status.unwrap_or_default())));
        let entry = endpoints::NewTry::new(
            endpoint.id,
            delivery.event_id,
            &delivery.event_type,
            attempt,
            at,
            started.elapsed(),
            answer.status,
            answer.excerpt.as_deref(),
            error.as_deref(),
        );
        self.log
            .write(conn, entry)
            .map_err(|error| ListenerError::transient(format!("cannot log the try: {error}")))?;
        if delivered {
            // Only an endpoint seen failing needs resetting: the cached
            // state is at most ENDPOINT_CACHE old, and this worker forgets
            // it at every failure it counts, so a reset missed on a stale
            // read is made by the next delivery after the cache expires.
            let failing = endpoint.failed_deliveries > 0 || endpoint.failing_since.is_some();
            if failing && super::health::succeeded(conn, endpoint.id).map_err(ListenerError::transient)? {
                self.forget_endpoint(endpoint.id);
            }
            return Ok(());
        }
        let error = error.unwrap_or_default();
        if answer.status == Some(410) {
            // Standard Webhooks: 410 Gone asks for no more deliveries.
            super::health::gone(conn, &endpoint).map_err(ListenerError::transient)?;
            self.forget_endpoint(endpoint.id);
            return Err(ListenerError::permanent(format!(
                "delivery to endpoint {} ({}): {error}: the endpoint is gone and was disabled",
                endpoint.id, endpoint.url
            )));
        }
        if last_try {
            super::health::failed_for_good(conn, &endpoint, &self.config)
                .map_err(ListenerError::transient)?;
            self.forget_endpoint(endpoint.id);
        }
        let error = format!("delivery to endpoint {} ({}): {error}", endpoint.id, endpoint.url);
        match answer.retry_after {
            Some(wait) if !last_try => {
                // Every delivery to this endpoint waits, not only this one.
                self.hold_off(endpoint.id, wait);
                Err(ListenerError::retry_after(
                    format!("{error} (Retry-After: {} s)", wait.as_secs()),
                    wait,
                ))
            }
            _ => Err(ListenerError::transient(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(120)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
