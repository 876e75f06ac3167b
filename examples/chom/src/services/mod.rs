//! The write path: one function per use case, each running one
//! transaction in which the domain write and its event commit together.
//!
//! Every function that records an event takes the [`outbox::Outbox`], a
//! connection, and the [`outbox::Metadata`] of the action
//! (`Metadata::by("user:42")` for a person, `Metadata::system()` for a job),
//! and returns the changed row with the id of the event it recorded. A
//! service that changes an existing aggregate locks its row first
//! (`SELECT ... FOR UPDATE`), so the events of one aggregate commit in the
//! order they were recorded. An error means the transaction rolled back:
//! nothing was written and no event exists; the one exception is
//! [`ChomError::QuotaExceeded`], a refusal that is itself recorded
//! (`quota.site_quota_exceeded`), so it committed.
//!
//! Seed: [`sites`], [`backups`], [`tenants`]. Accounts: [`team`], [`ssl`],
//! [`security`], [`quotas`].

pub mod backups;
pub mod quotas;
pub mod security;
pub mod sites;
pub mod ssl;
pub mod team;
pub mod tenants;

use serde::Serialize;
use uuid::Uuid;

use crate::error::ChomError;

/// A service's result: the row it wrote and the event it recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recorded<T> {
    /// The row as committed.
    pub value: T,
    /// The recorded event's id (UUIDv7).
    pub event_id: Uuid,
    /// The recorded event's type (`site.created`, ...).
    pub event_type: &'static str,
    /// Further events the same transaction recorded, in order: a
    /// `quota.storage_quota_exceeded` beside the `backup.completed` whose
    /// size took the tenant over its plan. Usually empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<RecordedEvent>,
}

impl<T> Recorded<T> {
    /// A result with one event.
    pub(crate) fn one(value: T, event_id: Uuid, event_type: &'static str) -> Self {
        Self {
            value,
            event_id,
            event_type,
            also: Vec::new(),
        }
    }

    /// Every event the transaction recorded, the main one first.
    pub fn events(&self) -> impl Iterator<Item = RecordedEvent> + '_ {
        std::iter::once(RecordedEvent {
            event_id: self.event_id,
            event_type: self.event_type,
        })
        .chain(self.also.iter().copied())
    }
}

/// One recorded event: its id and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct RecordedEvent {
    /// The event's id (UUIDv7).
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: &'static str,
}

/// Longest error text kept from a failed provisioning or backup; the rest is
/// cut, since the text is diagnostic and the columns cap it at 4096 bytes.
pub const MAX_ERROR_BYTES: usize = 4000;

/// Checks and trims an error text, cutting it to [`MAX_ERROR_BYTES`] on a
/// character boundary.
pub(crate) fn error_text(field: &'static str, text: &str) -> Result<String, ChomError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ChomError::invalid(field, "must not be empty"));
    }
    if text.contains('\0') {
        // Postgres text cannot store NUL.
        return Err(ChomError::invalid(field, "must not contain NUL characters"));
    }
    Ok(outbox::text::prefix_within(text, MAX_ERROR_BYTES).to_owned())
}

/// Locks the tenant's row against other team changes for the rest of the
/// transaction (`FOR NO KEY UPDATE`: site creations, which only take a key
/// share, are not held up). [`ChomError::NotFound`] if there is no tenant.
pub(crate) fn lock_tenant_for_team_change(
    conn: &mut diesel::PgConnection,
    tenant_id: i64,
) -> Result<(), ChomError> {
    use diesel::prelude::*;
    let found = crate::schema::tenants::table
        .find(tenant_id)
        .select(crate::schema::tenants::id)
        .for_no_key_update()
        .first::<i64>(conn)
        .optional()?;
    match found {
        Some(_) => Ok(()),
        None => Err(ChomError::NotFound {
            what: "tenant",
            id: tenant_id,
        }),
    }
}

/// Whether `error` is a violation of the unique index or constraint named
/// `constraint`.
pub(crate) fn is_unique_violation(error: &diesel::result::Error, constraint: &str) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        error,
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name() == Some(constraint)
    )
}
