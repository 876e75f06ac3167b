//! SendNotification (queued): tells a tenant's team that a provisioning or
//! a backup failed, that a certificate expires soon, that a quota was
//! exceeded, that someone keeps failing to sign in, or that the tenant has
//! a new owner, through a [`Notifier`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use outbox::{HandlerContext, ListenerError, QueuedListener, ReceivedEvent};
use uuid::Uuid;

use crate::events::{
    BACKUP_FAILED, BackupFailed, BandwidthLimitReached, OwnershipTransferred, QUOTA_BANDWIDTH_LIMIT_REACHED,
    QUOTA_SITE_QUOTA_EXCEEDED, QUOTA_STORAGE_QUOTA_EXCEEDED, SECURITY_SUSPICIOUS_ACTIVITY_DETECTED,
    SITE_PROVISIONING_FAILED, SSL_CERTIFICATE_EXPIRING, SiteProvisioningFailed, SiteQuotaExceeded,
    SslCertificateExpiring, StorageQuotaExceeded, SuspiciousActivityDetected, TEAM_OWNERSHIP_TRANSFERRED,
};
use crate::listeners::{SEND_NOTIFICATION, tenant_id};
use crate::models::User;
use crate::schema::{team_members, tenants, users};

/// One message to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The tenant.
    pub tenant_id: i64,
    /// The recipient.
    pub user_id: i64,
    /// The recipient's address.
    pub email: String,
    /// The event type it is about (`backup.failed`, ...).
    pub kind: String,
    /// Subject line.
    pub subject: String,
    /// Body text.
    pub body: String,
    /// The event it is about (with the user, the dedup key).
    pub event_id: Uuid,
}

/// Why a notification was not sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// The service is down or overloaded: worth retrying.
    #[error("notifier unavailable: {0}")]
    Unavailable(String),
    /// The service refused this notification: retrying will not help.
    #[error("notification rejected: {0}")]
    Rejected(String),
    /// Storing it failed.
    #[error("storing the notification failed")]
    Database(#[from] diesel::result::Error),
}

/// Delivers notifications. `conn` is SendNotification's inbox
/// transaction: a notifier that writes there sends exactly once; one that
/// calls out (email, chat) sends at least once.
pub trait Notifier: Send + Sync + 'static {
    /// For logs.
    fn name(&self) -> &str;
    /// Sends one notification.
    fn send(&self, conn: &mut PgConnection, notification: &Notification) -> Result<(), NotifierError>;
}

/// The default notifier: stores the notification in `notifications` (one
/// per user and event), for the web app to show.
#[derive(Debug, Clone, Copy, Default)]
pub struct DatabaseNotifier;

impl Notifier for DatabaseNotifier {
    fn name(&self) -> &str {
        "database"
    }

    fn send(&self, conn: &mut PgConnection, n: &Notification) -> Result<(), NotifierError> {
        diesel::sql_query(
            "INSERT INTO notifications (tenant_id, user_id, kind, subject, body, event_id)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (event_id, user_id) DO NOTHING",
        )
        .bind::<BigInt, _>(n.tenant_id)
        .bind::<BigInt, _>(n.user_id)
        .bind::<Text, _>(&n.kind)
        .bind::<Text, _>(&n.subject)
        .bind::<Text, _>(&n.body)
        .bind::<SqlUuid, _>(n.event_id)
        .execute(conn)?;
        Ok(())
    }
}

/// Turns a notifier's outage on and off (tests, `chom demo`).
#[derive(Debug, Clone, Default)]
pub struct OutageSwitch(Arc<AtomicBool>);

impl OutageSwitch {
    /// Takes the notifier down.
    pub fn down(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Brings it back.
    pub fn up(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    /// Whether it is down.
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A notifier that fails with [`NotifierError::Unavailable`] while its
/// switch is down, and otherwise delegates.
#[derive(Debug, Clone)]
pub struct SwitchableNotifier<N> {
    inner: N,
    switch: OutageSwitch,
}

impl<N: Notifier> SwitchableNotifier<N> {
    /// Wraps `inner`; returns the switch too.
    pub fn new(inner: N) -> (Self, OutageSwitch) {
        let switch = OutageSwitch::default();
        (
            Self {
                inner,
                switch: switch.clone(),
            },
            switch,
        )
    }
}

impl<N: Notifier> Notifier for SwitchableNotifier<N> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn send(&self, conn: &mut PgConnection, notification: &Notification) -> Result<(), NotifierError> {
        if self.switch.is_down() {
            return Err(NotifierError::Unavailable(format!(
                "{} notifier is down",
                self.inner.name()
            )));
        }
        self.inner.send(conn, notification)
    }
}

/// Notifies every current member of the tenant's team about an event of
/// [`NOTIFIED_EVENT_TYPES`](super::NOTIFIED_EVENT_TYPES). Runs in the inbox
/// transaction; skips (succeeds) when the tenant is gone. When the notifier is unavailable it logs and fails the
/// try as transient, so the framework retries it and, after the last try,
/// records it in failed_jobs.
pub struct SendNotification {
    notifier: Arc<dyn Notifier>,
}

impl std::fmt::Debug for SendNotification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendNotification")
            .field("notifier", &self.notifier.name())
            .finish()
    }
}

impl SendNotification {
    /// Sends through `notifier`.
    pub fn new(notifier: Arc<dyn Notifier>) -> Self {
        Self { notifier }
    }
}

impl QueuedListener for SendNotification {
    fn name(&self) -> &str {
        SEND_NOTIFICATION
    }

