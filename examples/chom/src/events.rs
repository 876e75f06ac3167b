//! CHOM's domain events: the seed's seven (sites and backups) and the
//! twelve account events (teams, SSL, security, quotas).
//!
//! Payloads carry primitive data only (ids, domain names, numbers, error
//! text, timestamps), so a consumer never needs the row to still exist: a
//! site may be deleted before its `site.created` event is handled. Every
//! event names its tenant, both in the payload and as the envelope's
//! `tenant_id`. Security events never carry secret material: no
//! credential, no token, no hash of either; ids, names and times only.

use chrono::{DateTime, Utc};
use outbox::{DomainEvent, Registry};
use schemars::JsonSchema;
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

/// `team.member_role_changed`: a team member became admin or member.
pub const TEAM_MEMBER_ROLE_CHANGED: &str = "team.member_role_changed";
/// `team.member_removed`: a member left the tenant's team.
pub const TEAM_MEMBER_REMOVED: &str = "team.member_removed";
/// `team.ownership_transferred`: the tenant has a new owner.
pub const TEAM_OWNERSHIP_TRANSFERRED: &str = "team.ownership_transferred";
/// `ssl.certificate_requested`: a certificate was requested for a site.
pub const SSL_CERTIFICATE_REQUESTED: &str = "ssl.certificate_requested";
/// `ssl.certificate_issued`: a requested certificate was issued.
pub const SSL_CERTIFICATE_ISSUED: &str = "ssl.certificate_issued";
/// `ssl.certificate_expiring`: an issued certificate expires within a
/// warning window (once per certificate and window).
pub const SSL_CERTIFICATE_EXPIRING: &str = "ssl.certificate_expiring";
/// `security.vps_credentials_rotated`: a VPS got a new credential.
pub const SECURITY_VPS_CREDENTIALS_ROTATED: &str = "security.vps_credentials_rotated";
/// `security.api_token_rotated`: an API token got a new secret.
pub const SECURITY_API_TOKEN_ROTATED: &str = "security.api_token_rotated";
/// `security.suspicious_activity_detected`: too many failed sign-ins.
pub const SECURITY_SUSPICIOUS_ACTIVITY_DETECTED: &str = "security.suspicious_activity_detected";
/// `quota.site_quota_exceeded`: a site creation was refused by the plan.
pub const QUOTA_SITE_QUOTA_EXCEEDED: &str = "quota.site_quota_exceeded";
/// `quota.storage_quota_exceeded`: a backup took storage over the plan.
pub const QUOTA_STORAGE_QUOTA_EXCEEDED: &str = "quota.storage_quota_exceeded";
/// `quota.bandwidth_limit_reached`: a month's bandwidth reached the plan's.
pub const QUOTA_BANDWIDTH_LIMIT_REACHED: &str = "quota.bandwidth_limit_reached";

/// The seed's seven event types (sites and backups), in lifecycle order.
pub const SEED_EVENT_TYPES: [&str; 7] = [
    SITE_CREATED,
    SITE_PROVISIONED,
    SITE_PROVISIONING_FAILED,
    SITE_DELETED,
    BACKUP_CREATED,
    BACKUP_COMPLETED,
    BACKUP_FAILED,
];

/// The twelve account event types: teams, SSL certificates, security and quotas.
pub const ACCOUNT_EVENT_TYPES: [&str; 12] = [
    TEAM_MEMBER_ROLE_CHANGED,
    TEAM_MEMBER_REMOVED,
    TEAM_OWNERSHIP_TRANSFERRED,
    SSL_CERTIFICATE_REQUESTED,
    SSL_CERTIFICATE_ISSUED,
    SSL_CERTIFICATE_EXPIRING,
    SECURITY_VPS_CREDENTIALS_ROTATED,
    SECURITY_API_TOKEN_ROTATED,
    SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
    QUOTA_SITE_QUOTA_EXCEEDED,
    QUOTA_STORAGE_QUOTA_EXCEEDED,
    QUOTA_BANDWIDTH_LIMIT_REACHED,
];

/// The old name of [`ACCOUNT_EVENT_TYPES`], kept for a release.
#[deprecated(note = "renamed ACCOUNT_EVENT_TYPES")]
pub const PHASE2_EVENT_TYPES: [&str; 12] = ACCOUNT_EVENT_TYPES;

