//! The consumer framework: queued listeners run by a [`Worker`], each from
//! its own queue, with delayed retries, a dead-letter queue and a
//! [`failed_jobs`](crate::failed_jobs) row when a message fails for good.
//!
//! ## Pieces
//!
//! | piece | where |
//! | --- | --- |
//! | a listener and its options (tries, backoff, prefetch, concurrency, timeout, inbox, single active consumer) | [`QueuedListener`], [`ListenerOptions`] |
//! | whether a failure is worth retrying | [`ListenerError`] |
//! | the event as a listener sees it | [`ReceivedEvent`] ([`message::decode`]) |
//! | event type → listener mapping | [`Registry::queued_listener`](crate::Registry::queued_listener) |
//! | queues, retry queues, dead-letter queues | [`topology`] |
//! | running it all | [`Worker`], [`WorkerConfig`] |
//! | pruning old inbox rows and attempt counts on a schedule | [`WorkerConfig::prune_interval`], [`inbox::prune`], [`prune_attempts`] |
//!
//! ## Guarantees
//!
//! - **Isolation.** Each listener has its own queue bound to its event
//!   types, its own retry queues (which dead-letter back to that queue
//!   only) and its own dead-letter queue: one listener failing never
//!   delays or duplicates another's work.
//! - **Retries without sleeping.** A failed try is counted in Postgres
//!   (`listener_attempts`: a publisher cannot forge it), the message is
//!   published to the retry queue of the backoff delay, and acknowledged.
//!   The broker holds it for the delay, then puts it back in the listener's
//!   queue. No sleeping consumer, no hot requeue loop. The attempts row
//!   also keeps the copy and when it is due back, so a copy the broker
//!   does not hand back (a broken dead-letter path) is published to the
//!   listener's queue by the worker's retry repairer
//!   ([`WorkerConfig::retry_repair_interval`]).
//! - **Final failure.** After the last try (or at once for a permanent
//!   error, a message that does not decode, or an event type the listener
//!   does not handle): exactly one `failed_jobs` row per (listener, event)
//!   with the payload, the bounded error, the tries and every try's error;
//!   then the message is published to `<app>.<listener>.dead` (confirmed)
//!   and acknowledged.
//! - **Exactly-once database effects** for listeners with
//!   [`ListenerOptions::inbox`] (the default): effect and inbox row commit
//!   together; duplicates are acknowledged without running the handler.
//!   Effects outside the database (mail, HTTP) are at least once.
//! - **Nothing lost.** A message is acknowledged only after its outcome is
//!   durable (committed effect, confirmed retry copy, or committed failed
//!   job plus confirmed dead-letter copy). A crash at any point leaves it
//!   unacknowledged, and the broker redelivers it.
//! - **Order.** Messages of one listener are handled concurrently
//!   ([`ListenerOptions::concurrency`]) and retried out of order. A
//!   listener that needs per-aggregate order sets
//!   [`ListenerOptions::single_active_consumer`] with concurrency 1 (and
//!   accepts that a retried message is overtaken by later ones, or uses
//!   one try).

pub(crate) mod attempts;
mod batch;
mod config;
mod headers;
pub mod inbox;
pub(crate) mod listener;
pub(crate) mod message;
mod pipeline;
mod registration;
mod session;
pub mod topology;
mod worker;

#[cfg(test)]
mod fuzz;

/// Deleting attempt counts left behind (a worker runs it on a schedule:
/// [`WorkerConfig::prune_interval`]).
pub use crate::maintenance::attempts_pruner::prune_attempts;
pub use crate::maintenance::retry_repairer::REPAIRED_FROM_HEADER;
pub use attempts::retrying_by_listener;
pub use config::WorkerConfig;
pub use headers::{ERROR_HEADER, FAILED_JOB_HEADER, HEADERS_DROPPED_HEADER, RETRY_HEADER};
pub use listener::{HandlerContext, ListenerError, ListenerOptions, QueuedListener, RateLimit};
pub use message::{DecodeError, MAX_BODY_BYTES, ReceivedEvent, decode};
pub use registration::{RegisteredListener, forget_registered_listeners, registered_listeners};
pub use topology::ListenerQueues;
pub use worker::Worker;
