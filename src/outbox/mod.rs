//! [`Outbox`]: a configured, cheaply cloned handle for recording events,
//! with its payload cap, its sync listeners, and an in-memory fake mode for
//! tests.

use std::fmt;
use std::sync::Arc;

use diesel::{Connection, PgConnection};
use uuid::Uuid;

use crate::envelope::{DEFAULT_MAX_PAYLOAD_BYTES, EventEnvelope, MAX_PAYLOAD_BYTES_LIMIT};
use crate::error::{Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::fake::EventFake;
use crate::record::{ensure_in_transaction, insert_envelopes};
use crate::registry::Registry;
use crate::wake::WakeSender;

mod transaction;

pub use transaction::OutboxTx;

/// Where recorded events go.
#[derive(Clone)]
enum Sink {
    /// `outbox_events`, in the caller's transaction.
    Database,
    /// An [`EventFake`], for tests that assert what was recorded.
    Fake(EventFake),
}

struct Inner {
    max_payload_bytes: usize,
    registry: Registry,
    sink: Sink,
    /// Wakes relays after each commit that recorded events.
    wake: Option<WakeSender>,
    /// Check each payload against its type's registered schema.
    validate_payloads: bool,
}

/// The recording side of the outbox, configured once per service.
///
/// ```no_run
/// # use outbox::{Outbox, Registry};
/// let outbox = Outbox::builder()
///     .max_payload_bytes(64 * 1024) // default 256 KiB, at most 512 KiB
///     .registry(Registry::new())    // sync listeners run after commit
///     .build()?;
/// # Ok::<(), outbox::Error>(())
/// ```
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("max_payload_bytes", &self.inner.max_payload_bytes)
            .field("registry", &self.inner.registry)
            .field("fake", &matches!(self.inner.sink, Sink::Fake(_)))
            .field("wakes_relays", &self.inner.wake.is_some())
            .field("validate_payloads", &self.inner.validate_payloads)
            .finish()
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An outbox with the default payload cap and no sync listeners.
    pub fn new() -> Self {
        Self::from_parts(
            DEFAULT_MAX_PAYLOAD_BYTES,
            Registry::new(),
            Sink::Database,
            None,
            VALIDATE_BY_DEFAULT,
        )
    }

    /// Starts configuring an outbox.
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder::default()
    }

    /// An outbox that keeps recorded events in memory instead of writing
    /// them, and the [`EventFake`] to assert on them: the seed's "fake
    /// events" style of testing a service without a broker or outbox table.
    ///
    /// Events recorded through [`Outbox::transaction`] reach the fake only
    /// if the transaction commits; events recorded with [`Outbox::record`]
    /// reach it at once, since that call cannot know the outcome.
    ///
    /// Every payload is checked against the schema its type has in the
    /// registry ([`Registry::event_schema`]); a payload that does not match
    /// is refused with [`Error::SchemaViolation`] (type, version, failing
    /// path), a version without a schema with [`Error::UnknownSchemaVersion`].
    /// `Outbox::fake()` has an empty registry: use [`Outbox::fake_with`]
    /// and the service's registry to have its payloads checked.
    pub fn fake() -> (Self, EventFake) {
        Self::fake_with(Registry::new())
    }

    /// Like [`Outbox::fake`], still running `registry`'s sync listeners
    /// after commit.
    pub fn fake_with(registry: Registry) -> (Self, EventFake) {
        let fake = EventFake::default();
        let outbox = Self::from_parts(
            DEFAULT_MAX_PAYLOAD_BYTES,
            registry,
            Sink::Fake(fake.clone()),
            None,
            true,
        );
        (outbox, fake)
    }

    fn from_parts(
        max_payload_bytes: usize,
        registry: Registry,
        sink: Sink,
        wake: Option<WakeSender>,
        validate_payloads: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_payload_bytes,
                registry,
                sink,
                wake,
                validate_payloads,
            }),
        }
    }

    /// The wake-up sender, if this outbox was built with
    /// [`OutboxBuilder::wake_relays`].
    pub fn wake_sender(&self) -> Option<&WakeSender> {
        self.inner.wake.as_ref()
    }

    /// Wakes the relays, if this outbox was built with
    /// [`OutboxBuilder::wake_relays`]: call it after committing a
    /// transaction in which you recorded events with [`Outbox::record`]
    /// or [`crate::record()`] ([`Outbox::transaction`] does it for you).
    /// Never blocks; many calls close together send one wake-up.
    pub fn wake_relays(&self) {
        if let Some(wake) = &self.inner.wake {
            wake.wake();
        }
    }

    /// The payload cap in bytes.
    pub fn max_payload_bytes(&self) -> usize {
        self.inner.max_payload_bytes
    }

    /// The listener registry.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Builds and checks the envelope of `event` without recording it, for
    /// [`Outbox::record_batch`].
    pub fn envelope<E: DomainEvent + ?Sized>(&self, event: &E, metadata: &Metadata) -> Result<EventEnvelope> {
        let envelope = EventEnvelope::new(event, metadata, self.inner.max_payload_bytes)?;
        self.check_schema(&envelope)?;
        Ok(envelope)
    }

    /// Whether payloads are checked against their schemas.
    pub fn validates_payloads(&self) -> bool {
        self.inner.validate_payloads
    }

    /// Checks `envelope`'s payload against its type's registered schema,
    /// when this outbox validates payloads and the type has one.
    fn check_schema(&self, envelope: &EventEnvelope) -> Result<()> {
        let schemas = self.inner.registry.schemas();
        if !self.inner.validate_payloads || schemas.versions(&envelope.event_type).is_empty() {
            return Ok(());
        }
        let payload = envelope.payload.to_value().map_err(|source| Error::Serialize {
            event_type: envelope.event_type.clone(),
            source,
        })?;
        schemas.validate(&envelope.event_type, envelope.schema_version, &payload)
    }

    /// Records `event` as a system action in the transaction open on `conn`.
    /// See [`crate::record`]. Sync listeners do not run: use
    /// [`Outbox::transaction`] for that.
    pub fn record<E: DomainEvent + ?Sized>(&self, conn: &mut PgConnection, event: &E) -> Result<Uuid> {
        self.record_with(conn, event, &Metadata::default())
    }

    /// Records `event` with `metadata` in the transaction open on `conn`.
    pub fn record_with<E: DomainEvent + ?Sized>(
        &self,
        conn: &mut PgConnection,
        event: &E,
        metadata: &Metadata,
    ) -> Result<Uuid> {
        let envelope = self.envelope(event, metadata)?;
        let event_id = envelope.event_id;
        self.write(conn, std::slice::from_ref(&envelope))?;
        Ok(event_id)
    }

    /// Records many envelopes in one statement in the transaction open on
    /// `conn`. Each is checked against this outbox's cap first.
    pub fn record_batch(&self, conn: &mut PgConnection, envelopes: &[EventEnvelope]) -> Result<()> {
        for envelope in envelopes {
            envelope.validate(self.inner.max_payload_bytes)?;
            self.check_schema(envelope)?;
        }
        self.write(conn, envelopes)
    }

    /// Writes validated envelopes outside [`Outbox::transaction`]: to the
    /// database, or straight into the fake.
    fn write(&self, conn: &mut PgConnection, envelopes: &[EventEnvelope]) -> Result<()> {
        self.write_in_transaction(conn, envelopes)?;
        if let Sink::Fake(fake) = &self.inner.sink {
            fake.push(envelopes.to_vec());
        }
        Ok(())
    }

    /// Inserts validated envelopes in the open transaction. In fake mode
    /// nothing is written; the caller hands the events to the fake once
    /// their fate is known.
    pub(crate) fn write_in_transaction(
        &self,
        conn: &mut PgConnection,
        envelopes: &[EventEnvelope],
    ) -> Result<()> {
        match &self.inner.sink {
            Sink::Database => insert_envelopes(conn, envelopes),
            Sink::Fake(_) => ensure_in_transaction(conn),
        }
    }

    /// Runs `work` in a new transaction on `conn`, commits, then runs the
    /// registered sync listeners for the events recorded through the
    /// [`OutboxTx`] — only if the commit succeeded, and only for those events.
    ///
    /// `work`'s error rolls everything back and is returned; so is a commit
    /// failure, converted through `From<outbox::Error>`.
    pub fn transaction<T, E, F>(&self, conn: &mut PgConnection, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut OutboxTx<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        self.transaction_with(conn, Metadata::default(), work)
    }

    /// Like [`Outbox::transaction`], with `metadata` (actor, correlation id,
    /// trace) applied to every event recorded with [`OutboxTx::record`].
    pub fn transaction_with<T, E, F>(
        &self,
        conn: &mut PgConnection,
        metadata: Metadata,
        work: F,
    ) -> Result<T, E>
    where
        F: FnOnce(&mut OutboxTx<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let outcome = conn.transaction::<(T, Vec<EventEnvelope>), TransactionError<E>, _>(|conn| {
            let mut tx = OutboxTx::new(self, conn, metadata);
            let value = work(&mut tx).map_err(TransactionError::Work)?;
            Ok((value, tx.into_recorded()))
        });
        match outcome {
            Ok((value, committed)) => {
                if !committed.is_empty() {
                    self.wake_relays();
                }
                self.inner.registry.run_sync_listeners(&committed);
                if let Sink::Fake(fake) = &self.inner.sink {
                    fake.push(committed);
                }
                Ok(value)
            }
            Err(TransactionError::Work(error)) => Err(error),
            Err(TransactionError::Database(error)) => Err(E::from(Error::Database(error))),
        }
    }
}

