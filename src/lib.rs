//! # outbox
//!
//! A transactional outbox for diesel services: domain events are recorded
//! in the same Postgres transaction as the domain write, so they exist if
//! and only if that write commits; a relay then publishes them to RabbitMQ.
//!
//! ## Map of the crate
//!
//! | concern | module | main items |
//! | --- | --- | --- |
//! | what an event is | `event.rs` | [`DomainEvent`], [`Metadata`] |
//! | the checked, serialized event | `envelope.rs` | [`EventEnvelope`] |
//! | writing events in the caller's transaction | `record.rs` | [`record()`], [`record_with`], [`record_batch`] |
//! | a configured recorder, after-commit hooks | `outbox/mod.rs`, `outbox/transaction.rs` | [`Outbox`], [`OutboxTx`] |
//! | event type → listener mapping | `registry.rs` | [`Registry`], [`SyncListener`], [`QueuedListener`] |
//! | queued listeners: retries, dead-lettering, batched commits, rate limits, accepted sources, the worker | [`consumer`] | [`Worker`], [`ListenerOptions`], [`RateLimit`], [`ReceivedEvent`] |
//! | a listener's failure, the library's errors | `error.rs` | [`ListenerError`], [`Error`], [`Unconfirmed`] |
//! | the listeners workers run, registered in the database | `consumer/registration.rs` | [`consumer::registered_listeners`] |
//! | listener failures for good: filtered pages, bulk retry, edit-and-retry | [`failed_jobs`] | [`failed_jobs::list_page`], [`failed_jobs::retry_matching`], [`failed_jobs::retry_edited`] |
//! | "where is my event?": search, an aggregate's timeline per listener | [`timeline`] | [`timeline::search`], [`timeline::aggregate_timeline`] |
//! | exactly-once listener effects (the worker's inbox transaction) | [`inbox`] (`consumer/inbox.rs`) | [`inbox::claim`] |
//! | pruning and gauges on a schedule: published rows, expired leases, backlog gauges (relay); inbox rows, attempt counts, retry copies the broker did not hand back (worker) | `maintenance` (one service a file) | [`RelayConfig::retention`], [`WorkerConfig::prune_interval`], [`WorkerConfig::retry_repair_interval`], [`inbox::prune`] |
//! | asserting on recorded events in tests | `fake.rs` | [`EventFake`] |
//! | the library's schema | [`migrate`](mod@migrate), [`schema`] | [`migrate()`] |
//! | connections, diesel work on the blocking pool, safe-to-print URLs | `database.rs` | [`connect`], [`pool`], [`run_blocking`], [`redact_url`] |
//! | RabbitMQ connection (one node or a list of a cluster's nodes), exchange | [`amqp`] | [`DEFAULT_AMQP_URL`], [`DEFAULT_EXCHANGE`], [`amqp::BrokerAddresses`], [`amqp::BrokerConnector`] |
//! | database, broker and exchange from `DATABASE_URL`, `AMQP_URL`, `OUTBOX_EXCHANGE` | [`settings`] | [`Settings::from_env`] |
//! | the wire format | [`cloudevents`] | [`cloudevents::encode_body`] |
//! | text cut to a bound for columns, headers and messages | [`text`] | [`text::bounded_text`] |
//! | publishing committed events; the claim floor that keeps claims off rows already published (`relay/floor.rs`); relays alive, published per minute; the phantom guard for a Postgres standby (`relay/standby.rs`) | [`relay`] | [`Relay`], [`RelayConfig`], [`RelayConfig::wait_for_standby`], [`relay::presence::relays`], [`relay::history::published_per_minute`] |
//! | writers waking relays after commit | [`wake`] | [`wake::WakeSender`], [`wake::WakeListener`] |
//! | webhooks: endpoints, signing, the fan-out and delivery listeners (feature `webhooks`) | `webhooks/` | `webhooks::add`, `webhooks::register` |
//! | pause, resume, retry failed rows | [`control`] | [`control::pause`] |
//! | where events live after publishing: the event log, partitioned by month | [`event_log`] | [`event_log::read_after`], [`event_log::aggregate_history`], [`RelayConfig::event_log`] |
//! | publishing stored events again, to one queue | [`replay`] | [`replay::select`], [`replay::publish_to_queue`] |
//! | read models fed by events, rebuilt from the log while writers write | [`projection`] | [`projection::Projection`], [`Registry::projection`], [`projection::rebuild`] |
//! | event contracts: a JSON Schema per event type and version (schemars), its export, the `dataschema` URI, payload checks in fakes and tests, the compatibility check, the AsyncAPI 3.0 document, the event catalog page | [`contract`] (`contract/compat.rs`, `contract/asyncapi.rs`, `contract/catalog.rs`) | [`Registry::event_schema`], [`contract::SchemaSet`], [`contract::compat::check`], [`contract::asyncapi::document`], [`contract::catalog::markdown`] |
//! | old payload shapes brought to the current one wherever events are read | [`upcast`] | [`Registry::upcaster`], [`upcast::Upcasters`] |
//! | OpenTelemetry traces: the OTLP exporter from `OTEL_*`, the `tracing` layer, trace context from `record` to `publish` to `handle <listener>` (feature `otel`) | `telemetry.rs` | `telemetry::Telemetry::from_env`, `telemetry::is_active` |
//! | metric names, health flags, `/metrics` and `/health` | [`metrics`] | [`metrics::serve`], [`Health`] |
//! | one backoff schedule for every wait-and-try-again | `delay.rs` | |
//! | per-test databases, exchanges, proxy, waits, fault-run delivery reports (feature `testing`) | `testing` | `TestDatabase`, `testing::eventually`, `testing::DeliveryReport` |
//!
//! ## Recording an event
//!
//! ```no_run
//! use diesel::prelude::*;
//! use outbox::{DomainEvent, Metadata};
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct SiteCreated { site_id: i64, domain: String }
//!
//! impl DomainEvent for SiteCreated {
//!     fn event_type(&self) -> &'static str { "site.created" }
//!     fn aggregate_type(&self) -> &'static str { "site" }
//!     fn aggregate_id(&self) -> String { self.site_id.to_string() }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut conn = outbox::connect("postgres://postgres@127.0.0.1:5432/outbox")?;
//! conn.transaction::<_, Box<dyn std::error::Error>, _>(|conn| {
//!     // ... INSERT INTO sites ... (the domain write)
//!     let event = SiteCreated { site_id: 7, domain: "example.com".into() };
//!     outbox::record_with(conn, &event, &Metadata::by("user:42"))?;
//!     Ok(())
//! })?; // the site and its event commit together, or neither does
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod amqp;
pub mod cloudevents;
pub mod consumer;
pub mod contract;
pub mod control;
mod database;
mod delay;
mod envelope;
mod error;
mod event;
pub mod event_log;
pub mod failed_jobs;
mod fake;
mod maintenance;
pub mod metrics;
pub mod migrate;
mod outbox;
mod prepared;
pub mod projection;
mod record;
mod registry;
pub mod relay;
pub mod replay;
pub mod schema;
pub mod settings;
#[cfg(feature = "otel")]
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;
pub mod timeline;
pub mod upcast;
pub mod wake;
#[cfg(feature = "webhooks")]
pub mod webhooks;

