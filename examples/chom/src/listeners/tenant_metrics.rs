//! UpdateTenantMetrics (queued): recomputes a tenant's cached stats from
//! the source tables, replacing the seed's `updateCachedStats()` model
//! hooks.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use outbox::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, ReceivedEvent};

use crate::listeners::{UPDATE_TENANT_METRICS, tenant_id};

/// Recomputes `tenant_stats` for the event's tenant: live sites, active
/// sites, their storage, backups, failed backups.
///
/// Idempotent by construction (it recounts, never increments), so it runs
/// without the inbox: a duplicate just recounts. Concurrent recounts of
/// one tenant are serialized by a row lock on its stats row, so the last
/// one to commit has seen every committed change. Skips (succeeds) when
/// the tenant has been deleted.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpdateTenantMetrics;

impl UpdateTenantMetrics {
    /// No inbox (idempotent by construction); otherwise the defaults.
    pub fn base_options() -> ListenerOptions {
        ListenerOptions {
            inbox: false,
            ..ListenerOptions::default()
        }
    }
}

impl QueuedListener for UpdateTenantMetrics {
    fn name(&self) -> &str {
        UPDATE_TENANT_METRICS
    }

    fn options(&self) -> ListenerOptions {
        Self::base_options()
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tenant = tenant_id(event)?;
        let recounted = ctx.conn()?.transaction(|conn| recount(conn, tenant))?;
        if !recounted {
            tracing::info!(tenant, event_id = %event.event_id, "tenant is gone; stats skipped");
        }
        Ok(())
    }
}

/// Recounts `tenant`'s stats in the open transaction; false when the
/// tenant no longer exists.
pub(crate) fn recount(conn: &mut PgConnection, tenant: i64) -> QueryResult<bool> {
    // Locks the tenant's stats row (creating it first if needed): concurrent
    // recounts of one tenant run one after the other, and each statement
    // below sees everything committed before it started.
    let locked = diesel::sql_query(
        "INSERT INTO tenant_stats (tenant_id)
         SELECT id FROM tenants WHERE id = $1
         ON CONFLICT (tenant_id) DO UPDATE SET updated_at = tenant_stats.updated_at
         RETURNING tenant_id",
    )
    .bind::<BigInt, _>(tenant)
    .execute(conn)?;
    if locked == 0 {
        return Ok(false);
    }
    diesel::sql_query(
        "UPDATE tenant_stats SET
             site_count = s.sites,
             active_site_count = s.active,
             storage_bytes = s.storage,
             backup_count = b.backups,
             failed_backup_count = b.failed,
             updated_at = now()
         FROM (SELECT count(*) AS sites,
                      count(*) FILTER (WHERE status = 'active') AS active,
                      COALESCE(sum(storage_bytes), 0)::bigint AS storage
               FROM sites WHERE tenant_id = $1 AND deleted_at IS NULL) s,
              (SELECT count(*) AS backups,
                      count(*) FILTER (WHERE status = 'failed') AS failed
               FROM backups WHERE tenant_id = $1) b
         WHERE tenant_stats.tenant_id = $1",
    )
    .bind::<BigInt, _>(tenant)
    .execute(conn)?;
    Ok(true)
}
