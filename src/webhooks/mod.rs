//! Webhooks (feature `webhooks`): outside systems subscribe to domain
//! events and get them over HTTPS, signed by the Standard Webhooks
//! specification, retried on the broker, never able to slow the rest.
//!
//! | concern | file |
//! | --- | --- |
//! | endpoints, secrets, the delivery log | `endpoints.rs`: [`add`], [`list`], [`rotate_secret`], [`deliveries`] |
//! | signing (`webhook-id`, `webhook-timestamp`, `webhook-signature`) | `signing.rs`: [`sign`], [`Secret`] |
//! | where deliveries may go (HTTPS, public addresses, the allow-list) | `outbound.rs`: [`OutboundPolicy`] |
//! | the fan-out and delivery listeners | `delivery.rs`: [`WebhookFanout`], [`WebhookDelivery`] |
//! | failure counts, disabling and the event it records | `health.rs`: [`EndpointDisabled`] |
//! | writing concurrent deliveries' log rows in one statement | `try_log.rs` |
//! | pruning the delivery log | `maintenance/webhook_log_pruner.rs` (a worker running [`WebhookDelivery`]) |
//! | OAuth2 client credentials | `oauth.rs` |
//! | per-endpoint rate limits (per worker process) | `rate_limit.rs` |
//!
//! A service enables webhooks by registering [`WebhookFanout`] for the
//! event types endpoints may subscribe to and [`WebhookDelivery`] for
//! [`DELIVERY_REQUESTED`] (see [`register`]), and running its worker as
//! usual. The body of a delivery is the CloudEvents document the queues
//! carry; `webhook-id` is the event id, the same on every retry and replay,
//! so receivers can drop duplicates.

mod delivery;
mod endpoints;
mod health;
pub use health::EndpointDisabled;
mod oauth;
mod outbound;
mod rate_limit;
mod signing;
mod try_log;

use std::time::Duration;

use diesel::prelude::*;

pub use delivery::{
    DELIVERY_LISTENER, DeliveryRequested, ENDPOINT_CACHE, FANOUT_LISTENER, MAX_RETRY_AFTER, TestOutcome,
    WebhookDelivery, WebhookFanout,
};
pub use endpoints::{
    DeliveryTry, Endpoint, EndpointStatus, MAX_RATE_LIMIT, NewEndpoint, OAuthSettings, Signing, add,
    deliveries, disable, enable, get, list, pattern_matches, prune_deliveries, public_keys, remove,
    rotate_secret, set_rate_limit, signing_secrets, subscribed, validate_pattern,
};
pub use outbound::{ALLOW_ENV, OutboundPolicy, is_public};
pub use signing::{
    ED25519_SECRET_PREFIX, PUBLIC_KEY_PREFIX, SECRET_PREFIX, Secret, is_ed25519, new_ed25519_secret,
    new_secret, public_key, sign, signature_header, validate_secret,
};

use crate::error::{Error, Result};

/// The event type of one endpoint's delivery of one event.
pub const DELIVERY_REQUESTED: &str = "webhook.delivery_requested";
/// The event recorded when an endpoint is disabled for failing.
pub const ENDPOINT_DISABLED: &str = "webhook.endpoint_disabled";

/// How deliveries are made. Each default is next to its field.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where deliveries may go. Default [`OutboundPolicy::from_env`].
    pub policy: std::sync::Arc<OutboundPolicy>,
    /// Longest wait for the TCP and TLS connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Longest a whole request may take, the answer included. Default 10 s.
    pub request_timeout: Duration,
    /// Bytes of an answer read (and kept as its excerpt). Default 2,048.
    pub max_response_bytes: usize,
    /// Tries of one delivery. Default 8.
    pub tries: u32,
    /// Waits between tries (the last repeating). Default 10 s, 30 s, 1 min,
    /// 5 min, 15 min, 30 min, 1 h.
    pub backoff: Vec<Duration>,
    /// Deliveries sent at once by one worker. Default 16.
    pub concurrency: usize,
    /// After this many deliveries failed in a row, further deliveries skip
    /// their HTTP call but on their last try (the endpoint holds no slot
    /// for its timeouts). Default 3.
    pub circuit_after_failures: i32,
    /// Disable an endpoint after this many deliveries failed in a row.
    /// Default 20.
    pub disable_after_failures: i32,
    /// Disable an endpoint failing for this long. Default 3 days.
    pub disable_after: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            policy: std::sync::Arc::new(OutboundPolicy::strict()),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_response_bytes: 2048,
            tries: 8,
            backoff: [10, 30, 60, 300, 900, 1800, 3600]
                .map(Duration::from_secs)
                .to_vec(),
            concurrency: 16,
            circuit_after_failures: 3,
            disable_after_failures: 20,
            disable_after: Duration::from_secs(3 * 86_400),
        }
    }
}

