//! The one place a service maps event types to listeners, like the seed's
//! EventServiceProvider. Sync listeners run in-process right after the
//! recording transaction commits; queued listeners run in a worker
//! ([`crate::consumer::Worker`]), each from its own queue bound to exactly
//! its event types.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::consumer::listener::{ListenerOptions, QueuedListener, is_valid_listener_name};
use crate::contract::{EventSchema, SchemaSet, schema_of};
use crate::envelope::{EventEnvelope, is_valid_event_type};
use crate::error::{BoxError, Error, Result};
use crate::projection::{Projection, ProjectionListener};
use crate::upcast::Upcasters;

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

/// A queued listener with its event types and options, as registered.
#[derive(Clone)]
pub struct QueuedRegistration {
    listener: Arc<dyn QueuedListener>,
    event_types: Vec<String>,
    options: ListenerOptions,
}

impl fmt::Debug for QueuedRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuedRegistration")
            .field("name", &self.name())
            .field("event_types", &self.event_types)
            .field("options", &self.options)
            .finish()
    }
}

impl QueuedRegistration {
    /// The listener's name.
    pub fn name(&self) -> &str {
        self.listener.name()
    }

    /// The event types it handles, sorted.
    pub fn event_types(&self) -> &[String] {
        &self.event_types
    }

    /// Whether it handles `event_type`.
    pub fn handles(&self, event_type: &str) -> bool {
        self.event_types.iter().any(|t| t == event_type)
    }

    /// Its options.
    pub fn options(&self) -> &ListenerOptions {
        &self.options
    }

    /// The listener.
    pub fn listener(&self) -> &Arc<dyn QueuedListener> {
        &self.listener
    }
}

