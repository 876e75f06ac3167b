//! Plans, quotas and usage: live sites against the plan's site count (when
//! a site is created), storage measured by backups against the plan's
//! storage (when a backup completes), bandwidth reports against the plan's
//! monthly bandwidth. Events: `quota.site_quota_exceeded`,
//! `quota.storage_quota_exceeded`, `quota.bandwidth_limit_reached`.
//!
//! A tenant without a `tenant_quotas` row has no limits, and a `None` limit
//! is unlimited. The site quota is enforced: a creation over it is refused
//! ([`ChomError::QuotaExceeded`]), and the refusal commits with its event.
//! Storage and bandwidth are measured after the fact, so their events are
//! recorded when the usage crosses the limit, once per crossing. Every
//! check locks the tenant's quota row first, so one tenant's quota events
//! commit in order and two writers cannot both cross the same limit.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use diesel::dsl::now;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Date};
use outbox::{Metadata, Outbox, OutboxTx};
use serde::Serialize;

use crate::error::{ChomError, Result};
use crate::events::{BandwidthLimitReached, SiteQuotaExceeded, StorageQuotaExceeded};
use crate::events::{QUOTA_BANDWIDTH_LIMIT_REACHED, QUOTA_STORAGE_QUOTA_EXCEEDED};
use crate::models::{QuotaBreach, Site, TenantQuota};
use crate::schema::{bandwidth_usage, quota_breaches, sites, tenant_quotas, tenants};
use crate::services::RecordedEvent;

/// A tenant's limits (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Live sites allowed.
    pub max_sites: Option<i64>,
    /// Storage allowed, bytes.
    pub max_storage_bytes: Option<i64>,
    /// Bandwidth allowed a calendar month, bytes.
    pub monthly_bandwidth_bytes: Option<i64>,
}

/// A plan: a name and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The plan's name.
    pub name: &'static str,
    /// Its limits.
    pub limits: Limits,
}

const GIB: i64 = 1 << 30;

/// CHOM's plans.
pub const PLANS: [Plan; 3] = [
    Plan {
        name: "starter",
        limits: Limits {
            max_sites: Some(3),
            max_storage_bytes: Some(10 * GIB),
            monthly_bandwidth_bytes: Some(100 * GIB),
        },
    },
    Plan {
        name: "pro",
        limits: Limits {
            max_sites: Some(25),
            max_storage_bytes: Some(250 * GIB),
            monthly_bandwidth_bytes: Some(2048 * GIB),
        },
    },
    Plan {
        name: "business",
        limits: Limits {
            max_sites: None,
            max_storage_bytes: Some(1024 * GIB),
            monthly_bandwidth_bytes: None,
        },
    },
];

/// The plan named `name`.
pub fn plan(name: &str) -> Option<Plan> {
    PLANS.iter().find(|p| p.name == name).copied()
}

/// Sets a tenant's plan and limits (a plain write, no event). `plan` names
/// them (one of [`PLANS`] or a custom name); each limit must be at least 0.
pub fn set_quota(
    conn: &mut PgConnection,
    tenant_id: i64,
    plan: &str,
    limits: &Limits,
) -> Result<TenantQuota> {
    let plan = plan.trim();
    if plan.is_empty() || plan.len() > 64 || plan.contains('\0') {
        return Err(ChomError::invalid("plan", "must be 1 to 64 bytes"));
    }
    for (field, limit) in [
        ("max_sites", limits.max_sites),
        ("max_storage_bytes", limits.max_storage_bytes),
        ("monthly_bandwidth_bytes", limits.monthly_bandwidth_bytes),
    ] {
        if limit.is_some_and(|l| l < 0) {
            return Err(ChomError::invalid(field, "must not be negative"));
        }
    }
    conn.transaction(|conn| {
        tenants::table
            .find(tenant_id)
            .select(tenants::id)
            .for_key_share()
            .first::<i64>(conn)
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "tenant",
                id: tenant_id,
            })?;
        let values = (
            tenant_quotas::plan.eq(plan),
            tenant_quotas::max_sites.eq(limits.max_sites),
            tenant_quotas::max_storage_bytes.eq(limits.max_storage_bytes),
            tenant_quotas::monthly_bandwidth_bytes.eq(limits.monthly_bandwidth_bytes),
            tenant_quotas::updated_at.eq(now),
        );
        Ok(diesel::insert_into(tenant_quotas::table)
            .values((tenant_quotas::tenant_id.eq(tenant_id), values))
            .on_conflict(tenant_quotas::tenant_id)
            .do_update()
            .set(values)
            .returning(TenantQuota::as_returning())
            .get_result(conn)?)
    })
}

