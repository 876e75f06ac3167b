//! RecordAuditLog (queued): one `audit_logs` row per event, replacing the
//! seed's scattered `AuditLog::log(...)` calls.

use diesel::prelude::*;
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
        use crate::schema::audit_logs::dsl;
        // The query builder, not sql_query: the statement is prepared once
        // per connection and reused.
        diesel::insert_into(dsl::audit_logs)
            .values((
                dsl::tenant_id.eq(Some(tenant)),
                dsl::actor.eq(event.actor.as_deref()),
                dsl::action.eq(&event.event_type),
                dsl::aggregate_type.eq(&event.aggregate_type),
                dsl::aggregate_id.eq(&event.aggregate_id),
                dsl::event_id.eq(event.event_id),
                dsl::details.eq(&details),
                dsl::occurred_at.eq(event.occurred_at),
            ))
            .on_conflict(dsl::event_id)
            .do_nothing()
            .execute(ctx.conn()?)?;
        Ok(())
    }
}