/// Every event type CHOM records: the site and backup seven, then the twelve of teams, SSL, security and quotas.
pub const EVENT_TYPES: [&str; 19] = [
    SITE_CREATED,
    SITE_PROVISIONED,
    SITE_PROVISIONING_FAILED,
    SITE_DELETED,
    BACKUP_CREATED,
    BACKUP_COMPLETED,
    BACKUP_FAILED,
    TEAM_MEMBER_ROLE_CHANGED,
    TEAM_MEMBER_REMOVED,
    TEAM_OWNERSHIP_TRANSFERRED,
    SSL_CERTIFICATE_REQUESTED,
    SSL_CERTIFICATE_ISSUED,
    SSL_CERTIFICATE_EXPIRING,
    SECURITY_VPS_CREDENTIALS_ROTATED,
    SECURITY_API_TOKEN_ROTATED,
    SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
    QUOTA_SITE_QUOTA_EXCEEDED,
    QUOTA_STORAGE_QUOTA_EXCEEDED,
    QUOTA_BANDWIDTH_LIMIT_REACHED,
];

/// `aggregate_type` of the site events.
pub const SITE_AGGREGATE: &str = "site";
/// `aggregate_type` of the backup events.
pub const BACKUP_AGGREGATE: &str = "backup";
/// `aggregate_type` of the team events; the aggregate id is the tenant's.
pub const TEAM_AGGREGATE: &str = "team";
/// `aggregate_type` of the SSL events; the aggregate id is the
/// certificate's.
pub const SSL_CERTIFICATE_AGGREGATE: &str = "ssl_certificate";
/// `aggregate_type` of `security.vps_credentials_rotated`.
pub const VPS_AGGREGATE: &str = "vps";
/// `aggregate_type` of `security.api_token_rotated`.
pub const API_TOKEN_AGGREGATE: &str = "api_token";
/// `aggregate_type` of `security.suspicious_activity_detected`; the
/// aggregate id is the incident's.
pub const SECURITY_INCIDENT_AGGREGATE: &str = "security_incident";
/// `aggregate_type` of the quota events; the aggregate id is the
/// tenant's.
pub const QUOTA_AGGREGATE: &str = "quota";

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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

/// A team member's role changed (between `admin` and `member`; the owner
/// changes only by [`OwnershipTransferred`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TeamMemberRoleChanged {
    /// The tenant whose team it is (also the aggregate id).
    pub tenant_id: i64,
    /// The member.
    pub user_id: i64,
    /// The member's email.
    pub email: String,
    /// The role before.
    pub previous_role: String,
    /// The role now.
    pub role: String,
}
domain_event!(
    TeamMemberRoleChanged,
    TEAM_MEMBER_ROLE_CHANGED,
    TEAM_AGGREGATE,
    tenant_id
);

/// A member left the team. The user row stays; the membership is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TeamMemberRemoved {
    /// The tenant whose team it was (also the aggregate id).
    pub tenant_id: i64,
    /// The removed member.
    pub user_id: i64,
    /// The removed member's email.
    pub email: String,
    /// The role the member had.
    pub role: String,
}
domain_event!(TeamMemberRemoved, TEAM_MEMBER_REMOVED, TEAM_AGGREGATE, tenant_id);

/// The tenant's ownership moved to another member; the previous owner, if
/// there was one, is now an admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OwnershipTransferred {
    /// The tenant (also the aggregate id).
    pub tenant_id: i64,
    /// The previous owner, now an admin; `None` if the team had no owner.
    pub previous_owner_id: Option<i64>,
    /// The previous owner's email.
    pub previous_owner_email: Option<String>,
    /// The new owner.
    pub new_owner_id: i64,
    /// The new owner's email.
    pub new_owner_email: String,
}
domain_event!(
    OwnershipTransferred,
    TEAM_OWNERSHIP_TRANSFERRED,
    TEAM_AGGREGATE,
    tenant_id
);

/// A certificate was requested for a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SslCertificateRequested {
    /// The certificate's id (also the aggregate id).
    pub certificate_id: i64,
    /// The site it is for.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The domain it covers.
    pub domain: String,
}
domain_event!(
    SslCertificateRequested,
    SSL_CERTIFICATE_REQUESTED,
    SSL_CERTIFICATE_AGGREGATE,
    certificate_id
);

