//! The library's error types: [`Error`] for its own operations,
//! [`ListenerError`] for what a queued listener returns, [`BoxError`] for a
//! sync listener, and [`error_chain`] to print any of them whole.

use std::fmt;
use std::time::Duration;

use diesel::result::ConnectionError;

/// Result alias for the library's fallible operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can fail with.
///
/// Connection errors carry the database URL with its password redacted;
/// no variant ever holds a password. As the API guidelines ask, `Display`
/// describes this layer only; the cause is in [`std::error::Error::source`]
/// (`{:#}` with anyhow prints the whole chain).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The serialized payload is larger than the configured cap. Nothing was
    /// written: the check runs before any SQL.
    #[error("payload of {event_type} event is {size} bytes, over the cap of {limit} bytes")]
    PayloadTooLarge {
        /// The event's type name.
        event_type: String,
        /// Serialized payload size in bytes.
        size: usize,
        /// The configured cap in bytes.
        limit: usize,
    },
    /// The payload could not be serialized to JSON.
    #[error("cannot serialize payload of {event_type} event")]
    Serialize {
        /// The event's type name.
        event_type: String,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// A field of the event or its metadata breaks the event contract
    /// (type name format, empty aggregate id, over-long field, ...).
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// `record` was called on a connection with no open transaction. The
    /// outbox only writes inside the caller's transaction, so that the event
    /// exists if and only if the domain change commits.
    #[error(
        "no transaction is open on this connection: record events inside the transaction of the domain write"
    )]
    NoTransaction,
    /// A query failed.
    #[error("database error")]
    Database(#[from] diesel::result::Error),
    /// Connecting to Postgres failed.
    #[error("cannot connect to {url}")]
    Connect {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What libpq reported.
        #[source]
        source: ConnectionError,
    },
    /// The connection pool could not hand out a connection.
    #[error("database pool")]
    Pool(#[from] r2d2::Error),
    /// A broker operation failed.
    #[error("{context}")]
    Broker {
        /// What was being done, with any URL redacted.
        context: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },
    /// Running the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// A configuration value is out of range or malformed.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An operator's input was refused (a page cursor, an edited payload,
    /// ...): the message says what is wrong with it.
    #[error("{0}")]
    InvalidInput(String),
    /// The thing named does not exist (a failed job id, ...).
    #[error("not found: {0}")]
    NotFound(String),
    /// A projection refused events while rebuilding (its `apply` or
    /// `reset` failed, or an event could not be upcast).
    #[error("projection {name}: {reason}")]
    Projection {
        /// The projection.
        name: String,
        /// What failed.
        reason: String,
    },
    /// The broker did not confirm a publish; [`Unconfirmed`](enum@Unconfirmed) says how.
    #[error("{context}: {reason}")]
    Unconfirmed {
        /// What was being published (`failed job 7 to chom.audit`).
        context: String,
        /// Nack, return or timeout.
        reason: Unconfirmed,
    },
    /// A recorded payload does not match its type's registered JSON Schema
    /// (checked by fake outboxes, and by every outbox with feature
    /// `testing` or [`OutboxBuilder::validate_payloads`](crate::OutboxBuilder::validate_payloads)).
    #[error("payload of {event_type} v{schema_version} does not match its schema at {path:?}: {reason}")]
    SchemaViolation {
        /// The event type.
        event_type: String,
        /// The payload's schema version.
        schema_version: i32,
        /// JSON pointer of the failing value (`/domain`; `""` for the
        /// payload itself).
        path: String,
        /// What the validator reported.
        reason: String,
    },
    /// A payload's version has no schema, though its type has schemas
    /// registered: the event's `schema_version` and the registration
    /// disagree.
    #[error("{event_type} has no schema at version {schema_version} (registered: {known:?})")]
    UnknownSchemaVersion {
        /// The event type.
        event_type: String,
        /// The payload's schema version.
        schema_version: i32,
        /// The versions registered.
        known: Vec<i32>,
    },
    /// A task on tokio's blocking pool panicked or was cancelled.
    #[error("a blocking task failed")]
    BlockingTask(#[source] tokio::task::JoinError),
    /// With [`RelayConfig::wait_for_standby`](crate::RelayConfig::wait_for_standby)
    /// on, no streaming standby had flushed the WAL of a claimed batch in
    /// time (the message says why: none connected, none visible to this
    /// role, or behind); the batch was given back unpublished.
    #[error("standby guard: {0}")]
    StandbyNotFlushed(String),
}

impl Error {
    /// The same error with its context replaced, for callers that know
    /// more about what was being done; other kinds are returned as they are.
    pub(crate) fn in_context(self, context: impl FnOnce(String) -> String) -> Self {
        match self {
            Error::Unconfirmed { context: old, reason } => Error::Unconfirmed {
                context: context(old),
                reason,
            },
            Error::Broker { context: old, source } => Error::Broker {
                context: context(old),
                source,
            },
            other => other,
        }
    }
}

/// Lets `record` run inside a diesel-native transaction,
/// `conn.transaction::<_, diesel::result::Error, _>(|conn| ...)`: the
/// outbox's own database errors come back as the diesel error they were;
/// every other outbox error (an invalid event, an oversized payload, no
/// open transaction) becomes [`QueryBuilderError`] holding the
/// [`Error`], which `downcast_ref::<outbox::Error>()` gets back. Either
/// way the transaction rolls back. Use [`Error`] as the transaction's
/// error type instead (diesel's errors convert into it with `?`) to
/// branch on the outbox's variants without downcasting.
///
/// [`QueryBuilderError`]: diesel::result::Error::QueryBuilderError
impl From<Error> for diesel::result::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Database(inner) => inner,
            other => diesel::result::Error::QueryBuilderError(Box::new(other)),
        }
    }
}

