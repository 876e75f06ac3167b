//! Sites: create, provision (simulated: the outcome is an argument), soft
//! delete. Events: `site.created`, `site.provisioned`,
//! `site.provisioning_failed`, `site.deleted`.

use chrono::{DateTime, Utc};
use diesel::dsl::now;
use diesel::prelude::*;
use outbox::{Metadata, Outbox};

use crate::error::{ChomError, Result};
use crate::events::{SITE_CREATED, SITE_DELETED, SITE_PROVISIONED, SITE_PROVISIONING_FAILED};
use crate::events::{SiteCreated, SiteDeleted, SiteProvisioned, SiteProvisioningFailed};
use crate::models::{NewSite, Site, SiteStatus};
use crate::schema::{sites, tenants};
use crate::services::{Recorded, error_text, is_unique_violation, quotas};

/// Creates a `pending` site for `tenant_id` and records `site.created`.
///
/// The domain is trimmed and lower-cased and must be a valid host name not
/// used by another live site ([`ChomError::Conflict`] otherwise). A tenant
/// with as many live sites as its plan allows is refused with
/// [`ChomError::QuotaExceeded`]: no site, but the refusal itself commits
/// with `quota.site_quota_exceeded` ([`quotas`]).
pub fn create_site(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    tenant_id: i64,
    domain: &str,
) -> Result<Recorded<Site>> {
    let domain = normalize_domain(domain)?;
    // Ok(Err(refusal)) committed the refusal; it is returned as the error.
    outbox
        .transaction_with(conn, metadata, |tx| {
            // FOR KEY SHARE: the tenant cannot vanish before the insert commits,
            // and concurrent site creations for one tenant do not queue up.
            let tenant = tenants::table
                .find(tenant_id)
                .select(tenants::id)
                .for_key_share()
                .first::<i64>(tx.conn())
                .optional()?;
            if tenant.is_none() {
                return Err(ChomError::NotFound {
                    what: "tenant",
                    id: tenant_id,
                });
            }
            // Returned after the commit, with the refusal's event recorded.
            if let Some(refused) = quotas::refuse_site_over_quota(tx, tenant_id, &domain)? {
                return Ok(Err(refused));
            }
            let site = diesel::insert_into(sites::table)
                .values(NewSite {
                    tenant_id,
                    domain: &domain,
                    status: SiteStatus::Pending,
                })
                .returning(Site::as_returning())
                .get_result(tx.conn())
                .map_err(|error| {
                    if is_unique_violation(&error, "sites_domain_live") {
                        ChomError::Conflict(format!("domain {domain} is already used by a live site"))
                    } else {
                        error.into()
                    }
                })?;
            let event_id = tx.record(&SiteCreated {
                site_id: site.id,
                tenant_id: site.tenant_id,
                domain: site.domain.clone(),
            })?;
            Ok(Ok(Recorded::one(site, event_id, SITE_CREATED)))
        })
        .and_then(std::convert::identity)
}

/// Marks a `pending` (or previously `failed`) site as `provisioning`, the
/// moment a provisioning job picks it up. Records no event: the seed has
/// none for it, and [`provision_site`] reports the outcome.
pub fn start_provisioning(conn: &mut PgConnection, site_id: i64) -> Result<Site> {
    conn.transaction(|conn| {
        let site = lock_live_site(conn, site_id)?;
        if !matches!(site.status, SiteStatus::Pending | SiteStatus::Failed) {
            return Err(invalid_state(&site, "start provisioning"));
        }
        Ok(diesel::update(sites::table.find(site_id))
            .set((
                sites::status.eq(SiteStatus::Provisioning),
                sites::provision_error.eq(None::<String>),
                sites::updated_at.eq(now),
            ))
            .returning(Site::as_returning())
            .get_result(conn)?)
    })
}

