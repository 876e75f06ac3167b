//! The claim floor: why a claim reads a path that does not grow with rows
//! already published, and what keeps that from skipping any row.
//!
//! ## The problem
//!
//! Marking a row published leaves a dead entry in the backlog index
//! (`outbox_events_unpublished_by_seq`, partial on `published_at IS NULL`)
//! until vacuum removes it. Vacuum cannot remove it while any snapshot
//! older than the mark is open anywhere in the cluster: a long analytics
//! query, a `REPEATABLE READ` session left open in `psql`. A claim that
//! scans the index from its start walks every such entry again, and
//! checks each one against the heap: the claim grows with everything
//! published since the oldest snapshot.
//!
//! ## The floor
//!
//! Claims scan the backlog index from the *floor*, a seq kept in the
//! sequence `outbox_claim_floor`, so the dead entries below it are never
//! visited. The invariant:
//!
//! > Every unpublished row with a seq below the floor waits for a publish
//! > retry or has failed (it is in the small `outbox_events_retrying`
//! > index), or belongs to an aggregate that has such a row.
//!
//! So a claim reads (all in `outbox_claim_batch`): the backlog from the
//! floor up, as before; and below the floor only the aggregates whose
//! retry is due, through the retrying index and the aggregate index, both
//! of which hold only what is being retried. Aggregates blocked behind a
//! retry that is not due, or a failed row, are skipped as before.
//!
//! ## Raising it (each claim, under the claim lock)
//!
//! `outbox_claim_floor_raise` moves the floor up to the first unpublished
//! row that is not in (or behind) a retry, walking the index from the old
//! floor: the dead entries it passes are walked once, not by every claim.
//! Leased rows count as unpublished, so the floor never passes a row in
//! flight (the claim that leased it may even roll back) or a row whose
//! relay died. Two things bound the raise:
//!
//! - **Late commits.** A row whose transaction is still open is invisible,
//!   and its seq may be below rows already published; the floor must not
//!   pass it. A [`CommitTick`] records the last seq drawn, then the
//!   transactions holding a write lock on `outbox_events`. A transaction
//!   takes that lock before it draws a seq (an `INSERT` locks its table
//!   before evaluating defaults) and keeps it to its end, so once none of
//!   a tick's holders holds it any more, every row with a seq at or below
//!   the tick's `last_seq` is committed or gone: [`CommitFrontier`] keeps
//!   the ticks not yet settled and gives the newest settled `last_seq`,
//!   and the floor never passes it. A transaction that writes no event (the
//!   analytics query, the open snapshot) never holds the lock and so never
//!   holds the floor back; a transaction that wrote events and stays open
//!   holds it (and, while it does, claims walk what is published after
//!   it: the price of not skipping its rows). Ticks are taken by the mark
//!   lane after it marks (off the path from commit to publish) and hold
//!   only for the server they were taken on, which each tick names (its
//!   start time): a claim on another server (a standby promoted after a
//!   failover, whose sequences and open transactions are its own) raises
//!   the floor only from that server's ticks.
//! - **`setval` is not transactional**: the floor is raised only to a
//!   value that holds whether or not the claim commits, which is why
//!   leased rows (this claim's included) hold it.
//!
//! ## Lowering it (triggers on `outbox_events`)
//!
//! A row that leaves the retrying index without its aggregate being done
//! (its retry published, an operator put a failed row back in line, it was
//! deleted) takes the aggregate out of what claims read below the floor.
//! A trigger then brings the floor down to the aggregate's first
//! unpublished row, under the claim lock held to the end of that
//! transaction, so no claim runs between the change and its commit. The
//! next claim walks back up once. `TRUNCATE` resets the floor to 0.
//!
//! ## What vacuum it needs
//!
//! None for the claim path: it reads the entries above the floor, which
//! are the backlog and what was published since the last raise (one
//! claim's worth). Vacuum still reclaims the table's space in the end;
//! until it can, the table and its other indexes grow as before, which
//! costs disk, not claim time.
//!
//! ## Arithmetic
//!
//! A claim reads `batch` live entries plus the dead entries published
//! since the last raise: with one tick every [`TICK_INTERVAL`] and relays
//! raising at every claim, that is the events published in a few tick
//! intervals. 16 relays at 100,000 events/s in total, ticking every 5 ms:
//! the floor trails the newest committed row by about 10 ms, 1,000
//! entries, so each claim walks at most ~1,000 dead entries (a few
//! hundred microseconds) however long a snapshot stays open, against
//! 100,000 more a second for a claim scanning from the start.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::store::CommitTick;

/// How often a relay takes a commit tick (at most once per mark).
pub(crate) const TICK_INTERVAL: Duration = Duration::from_millis(5);

/// Unsettled ticks kept at most; past that the newest is replaced, which
/// only delays the frontier.
const MAX_PENDING: usize = 64;

/// A relay's commit frontier: the newest seq at or below which every row is
/// committed or gone for good, from its commit ticks.
///
/// Ticks may be taken on any of the relay's connections; each names its
/// server, and the frontier is only ever one server's: a tick of another
/// server (a standby promoted after a failover) starts it again.
#[derive(Debug, Default)]
pub(crate) struct CommitFrontier {
    server: Option<i64>,
    pending: VecDeque<CommitTick>,
    settled: Option<i64>,
    last_tick: Option<Instant>,
}

