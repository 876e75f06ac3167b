//! Webhook endpoints in the database: who is subscribed to what, their
//! signing secrets (two while a rotation overlaps), OAuth2 settings, and
//! the log of every delivery try.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::Serialize;
use uuid::Uuid;

use super::outbound::OutboundPolicy;
use super::signing::{Secret, is_ed25519, new_ed25519_secret, new_secret};
use crate::error::{Error, Result};
use crate::schema::{webhook_deliveries, webhook_endpoints, webhook_secrets};

/// An endpoint's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EndpointStatus {
    /// Gets deliveries.
    Active,
    /// Gets none, with why and when.
    Disabled {
        /// Why (an operator's reason or the failure threshold).
        reason: String,
        /// When.
        at: Option<DateTime<Utc>>,
    },
}

/// OAuth2 client-credentials settings (the secret never printed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OAuthSettings {
    /// The token endpoint.
    pub token_url: String,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    #[serde(skip)]
    pub client_secret: Secret,
    /// The scope asked for, if any.
    pub scope: Option<String>,
}

/// An endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Its id.
    pub id: i64,
    /// Where deliveries go.
    pub url: String,
    /// What it is for.
    pub description: String,
    /// Event types it gets: exact (`site.created`), `site.*`, or `*`.
    pub event_types: Vec<String>,
    /// Active or disabled.
    #[serde(flatten)]
    pub status: EndpointStatus,
    /// OAuth2 client credentials, when deliveries carry a bearer token.
    pub oauth: Option<OAuthSettings>,
    /// Deliveries that failed for good in a row.
    pub failed_deliveries: i32,
    /// Since when it has been failing.
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// At most this many deliveries per second, per worker process.
    pub rate_limit: Option<u32>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = webhook_endpoints)]
struct Row {
    id: i64,
    url: String,
    description: String,
    event_types: Vec<String>,
    status: String,
    disabled_reason: Option<String>,
    disabled_at: Option<DateTime<Utc>>,
    oauth_token_url: Option<String>,
    oauth_client_id: Option<String>,
    oauth_client_secret: Option<String>,
    oauth_scope: Option<String>,
    failed_deliveries: i32,
    failing_since: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    rate_limit: Option<i32>,
}

fn from_row(row: Row) -> Endpoint {
    let oauth = match (row.oauth_token_url, row.oauth_client_id, row.oauth_client_secret) {
        (Some(token_url), Some(client_id), Some(secret)) => Some(OAuthSettings {
            token_url,
            client_id,
            client_secret: Secret::new(secret),
            scope: row.oauth_scope,
        }),
        _ => None,
    };
    Endpoint {
        id: row.id,
        url: row.url,
        description: row.description,
        event_types: row.event_types,
        status: if row.status == "active" {
            EndpointStatus::Active
        } else {
            EndpointStatus::Disabled {
                reason: row.disabled_reason.unwrap_or_default(),
                at: row.disabled_at,
            }
        },
        oauth,
        failed_deliveries: row.failed_deliveries,
        failing_since: row.failing_since,
        created_at: row.created_at,
        rate_limit: row.rate_limit.and_then(|n| u32::try_from(n).ok()),
    }
}

/// An endpoint to add.
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint {
    /// Where deliveries go (checked by the [`OutboundPolicy`]).
    pub url: String,
    /// What it is for.
    pub description: String,
    /// Event types: exact, `prefix.*` or `*`; at least one.
    pub event_types: Vec<String>,
    /// OAuth2 client credentials, if deliveries need a bearer token.
    pub oauth: Option<OAuthSettings>,
    /// At most this many deliveries per second (1 to [`MAX_RATE_LIMIT`]),
    /// per worker process; `None`: no limit. Default none.
    pub rate_limit: Option<u32>,
    /// How deliveries are signed. Default HMAC (`v1`).
    pub signing: Signing,
}

/// How an endpoint's deliveries are signed (Standard Webhooks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signing {
    /// `v1`: HMAC-SHA256 under a shared `whsec_` secret.
    #[default]
    Hmac,
    /// `v1a`: ed25519 under a `whsk_` secret key; subscribers verify with
    /// its `whpk_` public key and hold no secret.
    Ed25519,
}

/// The highest per-endpoint rate limit, deliveries per second.
pub const MAX_RATE_LIMIT: u32 = 1_000_000;

fn check_rate_limit(rate_limit: Option<u32>) -> Result<Option<i32>> {
    match rate_limit {
        None => Ok(None),
        Some(n) if (1..=MAX_RATE_LIMIT).contains(&n) => Ok(i32::try_from(n).ok()),
        Some(n) => Err(Error::InvalidInput(format!(
            "a rate limit is 1 to {MAX_RATE_LIMIT} deliveries per second, not {n}"
        ))),
    }
}

