//! The event log pruner (run by the relay when
//! [`RelayConfig::log_retention`] is set; the log is kept forever by
//! default): drops the event log's monthly partitions whose month ended
//! more than the retention ago, every [`RelayConfig::prune_interval`].
//! Dropping a partition is one statement whatever its size, and leaves no
//! dead rows behind (see [`crate::event_log`]).
//!
//! [`RelayConfig::log_retention`]: crate::RelayConfig::log_retention
//! [`RelayConfig::prune_interval`]: crate::RelayConfig::prune_interval

use std::time::Duration;

use diesel::PgConnection;

use super::{MaintenanceService, Step};
use crate::error::Result;

/// Drops event log months past the retention.
#[derive(Debug)]
pub(crate) struct EventLogPruner {
    retention: Duration,
    period: Duration,
}

impl EventLogPruner {
    /// Drops months older than `retention`, every `period`.
    pub(crate) fn new(retention: Duration, period: Duration) -> Self {
        Self { retention, period }
    }
}

impl MaintenanceService for EventLogPruner {
    const NAME: &'static str = "event_log_pruner";
    const ROWS_TOTAL: Option<&'static str> = None;

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        let dropped = crate::event_log::drop_partitions_older_than(conn, self.retention)?;
        if !dropped.is_empty() {
            tracing::info!(partitions = ?dropped, "event log months past the retention dropped");
        }
        Ok(Step::done(0))
    }
}