/// A requested certificate was issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SslCertificateIssued {
    /// The certificate's id (also the aggregate id).
    pub certificate_id: i64,
    /// The site it is for.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The domain it covers.
    pub domain: String,
    /// Who issued it.
    pub issuer: String,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}
domain_event!(
    SslCertificateIssued,
    SSL_CERTIFICATE_ISSUED,
    SSL_CERTIFICATE_AGGREGATE,
    certificate_id
);

/// An issued certificate expires within `window_days` days. Recorded once
/// per certificate and window by the expiry check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SslCertificateExpiring {
    /// The certificate's id (also the aggregate id).
    pub certificate_id: i64,
    /// The site it is for.
    pub site_id: i64,
    /// The site's tenant.
    pub tenant_id: i64,
    /// The domain it covers.
    pub domain: String,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// Whole days left when the check ran (0 on its last day).
    pub days_remaining: i64,
    /// The warning window the check used.
    pub window_days: i32,
}

impl DomainEvent for SslCertificateExpiring {
    fn event_type(&self) -> &'static str {
        SSL_CERTIFICATE_EXPIRING
    }

    fn aggregate_type(&self) -> &'static str {
        SSL_CERTIFICATE_AGGREGATE
    }

    fn aggregate_id(&self) -> String {
        self.certificate_id.to_string()
    }

    fn tenant_id(&self) -> Option<String> {
        Some(self.tenant_id.to_string())
    }
}

/// A VPS got a new credential; the previous one is revoked. Carries ids and
/// names only: never the credential, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VpsCredentialsRotated {
    /// The server (also the aggregate id).
    pub vps_id: i64,
    /// Its tenant.
    pub tenant_id: i64,
    /// Its host name.
    pub hostname: String,
    /// The id of the new credential row.
    pub credential_id: i64,
    /// The id of the revoked one, if there was one.
    pub previous_credential_id: Option<i64>,
    /// When the rotation committed.
    pub rotated_at: DateTime<Utc>,
}
domain_event!(
    VpsCredentialsRotated,
    SECURITY_VPS_CREDENTIALS_ROTATED,
    VPS_AGGREGATE,
    vps_id
);

/// An API token got a new secret; the old one no longer verifies. Carries
/// ids and names only: never the token, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiTokenRotated {
    /// The token (also the aggregate id).
    pub token_id: i64,
    /// Its tenant.
    pub tenant_id: i64,
    /// Its name.
    pub name: String,
    /// When the rotation committed.
    pub rotated_at: DateTime<Utc>,
}
domain_event!(
    ApiTokenRotated,
    SECURITY_API_TOKEN_ROTATED,
    API_TOKEN_AGGREGATE,
    token_id
);

/// A user's failed sign-ins reached the detector's threshold within its
/// window. Recorded once per user and window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SuspiciousActivityDetected {
    /// The incident (also the aggregate id).
    pub incident_id: i64,
    /// The user's tenant.
    pub tenant_id: i64,
    /// The user whose account was targeted.
    pub user_id: i64,
    /// The user's email.
    pub email: String,
    /// What was detected: `failed_logins`.
    pub kind: String,
    /// Failed sign-ins within the window.
    pub attempts: i32,
    /// The window's length.
    pub window_seconds: i32,
    /// The first failed sign-in counted.
    pub first_attempt_at: DateTime<Utc>,
    /// The last one.
    pub last_attempt_at: DateTime<Utc>,
}
domain_event!(
    SuspiciousActivityDetected,
    SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
    SECURITY_INCIDENT_AGGREGATE,
    incident_id
);

/// A site creation was refused: the tenant has as many live sites as its
/// plan allows. The refusal commits with this event; the site does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SiteQuotaExceeded {
    /// The tenant (also the aggregate id).
    pub tenant_id: i64,
    /// The tenant's plan.
    pub plan: String,
    /// Live sites the plan allows.
    pub max_sites: i64,
    /// Live sites the tenant has.
    pub sites: i64,
    /// The domain of the refused site.
    pub domain: String,
}
domain_event!(
    SiteQuotaExceeded,
    QUOTA_SITE_QUOTA_EXCEEDED,
    QUOTA_AGGREGATE,
    tenant_id
);

