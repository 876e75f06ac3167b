//! RecordMetrics (sync): Prometheus counters, in-process, right after the
//! write commits (the seed keeps it sync "for accurate metrics").

use outbox::{BoxError, EventEnvelope, SyncListener};

use crate::events::{
    BACKUP_COMPLETED, BACKUP_CREATED, BACKUP_FAILED, BackupCompleted, QUOTA_BANDWIDTH_LIMIT_REACHED,
    QUOTA_SITE_QUOTA_EXCEEDED, QUOTA_STORAGE_QUOTA_EXCEEDED, SECURITY_API_TOKEN_ROTATED,
    SECURITY_SUSPICIOUS_ACTIVITY_DETECTED, SECURITY_VPS_CREDENTIALS_ROTATED, SITE_CREATED, SITE_DELETED,
    SITE_PROVISIONED, SITE_PROVISIONING_FAILED, SSL_CERTIFICATE_EXPIRING, SSL_CERTIFICATE_ISSUED,
    SSL_CERTIFICATE_REQUESTED, TEAM_MEMBER_REMOVED, TEAM_MEMBER_ROLE_CHANGED, TEAM_OWNERSHIP_TRANSFERRED,
};
use crate::listeners::RECORD_METRICS;

/// Sites created.
pub const SITES_CREATED_TOTAL: &str = "chom_sites_created_total";
/// Sites provisioned.
pub const SITES_PROVISIONED_TOTAL: &str = "chom_sites_provisioned_total";
/// Site provisionings that failed.
pub const SITES_PROVISIONING_FAILED_TOTAL: &str = "chom_sites_provisioning_failed_total";
/// Sites deleted.
pub const SITES_DELETED_TOTAL: &str = "chom_sites_deleted_total";
/// Backups started.
pub const BACKUPS_CREATED_TOTAL: &str = "chom_backups_created_total";
/// Backups completed.
pub const BACKUPS_COMPLETED_TOTAL: &str = "chom_backups_completed_total";
/// Backups failed.
pub const BACKUPS_FAILED_TOTAL: &str = "chom_backups_failed_total";
/// Size of completed backups.
pub const BACKUP_SIZE_BYTES: &str = "chom_backup_size_bytes";
/// Duration of completed backups.
pub const BACKUP_DURATION_SECONDS: &str = "chom_backup_duration_seconds";

/// The account events' counters: event type, counter name, description.
pub const ACCOUNT_COUNTERS: [(&str, &str, &str); 12] = [
    (
        TEAM_MEMBER_ROLE_CHANGED,
        "chom_team_role_changes_total",
        "Team members whose role changed",
    ),
    (
        TEAM_MEMBER_REMOVED,
        "chom_team_members_removed_total",
        "Team members removed",
    ),
    (
        TEAM_OWNERSHIP_TRANSFERRED,
        "chom_team_ownership_transfers_total",
        "Transfers of a tenant's ownership",
    ),
    (
        SSL_CERTIFICATE_REQUESTED,
        "chom_ssl_certificates_requested_total",
        "SSL certificates requested",
    ),
    (
        SSL_CERTIFICATE_ISSUED,
        "chom_ssl_certificates_issued_total",
        "SSL certificates issued",
    ),
    (
        SSL_CERTIFICATE_EXPIRING,
        "chom_ssl_certificates_expiring_total",
        "Expiry warnings of SSL certificates",
    ),
    (
        SECURITY_VPS_CREDENTIALS_ROTATED,
        "chom_vps_credential_rotations_total",
        "VPS credentials rotated",
    ),
    (
        SECURITY_API_TOKEN_ROTATED,
        "chom_api_token_rotations_total",
        "API tokens rotated",
    ),
    (
        SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
        "chom_suspicious_activity_total",
        "Suspicious activity detected (failed sign-ins)",
    ),
    (
        QUOTA_SITE_QUOTA_EXCEEDED,
        "chom_site_quota_exceeded_total",
        "Site creations refused by the plan's site quota",
    ),
    (
        QUOTA_STORAGE_QUOTA_EXCEEDED,
        "chom_storage_quota_exceeded_total",
        "Tenants whose storage went over the plan's",
    ),
    (
        QUOTA_BANDWIDTH_LIMIT_REACHED,
        "chom_bandwidth_limit_reached_total",
        "Tenants whose month reached the plan's bandwidth",
    ),
];

/// The old name of [`ACCOUNT_COUNTERS`], kept for a release.
#[deprecated(note = "renamed ACCOUNT_COUNTERS")]
pub const PHASE2_COUNTERS: [(&str, &str, &str); 12] = ACCOUNT_COUNTERS;

/// Counts each committed event with the `metrics` facade; whatever
/// recorder the process installed (`chom work` and `chom demo` serve
/// Prometheus text on `/metrics`) exports them. Never fails: a counter
/// has nothing to be unavailable.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordMetrics;

impl SyncListener for RecordMetrics {
    fn name(&self) -> &str {
        RECORD_METRICS
    }

    fn handle(&self, event: &EventEnvelope) -> Result<(), BoxError> {
        let counter = match event.event_type.as_str() {
            SITE_CREATED => SITES_CREATED_TOTAL,
            SITE_PROVISIONED => SITES_PROVISIONED_TOTAL,
            SITE_PROVISIONING_FAILED => SITES_PROVISIONING_FAILED_TOTAL,
            SITE_DELETED => SITES_DELETED_TOTAL,
            BACKUP_CREATED => BACKUPS_CREATED_TOTAL,
            BACKUP_COMPLETED => BACKUPS_COMPLETED_TOTAL,
            BACKUP_FAILED => BACKUPS_FAILED_TOTAL,
            other => match ACCOUNT_COUNTERS
                .iter()
                .find(|(event_type, _, _)| *event_type == other)
            {
                Some((_, counter, _)) => counter,
                None => return Ok(()),
            },
        };
        metrics::counter!(counter).increment(1);
        if event.event_type == BACKUP_COMPLETED {
            let completed: BackupCompleted = event.payload_as()?;
            metrics::histogram!(BACKUP_SIZE_BYTES).record(completed.size_bytes as f64);
            metrics::histogram!(BACKUP_DURATION_SECONDS).record(completed.duration_ms as f64 / 1000.0);
        }
        Ok(())
    }
}

/// Registers the counters' descriptions (idempotent).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(SITES_CREATED_TOTAL, "Sites created");
    describe_counter!(SITES_PROVISIONED_TOTAL, "Sites provisioned");
    describe_counter!(SITES_PROVISIONING_FAILED_TOTAL, "Site provisionings that failed");
    describe_counter!(SITES_DELETED_TOTAL, "Sites deleted");
    describe_counter!(BACKUPS_CREATED_TOTAL, "Backups started");
    describe_counter!(BACKUPS_COMPLETED_TOTAL, "Backups completed");
    describe_counter!(BACKUPS_FAILED_TOTAL, "Backups failed");
    for (_, counter, description) in ACCOUNT_COUNTERS {
        describe_counter!(counter, description);
    }
    describe_histogram!(BACKUP_SIZE_BYTES, Unit::Bytes, "Size of completed backups");
    describe_histogram!(
        BACKUP_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of completed backups"
    );
}
