//! The lease cleaner (run by the relay): deletes `outbox_leases` rows that
//! expired more than a minute ago, every
//! [`RelayConfig::prune_interval`]. A relay gives its leases back when it
//! stops; the leases of one that died, froze past its lease or lost the
//! database stay behind. Expired leases hold nothing (their rows are
//! claimable again), so this only keeps the table small; live leases are
//! never touched.

use std::time::Duration;

use diesel::PgConnection;

use super::{MaintenanceService, Step};
use crate::RelayConfig;
use crate::error::Result;
use crate::metrics as m;
use crate::relay::store;

/// Deletes leases of relays that died.
#[derive(Debug)]
pub(crate) struct LeaseCleaner {
    period: Duration,
}

impl LeaseCleaner {
    /// The cleaner of a relay configured with `config`.
    pub(crate) fn new(config: &RelayConfig) -> Self {
        Self {
            period: config.prune_interval,
        }
    }
}

impl MaintenanceService for LeaseCleaner {
    const NAME: &'static str = "lease_cleaner";
    const ROWS_TOTAL: Option<&'static str> = Some(m::EXPIRED_LEASES_DELETED_TOTAL);

    fn period(&self) -> Duration {
        self.period
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        // One lease row per claimed batch of a dead relay: few rows, one
        // statement.
        Ok(Step::done(store::delete_expired_leases(conn)?))
    }
}
