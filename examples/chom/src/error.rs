//! The crate's error type.

/// Result alias for chom's fallible operations.
pub type Result<T, E = ChomError> = std::result::Result<T, E>;

/// Everything a chom service can fail with. A service that returns an
/// error has rolled its transaction back: no row changed, no event exists.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChomError {
    /// The row does not exist (or, for sites, was soft-deleted).
    #[error("{what} {id} not found")]
    NotFound {
        /// The kind of row: `tenant`, `site`, `backup`.
        what: &'static str,
        /// The id that was looked up.
        id: i64,
    },
    /// The row exists but its status does not allow the action.
    #[error("cannot {action} {what} {id}: it is {status}")]
    InvalidState {
        /// The kind of row.
        what: &'static str,
        /// The row's id.
        id: i64,
        /// Its current status.
        status: String,
        /// What was attempted (`provision`, `complete`, ...).
        action: &'static str,
    },
    /// The change would break a uniqueness rule (a domain or an email
    /// already in use).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The tenant's plan does not allow it (a site over the plan's site
    /// count). Unlike every other error this one committed: the refusal is
    /// recorded as a `quota_breaches` row and a `quota.site_quota_exceeded`
    /// event, so the tenant's team hears of it.
    #[error("quota exceeded: tenant {tenant_id} has {used} {quota}, as many as its plan allows ({limit})")]
    QuotaExceeded {
        /// The tenant.
        tenant_id: i64,
        /// Which quota: `sites`.
        quota: &'static str,
        /// The plan's limit.
        limit: i64,
        /// The usage that met it.
        used: i64,
        /// The `quota.*` event recorded for the refusal.
        event_id: uuid::Uuid,
    },
    /// An argument is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The argument's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Recording the event (or connecting, migrating) failed.
    #[error(transparent)]
    Outbox(#[from] outbox::Error),
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
}

impl ChomError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}
