//! The relay: committed events from `outbox_events` to RabbitMQ, at least
//! once, in per-aggregate order, with any number of instances.
//!
//! [`Relay::run`] connects to the broker, runs the claim/publish/confirm
//! loop (`engine/`), reconnects with backoff when the broker goes away
//! (holding nothing in memory meanwhile), and runs four maintenance
//! services beside it (`src/maintenance/`): the published pruner
//! (deletes published rows past retention), the lease cleaner (deletes
//! expired leases of dead relays), the backlog gauges and the relay
//! heartbeat (its row in `outbox_relays`, [`presence`]).
//!
//! ## How relays share the table
//!
//! - **Claims** (`store::claim_batch`) take the first unpublished rows in
//!   seq order that are not leased and whose aggregate is not blocked (named
//!   by another relay's live lease, waiting for a retry, or failed), and
//!   record them in one lease row with the keys of their aggregates. They read the backlog from the claim
//!   floor up (`floor.rs`), so rows published earlier are never walked
//!   again, whatever vacuum can or cannot remove. Skipping blocked aggregates inside the
//!   window is what keeps one stuck aggregate, with any number of queued
//!   events, from stalling the others. Claims take turns on an advisory
//!   lock for one statement (about 4 ms for 500 rows here).
//! - **Leases are heartbeated.** A lease lasts [`RelayConfig::lease`]
//!   (3 s) and the relay renews all of its leases every third of that
//!   (`store::renew_leases`); a relay that dies, freezes or loses the
//!   database stops renewing, and its rows are claimable by others within
//!   the lease. A row is published only while its lease has at least a
//!   renewal interval left, and marked only through a live lease, so a
//!   relay that lost its lease marks nothing.
//! - **Wake-ups.** Writers built with
//!   [`OutboxBuilder::wake_relays`](crate::OutboxBuilder::wake_relays)
//!   send a coalesced `NOTIFY` after commit ([`crate::wake`]); the relay
//!   claims at once instead of at its next poll. Polling (5 ms while rows
//!   come, doubling to 100 ms when idle) stays the fallback.
//! - **Marks** go out at most [`RelayConfig::mark_delay`] (5 ms) after the
//!   confirm, many rows a statement; delivery never waits for them.
//!
//! ## Scaling past one machine
//!
//! The figures measured here (2 cores shared by Postgres, RabbitMQ and the
//! relay; `BENCHMARKS.md`) and what they imply:
//!
//! - Claims take turns on one lock. What a claim reads, why that does not
//!   grow with what was published or with what other relays hold, and the
//!   arithmetic for 16 relays at 100,000 events/s are in
//!   `docs/operating.md` ("What a claim reads: the claim floor").
//! - Marking costs Postgres about 10 to 20 µs of CPU a row (an UPDATE that
//!   rewrites the row and two index entries); 100,000 events/s is 1 to 2
//!   cores for marks alone. Retention 0 (delete on publish) costs about a
//!   fifth of that; moving published rows to a partition of their own (the
//!   planned event log) about half.
//! - Publishing is bounded by the broker: one quorum queue here takes
//!   ~15,000 to 20,000 confirmed messages/s; 100,000/s needs a RabbitMQ
//!   cluster with the load spread over queues and nodes, and relays
//!   spread over machines (each relay holds at most `--max-in-flight`
//!   rows, ~35 MiB resident).
//! - Per-aggregate order caps one aggregate at one confirm round trip per
//!   event (~0.5 ms here, ~2,000 events/s): hot aggregates scale by
//!   having more of them, not by more relays.
//!
//! ## Failure policy
//!
//! A publish that is nacked, not confirmed in time, or cut off by a lost
//! connection leaves the row unpublished: its `attempts` grows,
//! `last_error` says why, and `next_attempt_at` is set by an exponential
//! backoff. After `max_attempts` the row is marked failed. Later events of
//! the same aggregate wait behind a retrying or failed row (order over
//! progress), and only they: other aggregates keep flowing. `outbox
//! status` shows failed rows and
//! [`retry_failed_events`](crate::control::retry_failed_events) puts them
//! back in line.
//!
//! An event the broker returns as unroutable (no queue is bound to its
//! type, normal when an event ships before its listener) is published to
//! nobody: it is kept with `unroutable_at` set, counted in `outbox status`
//! and `outbox_unroutable_total`, and its aggregate goes on; `outbox
//! replay` sends it to a listener added later. With
//! [`RelayConfig::strict_routing`] it is a failed attempt instead.
//!
//! ## With a Postgres standby
//!
//! A multi-host `DATABASE_URL` with `target_session_attrs=read-write`
//! finds the primary; after a promotion the relay's connections fail and
//! reopen on the new primary, and claiming goes on. With
//! [`RelayConfig::wait_for_standby`] a batch is published only once a
//! standby holds it (`standby.rs`): no event the promoted standby lacks
//! is ever published.

