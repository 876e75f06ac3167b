//! The seed's four listeners, and the one place that maps CHOM's events to
//! them (the seed's EventServiceProvider): [`registry`].
//!
//! | event | UpdateTenantMetrics (queued) | RecordAuditLog (queued) | SendNotification (queued) | RecordMetrics (sync) |
//! | --- | :-: | :-: | :-: | :-: |
//! | `site.created` | ✓ | ✓ | | ✓ |
//! | `site.provisioned` | ✓ | ✓ | | ✓ |
//! | `site.provisioning_failed` | ✓ | ✓ | ✓ | ✓ |
//! | `site.deleted` | ✓ | ✓ | | ✓ |
//! | `backup.created` | ✓ | ✓ | | ✓ |
//! | `backup.completed` | ✓ | ✓ | | ✓ |
//! | `backup.failed` | ✓ | ✓ | ✓ | ✓ |
//! | `team.member_role_changed` | | ✓ | | ✓ |
//! | `team.member_removed` | | ✓ | | ✓ |
//! | `team.ownership_transferred` | | ✓ | ✓ | ✓ |
//! | `ssl.certificate_requested` | | ✓ | | ✓ |
//! | `ssl.certificate_issued` | | ✓ | | ✓ |
//! | `ssl.certificate_expiring` | | ✓ | ✓ | ✓ |
//! | `security.vps_credentials_rotated` | | ✓ | | ✓ |
//! | `security.api_token_rotated` | | ✓ | | ✓ |
//! | `security.suspicious_activity_detected` | | ✓ | ✓ | ✓ |
//! | `quota.site_quota_exceeded` | | ✓ | ✓ | ✓ |
//! | `quota.storage_quota_exceeded` | | ✓ | ✓ | ✓ |
//! | `quota.bandwidth_limit_reached` | | ✓ | ✓ | ✓ |
//!
//! As in the seed: two queued jobs per site change (tenant metrics, audit),
//! two or three per backup change (plus a notification when it failed),
//! and the metrics counters in-process right after the write commits.
//! The account events are audited, counted, and notified where a person must
//! act: an expiring certificate, an exceeded quota, suspicious activity, a
//! new owner. They change no tenant stats.
//!
//! Queued listeners run in `chom work` from the queues `chom.<listener>`
//! with the seed's retries (3 tries, 30 s / 60 s / 120 s backoff) unless
//! [`ListenerConfig`] says otherwise. Delivery guarantees:
//!
//! - [`UpdateTenantMetrics`]: a projection (`outbox projection rebuild
//!   update_tenant_metrics`) that recomputes from the source tables, so
//!   any number of deliveries give the same row and a rebuild equals a
//!   recompute.
//! - [`TenantActivity`]: a projection fed by the events alone, the
//!   per-tenant activity feed (`tenant_activity`), rebuilt from the event
//!   log.
//! - [`RecordAuditLog`]: exactly one audit row per event (inbox
//!   transaction, and a unique event id as a backstop).
//! - [`SendNotification`]: with the default [`DatabaseNotifier`], exactly
//!   one stored notification per team member and event (inbox
//!   transaction). A notifier that reaches outside the database (email) is
//!   at least once.
//! - [`RecordMetrics`]: in-process counters; nothing to retry.

pub mod activity_feed;
mod audit_log;
mod metrics;
mod notification;
mod tenant_metrics;

use std::sync::Arc;
use std::time::Duration;

use outbox::{ListenerOptions, Registry};

pub use activity_feed::{TENANT_ACTIVITY, TenantActivity};
pub use audit_log::RecordAuditLog;
#[allow(deprecated)]
pub use metrics::PHASE2_COUNTERS;
pub use metrics::{
    ACCOUNT_COUNTERS, BACKUP_DURATION_SECONDS, BACKUP_SIZE_BYTES, BACKUPS_COMPLETED_TOTAL,
    BACKUPS_CREATED_TOTAL, BACKUPS_FAILED_TOTAL, RecordMetrics, SITES_CREATED_TOTAL, SITES_DELETED_TOTAL,
    SITES_PROVISIONED_TOTAL, SITES_PROVISIONING_FAILED_TOTAL, describe as describe_metrics,
};
pub use notification::{
    DatabaseNotifier, Notification, Notifier, NotifierError, OutageSwitch, SendNotification,
    SwitchableNotifier,
};
pub use tenant_metrics::UpdateTenantMetrics;

use crate::events::{
    BACKUP_FAILED, EVENT_TYPES, QUOTA_BANDWIDTH_LIMIT_REACHED, QUOTA_SITE_QUOTA_EXCEEDED,
    QUOTA_STORAGE_QUOTA_EXCEEDED, SECURITY_SUSPICIOUS_ACTIVITY_DETECTED, SEED_EVENT_TYPES,
    SITE_PROVISIONING_FAILED, SSL_CERTIFICATE_EXPIRING, TEAM_OWNERSHIP_TRANSFERRED,
};

