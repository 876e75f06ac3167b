//! The published pruner (run by the relay): moves published
//! `outbox_events` rows older than [`RelayConfig::retention`] into the
//! event log ([`RelayConfig::event_log`], on by default; see
//! [`crate::event_log`]) or, without the log, deletes them; oldest first,
//! [`RelayConfig::prune_batch`] a statement, every
//! [`RelayConfig::prune_interval`]. Without the log and with retention 0
//! the relay deletes rows as it marks them published; what is left
//! published then is kept unroutable rows (see
//! [`RelayConfig::strict_routing`]), pruned after
//! [`UNROUTABLE_RETENTION_WITHOUT_HISTORY`].

use std::time::Duration;

use diesel::PgConnection;

use super::{MaintenanceService, Step, batch_limit};
use crate::RelayConfig;
use crate::error::Result;
use crate::metrics as m;
use crate::relay::store;

/// How long unroutable rows are kept when published rows are not
/// (retention 0).
pub(crate) const UNROUTABLE_RETENTION_WITHOUT_HISTORY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Deletes published rows past the relay's retention.
#[derive(Debug)]
pub(crate) struct PublishedPruner {
    retention: Duration,
    batch: usize,
    period: Duration,
    /// Move into the event log instead of deleting.
    to_log: bool,
}

impl PublishedPruner {
    /// The pruner of a relay configured with `config`.
    pub(crate) fn new(config: &RelayConfig) -> Self {
        let retention = if config.retention.is_zero() && !config.event_log {
            UNROUTABLE_RETENTION_WITHOUT_HISTORY
        } else {
            config.retention
        };
        Self {
            retention,
            batch: config.prune_batch,
            period: config.prune_interval,
            to_log: config.event_log,
        }
    }
}

impl MaintenanceService for PublishedPruner {
    const NAME: &'static str = "published_pruner";
    const ROWS_TOTAL: Option<&'static str> = Some(m::PRUNED_TOTAL);

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        let (older_than, batch) = (self.retention.as_secs_f64(), batch_limit(self.batch));
        let deleted = if self.to_log {
            crate::event_log::move_published(conn, older_than, batch)?
        } else {
            store::prune_published(conn, older_than, batch)?
        };
        Ok(Step::batch(deleted, self.batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_zero_keeps_unroutable_rows_a_week() {
        let pruner = PublishedPruner::new(&RelayConfig {
            retention: Duration::ZERO,
            event_log: false,
            ..RelayConfig::default()
        });
        assert_eq!(pruner.retention, UNROUTABLE_RETENTION_WITHOUT_HISTORY);
        let pruner = PublishedPruner::new(&RelayConfig {
            retention: Duration::from_secs(3600),
            ..RelayConfig::default()
        });
        assert_eq!(pruner.retention, Duration::from_secs(3600));
    }
}