pub use amqp::{DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
pub use consumer::inbox;
pub use consumer::{
    HandlerContext, ListenerOptions, QueuedListener, RateLimit, ReceivedEvent, Worker, WorkerConfig,
};
pub use database::{
    DEFAULT_DATABASE_URL, PgPool, connect, create_database_if_missing, pool, redact_url, run_blocking,
};
pub use envelope::{DEFAULT_MAX_PAYLOAD_BYTES, EventEnvelope, JsonPayload, MAX_PAYLOAD_BYTES_LIMIT};
pub use error::{BoxError, Error, ListenerError, Result, Unconfirmed, error_chain};
pub use event::{DomainEvent, Metadata};
pub use fake::EventFake;
pub use metrics::Health;
pub use migrate::{MIGRATIONS, migrate};
pub use outbox::OutboxTx;
pub use outbox::{Outbox, OutboxBuilder};
pub use record::{record, record_batch, record_with};
pub use registry::{QueuedRegistration, Registry, SyncListener};
pub use relay::{Relay, RelayConfig};
/// The crate that derives payload schemas, re-exported so a service uses
/// the same version (`#[derive(outbox::schemars::JsonSchema)]` needs
/// `#[schemars(crate = "outbox::schemars")]`; depending on `schemars` 1.x
/// directly is simpler).
pub use schemars;
pub use settings::Settings;
#[cfg(feature = "testing")]
pub use testing::TestDatabase;

/// The README's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The guides' examples (`docs/`), compiled as doc tests too.
#[cfg(doctest)]
pub mod guide_doctests {
    /// `docs/consuming.md`.
    #[doc = include_str!("../docs/consuming.md")]
    pub struct Consuming;
    /// `docs/operating.md`.
    #[doc = include_str!("../docs/operating.md")]
    pub struct Operating;
    /// `docs/dashboard.md`.
    #[doc = include_str!("../docs/dashboard.md")]
    pub struct Dashboard;
    /// `docs/webhooks.md` (its examples need the feature).
    #[cfg(feature = "webhooks")]
    #[doc = include_str!("../docs/webhooks.md")]
    pub struct Webhooks;
    /// `docs/event-log.md`.
    #[doc = include_str!("../docs/event-log.md")]
    pub struct EventLog;
    /// `docs/cluster.md`.
    #[doc = include_str!("../docs/cluster.md")]
    pub struct Cluster;
    /// `docs/tracing-and-alerts.md`.
    #[doc = include_str!("../docs/tracing-and-alerts.md")]
    pub struct TracingAndAlerts;
    /// `docs/guarantees.md`.
    #[doc = include_str!("../docs/guarantees.md")]
    pub struct Guarantees;
}