/// Sets or (with `None`) lifts endpoint `id`'s rate limit. Workers see it
/// within [`ENDPOINT_CACHE`](super::ENDPOINT_CACHE).
pub fn set_rate_limit(conn: &mut PgConnection, id: i64, rate_limit: Option<u32>) -> Result<()> {
    let rate_limit = check_rate_limit(rate_limit)?;
    let changed = diesel::update(webhook_endpoints::table.find(id))
        .set((
            webhook_endpoints::rate_limit.eq(rate_limit),
            webhook_endpoints::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)?;
    must_exist(changed, id)
}

/// Whether `pattern` is an event-type filter: `*`, `site.*`, `site.created`.
pub fn validate_pattern(pattern: &str) -> Result<()> {
    let base = pattern.strip_suffix(".*").unwrap_or(pattern);
    let ok = pattern == "*"
        || (!base.is_empty()
            && base.len() <= 255
            && base.split('.').all(|part| {
                part.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            }));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "not an event-type filter: {pattern:?} (give site.created, site.* or *)"
        )))
    }
}

/// Whether `event_type` matches `pattern`. `*` takes every event but the
/// webhook machinery's own (`webhook.*`), which must be named.
pub fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix(".*") {
        _ if pattern == "*" => !event_type.starts_with("webhook."),
        Some(prefix) => {
            event_type.len() > prefix.len() + 1
                && event_type.starts_with(prefix)
                && event_type.as_bytes()[prefix.len()] == b'.'
        }
        None => pattern == event_type,
    }
}

impl Endpoint {
    /// Whether this endpoint gets `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        event_type != super::DELIVERY_REQUESTED
            && self.event_types.iter().any(|p| pattern_matches(p, event_type))
    }

    /// Whether it gets deliveries.
    pub fn is_active(&self) -> bool {
        self.status == EndpointStatus::Active
    }
}

/// Adds an endpoint with a fresh signing secret; returns it and the secret
/// (shown to the operator once, for the receiver).
pub fn add(
    conn: &mut PgConnection,
    new: &NewEndpoint,
    policy: &OutboundPolicy,
) -> Result<(Endpoint, Secret)> {
    policy.check_url(&new.url)?;
    if new.event_types.is_empty() {
        return Err(Error::InvalidInput(
            "give at least one event type (site.created, site.* or *)".into(),
        ));
    }
    for pattern in &new.event_types {
        validate_pattern(pattern)?;
    }
    if new.description.len() > 1024 {
        return Err(Error::InvalidInput("a description is at most 1,024 bytes".into()));
    }
    if let Some(oauth) = &new.oauth {
        policy.check_url(&oauth.token_url)?;
        if oauth.client_id.is_empty() || oauth.client_secret.expose().is_empty() {
            return Err(Error::InvalidInput(
                "OAuth2 needs a client id and a client secret".into(),
            ));
        }
    }
    let rate_limit = check_rate_limit(new.rate_limit)?;
    let secret = match new.signing {
        Signing::Hmac => new_secret(),
        Signing::Ed25519 => new_ed25519_secret(),
    };
    let id = conn.transaction::<i64, Error, _>(|conn| {
        let id: i64 = diesel::insert_into(webhook_endpoints::table)
            .values((
                webhook_endpoints::url.eq(&new.url),
                webhook_endpoints::description.eq(&new.description),
                webhook_endpoints::event_types.eq(&new.event_types),
                webhook_endpoints::oauth_token_url.eq(new.oauth.as_ref().map(|o| o.token_url.as_str())),
                webhook_endpoints::oauth_client_id.eq(new.oauth.as_ref().map(|o| o.client_id.as_str())),
                webhook_endpoints::oauth_client_secret
                    .eq(new.oauth.as_ref().map(|o| o.client_secret.expose())),
                webhook_endpoints::oauth_scope.eq(new.oauth.as_ref().and_then(|o| o.scope.as_deref())),
                webhook_endpoints::rate_limit.eq(rate_limit),
            ))
            .returning(webhook_endpoints::id)
            .get_result(conn)?;
        diesel::insert_into(webhook_secrets::table)
            .values((
                webhook_secrets::endpoint_id.eq(id),
                webhook_secrets::secret.eq(secret.expose()),
            ))
            .execute(conn)?;
        Ok(id)
    })?;
    let endpoint = get(conn, id)?.ok_or_else(|| Error::NotFound(format!("webhook endpoint {id}")))?;
    Ok((endpoint, secret))
}

