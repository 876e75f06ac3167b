//! The one place a service maps event types to listeners, like the seed's
//! EventServiceProvider. Sync listeners run in-process right after the
//! recording transaction commits.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::envelope::{EventEnvelope, is_valid_event_type};
use crate::error::{Error, Result};

/// Error type a listener returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A listener that runs in the writer's process after the transaction that
/// recorded the event commits (never for a rolled-back one).
///
/// Keep it cheap and infallible in spirit (counters, caches): the commit
/// already happened, so an error is logged and counted, never returned to
/// the writer. Work that must not be lost belongs in a queued listener.
pub trait SyncListener: Send + Sync + 'static {
    /// A stable name for logs (`record_metrics`).
    fn name(&self) -> &str;
    /// Handles one committed event.
    fn handle(&self, event: &EventEnvelope) -> Result<(), BoxError>;
}

struct SyncRegistration {
    listener: Arc<dyn SyncListener>,
    event_types: HashSet<String>,
}

/// Maps event types to their listeners, explicitly.
#[derive(Default, Clone)]
pub struct Registry {
    sync: Vec<Arc<SyncRegistration>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_map();
        for registration in &self.sync {
            let mut types: Vec<&String> = registration.event_types.iter().collect();
            types.sort();
            list.entry(&registration.listener.name(), &types);
        }
        list.finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `listener` to run after commit for each of `event_types`.
    /// Fails if an event type is not a dotted lower-case name or a listener
    /// of the same name is already registered.
    pub fn sync_listener<L: SyncListener>(mut self, event_types: &[&str], listener: L) -> Result<Self> {
        if let Some(bad) = event_types.iter().find(|t| !is_valid_event_type(t)) {
            return Err(Error::Config(format!(
                "listener {} is registered for {bad:?}, which is not a dotted lower-case event type",
                listener.name()
            )));
        }
        if self.sync.iter().any(|r| r.listener.name() == listener.name()) {
            return Err(Error::Config(format!(
                "a sync listener named {} is already registered",
                listener.name()
            )));
        }
        self.sync.push(Arc::new(SyncRegistration {
            listener: Arc::new(listener),
            event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
        }));
        Ok(self)
    }

    /// The sync listeners registered for `event_type`, in registration order.
    pub fn sync_listeners_for<'a>(
        &'a self,
        event_type: &'a str,
    ) -> impl Iterator<Item = &'a dyn SyncListener> + 'a {
        self.sync
            .iter()
            .filter(move |r| r.event_types.contains(event_type))
            .map(|r| r.listener.as_ref())
    }

    /// Whether any sync listener is registered.
    pub fn has_sync_listeners(&self) -> bool {
        !self.sync.is_empty()
    }

    /// Runs the sync listeners of each committed event, in order. Errors and
    /// panics are logged and do not reach the writer.
    pub(crate) fn run_sync_listeners(&self, committed: &[EventEnvelope]) {
        for event in committed {
            for listener in self.sync_listeners_for(&event.event_type) {
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener.handle(event)));
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(
                        listener = listener.name(),
                        event_id = %event.event_id,
                        event_type = %event.event_type,
                        %error,
                        "sync listener failed after commit"
                    ),
                    Err(_) => tracing::error!(
                        listener = listener.name(),
                        event_id = %event.event_id,
                        event_type = %event.event_type,
                        "sync listener panicked after commit"
                    ),
                }
            }
        }
    }
}