/// A tenant's limits, `None` when it has none.
pub fn get_quota(conn: &mut PgConnection, tenant_id: i64) -> Result<Option<TenantQuota>> {
    Ok(tenant_quotas::table
        .find(tenant_id)
        .select(TenantQuota::as_select())
        .first(conn)
        .optional()?)
}

/// A tenant's usage beside its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaUsage {
    /// The tenant.
    pub tenant_id: i64,
    /// Its limits, if it has any.
    pub quota: Option<TenantQuota>,
    /// Live sites.
    pub sites: i64,
    /// Storage of live sites, as measured by their last backups.
    pub storage_bytes: i64,
    /// The month of `bandwidth_bytes`, `YYYY-MM`.
    pub month: String,
    /// Bytes served that month.
    pub bandwidth_bytes: i64,
}

/// `tenant_id`'s usage in the month of `at`.
pub fn usage(conn: &mut PgConnection, tenant_id: i64, at: DateTime<Utc>) -> Result<QuotaUsage> {
    crate::services::tenants::get_tenant(conn, tenant_id)?;
    let month = month_of(at);
    Ok(QuotaUsage {
        tenant_id,
        quota: get_quota(conn, tenant_id)?,
        sites: live_sites(conn, tenant_id)?,
        storage_bytes: storage(conn, tenant_id)?,
        month: month_label(month),
        bandwidth_bytes: bandwidth(conn, tenant_id, month)?,
    })
}

/// The quota breaches of one tenant or of all, newest first.
pub fn list_breaches(conn: &mut PgConnection, tenant_id: Option<i64>) -> Result<Vec<QuotaBreach>> {
    let mut query = quota_breaches::table
        .order(quota_breaches::id.desc())
        .select(QuotaBreach::as_select())
        .into_boxed();
    if let Some(tenant_id) = tenant_id {
        query = query.filter(quota_breaches::tenant_id.eq(tenant_id));
    }
    Ok(query.load(conn)?)
}

/// What [`report_bandwidth`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BandwidthReport {
    /// The site.
    pub site_id: i64,
    /// Its tenant.
    pub tenant_id: i64,
    /// The month, `YYYY-MM`.
    pub month: String,
    /// The site's bytes that month, this report included.
    pub site_bytes: i64,
    /// The tenant's bytes that month.
    pub tenant_bytes: i64,
    /// `quota.bandwidth_limit_reached`, if this report reached the limit.
    pub event: Option<RecordedEvent>,
}