/// Every endpoint, by id.
pub fn list(conn: &mut PgConnection) -> Result<Vec<Endpoint>> {
    let rows: Vec<Row> = webhook_endpoints::table
        .select(Row::as_select())
        .order(webhook_endpoints::id)
        .load(conn)?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// The endpoint `id`.
pub fn get(conn: &mut PgConnection, id: i64) -> Result<Option<Endpoint>> {
    Ok(webhook_endpoints::table
        .find(id)
        .select(Row::as_select())
        .first::<Row>(conn)
        .optional()?
        .map(from_row))
}

fn must_exist(changed: usize, id: i64) -> Result<()> {
    if changed == 0 {
        Err(Error::NotFound(format!("webhook endpoint {id}")))
    } else {
        Ok(())
    }
}

/// Lets `id` get deliveries again (its failure count reset).
pub fn enable(conn: &mut PgConnection, id: i64) -> Result<()> {
    must_exist(
        diesel::update(webhook_endpoints::table.find(id))
            .set((
                webhook_endpoints::status.eq("active"),
                webhook_endpoints::disabled_reason.eq(None::<String>),
                webhook_endpoints::disabled_at.eq(None::<DateTime<Utc>>),
                webhook_endpoints::failed_deliveries.eq(0),
                webhook_endpoints::failing_since.eq(None::<DateTime<Utc>>),
                webhook_endpoints::updated_at.eq(diesel::dsl::now),
            ))
            .execute(conn)?,
        id,
    )
}

/// Stops deliveries to `id`, with `reason`.
pub fn disable(conn: &mut PgConnection, id: i64, reason: &str) -> Result<()> {
    must_exist(
        diesel::update(webhook_endpoints::table.find(id))
            .set((
                webhook_endpoints::status.eq("disabled"),
                webhook_endpoints::disabled_reason.eq(crate::text::bounded_text(reason, 1024)),
                webhook_endpoints::disabled_at.eq(diesel::dsl::now),
                webhook_endpoints::updated_at.eq(diesel::dsl::now),
            ))
            .execute(conn)?,
        id,
    )
}

/// Deletes `id` and its secrets (its delivery log stays until pruned).
pub fn remove(conn: &mut PgConnection, id: i64) -> Result<()> {
    must_exist(
        diesel::delete(webhook_endpoints::table.find(id)).execute(conn)?,
        id,
    )
}

/// Starts a rotation: a new secret signs from now on; the current ones
/// keep signing for `overlap` (so receivers can switch), then retire.
/// Returns the new secret.
pub fn rotate_secret(conn: &mut PgConnection, id: i64, overlap: Duration) -> Result<Secret> {
    let overlap_secs = overlap.as_secs_f64();
    let secret = conn.transaction::<Secret, Error, _>(|conn| {
        must_exist(webhook_endpoints::table.find(id).count().get_result::<i64>(conn)? as usize, id)?;
        // The new secret signs as the current one does (HMAC or ed25519).
        let ed25519 = signing_secrets(conn, id)?.first().is_some_and(is_ed25519);
        let secret = if ed25519 { new_ed25519_secret() } else { new_secret() };
        diesel::sql_query(
            "UPDATE webhook_secrets SET retires_at = LEAST(COALESCE(retires_at, 'infinity'), now() + make_interval(secs => $2))
             WHERE endpoint_id = $1",
        )
        .bind::<diesel::sql_types::BigInt, _>(id)
        .bind::<diesel::sql_types::Double, _>(overlap_secs)
        .execute(conn)?;
        diesel::insert_into(webhook_secrets::table)
            .values((webhook_secrets::endpoint_id.eq(id), webhook_secrets::secret.eq(secret.expose())))
            .execute(conn)?;
        diesel::delete(webhook_secrets::table.filter(webhook_secrets::endpoint_id.eq(id)).filter(webhook_secrets::retires_at.lt(diesel::dsl::now)))
            .execute(conn)?;
        Ok(secret)
    })?;
    Ok(secret)
}

/// The public keys (`whpk_...`) that verify `id`'s ed25519 signatures now,
/// newest first; none for an HMAC endpoint.
pub fn public_keys(conn: &mut PgConnection, id: i64) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for secret in signing_secrets(conn, id)? {
        keys.extend(super::signing::public_key(&secret)?);
    }
    Ok(keys)
}

/// The secrets that sign `id`'s deliveries now, newest first.
pub fn signing_secrets(conn: &mut PgConnection, id: i64) -> Result<Vec<Secret>> {
    let secrets: Vec<String> = webhook_secrets::table
        .filter(webhook_secrets::endpoint_id.eq(id))
        .filter(
            webhook_secrets::retires_at
                .is_null()
                .or(webhook_secrets::retires_at.gt(diesel::dsl::now)),
        )
        .select(webhook_secrets::secret)
        .order(webhook_secrets::id.desc())
        .load(conn)?;
    Ok(secrets.into_iter().map(Secret::new).collect())
}

