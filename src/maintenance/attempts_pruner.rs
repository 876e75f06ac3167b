//! The attempts pruner (run by the worker): deletes `listener_attempts`
//! rows not touched for [`WorkerConfig::attempts_retention`] (default 7
//! days), [`PRUNE_BATCH`](super::PRUNE_BATCH) a statement, every
//! [`WorkerConfig::prune_interval`] (default 10 minutes; `None` turns the
//! worker's pruning off).
//!
//! A row counts an event's failed tries while it is being retried; the
//! worker deletes it when the event succeeds or fails for good. Rows stay
//! behind only for messages that never came back (purged from their queues
//! by hand, or a queue deleted). A row being retried is touched at every
//! failed try, so the retention must be longer than any listener's longest
//! retry delay plus its timeout ([`Worker::new`](crate::Worker::new)
//! refuses less), or a retried event would find its count gone and get its
//! tries again.
//!
//! [`WorkerConfig::attempts_retention`]: crate::WorkerConfig::attempts_retention
//! [`WorkerConfig::prune_interval`]: crate::WorkerConfig::prune_interval

use diesel::PgConnection;

use super::{AgePruner, AgedRows, delete_older_than};
use crate::error::Result;
use crate::metrics as m;

/// Attempt counts, dated by their last failed try.
#[derive(Debug)]
pub(crate) struct Attempts;

impl AgedRows for Attempts {
    const PRUNER: &'static str = "attempts_pruner";
    const TABLE: &'static str = "listener_attempts";
    const DATED_BY: &'static str = "updated_at";
    const PRUNED_TOTAL: &'static str = m::ATTEMPTS_PRUNED_TOTAL;
}

/// Deletes attempt counts past the worker's attempts retention.
pub(crate) type AttemptsPruner = AgePruner<Attempts>;

/// Deletes attempt counts not touched for `older_than_hours` (left behind
/// by messages purged from their queues by hand), at most `batch`, and
/// returns how many. A worker runs this on a schedule
/// ([`WorkerConfig::prune_interval`](crate::WorkerConfig::prune_interval),
/// [`WorkerConfig::attempts_retention`](crate::WorkerConfig::attempts_retention)).
pub fn prune_attempts(conn: &mut PgConnection, older_than_hours: f64, batch: i64) -> Result<usize> {
    delete_older_than::<Attempts>(conn, older_than_hours * 3600.0, batch)
}
