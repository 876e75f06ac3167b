//! The relay heartbeat (run by the relay): upserts the relay's row in
//! `outbox_relays` at start and every [`PRESENCE_INTERVAL`], so operators'
//! tools see which relays are alive, and deletes the rows of relays gone
//! for an hour (see `src/relay/presence.rs`). The relay deletes its own
//! row when it stops.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::PgConnection;

use super::{MaintenanceService, Step};
use crate::RelayConfig;
use crate::error::Result;
use crate::relay::presence::{self, PRESENCE_INTERVAL};

/// Keeps the relay's `outbox_relays` row fresh.
#[derive(Debug)]
pub(crate) struct RelayHeartbeat {
    relay_id: String,
    started_at: DateTime<Utc>,
}

impl RelayHeartbeat {
    /// The heartbeat of a relay configured with `config`, started now.
    pub(crate) fn new(config: &RelayConfig) -> Self {
        Self {
            relay_id: config.relay_id.clone(),
            started_at: Utc::now(),
        }
    }
}

impl MaintenanceService for RelayHeartbeat {
    const NAME: &'static str = "relay_heartbeat";
    const ROWS_TOTAL: Option<&'static str> = None;
    const RUN_AT_START: bool = true;

    fn period(&self) -> Duration {
        PRESENCE_INTERVAL
    }

    fn run_once(&self, conn: &mut PgConnection) -> Result<Step> {
        Ok(Step::done(presence::heartbeat(
            conn,
            &self.relay_id,
            self.started_at,
        )?))
    }
}
