//! Writing events into `outbox_events` inside the caller's transaction.
//!
//! These free functions use the default configuration; an [`Outbox`]
//! handle does the same with its own payload cap, fake mode and sync
//! listeners.
//!
//! [`Outbox`]: crate::Outbox

use diesel::PgConnection;
use diesel::RunQueryDsl;
use diesel::connection::{AnsiTransactionManager, TransactionManager};
use uuid::Uuid;

use crate::envelope::{DEFAULT_MAX_PAYLOAD_BYTES, EventEnvelope};
use crate::error::{Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::schema::outbox_events;

/// Rows per INSERT statement in a batch: 12 bind parameters a row keeps a
/// statement well under Postgres' 65,535-parameter limit.
const ROWS_PER_INSERT: usize = 1000;

/// Records `event` as a system action (no actor) in the transaction open on
/// `conn`, and returns its event id.
///
/// Never begins or commits a transaction: the event row commits or rolls
/// back with the caller's domain write. Fails with [`Error::NoTransaction`]
/// when no diesel transaction is open on `conn`, and with
/// [`Error::PayloadTooLarge`] before any SQL when the payload is over the
/// default cap of 256 KiB.
pub fn record<E: DomainEvent + ?Sized>(conn: &mut PgConnection, event: &E) -> Result<Uuid> {
    record_with(conn, event, &Metadata::default())
}

/// Like [`record`], with the actor, correlation, causation and trace
/// context in `metadata`.
pub fn record_with<E: DomainEvent + ?Sized>(
    conn: &mut PgConnection,
    event: &E,
    metadata: &Metadata,
) -> Result<Uuid> {
    let envelope = EventEnvelope::new(event, metadata, DEFAULT_MAX_PAYLOAD_BYTES)?;
    insert_envelopes(conn, std::slice::from_ref(&envelope))?;
    Ok(envelope.event_id)
}

/// Records many events in one INSERT (chunked past 1,000 rows) in the
/// transaction open on `conn`. Envelopes are checked against the default
/// cap first; nothing is written if any is invalid.
pub fn record_batch(conn: &mut PgConnection, envelopes: &[EventEnvelope]) -> Result<()> {
    for envelope in envelopes {
        envelope.validate(DEFAULT_MAX_PAYLOAD_BYTES)?;
    }
    insert_envelopes(conn, envelopes)
}

/// Inserts already validated envelopes, refusing to run outside a
/// transaction.
pub(crate) fn insert_envelopes(conn: &mut PgConnection, envelopes: &[EventEnvelope]) -> Result<()> {
    ensure_in_transaction(conn)?;
    if let [single] = envelopes {
        insert_one(conn, single)?;
        return Ok(());
    }
    for chunk in envelopes.chunks(ROWS_PER_INSERT) {
        diesel::insert_into(outbox_events::table)
            .values(chunk)
            .execute(conn)?;
    }
    Ok(())
}

/// The common case, one event, as a statement Postgres parses once per
/// connection. (diesel's own insert of the envelope is not kept prepared:
/// its `Option` fields turn into `DEFAULT` or a parameter, so its SQL
/// varies; measured, the parse was a fifth of `record`'s time.)
fn insert_one(conn: &mut PgConnection, envelope: &EventEnvelope) -> Result<()> {
    use crate::prepared::{Bind, Prepared};
    struct InsertEventSql;
    Prepared::<InsertEventSql>::new(
        "INSERT INTO outbox_events (event_id, event_type, aggregate_type, aggregate_id, tenant_id, occurred_at,
                                    actor, correlation_id, causation_id, traceparent, schema_version, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        vec![
            Bind::Uuid(envelope.event_id),
            Bind::Text(&envelope.event_type),
            Bind::Text(&envelope.aggregate_type),
            Bind::Text(&envelope.aggregate_id),
            Bind::NullableText(envelope.tenant_id.as_deref()),
            Bind::Timestamptz(&envelope.occurred_at),
            Bind::NullableText(envelope.actor.as_deref()),
            Bind::NullableText(envelope.correlation_id.as_deref()),
            Bind::NullableText(envelope.causation_id.as_deref()),
            Bind::NullableText(envelope.traceparent.as_deref()),
            Bind::Integer(envelope.schema_version),
            Bind::Jsonb(&envelope.payload),
        ],
    )
    .execute(conn)?;
    Ok(())
}

/// The outbox's atomicity rests on sharing the caller's transaction; on a
/// connection in autocommit mode the event would commit on its own.
pub(crate) fn ensure_in_transaction(conn: &mut PgConnection) -> Result<()> {
    let status = AnsiTransactionManager::transaction_manager_status_mut(conn);
    match status.transaction_depth()? {
        Some(_) => Ok(()),
        None => Err(Error::NoTransaction),
    }
}