impl WebhookConfig {
    /// The defaults with the allow-list of [`ALLOW_ENV`].
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            policy: std::sync::Arc::new(OutboundPolicy::from_env()?),
            ..Self::default()
        })
    }

    /// Refuses out-of-range values.
    pub fn validate(&self) -> Result<()> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::Config("webhook timeouts must be above zero".into()));
        }
        if self.max_response_bytes > 1024 * 1024 {
            return Err(Error::Config("max_response_bytes is at most 1 MiB".into()));
        }
        if self.disable_after_failures < 1 || self.circuit_after_failures < 1 {
            return Err(Error::Config("failure thresholds are at least 1".into()));
        }
        Ok(())
    }
}

/// The HTTP client of deliveries: rustls, the guarded resolver, the
/// timeouts, no redirects, no proxies from the environment.
pub(crate) fn client(config: &WebhookConfig) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("outbox-webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(std::sync::Arc::new(outbound::GuardedResolver {
            policy: std::sync::Arc::clone(&config.policy),
        }))
        .build()
        .map_err(|e| Error::Config(format!("cannot build the webhook HTTP client: {}", describe(&e))))
}

/// Reads at most `limit` bytes of an answer, as (lossy) text.
pub(crate) async fn read_bounded(mut response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// An HTTP error with its causes, without the URL's query (it may hold
/// tokens).
pub(crate) fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Registers the two listeners on `registry`: the fan-out bound to
/// `event_types` (those endpoints may subscribe to), the delivery made
/// with `config`. Call inside the worker's tokio runtime.
pub fn register(
    registry: crate::Registry,
    event_types: &[&str],
    config: WebhookConfig,
) -> Result<crate::Registry> {
    let delivery = WebhookDelivery::new(config)?;
    registry
        .queued_listener(event_types, WebhookFanout)?
        .queued_listener(&[DELIVERY_REQUESTED], delivery)
}

/// Sends stored events again to endpoint `id`: every retained, published
/// event since `since` of a type it subscribes to, with the same ids.
/// Records the deliveries (the relay and the delivery listener do the
/// rest). `source` is the CloudEvents source the relay gives them
/// ([`crate::relay::default_source`] of the database URL by default).
/// Payloads go as stored, with their `schemaversion`: upcasters live in
/// the worker's registry, which this function (and `outbox webhooks
/// replay`) does not have. Returns how many.
pub fn replay(
    conn: &mut PgConnection,
    id: i64,
    since: chrono::DateTime<chrono::Utc>,
    limit: i64,
    source: &str,
) -> Result<usize> {
    let endpoint = get(conn, id)?.ok_or_else(|| Error::NotFound(format!("webhook endpoint {id}")))?;
    if !endpoint.is_active() {
        return Err(Error::InvalidInput(format!(
            "webhook endpoint {id} is disabled: enable it first"
        )));
    }
    let events = crate::replay::select(
        conn,
        &crate::replay::ReplayFilter {
            since: Some(since),
            limit,
            event_type: None,
            aggregate_type: None,
            aggregate_id: None,
            until: None,
        },
    )?;
    conn.transaction::<usize, Error, _>(|conn| {
        let mut requested = 0;
        for event in events.iter().filter(|e| endpoint.subscribes_to(&e.event_type)) {
            let body = crate::cloudevents::encode_body(&event.as_event_ref(), source)?;
            let document: serde_json::Value =
                serde_json::from_slice(&body).map_err(|source| Error::Serialize {
                    event_type: event.event_type.clone(),
                    source,
                })?;
            requested +=
                delivery::request_deliveries(conn, event.event_id, &event.event_type, &document, Some(id))?;
        }
        Ok(requested)
    })
}

/// The failed jobs of `webhook_delivery` for endpoint `id`.
pub fn failed_delivery_jobs(conn: &mut PgConnection, id: i64) -> Result<Vec<i64>> {
    use crate::schema::failed_jobs;
    Ok(failed_jobs::table
        .filter(failed_jobs::listener.eq(DELIVERY_LISTENER))
        .filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>("payload->'data'->>'endpoint_id' = ")
                .bind::<diesel::sql_types::Text, _>(id.to_string()),
        )
        .select(failed_jobs::id)
        .order(failed_jobs::id)
        .load(conn)?)
}