/// Adds `bytes` served by a live site in the month of `at` to its usage.
/// When the tenant's month goes from under its plan's monthly bandwidth to
/// at or over it, inserts a breach and records
/// `quota.bandwidth_limit_reached` in the same transaction.
pub fn report_bandwidth(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    site_id: i64,
    bytes: i64,
    at: DateTime<Utc>,
) -> Result<BandwidthReport> {
    if bytes < 0 {
        return Err(ChomError::invalid("bytes", "must not be negative"));
    }
    let month = month_of(at);
    outbox.transaction_with(conn, metadata, |tx| {
        // The site's tenant never changes: read it unlocked, lock the quota
        // (before the site, the order every quota check takes), then check
        // the site is live.
        let tenant_id = sites::table
            .find(site_id)
            .select(sites::tenant_id)
            .first::<i64>(tx.conn())
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "site",
                id: site_id,
            })?;
        let quota = lock_quota(tx.conn(), tenant_id)?;
        sites::table
            .find(site_id)
            .filter(sites::deleted_at.is_null())
            .select(Site::as_select())
            .for_share()
            .first::<Site>(tx.conn())
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "site",
                id: site_id,
            })?;
        let before = bandwidth(tx.conn(), tenant_id, month)?;
        let site_bytes = diesel::insert_into(bandwidth_usage::table)
            .values((
                bandwidth_usage::site_id.eq(site_id),
                bandwidth_usage::tenant_id.eq(tenant_id),
                bandwidth_usage::month.eq(month),
                bandwidth_usage::bytes.eq(bytes),
            ))
            .on_conflict((bandwidth_usage::site_id, bandwidth_usage::month))
            .do_update()
            .set((
                bandwidth_usage::bytes.eq(bandwidth_usage::bytes + bytes),
                bandwidth_usage::updated_at.eq(now),
            ))
            .returning(bandwidth_usage::bytes)
            .get_result::<i64>(tx.conn())?;
        let after = before.saturating_add(bytes);
        let mut event = None;
        if let Some(quota) = quota
            && let Some(limit) = quota.monthly_bandwidth_bytes
            && before < limit
            && after >= limit
        {
            let event_id = tx.record(&BandwidthLimitReached {
                tenant_id,
                plan: quota.plan,
                month: month_label(month),
                monthly_bandwidth_bytes: limit,
                bandwidth_bytes: after,
                site_id,
            })?;
            insert_breach(tx, tenant_id, "bandwidth", limit, after, Some(site_id), event_id)?;
            event = Some(RecordedEvent {
                event_id,
                event_type: QUOTA_BANDWIDTH_LIMIT_REACHED,
            });
        }
        Ok(BandwidthReport {
            site_id,
            tenant_id,
            month: month_label(month),
            site_bytes,
            tenant_bytes: after,
            event,
        })
    })
}

/// In `create_site`'s transaction, before the insert: when the tenant has
/// as many live sites as its plan allows, records the refusal (a breach and
/// `quota.site_quota_exceeded`) and returns the error the service returns
/// after committing it.
pub(crate) fn refuse_site_over_quota(
    tx: &mut OutboxTx<'_>,
    tenant_id: i64,
    domain: &str,
) -> Result<Option<ChomError>> {
    let Some(quota) = lock_quota(tx.conn(), tenant_id)? else {
        return Ok(None);
    };
    let Some(limit) = quota.max_sites else {
        return Ok(None);
    };
    let used = live_sites(tx.conn(), tenant_id)?;
    if used < limit {
        return Ok(None);
    }
    let event_id = tx.record(&SiteQuotaExceeded {
        tenant_id,
        plan: quota.plan,
        max_sites: limit,
        sites: used,
        domain: domain.to_owned(),
    })?;
    insert_breach(tx, tenant_id, "sites", limit, used, None, event_id)?;
    Ok(Some(ChomError::QuotaExceeded {
        tenant_id,
        quota: "sites",
        limit,
        used,
        event_id,
    }))
}

/// The tenant's storage before a backup's size is applied, and its quota
/// row, locked: taken by `complete_backup` before it touches the site.
pub(crate) struct StorageCheck {
    quota: Option<TenantQuota>,
    before: i64,
}

/// Locks the tenant's quota and measures its storage, if it has a storage
/// limit.
pub(crate) fn before_storage_change(conn: &mut PgConnection, tenant_id: i64) -> Result<StorageCheck> {
    let quota = lock_quota(conn, tenant_id)?.filter(|q| q.max_storage_bytes.is_some());
    let before = match quota {
        Some(_) => storage(conn, tenant_id)?,
        None => 0,
    };
    Ok(StorageCheck { quota, before })
}

