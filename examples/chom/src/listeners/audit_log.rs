//! RecordAuditLog (queued): one `audit_logs` row per event, replacing the
//! seed's scattered `AuditLog::log(...)` calls.

use diesel::prelude::*;
use diesel::sql_types::{Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use outbox::{HandlerContext, ListenerError, QueuedListener, ReceivedEvent};

use crate::listeners::{RECORD_AUDIT_LOG, tenant_id};

/// Writes the audit row of an event: tenant, actor (none for a system
/// action), the event type as the action, the aggregate, and the payload
/// as details. Runs in the inbox transaction, so a redelivered event logs
/// once (and `audit_logs.event_id` is unique as a backstop).
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordAuditLog;

impl QueuedListener for RecordAuditLog {
    fn name(&self) -> &str {
        RECORD_AUDIT_LOG
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tenant = tenant_id(event)?;
        let details = event.data_value();
        diesel::sql_query(
            "INSERT INTO audit_logs (tenant_id, actor, action, aggregate_type, aggregate_id, event_id, details, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind::<Nullable<diesel::sql_types::BigInt>, _>(Some(tenant))
        .bind::<Nullable<Text>, _>(event.actor.as_deref())
        .bind::<Text, _>(&event.event_type)
        .bind::<Text, _>(&event.aggregate_type)
        .bind::<Text, _>(&event.aggregate_id)
        .bind::<SqlUuid, _>(event.event_id)
        .bind::<Jsonb, _>(&details)
        .bind::<Timestamptz, _>(event.occurred_at)
        .execute(ctx.conn()?)?;
        Ok(())
    }
}
