//! The backlog gauges (run by the relay): reads the backlog figures
//! ([`store::backlog_stats`]) every [`RelayConfig::stats_interval`] and sets
//! `outbox_backlog`, `outbox_oldest_unpublished_age_seconds`,
//! `outbox_failed_events`, `outbox_paused` and `outbox_unroutable_events`.
//! Every relay sets the same figures (they are the table's, not the
//! relay's); the first read is at start.

use std::time::Duration;

use diesel::PgConnection;

use super::{MaintenanceService, Step};
use crate::RelayConfig;
use crate::error::Result;
use crate::metrics as m;
use crate::relay::store;

/// Refreshes the backlog gauges.
#[derive(Debug)]
pub(crate) struct BacklogGauges {
    period: Duration,
}

impl BacklogGauges {
    /// The gauges of a relay configured with `config`.
    pub(crate) fn new(config: &RelayConfig) -> Self {
        Self {
            period: config.stats_interval,
        }
    }
}

impl MaintenanceService for BacklogGauges {
    const NAME: &'static str = "backlog_gauges";
    const ROWS_TOTAL: Option<&'static str> = None;
    const RUN_AT_START: bool = true;

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        let stats = store::backlog_stats(conn)?;
        metrics::gauge!(m::BACKLOG).set(stats.backlog as f64);
        metrics::gauge!(m::OLDEST_UNPUBLISHED_AGE_SECONDS).set(stats.oldest_unpublished_age_seconds);
        metrics::gauge!(m::FAILED_EVENTS).set(stats.failed as f64);
        metrics::gauge!(m::PAUSED).set(if stats.paused { 1.0 } else { 0.0 });
        metrics::gauge!(m::UNROUTABLE_EVENTS).set(stats.unroutable as f64);
        Ok(Step::done(0))
    }
}