/// Maps event types to their listeners, explicitly.
#[derive(Default, Clone)]
pub struct Registry {
    sync: Vec<Arc<SyncRegistration>>,
    queued: Vec<QueuedRegistration>,
    upcasters: Upcasters,
    projections: Vec<Arc<dyn Projection>>,
    schemas: SchemaSet,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_map();
        for registration in &self.sync {
            let mut types: Vec<&String> = registration.event_types.iter().collect();
            types.sort();
            list.entry(&registration.listener.name(), &types);
        }
        for registration in &self.queued {
            list.entry(&registration.name(), &registration.event_types);
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

    /// Registers `E` as the payload of `event_type` at schema `version`:
    /// its JSON Schema, derived with [`schemars`] (see
    /// [`crate::contract`]), is exported by `schema export`, named in each
    /// CloudEvent's `dataschema`, checked for compatibility, and checked
    /// against every payload a fake outbox records. `version` is what
    /// `E`'s [`DomainEvent::schema_version`](crate::DomainEvent::schema_version)
    /// returns. Fails on a bad type, a version below 1 or a schema already
    /// registered for the type and version.
    ///
    /// ```
    /// #[derive(serde::Serialize, schemars::JsonSchema)]
    /// struct SiteCreated { site_id: i64, domain: String }
    ///
    /// let registry = outbox::Registry::new().event_schema::<SiteCreated>("site.created", 1)?;
    /// assert_eq!(registry.schema_set().versions("site.created"), vec![1]);
    /// # Ok::<(), outbox::Error>(())
    /// ```
    pub fn event_schema<E: schemars::JsonSchema + ?Sized>(
        mut self,
        event_type: &str,
        version: i32,
    ) -> Result<Self> {
        self.schemas
            .add(EventSchema::new(event_type, version, schema_of::<E>())?)?;
        Ok(self)
    }

    /// The registered payload schemas, with the upcaster steps of each
    /// type (what [`crate::contract::compat::check`] needs).
    pub fn schema_set(&self) -> SchemaSet {
        self.schemas.clone().with_upcasters(&self.upcasters)
    }

    /// The registered payload schemas.
    pub fn schemas(&self) -> &SchemaSet {
        &self.schemas
    }

    /// Registers the upcaster of `event_type` payloads from schema version
    /// `from_version` to the next (see [`crate::upcast`]): the worker
    /// applies it, and the later steps, before any listener sees an event
    /// recorded at an older version. Fails on a bad type, a version below
    /// 1 or a step already registered.
    pub fn upcaster(
        mut self,
        event_type: &str,
        from_version: i32,
        step: impl Fn(serde_json::Value) -> std::result::Result<serde_json::Value, String> + Send + Sync + 'static,
    ) -> Result<Self> {
        self.upcasters.add(event_type, from_version, step)?;
        Ok(self)
    }

    /// The upcasters registered.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Registers `projection`: a queued listener of its name (with the
    /// inbox) for its event types, which a worker runs live and rebuilds
    /// when asked (see [`crate::projection`]).
    pub fn projection<P: Projection>(self, projection: P) -> Result<Self> {
        let options = projection.options();
        self.projection_with(projection, options)
    }

    /// [`Registry::projection`] with the live listener's `options` (the
    /// inbox is turned on whatever they say).
    pub fn projection_with<P: Projection>(mut self, projection: P, options: ListenerOptions) -> Result<Self> {
        let projection: Arc<dyn Projection> = Arc::new(projection);
        let name = projection.name().to_owned();
        let types = projection.event_types();
        let listener = ProjectionListener {
            projection: Arc::clone(&projection),
            name,
            options: ListenerOptions {
                inbox: true,
                ..options
            },
        };
        let types: Vec<&str> = types.iter().map(String::as_str).collect();
        self = self.queued_listener(&types, listener)?;
        self.projections.push(projection);
        Ok(self)
    }

    /// The projections registered (whose listener is still registered).
    pub fn projections(&self) -> Vec<Arc<dyn Projection>> {
        self.projections
            .iter()
            .filter(|p| self.queued.iter().any(|q| q.name() == p.name()))
            .cloned()
            .collect()
    }

    /// Registers queued `listener` for each of `event_types`, with the
    /// options it asks for ([`QueuedListener::options`]).
    pub fn queued_listener<L: QueuedListener>(self, event_types: &[&str], listener: L) -> Result<Self> {
        let options = listener.options();
        self.queued_listener_with(event_types, listener, options)
    }

    /// Registers queued `listener` for each of `event_types` with
    /// `options`. Fails if the name is not lower-case letters, digits and
    /// `_`, if a listener of that name exists, if an event type is not a
    /// dotted lower-case name, or if an option is out of range.
    pub fn queued_listener_with<L: QueuedListener>(
        mut self,
        event_types: &[&str],
        listener: L,
        options: ListenerOptions,
    ) -> Result<Self> {
        let name = listener.name().to_owned();
        if !is_valid_listener_name(&name) {
            return Err(Error::Config(format!(
                "listener name {name:?} must be 1 to 100 lower-case letters, digits or '_', starting with a letter"
            )));
        }
        if event_types.is_empty() {
            return Err(Error::Config(format!(
                "listener {name} is registered for no event type"
            )));
        }
        if let Some(bad) = event_types.iter().find(|t| !is_valid_event_type(t)) {
            return Err(Error::Config(format!(
                "listener {name} is registered for {bad:?}, which is not a dotted lower-case event type"
            )));
        }
        if self.queued.iter().any(|r| r.name() == name) || self.sync.iter().any(|r| r.listener.name() == name)
        {
            return Err(Error::Config(format!(
                "a listener named {name} is already registered"
            )));
        }
        options.validate(&name)?;
        let mut types: Vec<String> = event_types.iter().map(|t| (*t).to_owned()).collect();
        types.sort();
        types.dedup();
        self.queued.push(QueuedRegistration {
            listener: Arc::new(listener),
            event_types: types,
            options,
        });
        Ok(self)
    }

    /// The queued listeners, in registration order.
    pub fn queued_listeners(&self) -> &[QueuedRegistration] {
        &self.queued
    }

    /// The queued listener named `name`.
    pub fn queued_listener_named(&self, name: &str) -> Option<&QueuedRegistration> {
        self.queued.iter().find(|r| r.name() == name)
    }

    /// Keeps only the queued listeners whose names `keep` accepts (a
    /// worker that runs some of them). Sync listeners stay.
    #[must_use]
    pub fn retain_queued(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.queued.retain(|r| keep(r.name()));
        self
    }

    /// Every listener of `event_type`, sync then queued, as
    /// `(name, queued)`: the mapping as an operator reads it.
    pub fn listeners_for<'a>(&'a self, event_type: &'a str) -> Vec<(&'a str, bool)> {
        let sync = self.sync_listeners_for(event_type).map(|l| (l.name(), false));
        let queued = self
            .queued
            .iter()
            .filter(|r| r.handles(event_type))
            .map(|r| (r.name(), true));
        sync.chain(queued).collect()
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
