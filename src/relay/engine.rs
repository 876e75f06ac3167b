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

/// Database work waiting for the next lane job.
#[derive(Default)]
struct Pending {
    to_mark: Vec<LeasedSeq>,
    /// Returned by the broker as unroutable: marked, kept, flagged.
    to_mark_unroutable: Vec<LeasedSeq>,
    failures: Vec<PublishFailure>,
    releases: Vec<LeasedSeq>,
    /// Leases whose rows are all settled and flushed.
    finished_leases: Vec<i64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.to_mark.is_empty()
            && self.to_mark_unroutable.is_empty()
            && self.failures.is_empty()
            && self.releases.is_empty()
            && self.finished_leases.is_empty()
    }

    fn absorb(&mut self, mut other: Pending) {
        self.to_mark.append(&mut other.to_mark);
        self.to_mark_unroutable.append(&mut other.to_mark_unroutable);
        self.failures.append(&mut other.failures);
        self.releases.append(&mut other.releases);
        self.finished_leases.append(&mut other.finished_leases);
    }
}

struct LaneResult {
    /// Handed back when the job failed, to be retried.
    unflushed: Option<Pending>,
    /// What the job settled with the database, when it succeeded.
    flushed: Option<Pending>,
    attempted_marks: usize,
    marked: usize,
    newly_failed: usize,
    claimed: Option<(u64, Instant, Vec<ClaimedEvent>)>,
    error: Option<Error>,
    /// The lane's connection, handed back for its next job (dropped after
    /// an error, so the next job opens a fresh one).
    conn: Option<PgConnection>,
}

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
    claim_conn: Option<PgConnection>,
    mark_conn: Option<PgConnection>,
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
    fn maybe_start_lane(&mut self) {
        if self.lane.is_some() {
            return;
        }
        let config = &self.shared.config;
        let now = Instant::now();
        let claim =
            !self.stopping && now >= self.next_poll && self.held + config.batch_size <= config.max_in_flight;
        if !claim && self.pending.failures.is_empty() && self.pending.releases.is_empty() {
            return;
        }
        // Marks go to the mark lane.
        let pending = Pending {
            failures: std::mem::take(&mut self.pending.failures),
            releases: std::mem::take(&mut self.pending.releases),
            ..Pending::default()
        };
        let claim_job = if claim {
            // This claim's snapshot is taken after every wake-up so far.
            self.wake_pending = false;
            self.generation += 1;
            // Cuts recorded before this claim are flushed by this very job
            // before it claims, so they no longer need guarding.
            let current = self.generation;
            self.blocked.retain(|_, generation| *generation >= current);
            // Only this session's leases are its own to claim behind.
            let held: Vec<i64> = self.lease_deadlines.keys().copied().collect();
            Some((current, held))
        } else {
            None
        };
        let shared = self.shared.clone_for_lane();
        let conn = self.claim_conn.take();
        self.lane = Some(tokio::task::spawn_blocking(move || {
            run_lane_job(&shared, conn, pending, claim_job)
        }));
    }

    /// Starts a lease renewal when one is due and this session holds leases.
    fn maybe_start_heartbeat(&mut self) {
        let now = Instant::now();
        if self.heartbeat.is_some() || self.lease_deadlines.is_empty() || now < self.next_heartbeat {
            return;
        }
        self.next_heartbeat = now + self.shared.config.heartbeat_interval();
        let shared = self.shared.clone_for_lane();
        let held: Vec<i64> = self.lease_deadlines.keys().copied().collect();
        self.heartbeat = Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let renewed = shared.pool.get().map_err(Error::from).and_then(|mut conn| {
                store::renew_leases(
                    &mut conn,
                    &shared.config.relay_id,
                    &held,
                    shared.config.lease.as_secs_f64(),
                )
            });
            HeartbeatResult { started, renewed }
        }));
    }

    /// Moves the deadline of every renewed lease. A lease the renewal did
    /// not find has ended: its deadline stays, so its rows are given back
    /// instead of published (another relay may hold them now).
    fn on_heartbeat_done(&mut self, joined: std::result::Result<HeartbeatResult, tokio::task::JoinError>) {
        match joined {
            Ok(HeartbeatResult {
                started,
                renewed: Ok(ids),
            }) => {
                let deadline = started + self.shared.config.lease;
                for id in ids {
                    if let Some(current) = self.lease_deadlines.get_mut(&id) {
                        *current = (*current).max(deadline);
                    }
                }
            }
            Ok(HeartbeatResult {
                renewed: Err(error), ..
            }) => {
                self.shared.health.set_database_ok(false);
                tracing::warn!(error = %error_chain(&error), "cannot renew leases; rows whose lease ends are given back");
            }
            Err(e) => tracing::error!(error = %e, "relay heartbeat job panicked"),
        }
    }

    /// Starts a mark job if none runs and rows wait to be marked: once a
    /// batch of them waits, or the first of them has waited `mark_delay`
    /// (marking many rows in one statement costs little more than one; the
    /// messages are already confirmed, so only bookkeeping waits).
    fn maybe_start_mark_lane(&mut self) {
        if self.mark_lane.is_some() {
            return;
        }
        let waiting = self.pending.to_mark.len() + self.pending.to_mark_unroutable.len();
        if waiting == 0 && self.pending.finished_leases.is_empty() {
            self.mark_at = None;
            return;
        }
        let due = *self
            .mark_at
            .get_or_insert_with(|| Instant::now() + self.shared.config.mark_delay);
        if waiting < self.shared.config.batch_size && !self.stopping && Instant::now() < due {
            return;
        }
        self.mark_at = None;
        let pending = Pending {
            to_mark: std::mem::take(&mut self.pending.to_mark),
            to_mark_unroutable: std::mem::take(&mut self.pending.to_mark_unroutable),
            finished_leases: std::mem::take(&mut self.pending.finished_leases),
            ..Pending::default()
        };
        let shared = self.shared.clone_for_lane();
        let conn = self.mark_conn.take();
        self.mark_lane = Some(tokio::task::spawn_blocking(move || {
            run_lane_job(&shared, conn, pending, None)
        }));
    }

    async fn on_lane_done(
        &mut self,
        joined: std::result::Result<LaneResult, tokio::task::JoinError>,
    ) -> std::result::Result<(), SessionLost> {
        let config = Arc::clone(&self.shared.config);
        let result = match joined {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "relay database job panicked");
                self.next_poll = Instant::now() + self.db_backoff.upcoming();
                return Ok(());
            }
        };
        if let Some(unflushed) = result.unflushed {
            // Keep the work for the next job; order within each list does
            // not matter.
            let mut again = unflushed;
            again.absorb(std::mem::take(&mut self.pending));
            self.pending = again;
        }
        if let Some(error) = result.error {
            self.shared.health.set_database_ok(false);
            let retry_in = self.db_backoff.next_delay();
            tracing::warn!(error = %error_chain(&error), ?retry_in, "relay database work failed");
            self.next_poll = Instant::now() + retry_in;
            return Ok(());
        }
        self.shared.health.set_database_ok(true);
        self.db_backoff.reset();
        if let Some(flushed) = &result.flushed {
            let settled = flushed
                .to_mark
                .iter()
                .chain(flushed.to_mark_unroutable.iter())
                .chain(flushed.releases.iter())
                .map(|(_, lease)| *lease)
                .chain(flushed.failures.iter().map(|f| f.lease_id));
            for lease in settled {
                if let Some(count) = self.lease_rows.get_mut(&lease) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.lease_rows.remove(&lease);
                        self.lease_deadlines.remove(&lease);
                        self.pending.finished_leases.push(lease);
                    }
                }
            }
        }
        if result.marked > 0 {
            metrics::counter!(m::PUBLISHED_TOTAL).increment(result.marked as u64);
        }
        if result.attempted_marks > result.marked {
            let lost = result.attempted_marks - result.marked;
            metrics::counter!(m::LEASES_LOST_TOTAL).increment(lost as u64);
            tracing::warn!(
                rows = lost,
                "lease ran out before marking: rows will be published again by whoever holds them now"
            );
        }
        if result.newly_failed > 0 {
            tracing::error!(
                rows = result.newly_failed,
                "rows exhausted their publish attempts and are marked failed; their aggregates wait"
            );
        }
        if let Some((generation, claim_started, rows)) = result.claimed {
            let claimed = rows.len();
            metrics::counter!(m::CLAIMED_TOTAL).increment(claimed as u64);
            let now = Instant::now();
            self.next_poll = if claimed >= config.batch_size {
                now
            } else if claimed > 0 {
                self.idle_delay = config.poll_min;
                now + config.poll_min
            } else {
                self.idle_delay = (self.idle_delay * 2).min(config.poll_max);
                now + self.idle_delay
            };
            if self.wake_pending {
                self.next_poll = now;
            }
            self.accept_claimed(generation, claim_started, rows).await?;
        }
        Ok(())
    }

    /// Appends claimed rows to their aggregates' chains and publishes new
    /// heads.
    async fn accept_claimed(
        &mut self,
        generation: u64,
        claim_started: Instant,
        rows: Vec<ClaimedEvent>,
    ) -> std::result::Result<(), SessionLost> {
        let lease_deadline = claim_started + self.shared.config.lease;
        if let Some(first) = rows.first() {
            // One lease per claim; renewals move it later.
            self.lease_deadlines
                .entry(first.lease_id)
                .or_insert(lease_deadline);
        }
        let mut new_heads = Vec::new();
        for row in rows {
            let key = (row.aggregate_type.clone(), row.aggregate_id.clone());
            if self.stopping || self.blocked.get(&key).is_some_and(|g| *g >= generation) {
                self.pending.releases.push((row.seq, row.lease_id));
                *self.lease_rows.entry(row.lease_id).or_insert(0) += 1;
                continue;
            }
            self.held += 1;
            *self.lease_rows.entry(row.lease_id).or_insert(0) += 1;
            let chain = self.chains.entry(key.clone()).or_insert_with(|| Chain {
                rows: VecDeque::new(),
                head_in_flight: false,
            });
            if chain.rows.is_empty() {
                new_heads.push(key);
            }
            chain.rows.push_back(HeldRow { row });
        }
        for key in new_heads {
            self.publish_head(key).await?;
        }
        metrics::gauge!(m::IN_FLIGHT).set(self.held as f64);
        Ok(())
    }

    /// Publishes the head of `key`'s chain, unless its lease may end before
    /// the next renewal could extend it (then the chain is given back: its
    /// relay froze or lost the database long enough that another relay may
    /// take the rows over).
    async fn publish_head(&mut self, key: AggregateKey) -> std::result::Result<(), SessionLost> {
        let confirm_timeout = self.shared.config.confirm_timeout;
        let margin = self.shared.config.heartbeat_interval();
        let (seq, event_id, lease_ok) = match self.chains.get(&key) {
            Some(chain) if !chain.head_in_flight => match chain.rows.front() {
                Some(head) => (
                    head.row.seq,
                    head.row.event_id,
                    self.lease_deadlines
                        .get(&head.row.lease_id)
                        .is_some_and(|deadline| Instant::now() + margin < *deadline),
                ),
                None => {
                    self.chains.remove(&key);
                    return Ok(());
                }
            },
            _ => return Ok(()),
        };
        if self.stopping || !lease_ok {
            self.cut_chain(&key, 0);
            return Ok(());
        }
        let sent = match self.chains.get(&key).and_then(|c| c.rows.front()) {
            Some(head) => self.publisher.publish(&head.row).await,
            None => return Ok(()),
        };
        match sent {
            Ok(confirm) => {
                crash_point!("relay::after_publish");
                if let Some(chain) = self.chains.get_mut(&key) {
                    chain.head_in_flight = true;
                }
                self.in_flight.push_back(Box::pin(async move {
                    let outcome = tokio::time::timeout(confirm_timeout, confirm).await;
                    Confirmed {
                        key,
                        seq,
                        event_id,
                        outcome,
                    }
                }));
                Ok(())
            }
            Err(PublishError::Encode(reason)) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "reason" => "encode").increment(1);
                tracing::error!(seq, %reason, "cannot encode event");
                self.fail_head(&key, format!("cannot encode: {reason}"));
                Ok(())
            }
            Err(PublishError::Broker(error)) => Err(SessionLost::Publish(error)),
        }
    }

    async fn on_confirm(&mut self, confirmed: Confirmed) -> std::result::Result<(), SessionLost> {
        let Confirmed {
            key,
            seq,
            event_id,
            outcome,
        } = confirmed;
        crash_point!("relay::after_confirm");
        let mut unroutable = false;
        let failure = match outcome {
            Ok(Ok(confirmation)) => {
                let acked = confirmation.is_ack();
                if let Some(message) = confirmation.take_message() {
                    // Our message ids are event ids; anything else is not ours.
                    let id = message
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
                    tracing::debug!(message_id = ?id, reply = %message.reply_text, "broker returned a message");
                    if let Some(id) = id {
                        self.returned.insert(id);
                    }
                }
                // Checked on every confirm: a set lookup, no allocation.
                let returned = self.returned.remove(&event_id);
                if returned && !self.shared.config.strict_routing && acked {
                    // Routed to no queue: published to nobody. Kept and
                    // flagged rather than retried, so its aggregate goes on.
                    unroutable = true;
                    None
                } else if returned {
                    let event_type = self
                        .chains
                        .get(&key)
                        .and_then(|c| c.rows.front())
                        .map(|h| h.row.event_type.clone())
                        .unwrap_or_default();
                    Some((
                        "unroutable",
                        format!(
                            "returned by the broker: NO_ROUTE (no queue is bound for routing key {event_type})"
                        ),
                    ))
                } else if acked {
                    None
                } else {
                    Some(("nack", "negatively acknowledged by the broker".to_owned()))
                }
            }
            Ok(Err(error)) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "reason" => "connection").increment(1);
                return Err(SessionLost::Confirm(error));
            }
            Err(_) => Some((
                "timeout",
                format!("no confirm within {:?}", self.shared.config.confirm_timeout),
            )),
        };
        if self
            .chains
            .get(&key)
            .and_then(|c| c.rows.front())
            .map(|h| h.row.seq)
            != Some(seq)
        {
            // The chain was given back meanwhile (shutdown); nothing to do.
            return Ok(());
        }
        match failure {
            None => {
                let mut chain_done = false;
                if let Some(chain) = self.chains.get_mut(&key) {
                    chain.head_in_flight = false;
                    if let Some(done) = chain.rows.pop_front() {
                        self.held -= 1;
                        let latency = (chrono::Utc::now() - done.row.recorded_at)
                            .num_microseconds()
                            .unwrap_or(0);
                        metrics::histogram!(m::PUBLISH_LATENCY_SECONDS).record(latency.max(0) as f64 / 1e6);
                        if unroutable {
                            metrics::counter!(m::UNROUTABLE_TOTAL, "event_type" => done.row.event_type.clone())
                                .increment(1);
                            tracing::warn!(seq, event_id = %done.row.event_id, event_type = %done.row.event_type,
                                "no queue is bound to this event type: kept as unroutable (replay it once a listener exists)");
                            self.pending.to_mark_unroutable.push((seq, done.row.lease_id));
                        } else {
                            tracing::debug!(seq, event_id = %done.row.event_id, event_type = %done.row.event_type, "published");
                            self.pending.to_mark.push((seq, done.row.lease_id));
                        }
                    }
                    chain_done = chain.rows.is_empty();
                }
                if chain_done {
                    self.chains.remove(&key);
                } else {
                    self.publish_head(key).await?;
                }
            }
            Some((reason, error)) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "reason" => reason).increment(1);
                tracing::warn!(seq, %error, "publish failed");
                self.fail_head(&key, error);
            }
        }
        metrics::gauge!(m::IN_FLIGHT).set(self.held as f64);
        Ok(())
    }

    /// Records a failed attempt for the chain's head and gives back the
    /// rest of the chain: the aggregate waits for the head's retry.
    fn fail_head(&mut self, key: &AggregateKey, error: String) {
        if let Some(chain) = self.chains.get_mut(key)
            && let Some(head) = chain.rows.pop_front()
        {
            self.held -= 1;
            let attempts = u32::try_from(head.row.attempts).unwrap_or(0);
            self.pending.failures.push(PublishFailure {
                seq: head.row.seq,
                lease_id: head.row.lease_id,
                error,
                retry_in: self.shared.config.backoff_after(attempts),
            });
        }
        self.cut_chain(key, 0);
    }

    /// Gives back the leases of `key`'s rows from index `from` on and
    /// forgets them; guards against a running claim re-adding them.
    fn cut_chain(&mut self, key: &AggregateKey, from: usize) {
        if let Some(chain) = self.chains.get_mut(key) {
            let cut: Vec<HeldRow> = chain.rows.drain(from..).collect();
            self.held -= cut.len();
            self.pending
                .releases
                .extend(cut.iter().map(|h| (h.row.seq, h.row.lease_id)));
            if chain.rows.is_empty() {
                self.chains.remove(key);
            }
        }
        self.blocked.insert(key.clone(), self.generation);
    }

    /// At shutdown: keep only the in-flight heads, give back the rest.
    fn cut_waiting_rows(&mut self) {
        let keys: Vec<(AggregateKey, bool)> = self
            .chains
            .iter()
            .map(|(k, c)| (k.clone(), c.head_in_flight))
            .collect();
        for (key, head_in_flight) in keys {
            self.cut_chain(&key, usize::from(head_in_flight));
        }
    }

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
                self.fail_head(&key, format!("connection lost before confirm: {}", error_chain(reason)));
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
            let result = run_lane_job(&shared, conn, pending, None);
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

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_instant(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// A lease renewal's outcome: when it started (the new deadlines count
/// from then) and the leases it renewed.
struct HeartbeatResult {
    started: Instant,
    renewed: Result<Vec<i64>>,
}

async fn wait_heartbeat(
    heartbeat: &mut Option<JoinHandle<HeartbeatResult>>,
) -> std::result::Result<HeartbeatResult, tokio::task::JoinError> {
    match heartbeat {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn wait_lane(
    lane: &mut Option<JoinHandle<LaneResult>>,
) -> std::result::Result<LaneResult, tokio::task::JoinError> {
    match lane {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// What a lane job needs, owned, for the blocking pool.
pub(crate) struct LaneContext {
    pub(crate) config: Arc<crate::relay::RelayConfig>,
    pub(crate) pool: crate::database::PgPool,
}

/// Flushes `pending`, then claims if `claim` (generation, this session's
/// leases) is set. Runs on the
/// blocking pool.
fn run_lane_job(
    ctx: &LaneContext,
    conn: Option<PgConnection>,
    pending: Pending,
    claim: Option<(u64, Vec<i64>)>,
) -> LaneResult {
    let config = &ctx.config;
    let mut result = LaneResult {
        unflushed: None,
        attempted_marks: pending.to_mark.len() + pending.to_mark_unroutable.len(),
        flushed: None,
        marked: 0,
        newly_failed: 0,
        claimed: None,
        error: None,
        conn: None,
    };
    let pending_is_empty = pending.is_empty();
    let mut conn = match conn.map_or_else(|| crate::relay::open_session(config), Ok) {
        Ok(conn) => conn,
        Err(e) => {
            result.unflushed = Some(pending);
            result.attempted_marks = 0;
            result.error = Some(e);
            return result;
        }
    };
    let delete = config.retention.is_zero();
    let flush_started = Instant::now();
    let flushed = (|| -> Result<(usize, usize)> {
        if !pending.to_mark.is_empty() || !pending.to_mark_unroutable.is_empty() {
            crash_point!("relay::before_mark");
        }
        let marked = store::mark_published(&mut conn, &config.relay_id, &pending.to_mark, delete)?.len()
            + store::mark_unroutable(&mut conn, &config.relay_id, &pending.to_mark_unroutable)?.len();
        if marked > 0 {
            crash_point!("relay::after_mark");
        }
        let failed = store::record_failures(
            &mut conn,
            &config.relay_id,
            &pending.failures,
            i32::try_from(config.max_attempts).unwrap_or(i32::MAX),
        )?;
        store::release_leases(&mut conn, &config.relay_id, &pending.releases)?;
        store::drop_leases(&mut conn, &config.relay_id, &pending.finished_leases)?;
        Ok((marked, failed))
    })();
    match flushed {
        Ok((marked, failed)) => {
            if !pending_is_empty {
                tracing::trace!(
                    marked,
                    failed,
                    elapsed_us = flush_started.elapsed().as_micros() as u64,
                    "flushed"
                );
            }
            result.marked = marked;
            result.newly_failed = failed;
            result.flushed = Some(pending);
        }
        Err(e) => {
            // Marks are idempotent (guarded by the lease), so retrying the
            // whole set later is safe.
            result.unflushed = Some(pending);
            result.attempted_marks = 0;
            result.error = Some(e);
            return result;
        }
    }
    if let Some((generation, held)) = claim {
        let started = Instant::now();
        let batch = i64::try_from(config.batch_size).unwrap_or(i64::MAX);
        match store::claim_batch_holding(
            &mut conn,
            &config.relay_id,
            &held,
            batch,
            config.lease.as_secs_f64(),
        ) {
            Ok(rows) => {
                tracing::trace!(
                    rows = rows.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "claimed"
                );
                result.claimed = Some((generation, started, rows));
            }
            Err(e) => result.error = Some(e),
        }
    }
    if result.error.is_none() {
        result.conn = Some(conn);
    }
    result
}
