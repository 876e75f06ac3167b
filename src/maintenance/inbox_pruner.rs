//! The inbox pruner (run by the worker): deletes `processed_events` rows
//! older than [`WorkerConfig::inbox_retention`] (default 7 days),
//! [`PRUNE_BATCH`](super::PRUNE_BATCH) a statement, every
//! [`WorkerConfig::prune_interval`] (default 10 minutes; `None` turns the
//! worker's pruning off).
//!
//! An inbox row is what makes a second delivery of an event a no-op, so it
//! must outlive every way an event arrives twice: the relay publishing
//! again after a lost confirm or a crash (within its retries, minutes),
//! redeliveries after a worker crash, the listener's own retry delays (at
//! most 24 h each), and `outbox replay` of stored events, which sends
//! events as old as the relay's retention again (keep the inbox retention
//! at least [`RelayConfig::retention`](crate::RelayConfig::retention), 7
//! days by default, for replays to stay deduplicated).
//!
//! [`WorkerConfig::inbox_retention`]: crate::WorkerConfig::inbox_retention
//! [`WorkerConfig::prune_interval`]: crate::WorkerConfig::prune_interval

use diesel::PgConnection;

use super::{AgePruner, AgedRows, delete_older_than};
use crate::error::Result;
use crate::metrics as m;

/// The inbox's rows, dated by when their effect committed.
#[derive(Debug)]
pub(crate) struct Inbox;

impl AgedRows for Inbox {
    const PRUNER: &'static str = "inbox_pruner";
    const TABLE: &'static str = "processed_events";
    const DATED_BY: &'static str = "processed_at";
    const PRUNED_TOTAL: &'static str = m::INBOX_PRUNED_TOTAL;
}

/// Deletes inbox rows past the worker's inbox retention.
pub(crate) type InboxPruner = AgePruner<Inbox>;

/// Deletes inbox rows older than `older_than_hours`, at most `batch` of
/// them, and returns how many. Keep rows for longer than a message can
/// take to arrive twice (the relay's retries plus the listeners' retry
/// delays, and `outbox replay` within the relay's retention); a week is
/// plenty. Call it repeatedly until it returns less than `batch`. A
/// worker runs this on a schedule ([`WorkerConfig::prune_interval`],
/// [`WorkerConfig::inbox_retention`]); call it yourself where workers do
/// not prune.
///
/// [`WorkerConfig::prune_interval`]: crate::WorkerConfig::prune_interval
/// [`WorkerConfig::inbox_retention`]: crate::WorkerConfig::inbox_retention
pub fn prune(conn: &mut PgConnection, older_than_hours: f64, batch: i64) -> Result<usize> {
    delete_older_than::<Inbox>(conn, older_than_hours * 3600.0, batch)
}
