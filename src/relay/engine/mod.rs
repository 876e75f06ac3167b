//! The relay's event loop for one broker session: claim rows, publish each
//! aggregate's rows one at a time in seq order, await confirms (many
//! aggregates in flight at once), mark acked rows, record failures.
//!
//! Database work runs in two "lanes" on the blocking pool, each one job at
//! a time. The claim lane first flushes failures and released leases, then
//! claims the next batch: serializing those before claims means a claim
//! never sees a lease this relay has already given up, which is what keeps
//! a failed aggregate's later rows from being published ahead of it. The
//! mark lane marks acked rows published, concurrently with claims: a claim
//! that still sees such a row as unpublished also sees it leased to this
//! relay, which is harmless.
//!
//! Files: this one holds the session's state and its select loop;
//! [`lanes`] the database jobs (claim, mark, heartbeat); [`chains`] each
//! aggregate's held rows, publishing heads and settling confirms.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::PgConnection;
use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::Confirmation;
use tokio::task::JoinHandle;

use crate::amqp::{SessionEnd, SessionLost};
use crate::delay::Backoff;
use crate::error::{Error, Result, error_chain};
use crate::metrics as m;
use crate::relay::Shared;
use crate::relay::floor::CommitFrontier;
use crate::relay::publisher::{PublishError, Publisher};
use crate::relay::store::{self, ClaimedEvent, LeasedSeq, PublishFailure};

/// A fail point (feature `failpoints`, nothing without it) whose `return`
/// action ends the process on the spot, as a crash at that step would:
/// `FAILPOINTS=relay::before_mark=return outbox relay`. The points:
/// `relay::after_publish` (sent, confirm not awaited),
/// `relay::after_confirm` (confirmed, not yet queued for marking),
/// `relay::before_mark` and `relay::after_mark` (the mark committed). Other
/// actions of the `fail` crate (`sleep(ms)`, `pause`, `panic`) work too.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            tracing::error!(failpoint = $name, "fail point: exiting as a crash would");
            std::process::exit(70)
        })
    };
}

mod chains;
mod lanes;

pub(crate) use lanes::LaneContext;
use lanes::{
    HeartbeatResult, Lane, LaneConnection, LaneResult, Pending, run_lane_job, sleep_until_instant,
    wait_heartbeat, wait_lane,
};

/// An aggregate: (aggregate_type, aggregate_id).
type AggregateKey = (String, String);

struct HeldRow {
    row: ClaimedEvent,
}

/// An aggregate's claimed rows, oldest first; only the head is ever in
/// flight.
struct Chain {
    rows: VecDeque<HeldRow>,
    head_in_flight: bool,
}

struct Confirmed {
    key: AggregateKey,
    seq: i64,
    event_id: uuid::Uuid,
    outcome: std::result::Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>,
}

type ConfirmFuture = Pin<Box<dyn Future<Output = Confirmed> + Send>>;

pub(crate) struct Session<'a> {
    shared: &'a Shared,
    publisher: Publisher,
    chains: HashMap<AggregateKey, Chain>,
    /// Confirms in publish order. lapin hands a returned (unroutable)
    /// message to the first confirm that completes after the return
    /// arrives, which may be an earlier message's; handling confirms in
    /// publish order guarantees the return is seen before its own confirm.
    in_flight: FuturesOrdered<ConfirmFuture>,
    /// Message ids the broker returned whose own confirm is still ahead.
    returned: HashSet<uuid::Uuid>,
    /// Rows held in chains (in flight or waiting).
    held: usize,
    pending: Pending,
    lane: Option<JoinHandle<LaneResult>>,
    mark_lane: Option<JoinHandle<LaneResult>>,
    /// Each lane keeps one connection of its own between jobs: no pool
    /// checkout (and its `SELECT 1`) per claim or mark.
    claim_conn: Option<LaneConnection>,
    mark_conn: Option<LaneConnection>,
    /// When the rows waiting to be marked must be marked at the latest.
    mark_at: Option<Instant>,
    /// The lease renewal running now, if any.
    heartbeat: Option<JoinHandle<HeartbeatResult>>,
    next_heartbeat: Instant,
    /// Local instant before which each lease of this session is certainly
    /// still ours: taken before the claim or the renewal that set it ran,
    /// so it errs early.
    lease_deadlines: HashMap<i64, Instant>,
    /// Rows of each of this session's leases not yet settled in the
    /// database; a lease is deleted when its count reaches zero.
    lease_rows: HashMap<i64, usize>,
    /// Incremented when a claim starts.
    generation: u64,
    /// Aggregates cut (failed or released) while the claim of the given
    /// generation could still see their old leases.
    blocked: HashMap<AggregateKey, u64>,
    next_poll: Instant,
    /// A wake-up arrived that no claim started since has covered.
    wake_pending: bool,
    idle_delay: Duration,
    db_backoff: Backoff,
    stopping: bool,
}

