//! An endpoint's failure count: reset by a delivery that succeeds, raised
//! by one that failed for good, and past the thresholds the endpoint is
//! disabled with a `webhook.endpoint_disabled` event recorded in the same
//! transaction.

use chrono::Utc;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::endpoints::Endpoint;
use super::{ENDPOINT_DISABLED, WebhookConfig};
use crate::DomainEvent;
use crate::error::{Error, Result};
use crate::schema::webhook_endpoints;

/// Recorded when an endpoint is disabled for failing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointDisabled {
    /// The endpoint.
    pub endpoint_id: i64,
    /// Its URL.
    pub url: String,
    /// Why.
    pub reason: String,
    /// Deliveries that failed in a row.
    pub failed_deliveries: i32,
}

impl DomainEvent for EndpointDisabled {
    fn event_type(&self) -> &'static str {
        ENDPOINT_DISABLED
    }
    fn aggregate_type(&self) -> &'static str {
        "webhook_endpoint"
    }
    fn aggregate_id(&self) -> String {
        self.endpoint_id.to_string()
    }
}

/// A delivery to `id` succeeded: the endpoint is healthy again. Returns
/// whether it had been failing.
pub(crate) fn succeeded(conn: &mut PgConnection, id: i64) -> Result<bool> {
    let reset = diesel::update(
        webhook_endpoints::table.find(id).filter(
            webhook_endpoints::failed_deliveries
                .gt(0)
                .or(webhook_endpoints::failing_since.is_not_null()),
        ),
    )
    .set((
        webhook_endpoints::failed_deliveries.eq(0),
        webhook_endpoints::failing_since.eq(None::<chrono::DateTime<Utc>>),
    ))
    .execute(conn)?;
    Ok(reset > 0)
}

/// `endpoint` answered `410 Gone`: disabled at once (if active), with a
/// `webhook.endpoint_disabled` event in the same transaction.
pub(crate) fn gone(conn: &mut PgConnection, endpoint: &Endpoint) -> Result<bool> {
    conn.transaction::<bool, Error, _>(|conn| {
        disable_recorded(
            conn,
            endpoint,
            "answered 410 Gone".into(),
            endpoint.failed_deliveries,
        )
    })
}

/// A delivery to `endpoint` failed after its last try. Returns whether
/// the endpoint was disabled for it.
pub(crate) fn failed_for_good(
    conn: &mut PgConnection,
    endpoint: &Endpoint,
    config: &WebhookConfig,
) -> Result<bool> {
    conn.transaction::<bool, Error, _>(|conn| {
        let (failed, since): (i32, Option<chrono::DateTime<Utc>>) =
            diesel::update(webhook_endpoints::table.find(endpoint.id))
                .set((
                    webhook_endpoints::failed_deliveries.eq(webhook_endpoints::failed_deliveries + 1),
                    webhook_endpoints::failing_since.eq(diesel::dsl::sql::<
                        diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
                    >(
                        "COALESCE(failing_since, now())"
                    )),
                ))
                .returning((
                    webhook_endpoints::failed_deliveries,
                    webhook_endpoints::failing_since,
                ))
                .get_result(conn)?;
        let failing_for = since
            .map(|s| (Utc::now() - s).to_std().unwrap_or_default())
            .unwrap_or_default();
        let reason = if failed >= config.disable_after_failures {
            format!("{failed} deliveries in a row failed")
        } else if failing_for >= config.disable_after {
            format!("failing for {}", humanize(failing_for))
        } else {
            return Ok(false);
        };
        disable_recorded(conn, endpoint, reason, failed)
    })
}

/// Disables `endpoint` if it is active and records why; inside the
/// caller's transaction. Returns whether it was disabled now.
fn disable_recorded(
    conn: &mut PgConnection,
    endpoint: &Endpoint,
    reason: String,
    failed: i32,
) -> Result<bool> {
    let disabled = diesel::update(
        webhook_endpoints::table
            .find(endpoint.id)
            .filter(webhook_endpoints::status.eq("active")),
    )
    .set((
        webhook_endpoints::status.eq("disabled"),
        webhook_endpoints::disabled_reason.eq(&reason),
        webhook_endpoints::disabled_at.eq(diesel::dsl::now),
    ))
    .execute(conn)?;
    if disabled == 1 {
        tracing::warn!(endpoint = endpoint.id, url = %endpoint.url, reason = %reason, "webhook endpoint disabled");
        crate::record(
            conn,
            &EndpointDisabled {
                endpoint_id: endpoint.id,
                url: endpoint.url.clone(),
                reason,
                failed_deliveries: failed,
            },
        )?;
    }
    Ok(disabled == 1)
}

fn humanize(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 86_400 {
        format!("{} days", secs / 86_400)
    } else if secs >= 3_600 {
        format!("{} hours", secs / 3_600)
    } else {
        format!("{secs} s")
    }
}
