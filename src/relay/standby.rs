//! The phantom guard ([`RelayConfig::wait_for_standby`]): publish only
//! rows that a streaming standby already has.
//!
//! With asynchronous replication a primary that dies can take its last
//! commits with it: the standby promoted in its place never saw them.
//! Atomicity holds (an event is lost together with its domain write), but
//! a relay may already have published such an event: listeners then act
//! on something the surviving database says never happened (a phantom).
//!
//! With the guard on, the claim commits synchronously (locally): every
//! claimed row's transaction committed before the claim's snapshot, so its
//! commit record lies before the claim's own, which is flushed when the
//! claim returns, whatever `synchronous_commit` the writers used. The
//! relay then reads the primary's flushed WAL position
//! (`pg_current_wal_flush_lsn()`) and waits until some standby's
//! `pg_stat_replication.flush_lsn` has reached it before publishing the
//! batch. A standby that flushed that far holds every claimed row; promote
//! the most advanced standby (the usual practice) and no published event
//! is missing from it. What it costs: one replication round trip per
//! claimed batch (measured in `examples/chom/tests/cluster`, README), and publishing
//! stops while no standby keeps up (the batch is given back after the
//! wait, claimed again later), which is the point. Synchronous
//! replication (`synchronous_commit = remote_write` or `on` with
//! `synchronous_standby_names`) gives the same without the guard, at a
//! cost to every writer instead.
//!
//! [`RelayConfig::wait_for_standby`]: crate::RelayConfig::wait_for_standby

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::error::{Error, Result};

#[derive(QueryableByName)]
struct Lsn {
    #[diesel(sql_type = Text)]
    lsn: String,
}

#[derive(QueryableByName)]
struct Standbys {
    #[diesel(sql_type = BigInt)]
    connected: i64,
    #[diesel(sql_type = BigInt)]
    hidden: i64,
    #[diesel(sql_type = BigInt)]
    flushed: i64,
}

/// Waits until a standby has flushed the WAL up to the primary's flushed
/// position now, polling `pg_stat_replication` (1 ms, doubling to 4 ms)
/// for at most `limit`. Returns how long it waited.
pub(crate) fn wait_until_flushed(conn: &mut PgConnection, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let lsn = diesel::sql_query("SELECT pg_current_wal_flush_lsn()::text AS lsn")
        .get_result::<Lsn>(conn)?
        .lsn;
    let mut pause = Duration::from_millis(1);
    loop {
        let standbys = diesel::sql_query(
            "SELECT count(*) AS connected,
                    count(*) FILTER (WHERE flush_lsn IS NULL) AS hidden,
                    count(*) FILTER (WHERE flush_lsn >= $1::pg_lsn) AS flushed
             FROM pg_stat_replication",
        )
        .bind::<Text, _>(&lsn)
        .get_result::<Standbys>(conn)?;
        if standbys.flushed > 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= limit {
            let why = if standbys.connected == 0 {
                "no standby is connected to this primary".to_owned()
            } else if standbys.hidden == standbys.connected {
                "pg_stat_replication hides the standbys' positions from this role (grant it pg_monitor)"
                    .to_owned()
            } else {
                format!(
                    "no standby of {} had flushed WAL position {lsn}",
                    standbys.connected
                )
            };
            return Err(Error::StandbyNotFlushed(format!(
                "{why} within {limit:?}; the batch is given back unpublished"
            )));
        }
        std::thread::sleep(pause.min(limit.saturating_sub(started.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(4));
    }
}