/// After a backup changed a site's storage: when the tenant's storage went
/// from at most its limit to over it, inserts a breach and records
/// `quota.storage_quota_exceeded`.
pub(crate) fn after_storage_change(
    tx: &mut OutboxTx<'_>,
    check: StorageCheck,
    tenant_id: i64,
    site_id: i64,
    backup_id: i64,
) -> Result<Option<RecordedEvent>> {
    let Some(quota) = check.quota else {
        return Ok(None);
    };
    let Some(limit) = quota.max_storage_bytes else {
        return Ok(None);
    };
    let after = storage(tx.conn(), tenant_id)?;
    if !(check.before <= limit && after > limit) {
        return Ok(None);
    }
    let event_id = tx.record(&StorageQuotaExceeded {
        tenant_id,
        plan: quota.plan,
        max_storage_bytes: limit,
        storage_bytes: after,
        site_id,
        backup_id,
    })?;
    insert_breach(tx, tenant_id, "storage", limit, after, Some(site_id), event_id)?;
    Ok(Some(RecordedEvent {
        event_id,
        event_type: QUOTA_STORAGE_QUOTA_EXCEEDED,
    }))
}

/// The tenant's quota row, locked for the rest of the transaction.
fn lock_quota(conn: &mut PgConnection, tenant_id: i64) -> Result<Option<TenantQuota>> {
    Ok(tenant_quotas::table
        .find(tenant_id)
        .select(TenantQuota::as_select())
        .for_update()
        .first(conn)
        .optional()?)
}

fn insert_breach(
    tx: &mut OutboxTx<'_>,
    tenant_id: i64,
    quota: &str,
    limit: i64,
    used: i64,
    site_id: Option<i64>,
    event_id: uuid::Uuid,
) -> Result<()> {
    diesel::insert_into(quota_breaches::table)
        .values((
            quota_breaches::tenant_id.eq(tenant_id),
            quota_breaches::quota.eq(quota),
            quota_breaches::limit_value.eq(limit),
            quota_breaches::used.eq(used),
            quota_breaches::site_id.eq(site_id),
            quota_breaches::event_id.eq(event_id),
        ))
        .execute(tx.conn())?;
    Ok(())
}

#[derive(QueryableByName)]
struct Sum {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn live_sites(conn: &mut PgConnection, tenant_id: i64) -> Result<i64> {
    Ok(sites::table
        .filter(sites::tenant_id.eq(tenant_id))
        .filter(sites::deleted_at.is_null())
        .count()
        .get_result(conn)?)
}

fn storage(conn: &mut PgConnection, tenant_id: i64) -> Result<i64> {
    Ok(diesel::sql_query(
        "SELECT COALESCE(sum(storage_bytes), 0)::bigint AS n FROM sites
         WHERE tenant_id = $1 AND deleted_at IS NULL",
    )
    .bind::<BigInt, _>(tenant_id)
    .get_result::<Sum>(conn)?
    .n)
}

fn bandwidth(conn: &mut PgConnection, tenant_id: i64, month: NaiveDate) -> Result<i64> {
    Ok(diesel::sql_query(
        "SELECT COALESCE(sum(bytes), 0)::bigint AS n FROM bandwidth_usage
         WHERE tenant_id = $1 AND month = $2",
    )
    .bind::<BigInt, _>(tenant_id)
    .bind::<Date, _>(month)
    .get_result::<Sum>(conn)?
    .n)
}

/// The first day of `at`'s month (UTC).
fn month_of(at: DateTime<Utc>) -> NaiveDate {
    let day = at.date_naive();
    day.with_day(1).unwrap_or(day)
}

fn month_label(month: NaiveDate) -> String {
    month.format("%Y-%m").to_string()
}