impl<'a> Session<'a> {
    pub(crate) fn new(shared: &'a Shared, publisher: Publisher) -> Self {
        Self {
            shared,
            publisher,
            chains: HashMap::new(),
            in_flight: FuturesOrdered::new(),
            returned: HashSet::new(),
            held: 0,
            pending: Pending::default(),
            lane: None,
            mark_lane: None,
            claim_conn: None,
            mark_conn: None,
            mark_at: None,
            heartbeat: None,
            next_heartbeat: Instant::now(),
            lease_deadlines: HashMap::new(),
            lease_rows: HashMap::new(),
            generation: 0,
            blocked: HashMap::new(),
            next_poll: Instant::now(),
            wake_pending: false,
            idle_delay: shared.config.poll_min,
            db_backoff: Backoff::new(shared.config.poll_min, shared.config.reconnect_max),
            stopping: false,
        }
    }

    /// Runs until `shutdown` resolves (then drains) or the broker is lost.
    pub(crate) async fn run<F: Future<Output = ()>>(mut self, shutdown: Pin<&mut F>) -> SessionEnd {
        let end = self.pump(shutdown).await;
        self.finish(&end).await;
        self.publisher.close().await;
        end
    }

    async fn pump<F: Future<Output = ()>>(&mut self, mut shutdown: Pin<&mut F>) -> SessionEnd {
        let config = Arc::clone(&self.shared.config);
        let mut stop_deadline = tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365);
        loop {
            if !self.publisher.is_connected() {
                return SessionEnd::BrokerLost(SessionLost::ConnectionClosed);
            }
            self.maybe_start_lane();
            self.maybe_start_mark_lane();
            self.maybe_start_heartbeat();
            if self.stopping
                && self.in_flight.is_empty()
                && self.lane.is_none()
                && self.mark_lane.is_none()
                && self.pending.is_empty()
            {
                return SessionEnd::Shutdown;
            }
            let can_claim = !self.stopping && self.held + config.batch_size <= config.max_in_flight;
            let poll_at = tokio::time::Instant::from_std(self.next_poll);
            let heartbeat_at = tokio::time::Instant::from_std(self.next_heartbeat);
            let heartbeat_due = self.heartbeat.is_none() && !self.lease_deadlines.is_empty();
            tokio::select! {
                () = &mut shutdown, if !self.stopping => {
                    tracing::info!(relay_id = %config.relay_id, in_flight = self.in_flight.len(), "relay stopping: no new claims, draining confirms");
                    self.stopping = true;
                    stop_deadline = tokio::time::Instant::now() + config.shutdown_timeout;
                    self.cut_waiting_rows();
                }
                () = tokio::time::sleep_until(stop_deadline), if self.stopping => {
                    tracing::warn!(unconfirmed = self.in_flight.len(), "shutdown timeout: leaving unconfirmed rows to be republished");
                    return SessionEnd::Shutdown;
                }
                Some(confirmed) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if let Err(reason) = self.on_confirm(confirmed).await {
                        return SessionEnd::BrokerLost(reason);
                    }
                }
                joined = wait_lane(&mut self.lane), if self.lane.is_some() => {
                    self.lane = None;
                    let joined = joined.map(|mut result| {
                        self.claim_conn = result.conn.take();
                        result
                    });
                    if let Err(reason) = self.on_lane_done(joined).await {
                        return SessionEnd::BrokerLost(reason);
                    }
                }
                joined = wait_lane(&mut self.mark_lane), if self.mark_lane.is_some() => {
                    self.mark_lane = None;
                    let joined = joined.map(|mut result| {
                        self.mark_conn = result.conn.take();
                        result
                    });
                    if let Err(reason) = self.on_lane_done(joined).await {
                        return SessionEnd::BrokerLost(reason);
                    }
                }
                joined = wait_heartbeat(&mut self.heartbeat), if self.heartbeat.is_some() => {
                    self.heartbeat = None;
                    self.on_heartbeat_done(joined);
                }
                () = self.shared.woken.notified(), if !self.stopping => {
                    // Writers committed: claim now (or right after the
                    // claim running now, which may predate their commit).
                    self.wake_pending = true;
                    self.idle_delay = config.poll_min;
                    if self.lane.is_none() {
                        self.next_poll = Instant::now();
                    }
                }
                () = tokio::time::sleep_until(heartbeat_at), if heartbeat_due => {}
                () = sleep_until_instant(self.mark_at), if self.mark_lane.is_none() && self.mark_at.is_some() => {}
                () = tokio::time::sleep_until(poll_at), if self.lane.is_none() && can_claim => {}
                // Wake up regularly to notice a dead connection while idle.
                () = tokio::time::sleep(config.poll_max) => {}
            }
        }
    }

    /// Starts a lane job if none runs and there is something to do.
    /// After the loop: settle everything with the database. In-flight rows
    /// of a lost connection count a failed attempt; everything else held is
    /// given back. Best effort: leases expire anyway if this fails.
    async fn finish(&mut self, end: &SessionEnd) {
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = heartbeat.await;
        }
        self.lease_deadlines.clear();
        for lane in [self.lane.take(), self.mark_lane.take()].into_iter().flatten() {
            let joined = lane.await;
            if let Ok(result) = joined {
                if result.marked > 0 {
                    metrics::counter!(m::PUBLISHED_TOTAL).increment(result.marked as u64);
                }
                if let Some(unflushed) = result.unflushed {
                    self.pending.absorb(unflushed);
                }
            }
        }
        let keys: Vec<AggregateKey> = self.chains.keys().cloned().collect();
        for key in keys {
            let in_flight = self.chains.get(&key).is_some_and(|c| c.head_in_flight);
            if in_flight && let SessionEnd::BrokerLost(reason) = end {
                self.fail_head(
                    &key,
                    format!("connection lost before confirm: {}", error_chain(reason)),
                );
            } else {
                self.cut_chain(&key, 0);
            }
        }
        self.in_flight = FuturesOrdered::new();
        self.returned.clear();
        self.held = 0;
        metrics::gauge!(m::IN_FLIGHT).set(0.0);
        let pending = std::mem::take(&mut self.pending);
        let shared = self.shared.clone_for_lane();
        let conn = self.claim_conn.take().or_else(|| self.mark_conn.take());
        let outcome = tokio::task::spawn_blocking(move || {
            let result = run_lane_job(&shared, Lane::Settle, conn, pending, None);
            if result.error.is_none() {
                // Nothing of ours should stay leased after this session.
                let released = shared
                    .pool
                    .get()
                    .map_err(Error::from)
                    .and_then(|mut conn| store::release_all_leases(&mut conn, &shared.config.relay_id));
                if let Err(e) = released {
                    tracing::warn!(error = %error_chain(&e), "could not release leases; they expire on their own");
                }
            }
            result
        })
        .await;
        match outcome {
            Ok(result) => {
                if result.marked > 0 {
                    metrics::counter!(m::PUBLISHED_TOTAL).increment(result.marked as u64);
                }
                if let Some(error) = result.error {
                    tracing::warn!(error = %error_chain(&error), "could not settle rows with the database; their leases expire on their own");
                }
            }
            Err(e) => tracing::error!(error = %e, "relay settle job panicked"),
        }
    }
}
