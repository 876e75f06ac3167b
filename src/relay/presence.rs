//! Relays alive (`outbox_relays`): each relay upserts its row when it
//! starts and every [`PRESENCE_INTERVAL`] after (the relay heartbeat
//! service, `src/maintenance/relay_heartbeat.rs`), and deletes it when it
//! stops. [`relays`] joins the rows with the leases each relay holds, for
//! the dashboard's overview.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz};

use crate::error::Result;

/// How often a relay refreshes its row.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(5);
/// A relay whose row is older than this many intervals is shown as gone.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Rows of relays gone for this long are deleted by the heartbeat of any
/// live relay.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// A relay as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, QueryableByName, serde::Serialize)]
pub struct RelayPresence {
    /// The relay's id (`--relay-id`, default host and pid).
    #[diesel(sql_type = Text)]
    pub relay_id: String,
    /// Host it runs on (`None` for a holder of leases that keeps no row,
    /// a relay of an earlier release).
    #[diesel(sql_type = Nullable<Text>)]
    pub hostname: Option<String>,
    /// Its process id.
    #[diesel(sql_type = Nullable<Integer>)]
    pub pid: Option<i32>,
    /// The library version it runs.
    #[diesel(sql_type = Nullable<Text>)]
    pub version: Option<String>,
    /// When it started.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub started_at: Option<DateTime<Utc>>,
    /// Its last heartbeat.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// Heartbeat within [`MISSED_HEARTBEATS`] intervals, or holding a live
    /// lease.
    #[diesel(sql_type = Bool)]
    pub alive: bool,
    /// Live leases it holds (one per claimed batch in flight).
    #[diesel(sql_type = BigInt)]
    pub leases: i64,
    /// Rows under those leases.
    #[diesel(sql_type = BigInt)]
    pub leased_rows: i64,
}

/// Every relay with a row or a live lease, by id.
pub fn relays(conn: &mut PgConnection) -> Result<Vec<RelayPresence>> {
    let stale = PRESENCE_INTERVAL.as_secs_f64() * f64::from(MISSED_HEARTBEATS);
    Ok(diesel::sql_query(
        "WITH held AS (
             SELECT owner, count(*) AS leases, COALESCE(sum(cardinality(seqs)), 0)::bigint AS leased_rows
             FROM outbox_leases WHERE expires_at > now() GROUP BY owner
         )
         SELECT COALESCE(r.relay_id, h.owner) AS relay_id, r.hostname, r.pid, r.version,
                r.started_at, r.heartbeat_at,
                (COALESCE(r.heartbeat_at > now() - make_interval(secs => $1), FALSE) OR h.owner IS NOT NULL) AS alive,
                COALESCE(h.leases, 0) AS leases, COALESCE(h.leased_rows, 0) AS leased_rows
         FROM outbox_relays r FULL JOIN held h ON h.owner = r.relay_id
         ORDER BY 1",
    )
    .bind::<Double, _>(stale)
    .load(conn)?)
}

/// Upserts this relay's row and deletes rows of relays gone for
/// [`FORGET_AFTER`]. Returns how many rows of gone relays it deleted.
pub(crate) fn heartbeat(conn: &mut PgConnection, relay_id: &str, started_at: DateTime<Utc>) -> Result<usize> {
    diesel::sql_query(
        "INSERT INTO outbox_relays (relay_id, hostname, pid, version, started_at, heartbeat_at)
         VALUES ($1, $2, $3, $4, $5, now())
         ON CONFLICT (relay_id) DO UPDATE
         SET hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, version = EXCLUDED.version,
             started_at = EXCLUDED.started_at, heartbeat_at = now()",
    )
    .bind::<Text, _>(crate::text::bounded_text(relay_id, 255))
    .bind::<Text, _>(crate::text::bounded_text(&hostname(), 255))
    .bind::<Integer, _>(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
    .bind::<Text, _>(env!("CARGO_PKG_VERSION"))
    .bind::<Timestamptz, _>(started_at)
    .execute(conn)?;
    Ok(
        diesel::sql_query("DELETE FROM outbox_relays WHERE heartbeat_at < now() - make_interval(secs => $1)")
            .bind::<Double, _>(FORGET_AFTER.as_secs_f64())
            .execute(conn)?,
    )
}

/// Deletes this relay's row (it is stopping).
pub(crate) fn unregister(conn: &mut PgConnection, relay_id: &str) -> Result<usize> {
    Ok(diesel::sql_query("DELETE FROM outbox_relays WHERE relay_id = $1")
        .bind::<Text, _>(crate::text::bounded_text(relay_id, 255))
        .execute(conn)?)
}

/// The host's name, for operators telling relays apart.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
