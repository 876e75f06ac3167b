//! [`OutboxTx`]: the view of an open transaction that [`Outbox::transaction`]
//! hands to the caller's work, collecting the events recorded in it so the
//! sync listeners can run for exactly those after commit.
//!
//! [`Outbox::transaction`]: crate::Outbox::transaction

use std::fmt;

use diesel::{Connection, PgConnection};
use uuid::Uuid;

use crate::envelope::EventEnvelope;
use crate::error::{Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::outbox::Outbox;

/// An open transaction that records events and remembers them.
///
/// Do domain writes through [`OutboxTx::conn`]; record events with
/// [`OutboxTx::record`]. Use [`OutboxTx::savepoint`] rather than a nested
/// `conn().transaction(..)` when events are recorded inside it, so events of
/// a rolled-back savepoint are forgotten too.
pub struct OutboxTx<'a> {
    outbox: &'a Outbox,
    conn: &'a mut PgConnection,
    metadata: Metadata,
    recorded: Vec<EventEnvelope>,
}

impl fmt::Debug for OutboxTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxTx")
            .field("metadata", &self.metadata)
            .field("recorded", &self.recorded.len())
            .finish_non_exhaustive()
    }
}

impl<'a> OutboxTx<'a> {
    pub(crate) fn new(outbox: &'a Outbox, conn: &'a mut PgConnection, metadata: Metadata) -> Self {
        Self {
            outbox,
            conn,
            metadata,
            recorded: Vec::new(),
        }
    }

    /// The connection, for the domain writes of this transaction.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// The metadata applied by [`OutboxTx::record`].
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Records `event` with this transaction's metadata.
    pub fn record<E: DomainEvent + ?Sized>(&mut self, event: &E) -> Result<Uuid> {
        let metadata = self.metadata.clone();
        self.record_with(event, &metadata)
    }

    /// Records `event` with its own metadata.
    pub fn record_with<E: DomainEvent + ?Sized>(&mut self, event: &E, metadata: &Metadata) -> Result<Uuid> {
        let envelope = self.outbox.envelope(event, metadata)?;
        let event_id = envelope.event_id;
        self.outbox
            .write_in_transaction(self.conn, std::slice::from_ref(&envelope))?;
        self.recorded.push(envelope);
        Ok(event_id)
    }

    /// Records many events of one type in a single INSERT.
    pub fn record_batch<E: DomainEvent>(&mut self, events: &[E]) -> Result<Vec<Uuid>> {
        let envelopes = events
            .iter()
            .map(|event| self.outbox.envelope(event, &self.metadata))
            .collect::<Result<Vec<_>>>()?;
        self.outbox.write_in_transaction(self.conn, &envelopes)?;
        let ids = envelopes.iter().map(|e| e.event_id).collect();
        self.recorded.extend(envelopes);
        Ok(ids)
    }

    /// Runs `work` in a savepoint. If it fails, the savepoint rolls back and
    /// the events recorded inside it are dropped from this transaction's
    /// list as well; the outer transaction carries on.
    pub fn savepoint<T, E, F>(&mut self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut OutboxTx<'_>) -> Result<T, E>,
        E: From<Error>,
    {
        let before = self.recorded.len();
        let outbox = self.outbox;
        let metadata = self.metadata.clone();
        let mut inner_recorded = Vec::new();
        let outcome = self.conn.transaction::<T, SavepointError<E>, _>(|conn| {
            let mut inner = OutboxTx::new(outbox, conn, metadata);
            let value = work(&mut inner).map_err(SavepointError::Work)?;
            inner_recorded = inner.into_recorded();
            Ok(value)
        });
        match outcome {
            Ok(value) => {
                self.recorded.extend(inner_recorded);
                Ok(value)
            }
            Err(error) => {
                self.recorded.truncate(before);
                match error {
                    SavepointError::Work(error) => Err(error),
                    SavepointError::Database(error) => Err(E::from(Error::Database(error))),
                }
            }
        }
    }

    /// Events recorded so far in this transaction, oldest first.
    pub fn recorded(&self) -> &[EventEnvelope] {
        &self.recorded
    }

    pub(crate) fn into_recorded(self) -> Vec<EventEnvelope> {
        self.recorded
    }
}

enum SavepointError<E> {
    Work(E),
    Database(diesel::result::Error),
}

impl<E> From<diesel::result::Error> for SavepointError<E> {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}