/// Why the broker did not confirm a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unconfirmed {
    /// The broker refused the message (a nack).
    Nacked,
    /// No queue took the message: it was returned (mandatory publish).
    Unroutable,
    /// No confirm arrived in time; the message may or may not be queued.
    TimedOut(Duration),
}

impl fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unconfirmed::Nacked => f.write_str("the broker refused the message"),
            Unconfirmed::Unroutable => f.write_str("no queue took the message (returned)"),
            Unconfirmed::TimedOut(after) => write!(f, "no confirm within {after:?}"),
        }
    }
}

/// Error type a listener returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A queued listener's failure, and whether trying again is worth it.
#[derive(Debug)]
pub enum ListenerError {
    /// Try again after the backoff delay, up to
    /// [`ListenerOptions::tries`](crate::ListenerOptions::tries).
    Transient(BoxError),
    /// Give up now: a failed-jobs row and the dead-letter queue.
    Permanent(BoxError),
    /// A transient failure whose next try must wait at least `at_least`
    /// (the other side asked, as with HTTP `Retry-After`): counted like
    /// [`Transient`](Self::Transient), then held in the retry queue of the
    /// smallest delay at or above both `at_least` and the backoff delay (the
    /// longest one if none is that long).
    RetryAfter {
        /// What failed.
        error: BoxError,
        /// The least wait before the next try.
        at_least: Duration,
    },
    /// Not a failure: the event was not handled now (a rate limit held it
    /// back) and goes back to wait at least `at_least`, in the retry queue
    /// chosen as for [`RetryAfter`](Self::RetryAfter), without counting a
    /// try: it never becomes a failed job this way.
    Deferred {
        /// Why it was held back.
        reason: BoxError,
        /// The least wait before it is handled again.
        at_least: Duration,
    },
}

impl ListenerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient(error.into())
    }

    /// A failure no retry can fix.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }

    /// A failure worth retrying, but not before `at_least` has passed.
    pub fn retry_after(error: impl Into<BoxError>, at_least: Duration) -> Self {
        Self::RetryAfter {
            error: error.into(),
            at_least,
        }
    }

    /// Not handled now and not a failure: handle it again no earlier than
    /// `at_least` from now, this try not counted.
    pub fn deferred(reason: impl Into<BoxError>, at_least: Duration) -> Self {
        Self::Deferred {
            reason: reason.into(),
            at_least,
        }
    }

    /// Whether this failure ends the job at once.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }

    /// The least wait before the next try that this error asks for.
    pub fn at_least(&self) -> Option<Duration> {
        match self {
            Self::RetryAfter { at_least, .. } | Self::Deferred { at_least, .. } => Some(*at_least),
            Self::Transient(_) | Self::Permanent(_) => None,
        }
    }

    /// The underlying error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            Self::Transient(e) | Self::Permanent(e) => e.as_ref(),
            Self::RetryAfter { error, .. } => error.as_ref(),
            Self::Deferred { reason, .. } => reason.as_ref(),
        }
    }
}

impl fmt::Display for ListenerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole source chain, so the failed-jobs row says everything.
        f.write_str(&error_chain(self.inner()))
    }
}

impl std::error::Error for ListenerError {}

/// Database errors are worth retrying (a serialization failure, a lost
/// connection); return [`ListenerError::permanent`] yourself for those
/// that are not.
impl From<diesel::result::Error> for ListenerError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Transient(Box::new(error))
    }
}

impl From<Error> for ListenerError {
    fn from(error: Error) -> Self {
        Self::Transient(Box::new(error))
    }
}

/// `error` and each of its sources, joined with `: `, for a log line or a
/// stored error text.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