    fn handle(&self, event: &ReceivedEvent, ctx: &mut HandlerContext<'_>) -> Result<(), ListenerError> {
        let tenant = tenant_id(event)?;
        let (subject, body) = message(event)?;
        let (attempt, tries, last) = (ctx.attempt(), ctx.tries(), ctx.is_last_try());
        let conn = ctx.conn()?;
        let exists = tenants::table
            .find(tenant)
            .select(tenants::id)
            .first::<i64>(conn)
            .optional()?;
        if exists.is_none() {
            tracing::info!(tenant, event_id = %event.event_id, "tenant is gone; notification skipped");
            return Ok(());
        }
        let recipients = users::table
            .inner_join(team_members::table)
            .filter(team_members::tenant_id.eq(tenant))
            .order(users::id)
            .select(User::as_select())
            .load(conn)?;
        for user in recipients {
            let notification = Notification {
                tenant_id: tenant,
                user_id: user.id,
                email: user.email,
                kind: event.event_type.clone(),
                subject: subject.clone(),
                body: body.clone(),
                event_id: event.event_id,
            };
            match self.notifier.send(conn, &notification) {
                Ok(()) => {}
                Err(NotifierError::Unavailable(reason)) => {
                    tracing::warn!(
                        notifier = self.notifier.name(),
                        event_id = %event.event_id,
                        attempt,
                        tries,
                        %reason,
                        "notifier unavailable; {}",
                        if last { "giving up: the job goes to failed_jobs" } else { "the framework will retry" }
                    );
                    return Err(ListenerError::transient(NotifierError::Unavailable(reason)));
                }
                Err(NotifierError::Rejected(reason)) => {
                    return Err(ListenerError::permanent(NotifierError::Rejected(reason)));
                }
                Err(NotifierError::Database(error)) => return Err(error.into()),
            }
        }
        Ok(())
    }
}

/// The subject and body of the notification about `event`. An event type
/// without a message is a permanent failure (a mapping mistake).
fn message(event: &ReceivedEvent) -> Result<(String, String), ListenerError> {
    Ok(match event.event_type.as_str() {
        SITE_PROVISIONING_FAILED => {
            let failed: SiteProvisioningFailed = event.data_as()?;
            (
                format!("Provisioning of {} failed", failed.domain),
                format!(
                    "We could not provision your site {} (site {}): {}",
                    failed.domain, failed.site_id, failed.error
                ),
            )
        }
        BACKUP_FAILED => {
            let failed: BackupFailed = event.data_as()?;
            (
                format!("Backup of {} failed", failed.domain),
                format!(
                    "Backup {} of your site {} failed: {}",
                    failed.backup_id, failed.domain, failed.error
                ),
            )
        }
        TEAM_OWNERSHIP_TRANSFERRED => {
            let moved: OwnershipTransferred = event.data_as()?;
            (
                format!("{} now owns your team", moved.new_owner_email),
                match moved.previous_owner_email {
                    Some(previous) => format!(
                        "Ownership of your tenant moved from {previous} (now an admin) to {}.",
                        moved.new_owner_email
                    ),
                    None => format!("{} is your tenant's owner.", moved.new_owner_email),
                },
            )
        }
        SSL_CERTIFICATE_EXPIRING => {
            let expiring: SslCertificateExpiring = event.data_as()?;
            (
                format!(
                    "The SSL certificate of {} expires in {} day(s)",
                    expiring.domain, expiring.days_remaining
                ),
                format!(
                    "Certificate {} of your site {} (site {}) expires at {}. Request a new one before then.",
                    expiring.certificate_id,
                    expiring.domain,
                    expiring.site_id,
                    expiring.expires_at.format("%Y-%m-%d %H:%M UTC")
                ),
            )
        }
        SECURITY_SUSPICIOUS_ACTIVITY_DETECTED => {
            let detected: SuspiciousActivityDetected = event.data_as()?;
            (
                format!("Suspicious sign-in attempts on {}", detected.email),
                format!(
                    "{} failed sign-ins to {} within {} s, from {} to {} (incident {}). \
                     If they were not yours, change the password and review the API tokens.",
                    detected.attempts,
                    detected.email,
                    detected.window_seconds,
                    detected.first_attempt_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    detected.last_attempt_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    detected.incident_id
                ),
            )
        }
        QUOTA_SITE_QUOTA_EXCEEDED => {
            let exceeded: SiteQuotaExceeded = event.data_as()?;
            (
                format!("Site quota of the {} plan reached", exceeded.plan),
                format!(
                    "The site {} was not created: you have {} live sites and the {} plan allows {}.",
                    exceeded.domain, exceeded.sites, exceeded.plan, exceeded.max_sites
                ),
            )
        }
        QUOTA_STORAGE_QUOTA_EXCEEDED => {
            let exceeded: StorageQuotaExceeded = event.data_as()?;
            (
                format!("Storage quota of the {} plan exceeded", exceeded.plan),
                format!(
                    "Your sites use {} bytes, over the {} bytes the {} plan allows (measured by backup {} of site {}).",
                    exceeded.storage_bytes,
                    exceeded.max_storage_bytes,
                    exceeded.plan,
                    exceeded.backup_id,
                    exceeded.site_id
                ),
            )
        }
        QUOTA_BANDWIDTH_LIMIT_REACHED => {
            let reached: BandwidthLimitReached = event.data_as()?;
            (
                format!(
                    "Bandwidth limit of the {} plan reached for {}",
                    reached.plan, reached.month
                ),
                format!(
                    "Your sites served {} bytes in {}, the {} bytes a month the {} plan allows.",
                    reached.bandwidth_bytes, reached.month, reached.monthly_bandwidth_bytes, reached.plan
                ),
            )
        }
        other => {
            return Err(ListenerError::permanent(format!(
                "send_notification has no message for {other} events"
            )));
        }
    })
}
