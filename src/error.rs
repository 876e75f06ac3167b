//! The library's error type.

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
    /// The thing named does not exist (a failed job id, ...).
    #[error("not found: {0}")]
    NotFound(String),
    /// The broker did not confirm a publish: it refused it (nack), returned
    /// it as unroutable, or did not answer in time.
    #[error("publish not confirmed: {0}")]
    Unconfirmed(String),
}
