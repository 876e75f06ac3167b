//! Replaying stored events to one listener: `outbox replay`.
//!
//! Published rows stay in `outbox_events` for the relay's retention (7 days
//! by default), then in the event log ([`crate::event_log`], forever by
//! default). [`select`] finds them in both by type, aggregate and time;
//! [`publish_to_queue`] sends them, encoded exactly as the relay encodes
//! them (CloudEvents body, same AMQP properties), through the default
//! exchange straight to one listener's queue, so no other listener gets
//! them again. The listener's inbox decides what is new: an event it
//! already handled is acknowledged without a second effect.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use lapin::Channel;

use crate::cloudevents::{amqp_properties, encode_body_with};
use crate::error::{Error, Result};
use crate::event_log::envelope_columns;
use crate::relay::store::ClaimedEvent;

/// The most events one [`select`] returns.
pub const MAX_REPLAY_LIMIT: i64 = 1_000_000;

/// Which stored events to replay. Only published rows are considered (an
/// unpublished one is still on its way through the relay).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this aggregate kind.
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    pub aggregate_id: Option<String>,
    /// Only events recorded at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub until: Option<DateTime<Utc>>,
    /// At most this many (1 to [`MAX_REPLAY_LIMIT`]).
    pub limit: i64,
}

/// Published events matching `filter`: those in the event log (in log
/// order), then those still in `outbox_events` (in seq order). Their `lease_id` is 0 and `attempts` 0 for logged events, their
/// publish attempts otherwise.
pub fn select(conn: &mut PgConnection, filter: &ReplayFilter) -> Result<Vec<ClaimedEvent>> {
    if !(1..=MAX_REPLAY_LIMIT).contains(&filter.limit) {
        return Err(Error::Config(format!(
            "limit must be between 1 and {MAX_REPLAY_LIMIT}, not {}",
            filter.limit
        )));
    }
    let matching = "($1::text IS NULL OR event_type = $1)
           AND ($2::text IS NULL OR aggregate_type = $2)
           AND ($3::text IS NULL OR aggregate_id = $3)
           AND ($4::timestamptz IS NULL OR recorded_at >= $4)
           AND ($5::timestamptz IS NULL OR recorded_at < $5)";
    let envelope = envelope_columns!();
    let query = format!(
        "SELECT {envelope}, payload, attempts, lease_id
         FROM (
             SELECT 0 AS part, position AS ord, {envelope}, payload::text AS payload, 0 AS attempts,
                    0::bigint AS lease_id
             FROM outbox_event_log WHERE {matching}
             UNION ALL
             SELECT 1, seq, {envelope}, payload::text, attempts, 0::bigint
             FROM outbox_events WHERE published_at IS NOT NULL AND {matching}
         ) stored
         ORDER BY part, ord
         LIMIT $6"
    );
    // One statement: one snapshot, so an event moved into the log
    // meanwhile is read once.
    Ok(diesel::sql_query(&query)
        .bind::<Nullable<Text>, _>(filter.event_type.as_deref())
        .bind::<Nullable<Text>, _>(filter.aggregate_type.as_deref())
        .bind::<Nullable<Text>, _>(filter.aggregate_id.as_deref())
        .bind::<Nullable<Timestamptz>, _>(filter.since)
        .bind::<Nullable<Timestamptz>, _>(filter.until)
        .bind::<BigInt, _>(filter.limit)
        .load(conn)?)
}

/// Publishes `events` in order to `queue` through the default exchange
/// (routing key = the queue), encoded as the relay encodes them with
/// CloudEvents `source`, the `dataschema` base (as the relay's
/// [`RelayConfig::dataschema_base`](crate::RelayConfig::dataschema_base))
/// and AMQP `app_id`, and waits for each confirm.
/// `channel` must be in confirm mode. Stops at the first event that is
/// not confirmed (returned because the queue does not exist, nacked, or
/// no confirm within `confirm_timeout`); returns how many were confirmed.
pub async fn publish_to_queue(
    channel: &Channel,
    queue: &str,
    events: &[ClaimedEvent],
    source: &str,
    dataschema_base: Option<&str>,
    app_id: &str,
    confirm_timeout: Duration,
) -> Result<usize> {
    for (done, row) in events.iter().enumerate() {
        let event = row.as_event_ref();
        let body = encode_body_with(&event, source, dataschema_base)?;
        let properties = amqp_properties(&event, app_id)?;
        crate::amqp::publish_to_queue(channel, queue, &body, properties, confirm_timeout)
            .await
            .map_err(|error| {
                error.in_context(|context| {
                    format!(
                        "event {} not confirmed ({context}); {done} of {} replayed",
                        row.event_id,
                        events.len()
                    )
                })
            })?;
    }
    Ok(events.len())
}