/// Keeps the caller's error apart from diesel's BEGIN/COMMIT errors, so the
/// caller's error type only needs `From<outbox::Error>`.
enum TransactionError<E> {
    Work(E),
    Database(diesel::result::Error),
}

impl<E> From<diesel::result::Error> for TransactionError<E> {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

/// Whether an outbox built for the database checks payloads against their
/// schemas unless told: yes in tests (feature `testing`), no otherwise.
const VALIDATE_BY_DEFAULT: bool = cfg!(feature = "testing");

/// Configures an [`Outbox`].
#[derive(Default)]
pub struct OutboxBuilder {
    max_payload_bytes: Option<usize>,
    registry: Registry,
    wake_relays: Option<String>,
    validate_payloads: Option<bool>,
}

impl fmt::Debug for OutboxBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxBuilder")
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("registry", &self.registry)
            .field("validate_payloads", &self.validate_payloads)
            // The URL may carry a password.
            .field(
                "wake_relays",
                &self.wake_relays.as_deref().map(crate::database::redact_url),
            )
            .finish()
    }
}

impl OutboxBuilder {
    /// Cap on a serialized payload. Default 256 KiB; at most 512 KiB, since
    /// larger messages belong in object storage with a reference in the
    /// event.
    #[must_use]
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = Some(bytes);
        self
    }

    /// The registry whose sync listeners run after commit.
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Wake relays as soon as a transaction that recorded events commits,
    /// through a `NOTIFY` sent from a thread and connection of the outbox's
    /// own to the database at `database_url` (the one the events are in),
    /// never inside the writer's transaction. Default: off, and relays find
    /// new events by polling (up to `--poll-max` later, 100 ms by default).
    #[must_use]
    pub fn wake_relays(mut self, database_url: &str) -> Self {
        self.wake_relays = Some(database_url.to_owned());
        self
    }

    /// Check every recorded payload against the schema its type has in the
    /// registry ([`Registry::event_schema`]) before writing it, refusing
    /// one that does not match ([`Error::SchemaViolation`]). Default: on
    /// with the library's feature `testing` (so a service's tests check
    /// what its code records), off otherwise (a production write path
    /// trusts its types and saves the parse); fake outboxes always check.
    #[must_use]
    pub fn validate_payloads(mut self, validate: bool) -> Self {
        self.validate_payloads = Some(validate);
        self
    }

    /// Checks the configuration and builds the outbox.
    pub fn build(self) -> Result<Outbox> {
        let max = self.max_payload_bytes.unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
        if max == 0 || max > MAX_PAYLOAD_BYTES_LIMIT {
            return Err(Error::Config(format!(
                "max_payload_bytes must be between 1 and {MAX_PAYLOAD_BYTES_LIMIT}, not {max}"
            )));
        }
        let wake = self.wake_relays.as_deref().map(WakeSender::start).transpose()?;
        Ok(Outbox::from_parts(
            max,
            self.registry,
            Sink::Database,
            wake,
            self.validate_payloads.unwrap_or(VALIDATE_BY_DEFAULT),
        ))
    }
}