impl CommitFrontier {
    /// The frontier for a claim on `server`, once one of its ticks has
    /// settled.
    pub(crate) fn settled_on(&self, server: i64) -> Option<i64> {
        if self.server == Some(server) {
            self.settled
        } else {
            None
        }
    }

    /// Whether a tick is due at `now`.
    pub(crate) fn tick_due(&self, now: Instant) -> bool {
        self.last_tick
            .is_none_or(|last| now.saturating_duration_since(last) >= TICK_INTERVAL)
    }

    /// Takes in a tick taken at `now`: every earlier tick none of whose
    /// holders still holds the lock is settled. A holder of an earlier tick
    /// that is still open holds the lock at this tick too, so the first
    /// tick still held back holds back every later one.
    pub(crate) fn observe(&mut self, tick: CommitTick, now: Instant) {
        if self.server != Some(tick.server) {
            *self = CommitFrontier {
                server: Some(tick.server),
                ..CommitFrontier::default()
            };
        }
        self.last_tick = Some(now);
        while let Some(oldest) = self.pending.front() {
            if oldest.holders.iter().any(|holder| tick.holders.contains(holder)) {
                break;
            }
            self.settle(oldest.last_seq);
            self.pending.pop_front();
        }
        if tick.holders.is_empty() {
            self.settle(tick.last_seq);
            self.pending.clear();
        } else if self.pending.len() < MAX_PENDING {
            self.pending.push_back(tick);
        } else if let Some(newest) = self.pending.back_mut() {
            *newest = tick;
        }
    }

    fn settle(&mut self, last_seq: i64) {
        self.settled = Some(self.settled.map_or(last_seq, |settled| settled.max(last_seq)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: i64 = 1_765_000_000_000_000;

    fn tick(last_seq: i64, holders: &[&str]) -> CommitTick {
        tick_on(SERVER, last_seq, holders)
    }

    fn tick_on(server: i64, last_seq: i64, holders: &[&str]) -> CommitTick {
        CommitTick {
            last_seq,
            holders: holders.iter().map(|h| (*h).to_owned()).collect(),
            server,
        }
    }

    #[test]
    fn a_tick_with_no_writer_open_settles_at_once() {
        let mut frontier = CommitFrontier::default();
        assert_eq!(frontier.settled_on(SERVER), None);
        frontier.observe(tick(10, &[]), Instant::now());
        assert_eq!(frontier.settled_on(SERVER), Some(10));
    }

    #[test]
    fn a_tick_settles_once_its_writers_have_ended() {
        let mut frontier = CommitFrontier::default();
        let now = Instant::now();
        frontier.observe(tick(10, &["3/1", "4/7"]), now);
        assert_eq!(frontier.settled_on(SERVER), None);
        // 3/1 ended, 4/7 is still open: the tick waits.
        frontier.observe(tick(20, &["4/7", "5/2"]), now);
        assert_eq!(frontier.settled_on(SERVER), None);
        // 4/7 ended: the first tick settles; the second waits for 5/2.
        frontier.observe(tick(30, &["5/2"]), now);
        assert_eq!(frontier.settled_on(SERVER), Some(10));
        frontier.observe(tick(40, &["6/1"]), now);
        assert_eq!(frontier.settled_on(SERVER), Some(30));
    }

    #[test]
    fn a_long_writer_holds_the_frontier_and_a_full_queue_keeps_only_the_newest() {
        let mut frontier = CommitFrontier::default();
        let now = Instant::now();
        frontier.observe(tick(5, &[]), now);
        for n in 0..(MAX_PENDING as i64 + 10) {
            frontier.observe(tick(100 + n, &["1/1", &format!("9/{n}")]), now);
        }
        assert_eq!(frontier.settled_on(SERVER), Some(5));
        assert_eq!(frontier.pending.len(), MAX_PENDING);
        // The long writer ends: every tick it held back settles, the newest
        // included.
        frontier.observe(tick(500, &["8/8"]), now);
        assert_eq!(frontier.settled_on(SERVER), Some(100 + MAX_PENDING as i64 + 9));
    }

    #[test]
    fn ticks_are_due_once_per_interval() {
        let mut frontier = CommitFrontier::default();
        let now = Instant::now();
        assert!(frontier.tick_due(now));
        frontier.observe(tick(1, &[]), now);
        assert!(!frontier.tick_due(now));
        assert!(frontier.tick_due(now + TICK_INTERVAL));
    }

    #[test]
    fn a_tick_of_another_server_starts_the_frontier_again() {
        let mut frontier = CommitFrontier::default();
        let now = Instant::now();
        frontier.observe(tick(1_000, &[]), now);
        assert_eq!(frontier.settled_on(SERVER), Some(1_000));
        // A claim on a promoted standby is given nothing the old primary's
        // ticks said.
        assert_eq!(frontier.settled_on(SERVER + 1), None);
        frontier.observe(tick_on(SERVER + 1, 990, &["3/9"]), now);
        assert_eq!(frontier.settled_on(SERVER), None);
        assert_eq!(frontier.settled_on(SERVER + 1), None);
        frontier.observe(tick_on(SERVER + 1, 995, &[]), now);
        assert_eq!(frontier.settled_on(SERVER + 1), Some(995));
    }
}