/// The active endpoints subscribed to `event_type`.
pub fn subscribed(conn: &mut PgConnection, event_type: &str) -> Result<Vec<Endpoint>> {
    let rows: Vec<Row> = webhook_endpoints::table
        .filter(webhook_endpoints::status.eq("active"))
        .select(Row::as_select())
        .order(webhook_endpoints::id)
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(from_row)
        .filter(|e| e.subscribes_to(event_type))
        .collect())
}

/// One delivery try, as logged.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Serialize)]
#[diesel(table_name = webhook_deliveries)]
pub struct DeliveryTry {
    /// Row id.
    pub id: i64,
    /// The endpoint.
    pub endpoint_id: i64,
    /// The event (the `webhook-id`).
    pub event_id: Uuid,
    /// Its type.
    pub event_type: String,
    /// The try, from 1.
    pub attempt: i32,
    /// When.
    pub at: DateTime<Utc>,
    /// The HTTP status, when an answer came.
    pub status_code: Option<i32>,
    /// How long the try took.
    pub duration_ms: f64,
    /// Whether it counted as delivered (2xx).
    pub delivered: bool,
    /// The start of the answer's body.
    pub excerpt: Option<String>,
    /// What went wrong.
    pub error: Option<String>,
}

/// One try to log (see [`log_tries`]).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = webhook_deliveries)]
pub(crate) struct NewTry {
    pub(crate) endpoint_id: i64,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) attempt: i32,
    /// When the try started.
    pub(crate) at: DateTime<Utc>,
    pub(crate) status_code: Option<i32>,
    pub(crate) duration_ms: f64,
    pub(crate) delivered: bool,
    pub(crate) excerpt: Option<String>,
    pub(crate) error: Option<String>,
}

impl NewTry {
    /// The try of `event_id` (attempt `attempt`) to `endpoint_id` that
    /// started at `at` and took `duration`; the texts bounded to 2 kB.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        endpoint_id: i64,
        event_id: Uuid,
        event_type: &str,
        attempt: u32,
        at: DateTime<Utc>,
        duration: Duration,
        status_code: Option<u16>,
        excerpt: Option<&str>,
        error: Option<&str>,
    ) -> Self {
        Self {
            endpoint_id,
            event_id,
            event_type: event_type.to_owned(),
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
            at,
            status_code: status_code.map(i32::from),
            duration_ms: duration.as_secs_f64() * 1000.0,
            delivered: status_code.is_some_and(|s| (200..300).contains(&s)),
            excerpt: excerpt.map(|e| crate::text::bounded_text(e, 2048)),
            error: error.map(|e| crate::text::bounded_text(e, 2048)),
        }
    }
}

/// Logs tries, one statement.
pub(crate) fn log_tries(conn: &mut PgConnection, tries: &[NewTry]) -> Result<()> {
    // The log is diagnostic: not waiting for its WAL flush is what lets a
    // worker send hundreds of deliveries a second; a crash may lose the
    // last few log rows, never a delivery (the broker holds those).
    conn.transaction::<(), Error, _>(|conn| {
        diesel::sql_query("SET LOCAL synchronous_commit = off").execute(conn)?;
        diesel::insert_into(webhook_deliveries::table)
            .values(tries)
            .execute(conn)?;
        Ok(())
    })
}

/// The newest `limit` tries of endpoint `id` (or of every endpoint).
pub fn deliveries(conn: &mut PgConnection, id: Option<i64>, limit: i64) -> Result<Vec<DeliveryTry>> {
    let mut query = webhook_deliveries::table
        .select(DeliveryTry::as_select())
        .into_boxed();
    if let Some(id) = id {
        query = query.filter(webhook_deliveries::endpoint_id.eq(id));
    }
    Ok(query
        .order(webhook_deliveries::id.desc())
        .limit(limit.clamp(1, 10_000))
        .load(conn)?)
}

/// Deletes logged tries older than `retention`, at most `batch` rows;
/// returns how many (a worker running `webhook_delivery` does this every
/// [`WorkerConfig::prune_interval`](crate::WorkerConfig::prune_interval)).
pub fn prune_deliveries(conn: &mut PgConnection, retention: Duration, batch: i64) -> Result<usize> {
    crate::maintenance::delete_older_than::<crate::maintenance::webhook_log_pruner::WebhookLog>(
        conn,
        retention.as_secs_f64(),
        batch,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "site.created"));
        assert!(!pattern_matches("*", "webhook.endpoint_disabled"));
        assert!(pattern_matches("site.*", "site.created"));
        assert!(!pattern_matches("site.*", "sites.created"));
        assert!(!pattern_matches("site.*", "site"));
        assert!(pattern_matches("site.created", "site.created"));
        assert!(!pattern_matches("site.created", "site.deleted"));
        for ok in ["*", "site.*", "site.created", "backup.failed"] {
            assert!(validate_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Site.created", "site.", "*.created", "site.**", "a b"] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }
}