pub(crate) mod config;
mod engine;
pub(crate) mod floor;
pub mod history;
pub mod presence;
mod publisher;
mod standby;
/// The relay's SQL (claim, mark, leases, failures, prune). Public only with
/// the `testing` feature, for the library's own claim and liveness tests;
/// operators' reads are re-exported below.
#[cfg(feature = "testing")]
pub mod store;
#[cfg(not(feature = "testing"))]
pub(crate) mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use diesel::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};

use crate::database::PgPool;
use crate::error::Result;
use crate::maintenance::Maintenance;
use crate::maintenance::backlog_gauges::BacklogGauges;
use crate::maintenance::event_log_pruner::EventLogPruner;
use crate::maintenance::lease_cleaner::LeaseCleaner;
use crate::maintenance::published_pruner::PublishedPruner;
use crate::maintenance::relay_heartbeat::RelayHeartbeat;
use crate::metrics as m;

use crate::amqp::SessionEnd;
use crate::delay::Backoff;
use crate::error::error_chain;
pub use crate::metrics::Health;
pub use config::{RelayConfig, default_relay_id, default_source};
use engine::{LaneContext, Session};
pub use store::{
    BacklogStats, ClaimedEvent, EventTypeBacklog, UnroutableEvents, backlog_by_event_type, backlog_stats,
    unroutable_by_event_type,
};

/// What the engine shares with its lanes.
pub(crate) struct Shared {
    pub(crate) config: Arc<RelayConfig>,
    pub(crate) pool: PgPool,
    pub(crate) health: Arc<Health>,
    /// Notified when writers committed events (see [`crate::wake`]).
    pub(crate) woken: Arc<tokio::sync::Notify>,
    /// The brokers of `amqp_url`, and which to try next.
    pub(crate) broker: crate::amqp::BrokerConnector,
    /// Commit ticks taken so far, for the claim floor (`floor.rs`).
    pub(crate) frontier: Arc<std::sync::Mutex<floor::CommitFrontier>>,
}

impl Shared {
    pub(crate) fn clone_for_lane(&self) -> LaneContext {
        LaneContext {
            config: Arc::clone(&self.config),
            pool: self.pool.clone(),
            frontier: Arc::clone(&self.frontier),
        }
    }
}

