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
//! nothing was written and no event exists.

pub mod backups;
pub mod sites;
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
