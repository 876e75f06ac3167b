//! The seed's seven domain events.
//!
//! Payloads carry primitive data only (ids, domain names, numbers, error
//! text), so a consumer never needs the row to still exist: a site may be
//! deleted before its `site.created` event is handled. Every event names
//! its tenant, both in the payload and as the envelope's `tenant_id`.

use chrono::{DateTime, Utc};
use outbox::DomainEvent;
use serde::{Deserialize, Serialize};

/// `site.created`: a site row was inserted (status `pending`).
pub const SITE_CREATED: &str = "site.created";
/// `site.provisioned`: provisioning succeeded (status `active`).
pub const SITE_PROVISIONED: &str = "site.provisioned";
/// `site.provisioning_failed`: provisioning failed (status `failed`).
pub const SITE_PROVISIONING_FAILED: &str = "site.provisioning_failed";
/// `site.deleted`: the site was soft-deleted.
pub const SITE_DELETED: &str = "site.deleted";
/// `backup.created`: a backup job started (status `running`).
pub const BACKUP_CREATED: &str = "backup.created";
/// `backup.completed`: a backup finished (status `completed`).
pub const BACKUP_COMPLETED: &str = "backup.completed";
/// `backup.failed`: a backup finished with an error (status `failed`).
pub const BACKUP_FAILED: &str = "backup.failed";

/// Every event type CHOM records, in lifecycle order.
pub const EVENT_TYPES: [&str; 7] = [
    SITE_CREATED,
    SITE_PROVISIONED,
    SITE_PROVISIONING_FAILED,
    SITE_DELETED,
    BACKUP_CREATED,
    BACKUP_COMPLETED,
    BACKUP_FAILED,
];

/// `aggregate_type` of the site events.
pub const SITE_AGGREGATE: &str = "site";
/// `aggregate_type` of the backup events.
pub const BACKUP_AGGREGATE: &str = "backup";

/// Implements [`DomainEvent`] for an event struct whose aggregate id and
/// tenant id are fields of it.
macro_rules! domain_event {
    ($ty:ident, $event_type:expr, $aggregate_type:expr, $aggregate_id:ident) => {
        impl DomainEvent for $ty {
            fn event_type(&self) -> &'static str {
                $event_type
            }

            fn aggregate_type(&self) -> &'static str {
                $aggregate_type
            }

            fn aggregate_id(&self) -> String {
                self.$aggregate_id.to_string()
            }

            fn tenant_id(&self) -> Option<String> {
                Some(self.tenant_id.to_string())
            }
        }
    };
}

/// A site was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteCreated {
    /// The site's id.
    pub site_id: i64,
    /// The owning tenant.
    pub tenant_id: i64,
    /// The site's domain.
    pub domain: String,
}
domain_event!(SiteCreated, SITE_CREATED, SITE_AGGREGATE, site_id);

/// A site was provisioned and is now active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteProvisioned {
    /// The site's id.
    pub site_id: i64,
    /// The owning tenant.
    pub tenant_id: i64,
    /// The site's domain.
    pub domain: String,
}
domain_event!(SiteProvisioned, SITE_PROVISIONED, SITE_AGGREGATE, site_id);

/// Provisioning a site failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteProvisioningFailed {
    /// The site's id.
    pub site_id: i64,
    /// The owning tenant.
    pub tenant_id: i64,
    /// The site's domain.
    pub domain: String,
    /// What went wrong, as stored in `sites.provision_error`.
    pub error: String,
}
domain_event!(
    SiteProvisioningFailed,
    SITE_PROVISIONING_FAILED,
    SITE_AGGREGATE,
    site_id
);

/// A site was soft-deleted. Carries everything a consumer needs, since the
/// site is gone from every listing by the time it is handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteDeleted {
    /// The deleted site's id.
    pub site_id: i64,
    /// The tenant that owned it.
    pub tenant_id: i64,
    /// Its domain, now free for reuse.
    pub domain: String,
    /// When it was deleted, as stored in `sites.deleted_at`.
    pub deleted_at: DateTime<Utc>,
}
domain_event!(SiteDeleted, SITE_DELETED, SITE_AGGREGATE, site_id);

/// A backup job started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCreated {
    /// The backup's id.
    pub backup_id: i64,
    /// The site backed up.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The site's domain.
    pub domain: String,
}
domain_event!(BackupCreated, BACKUP_CREATED, BACKUP_AGGREGATE, backup_id);

/// A backup finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCompleted {
    /// The backup's id.
    pub backup_id: i64,
    /// The site backed up.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The site's domain.
    pub domain: String,
    /// Size of the backup.
    pub size_bytes: i64,
    /// How long it took.
    pub duration_ms: i64,
}
domain_event!(BackupCompleted, BACKUP_COMPLETED, BACKUP_AGGREGATE, backup_id);

/// A backup failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFailed {
    /// The backup's id.
    pub backup_id: i64,
    /// The site backed up.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The site's domain.
    pub domain: String,
    /// What went wrong, as stored in `backups.error`.
    pub error: String,
}
domain_event!(BackupFailed, BACKUP_FAILED, BACKUP_AGGREGATE, backup_id);