/// A relay instance. Cheap to keep around; [`Relay::run`] does the work.
pub struct Relay {
    shared: Shared,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Checks `config` and prepares a connection pool (connections are
    /// opened lazily, so a database that is still starting is retried by
    /// [`Relay::run`] rather than failing here).
    pub fn new(config: RelayConfig) -> Result<Self> {
        config.validate()?;
        let broker = crate::amqp::BrokerConnector::new(&config.amqp_url)?;
        let pool = Pool::builder()
            // The lease heartbeat, and one each for the four maintenance
            // services, so a renewal never waits behind them (the claim
            // and mark lanes keep connections of their own).
            .max_size(6)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(5))
            .connection_customizer(Box::new(RelaySession::new(&config.relay_id)))
            .build_unchecked(ConnectionManager::<PgConnection>::new(&config.database_url));
        Ok(Self {
            shared: Shared {
                config: Arc::new(config),
                pool,
                health: Arc::new(Health::default()),
                woken: Arc::new(tokio::sync::Notify::new()),
                broker,
                frontier: Arc::default(),
            },
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// Health flags, for `/health`.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.shared.health)
    }

    /// Relays until `shutdown` resolves, then stops claiming, waits for
    /// outstanding confirms (up to `shutdown_timeout`), marks what was
    /// confirmed and gives back every lease it holds.
    pub async fn run<F: Future<Output = ()>>(&self, shutdown: F) -> Result<()> {
        let config = Arc::clone(&self.shared.config);
        m::describe();
        tracing::info!(relay_id = %config.relay_id, exchange = %config.exchange, "relay starting");
        // Stopped when the relay stops (below).
        let listener = if config.wake_up {
            Some(crate::wake::WakeListener::start(
                &config.database_url,
                Arc::clone(&self.shared.woken),
            )?)
        } else {
            None
        };
        let mut maintenance = Maintenance::new(self.shared.pool.clone());
        maintenance.start(PublishedPruner::new(&config));
        maintenance.start(LeaseCleaner::new(&config));
        if let (true, Some(retention)) = (config.event_log, config.log_retention) {
            maintenance.start(EventLogPruner::new(retention, config.prune_interval));
        }
        maintenance.start(BacklogGauges::new(&config));
        maintenance.start(RelayHeartbeat::new(&config));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut reconnect = Backoff::new(Duration::from_millis(100), config.reconnect_max);
        loop {
            let opened = tokio::select! {
                () = &mut shutdown => break,
                opened = publisher::Publisher::open(&config, &self.shared.broker) => opened,
            };
            match opened {
                Ok(publisher) => {
                    reconnect.reset();
                    self.shared.health.set_broker_ok(true);
                    tracing::info!(relay_id = %config.relay_id, broker = %self.shared.broker.current(), "connected to the broker");
                    let end = Session::new(&self.shared, publisher).run(shutdown.as_mut()).await;
                    self.shared.health.set_broker_ok(false);
                    match end {
                        SessionEnd::Shutdown => break,
                        SessionEnd::BrokerLost(reason) => {
                            metrics::counter!(m::BROKER_RECONNECTS_TOTAL).increment(1);
                            tracing::warn!(reason = %error_chain(&reason), broker = %self.shared.broker.current(), "broker connection lost; claiming stops until it is back");
                            self.shared.broker.connection_lost();
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), retry_in = ?reconnect.upcoming(), "cannot reach the broker");
                    // Connected but the session could not be set up (a
                    // node starting or stopping): try the others first.
                    self.shared.broker.connection_lost();
                }
            }
            let delay = reconnect.next_delay();
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        maintenance.stop().await;
        // Gone from the dashboard's relays at once rather than after missed
        // heartbeats; a failure only delays that.
        let relay_id = config.relay_id.clone();
        if let Err(error) = crate::database::run_blocking(&self.shared.pool, move |conn| {
            presence::unregister(conn, &relay_id)
        })
        .await
        {
            tracing::debug!(error = %error_chain(&error), "cannot delete this relay's presence row");
        }
        // Dropping joins the listener's thread: off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(listener)).await;
        tracing::info!(relay_id = %config.relay_id, "relay stopped");
        Ok(())
    }
}

/// Opens a connection of the relay's own (outside the pool) with the
/// relay's session settings, for a lane that keeps it between jobs.
pub(crate) fn open_session(config: &RelayConfig) -> Result<PgConnection> {
    use diesel::connection::SimpleConnection;
    let mut conn = crate::database::connect(&config.database_url)?;
    conn.batch_execute(&RelaySession::new(&config.relay_id).settings)?;
    Ok(conn)
}

/// Session settings of the relay's own connections.
///
/// `synchronous_commit = off`: the relay's writes are leases and marks. If
/// Postgres crashes and loses the last few of them, rows merely look
/// unleased or unpublished again and are published once more, which
/// at-least-once delivery allows; no writer's data is involved (writers use
/// their own connections). In exchange, claims and marks do not wait for a
/// WAL flush.
///
/// `application_name = 'outbox relay <relay id>'`: `pg_stat_activity` (and
/// the chaos test's audit trigger) tell which relay holds a connection.
#[derive(Debug)]
struct RelaySession {
    settings: String,
}

impl RelaySession {
    fn new(relay_id: &str) -> Self {
        // Postgres truncates application_name to 63 bytes and keeps only
        // printable ASCII; quotes are doubled for the string literal.
        let name: String = format!("outbox relay {relay_id}")
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(63)
            .collect::<String>()
            .replace('\'', "''");
        // jit = off: the claim query's row estimates are large enough to
        // trigger JIT compilation, which costs ~300 ms per claim for a query
        // that runs in a few milliseconds.
        // idle_in_transaction_session_timeout: a claim holds the lock that
        // claims take turns on for one short transaction; a relay frozen or
        // cut off inside it (a GC-like pause, SIGSTOP, a partition) would
        // otherwise stop every other relay from claiming until TCP gives up
        // on it. The server ends such a session after 5 s, releasing the
        // lock; the relay reconnects when it comes back.
        Self {
            settings: format!(
                "SET synchronous_commit = off; SET jit = off; \
                 SET idle_in_transaction_session_timeout = '5s'; SET application_name = '{name}'"
            ),
        }
    }
}

impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for RelaySession {
    fn on_acquire(&self, conn: &mut PgConnection) -> std::result::Result<(), diesel::r2d2::Error> {
        use diesel::connection::SimpleConnection;
        conn.batch_execute(&self.settings)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}
