//! UpdateTenantMetrics (a projection): recomputes a tenant's cached stats
//! from the source tables, replacing the seed's `updateCachedStats()` model
//! hooks. As a projection ([`outbox::projection`]) it is fed live by its
//! queue and rebuilt from the event log with `outbox projection rebuild
//! update_tenant_metrics`: every tenant an event names is recounted, so a
//! rebuild ends equal to a recompute from the source tables.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use outbox::projection::Projection;
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
    /// The defaults (the inbox, which a projection's rebuild relies on,
    /// is on; recounting is idempotent, so a duplicate would be harmless
    /// anyway), one event a transaction: a batch transaction would lock
    /// the stats rows of its events' tenants in arrival order, and two
    /// batches naming the same tenants in another order deadlock (seen
    /// under steady traffic with the default concurrency). One tenant's
    /// row a transaction cannot deadlock.
    pub fn base_options() -> ListenerOptions {
        ListenerOptions {
            batch_size: 1,
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

/// Registered as a projection (see the module docs); its direct
/// [`QueuedListener`] side recounts one event's tenant.
impl Projection for UpdateTenantMetrics {
    fn name(&self) -> &str {
        UPDATE_TENANT_METRICS
    }

    fn event_types(&self) -> Vec<String> {
        crate::listeners::MAPPING
            .iter()
            .find(|(listener, _)| *listener == UPDATE_TENANT_METRICS)
            .map(|(_, types)| types.iter().map(|t| (*t).to_owned()).collect())
            .unwrap_or_default()
    }

    fn reset(&self, conn: &mut PgConnection) -> Result<(), ListenerError> {
        diesel::sql_query("DELETE FROM tenant_stats").execute(conn)?;
        Ok(())
    }

    fn apply(&self, conn: &mut PgConnection, events: &[ReceivedEvent]) -> Result<(), ListenerError> {
        let mut tenants = events.iter().map(tenant_id).collect::<Result<Vec<i64>, _>>()?;
        // In id order: concurrent recounts lock tenants in one order.
        tenants.sort_unstable();
        tenants.dedup();
        recount_many(conn, &tenants)?;
        Ok(())
    }

    fn options(&self) -> ListenerOptions {
        Self::base_options()
    }
}

/// Recounts the stats of `tenants` (sorted) in one statement; tenants that
/// no longer exist are skipped.
pub(crate) fn recount_many(conn: &mut PgConnection, tenants: &[i64]) -> QueryResult<usize> {
    diesel::sql_query(
        "INSERT INTO tenant_stats AS ts (tenant_id, site_count, active_site_count, storage_bytes,
                                         backup_count, failed_backup_count, updated_at)
         SELECT t.id, COALESCE(s.sites, 0), COALESCE(s.active, 0), COALESCE(s.storage, 0),
                COALESCE(b.backups, 0), COALESCE(b.failed, 0), now()
         FROM tenants t
         LEFT JOIN (SELECT tenant_id, count(*) AS sites,
                           count(*) FILTER (WHERE status = 'active') AS active,
                           COALESCE(sum(storage_bytes), 0)::bigint AS storage
                    FROM sites WHERE tenant_id = ANY($1) AND deleted_at IS NULL
                    GROUP BY tenant_id) s ON s.tenant_id = t.id
         LEFT JOIN (SELECT tenant_id, count(*) AS backups,
                           count(*) FILTER (WHERE status = 'failed') AS failed
                    FROM backups WHERE tenant_id = ANY($1)
                    GROUP BY tenant_id) b ON b.tenant_id = t.id
         WHERE t.id = ANY($1)
         ORDER BY t.id
         ON CONFLICT (tenant_id) DO UPDATE SET
             site_count = EXCLUDED.site_count,
             active_site_count = EXCLUDED.active_site_count,
             storage_bytes = EXCLUDED.storage_bytes,
             backup_count = EXCLUDED.backup_count,
             failed_backup_count = EXCLUDED.failed_backup_count,
             updated_at = now()",
    )
    .bind::<diesel::sql_types::Array<BigInt>, _>(tenants)
    .execute(conn)
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