/// Queue name prefix: queues are `chom.<listener>`.
pub const APP: &str = "chom";

/// `update_tenant_metrics`.
pub const UPDATE_TENANT_METRICS: &str = "update_tenant_metrics";
/// `record_audit_log`.
pub const RECORD_AUDIT_LOG: &str = "record_audit_log";
/// `send_notification`.
pub const SEND_NOTIFICATION: &str = "send_notification";
/// `record_metrics`.
pub const RECORD_METRICS: &str = "record_metrics";

/// The events SendNotification tells a tenant's team about: failures
/// (the seed's), and the account events someone has to act on.
pub const NOTIFIED_EVENT_TYPES: [&str; 8] = [
    SITE_PROVISIONING_FAILED,
    BACKUP_FAILED,
    TEAM_OWNERSHIP_TRANSFERRED,
    SSL_CERTIFICATE_EXPIRING,
    SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
    QUOTA_SITE_QUOTA_EXCEEDED,
    QUOTA_STORAGE_QUOTA_EXCEEDED,
    QUOTA_BANDWIDTH_LIMIT_REACHED,
];

/// The mapping, listener by listener.
pub const MAPPING: [(&str, &[&str]); 4] = [
    (UPDATE_TENANT_METRICS, &SEED_EVENT_TYPES),
    (RECORD_AUDIT_LOG, &EVENT_TYPES),
    (SEND_NOTIFICATION, &NOTIFIED_EVENT_TYPES),
    (RECORD_METRICS, &EVENT_TYPES),
];

/// What the listeners need and how they retry.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Where SendNotification sends. Default [`DatabaseNotifier`].
    pub notifier: Arc<dyn Notifier>,
    /// Tries and backoff of every queued listener. Default the seed's: 3
    /// tries, 30 s, 60 s, 120 s. Tests and `chom demo` use milliseconds.
    pub retries: Option<(u32, Vec<Duration>)>,
    /// Handlers of each queued listener at once per worker. Default 4.
    pub concurrency: Option<usize>,
}

impl std::fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("notifier", &self.notifier.name())
            .field("retries", &self.retries)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            notifier: Arc::new(DatabaseNotifier),
            retries: None,
            concurrency: None,
        }
    }
}

impl ListenerConfig {
    /// The options of a queued listener: `base` with the configured
    /// retries and concurrency.
    pub fn options(&self, base: ListenerOptions) -> ListenerOptions {
        let mut options = base;
        if let Some((tries, backoff)) = &self.retries {
            options = options.retries(*tries, backoff);
        }
        if let Some(concurrency) = self.concurrency {
            options.concurrency = concurrency;
            options.prefetch = options
                .prefetch
                .max(u16::try_from(concurrency.saturating_mul(2)).unwrap_or(u16::MAX));
        }
        options
    }
}

/// CHOM's registry: every event's payload schema and every event mapped to
/// its listeners, in one place.
/// Used by `chom work` (the queued listeners) and by the write path's
/// [`outbox::Outbox`] (RecordMetrics after commit).
pub fn registry(config: &ListenerConfig) -> outbox::Result<Registry> {
    let listed = |name: &str| {
        MAPPING
            .iter()
            .find(|(listener, _)| *listener == name)
            .map(|(_, types)| *types)
            .unwrap_or(&[])
    };
    crate::events::register_schemas(Registry::new())?
        .projection_with(
            UpdateTenantMetrics,
            config.options(UpdateTenantMetrics::base_options()),
        )?
        .projection_with(TenantActivity, config.options(outbox::ListenerOptions::default()))?
        .queued_listener_with(
            listed(RECORD_AUDIT_LOG),
            RecordAuditLog,
            config.options(ListenerOptions::default()),
        )?
        .queued_listener_with(
            listed(SEND_NOTIFICATION),
            SendNotification::new(Arc::clone(&config.notifier)),
            config.options(ListenerOptions::default()),
        )?
        .sync_listener(listed(RECORD_METRICS), RecordMetrics)
}

/// The event's tenant id as CHOM stores it (a number). A missing or
/// non-numeric tenant is a permanent failure: CHOM never records one.
pub(crate) fn tenant_id(event: &outbox::ReceivedEvent) -> Result<i64, outbox::ListenerError> {
    let raw = event.tenant_id.as_deref().ok_or_else(|| {
        outbox::ListenerError::permanent(format!(
            "{} event {} has no tenant",
            event.event_type, event.event_id
        ))
    })?;
    raw.parse().map_err(|_| {
        outbox::ListenerError::permanent(format!(
            "{} event {} has a non-numeric tenant id",
            event.event_type, event.event_id
        ))
    })
}