/// A completed backup measured the tenant's storage over its plan's limit
/// (recorded when the usage crosses the limit, not on every backup above it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StorageQuotaExceeded {
    /// The tenant (also the aggregate id).
    pub tenant_id: i64,
    /// The tenant's plan.
    pub plan: String,
    /// Storage the plan allows.
    pub max_storage_bytes: i64,
    /// Storage of the tenant's live sites now.
    pub storage_bytes: i64,
    /// The site whose backup measured it.
    pub site_id: i64,
    /// That backup.
    pub backup_id: i64,
}
domain_event!(
    StorageQuotaExceeded,
    QUOTA_STORAGE_QUOTA_EXCEEDED,
    QUOTA_AGGREGATE,
    tenant_id
);

/// A bandwidth report took the tenant's month to its plan's limit
/// (recorded when the usage reaches the limit, once per crossing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BandwidthLimitReached {
    /// The tenant (also the aggregate id).
    pub tenant_id: i64,
    /// The tenant's plan.
    pub plan: String,
    /// The month, `YYYY-MM` (UTC).
    pub month: String,
    /// Bytes a month the plan allows.
    pub monthly_bandwidth_bytes: i64,
    /// Bytes served this month so far.
    pub bandwidth_bytes: i64,
    /// The site whose report reached it.
    pub site_id: i64,
}
domain_event!(
    BandwidthLimitReached,
    QUOTA_BANDWIDTH_LIMIT_REACHED,
    QUOTA_AGGREGATE,
    tenant_id
);

/// Registers each event's payload type with its schema version (every
/// CHOM payload is at version 1): the schemas `chom schema export` writes
/// to `examples/chom/schemas/`, that `chom schema check` guards and that a
/// fake outbox checks recorded payloads against.
pub fn register_schemas(registry: Registry) -> outbox::Result<Registry> {
    registry
        .event_schema::<SiteCreated>(SITE_CREATED, 1)?
        .event_schema::<SiteProvisioned>(SITE_PROVISIONED, 1)?
        .event_schema::<SiteProvisioningFailed>(SITE_PROVISIONING_FAILED, 1)?
        .event_schema::<SiteDeleted>(SITE_DELETED, 1)?
        .event_schema::<BackupCreated>(BACKUP_CREATED, 1)?
        .event_schema::<BackupCompleted>(BACKUP_COMPLETED, 1)?
        .event_schema::<BackupFailed>(BACKUP_FAILED, 1)?
        .event_schema::<TeamMemberRoleChanged>(TEAM_MEMBER_ROLE_CHANGED, 1)?
        .event_schema::<TeamMemberRemoved>(TEAM_MEMBER_REMOVED, 1)?
        .event_schema::<OwnershipTransferred>(TEAM_OWNERSHIP_TRANSFERRED, 1)?
        .event_schema::<SslCertificateRequested>(SSL_CERTIFICATE_REQUESTED, 1)?
        .event_schema::<SslCertificateIssued>(SSL_CERTIFICATE_ISSUED, 1)?
        .event_schema::<SslCertificateExpiring>(SSL_CERTIFICATE_EXPIRING, 1)?
        .event_schema::<VpsCredentialsRotated>(SECURITY_VPS_CREDENTIALS_ROTATED, 1)?
        .event_schema::<ApiTokenRotated>(SECURITY_API_TOKEN_ROTATED, 1)?
        .event_schema::<SuspiciousActivityDetected>(SECURITY_SUSPICIOUS_ACTIVITY_DETECTED, 1)?
        .event_schema::<SiteQuotaExceeded>(QUOTA_SITE_QUOTA_EXCEEDED, 1)?
        .event_schema::<StorageQuotaExceeded>(QUOTA_STORAGE_QUOTA_EXCEEDED, 1)?
        .event_schema::<BandwidthLimitReached>(QUOTA_BANDWIDTH_LIMIT_REACHED, 1)
}

/// What CHOM's event catalog page (`docs/events.md`, `chom schema catalog`)
/// says beyond the registry.
pub fn catalog_options() -> outbox::contract::catalog::CatalogOptions {
    outbox::contract::catalog::CatalogOptions {
        title: "CHOM's events".into(),
        producer: "CHOM's services (`chom::services`), in the transaction of the change".into(),
        schema_folder: Some("../examples/chom/schemas".into()),
        dataschema_base: None,
    }
}
