//! Backups of a site: started, then completed or failed. Events:
//! `backup.created`, `backup.completed`, `backup.failed`.

use diesel::dsl::now;
use diesel::prelude::*;
use outbox::{Metadata, Outbox};

use crate::error::{ChomError, Result};
use crate::events::{BACKUP_COMPLETED, BACKUP_CREATED, BACKUP_FAILED};
use crate::events::{BackupCompleted, BackupCreated, BackupFailed};
use crate::models::{Backup, BackupStatus, NewBackup, Site, SiteStatus};
use crate::schema::{backups, sites};
use crate::services::{Recorded, error_text, quotas};

/// Starts a backup of an `active` site: inserts a `running` backup and
/// records `backup.created`.
pub fn create_backup(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    site_id: i64,
) -> Result<Recorded<Backup>> {
    outbox.transaction_with(conn, metadata, |tx| {
        // FOR SHARE: the site cannot be deleted or change status until the
        // backup commits, while several backups of it may start at once.
        let site = sites::table
            .find(site_id)
            .filter(sites::deleted_at.is_null())
            .select(Site::as_select())
            .for_share()
            .first(tx.conn())
            .optional()?
            .ok_or(ChomError::NotFound {
                what: "site",
                id: site_id,
            })?;
        if site.status != SiteStatus::Active {
            return Err(ChomError::InvalidState {
                what: "site",
                id: site.id,
                status: site.status.to_string(),
                action: "back up",
            });
        }
        let backup = diesel::insert_into(backups::table)
            .values(NewBackup {
                site_id: site.id,
                tenant_id: site.tenant_id,
                status: BackupStatus::Running,
            })
            .returning(Backup::as_returning())
            .get_result::<Backup>(tx.conn())?;
        let event_id = tx.record(&BackupCreated {
            backup_id: backup.id,
            site_id: site.id,
            tenant_id: site.tenant_id,
            domain: site.domain,
        })?;
        Ok(Recorded {
            value: backup,
            event_id,
            event_type: BACKUP_CREATED,
            also: Vec::new(),
        })
    })
}

/// Completes a running backup with its size and duration, records
/// `backup.completed`, and takes the size as the site's measured storage.
/// When that takes the tenant's storage over its plan's limit, the same
/// transaction records `quota.storage_quota_exceeded` too (in
/// [`Recorded::also`]).
pub fn complete_backup(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    backup_id: i64,
    size_bytes: i64,
    duration_ms: i64,
) -> Result<Recorded<Backup>> {
    if size_bytes < 0 {
        return Err(ChomError::invalid("size_bytes", "must not be negative"));
    }
    if duration_ms < 0 {
        return Err(ChomError::invalid("duration_ms", "must not be negative"));
    }
    outbox.transaction_with(conn, metadata, |tx| {
        let backup = lock_unfinished_backup(tx.conn(), backup_id, "complete")?;
        // The quota row before the site's: the order every quota check
        // locks in.
        let storage = quotas::before_storage_change(tx.conn(), backup.tenant_id)?;
        let backup = diesel::update(backups::table.find(backup.id))
            .set((
                backups::status.eq(BackupStatus::Completed),
                backups::size_bytes.eq(size_bytes),
                backups::duration_ms.eq(duration_ms),
                backups::completed_at.eq(now),
            ))
            .returning(Backup::as_returning())
            .get_result::<Backup>(tx.conn())?;
        // A full backup's size is the best measure of the site's storage we
        // have; a deleted site keeps its last value.
        let domain = diesel::update(sites::table.find(backup.site_id))
            .filter(sites::deleted_at.is_null())
            .set(sites::storage_bytes.eq(size_bytes))
            .returning(sites::domain)
            .get_result::<String>(tx.conn())
            .optional()?;
        let domain = match domain {
            Some(domain) => domain,
            None => site_domain(tx.conn(), backup.site_id)?,
        };
        let event_id = tx.record(&BackupCompleted {
            backup_id: backup.id,
            site_id: backup.site_id,
            tenant_id: backup.tenant_id,
            domain,
            size_bytes,
            duration_ms,
        })?;
        let exceeded =
            quotas::after_storage_change(tx, storage, backup.tenant_id, backup.site_id, backup.id)?;
        Ok(Recorded {
            value: backup,
            event_id,
            event_type: BACKUP_COMPLETED,
            also: exceeded.into_iter().collect(),
        })
    })
}

/// Fails a running backup with `error` (kept in `backups.error`) and
/// records `backup.failed` carrying the error text.
pub fn fail_backup(
    outbox: &Outbox,
    conn: &mut PgConnection,
    metadata: Metadata,
    backup_id: i64,
    error: &str,
) -> Result<Recorded<Backup>> {
    let error = error_text("error", error)?;
    outbox.transaction_with(conn, metadata, |tx| {
        let backup = lock_unfinished_backup(tx.conn(), backup_id, "fail")?;
        let backup = diesel::update(backups::table.find(backup.id))
            .set((
                backups::status.eq(BackupStatus::Failed),
                backups::error.eq(&error),
                backups::completed_at.eq(now),
            ))
            .returning(Backup::as_returning())
            .get_result::<Backup>(tx.conn())?;
        let domain = site_domain(tx.conn(), backup.site_id)?;
        let event_id = tx.record(&BackupFailed {
            backup_id: backup.id,
            site_id: backup.site_id,
            tenant_id: backup.tenant_id,
            domain,
            error,
        })?;
        Ok(Recorded {
            value: backup,
            event_id,
            event_type: BACKUP_FAILED,
            also: Vec::new(),
        })
    })
}

/// The backup with id `backup_id`.
pub fn get_backup(conn: &mut PgConnection, backup_id: i64) -> Result<Backup> {
    backups::table
        .find(backup_id)
        .select(Backup::as_select())
        .first(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "backup",
            id: backup_id,
        })
}

/// The backups of `site_id`, oldest first.
pub fn list_backups(conn: &mut PgConnection, site_id: i64) -> Result<Vec<Backup>> {
    Ok(backups::table
        .filter(backups::site_id.eq(site_id))
        .order(backups::id)
        .select(Backup::as_select())
        .load(conn)?)
}

/// Locks a backup that has not finished yet, so its events commit in order
/// and it cannot finish twice.
fn lock_unfinished_backup(conn: &mut PgConnection, backup_id: i64, action: &'static str) -> Result<Backup> {
    let backup = backups::table
        .find(backup_id)
        .select(Backup::as_select())
        .for_update()
        .first::<Backup>(conn)
        .optional()?
        .ok_or(ChomError::NotFound {
            what: "backup",
            id: backup_id,
        })?;
    if !matches!(backup.status, BackupStatus::Pending | BackupStatus::Running) {
        return Err(ChomError::InvalidState {
            what: "backup",
            id: backup.id,
            status: backup.status.to_string(),
            action,
        });
    }
    Ok(backup)
}

/// The domain of a site, deleted or not: backup events name it even after
/// the site is gone.
fn site_domain(conn: &mut PgConnection, site_id: i64) -> Result<String> {
    Ok(sites::table.find(site_id).select(sites::domain).first(conn)?)
}
