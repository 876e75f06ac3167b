//! What a domain event is: the [`DomainEvent`] trait a service implements and
//! the [`Metadata`] that travels with each recorded event.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A fact the domain wants the world to know, recorded in the transaction
/// that made it true.
///
/// The payload is the type's serde serialization. Events about things that
/// may be deleted must carry primitive data (ids and names), never a
/// reference that needs the row to still exist.
///
/// ```
/// use outbox::DomainEvent;
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct SiteCreated { site_id: i64, tenant_id: i64, domain: String }
///
/// impl DomainEvent for SiteCreated {
///     fn event_type(&self) -> &'static str { "site.created" }
///     fn aggregate_type(&self) -> &'static str { "site" }
///     fn aggregate_id(&self) -> String { self.site_id.to_string() }
///     fn tenant_id(&self) -> Option<String> { Some(self.tenant_id.to_string()) }
/// }
/// ```
pub trait DomainEvent: Serialize {
    /// Dotted lower-case name, also the AMQP routing key: `site.created`.
    fn event_type(&self) -> &'static str;
    /// The kind of aggregate the event is about: `site`, `backup`.
    fn aggregate_type(&self) -> &'static str;
    /// The aggregate's id. Events of one aggregate are published in the
    /// order their transactions committed.
    fn aggregate_id(&self) -> String;
    /// The tenant the event belongs to, if the service is multi-tenant.
    fn tenant_id(&self) -> Option<String> {
        None
    }
    /// Version of the payload's schema; bump it when the payload changes
    /// incompatibly so consumers can tell the shapes apart. Starts at 1.
    fn schema_version(&self) -> i32 {
        1
    }
}

/// Context recorded with an event: who did it, what request it belongs to,
/// what caused it, and the trace it is part of.
///
/// `Metadata::default()` is a system action (no actor) at the current time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Who caused the event (`user:42`, an API token id, ...); `None` means
    /// a system action.
    pub actor: Option<String>,
    /// Groups the events of one request or workflow.
    pub correlation_id: Option<String>,
    /// The id of the event or command that caused this one.
    pub causation_id: Option<String>,
    /// W3C trace context (`00-<trace id>-<span id>-<flags>`).
    pub traceparent: Option<String>,
    /// When the fact happened; `None` means when it is recorded.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl Metadata {
    /// Metadata for an action taken by `actor`.
    pub fn by(actor: impl Into<String>) -> Self {
        Self {
            actor: Some(actor.into()),
            ..Self::default()
        }
    }

    /// Metadata for a system action (no actor).
    pub fn system() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Sets the W3C traceparent.
    #[must_use]
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Sets when the fact happened.
    #[must_use]
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(at);
        self
    }
}