/// Finishes provisioning a `pending` or `provisioning` site with the given
/// outcome (no real servers: the caller says how it went).
///
/// `Ok(())` makes the site `active` and records `site.provisioned`;
/// `Err(text)` makes it `failed` with `provision_error = text` and records
/// `site.provisioning_failed` carrying the text. A site in any other status
/// gives [`ChomError::InvalidState`].
pub fn provision_site(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    site_id: i64,
    outcome: std::result::Result<(), String>,
) -> Result<Recorded<Site>> {
    let failure = match &outcome {
        Ok(()) => None,
        Err(text) => Some(error_text("error", text)?),
    };
    outbox.transaction_with(conn, metadata, |tx| {
        let site = lock_live_site(tx.conn(), site_id)?;
        if !matches!(site.status, SiteStatus::Pending | SiteStatus::Provisioning) {
            return Err(invalid_state(&site, "provision"));
        }
        let status = if failure.is_some() {
            SiteStatus::Failed
        } else {
            SiteStatus::Active
        };
        let site = diesel::update(sites::table.find(site_id))
            .set((
                sites::status.eq(status),
                sites::provision_error.eq(&failure),
                sites::updated_at.eq(now),
            ))
            .returning(Site::as_returning())
            .get_result::<Site>(tx.conn())?;
        let (event_id, event_type) = match failure {
            None => (
                tx.record(&SiteProvisioned {
                    site_id: site.id,
                    tenant_id: site.tenant_id,
                    domain: site.domain.clone(),
                })?,
                SITE_PROVISIONED,
            ),
            Some(error) => (
                tx.record(&SiteProvisioningFailed {
                    site_id: site.id,
                    tenant_id: site.tenant_id,
                    domain: site.domain.clone(),
                    error,
                })?,
                SITE_PROVISIONING_FAILED,
            ),
        };
        Ok(Recorded {
            value: site,
            event_id,
            event_type,
            also: Vec::new(),
        })
    })
}

/// Soft-deletes a live site (any status) and records `site.deleted` with
/// the site's id, tenant, domain and deletion time: primitive data, since
/// the site is gone from every listing by the time a consumer sees it.
pub fn delete_site(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    site_id: i64,
) -> Result<Recorded<Site>> {
    outbox.transaction_with(conn, metadata, |tx| {
        lock_live_site(tx.conn(), site_id)?;
        // deleted_at was just set, so it is not NULL in the returned row.
        let (site, deleted_at) = diesel::update(sites::table.find(site_id))
            .set((sites::deleted_at.eq(now), sites::updated_at.eq(now)))
            .returning((Site::as_returning(), sites::deleted_at.assume_not_null()))
            .get_result::<(Site, DateTime<Utc>)>(tx.conn())?;
        let event_id = tx.record(&SiteDeleted {
            site_id: site.id,
            tenant_id: site.tenant_id,
            domain: site.domain.clone(),
            deleted_at,
        })?;
        Ok(Recorded {
            value: site,
            event_id,
            event_type: SITE_DELETED,
            also: Vec::new(),
        })
    })
}

/// The live (not deleted) site with id `site_id`.
pub fn get_site(conn: &mut PgConnection, site_id: i64) -> Result<Site> {
    sites::table
        .find(site_id)
        .filter(sites::deleted_at.is_null())
        .select(Site::as_select())
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "site",
            id: site_id,
        })
}

/// Live sites, oldest first, of one tenant or of all.
pub fn list_sites(conn: &mut PgConnection, tenant_id: Option<i64>) -> Result<Vec<Site>> {
    let mut query = sites::table
        .filter(sites::deleted_at.is_null())
        .order(sites::id)
        .select(Site::as_select())
        .into_boxed();
    if let Some(tenant_id) = tenant_id {
        query = query.filter(sites::tenant_id.eq(tenant_id));
    }
    Ok(query.load(conn)?)
}

/// Locks a live site's row for the rest of the transaction, so changes to
/// one site (and so its events) are serialized in commit order. A site
/// deleted meanwhile is re-checked after the lock wait and not found.
pub(crate) fn lock_live_site(conn: &mut PgConnection, site_id: i64) -> Result<Site> {
    sites::table
        .find(site_id)
        .filter(sites::deleted_at.is_null())
        .select(Site::as_select())
        .for_update()
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "site",
            id: site_id,
        })
}

fn invalid_state(site: &Site, action: &'static str) -> ChomError {
    ChomError::InvalidState {
        what: "site",
        id: site.id,
        status: site.status.to_string(),
        action,
    }
}

/// Trims and lower-cases `domain` and checks it is a host name: at least
/// two dot-separated labels of letters, digits and inner hyphens, each at
/// most 63 bytes, 253 in all. A trailing dot (the DNS root) is dropped.
pub fn normalize_domain(domain: &str) -> Result<String> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let invalid = |reason: &str| ChomError::invalid("domain", format!("{domain:?} {reason}"));
    if domain.is_empty() {
        return Err(ChomError::invalid("domain", "must not be empty"));
    }
    if domain.len() > 253 {
        return Err(invalid("is longer than 253 bytes"));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(invalid("needs at least two labels, such as example.com"));
    }
    for label in labels {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(invalid("is not a valid host name"));
        }
    }
    Ok(domain)
}
