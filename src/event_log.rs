//! The event log: where events live after publishing.
//!
//! A published row stays in `outbox_events` for the relay's
//! [`RelayConfig::retention`](crate::RelayConfig::retention) (7 days by
//! default); then, with [`RelayConfig::event_log`](crate::RelayConfig::event_log)
//! on (the default), the relay's published pruner moves it into
//! `outbox_event_log` instead of deleting it: deleted from one table and
//! inserted into the other in one transaction, so every committed event is
//! in exactly one of them, and a reader that looks at both under one
//! snapshot sees each once ([`aggregate_history`], [`crate::replay::select`],
//! projection rebuilds). Rows are moved in `seq`
//! order by one relay at a time (an advisory lock), so the log's
//! [`position`](LoggedEvent::position) is a global order that keeps each
//! aggregate's order.
//!
//! The log is partitioned by month of the move. It is kept forever unless
//! [`RelayConfig::log_retention`](crate::RelayConfig::log_retention) is
//! set; then whole months past it are dropped
//! ([`drop_partitions_older_than`]): no row-by-row delete, no bloat. Keep
//! it forever where projections are rebuilt from it (a rebuild can only
//! replay what the log still holds).
//!
//! Partitions are created ahead: `outbox migrate` creates this month's and
//! the next [`MONTHS_AHEAD`], and a relay moving rows creates this month's
//! and the next if missing. Creating one needs the privileges of the
//! table's owner: a relay role without them that finds a month missing logs
//! the failure, counts it in
//! `outbox_maintenance_failures_total{service="published_pruner"}` and
//! leaves the rows in `outbox_events`, nothing lost; run `outbox migrate`
//! as the owner at least every few months then.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Double, Nullable, Text};

use crate::error::{Error, Result};
use crate::relay::store::ClaimedEvent;

/// The envelope columns both `outbox_events` and `outbox_event_log` have,
/// as one literal (for `concat!`): every reader of stored events selects
/// them, and the mover copies them.
macro_rules! envelope_columns {
    () => {
        "seq, event_id, event_type, aggregate_type, aggregate_id, tenant_id, occurred_at, recorded_at, \
         actor, correlation_id, causation_id, traceparent, schema_version"
    };
}
pub(crate) use envelope_columns;

/// The advisory lock moves take turns on (`outb`, 2; see
/// [`crate::relay::store::CLAIM_LOCK`] for 1).
const MOVE_LOCK: (i32, i32) = (0x6f75_7462, 2);

/// A logged event: its log position and the stored event.
#[derive(Debug, Clone, QueryableByName)]
pub struct LoggedEvent {
    /// The position in the log (0 for an event still in `outbox_events`,
    /// read by [`history_page`]).
    #[diesel(sql_type = BigInt)]
    pub position: i64,
    /// The event as stored (`lease_id` 0, `attempts` 0).
    #[diesel(embed)]
    pub event: ClaimedEvent,
}

/// The partition holding month `(year, month)`: its name and bounds.
fn partition_of(year: i32, month: u32) -> Result<(String, DateTime<Utc>, DateTime<Utc>)> {
    let start = Utc
        .with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .ok_or_else(|| Error::Config(format!("no month {year}-{month:02}")))?;
    let (next_year, next_month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let end = Utc
        .with_ymd_and_hms(next_year, next_month, 1, 0, 0, 0)
        .single()
        .ok_or_else(|| Error::Config(format!("no month {next_year}-{next_month:02}")))?;
    Ok((format!("outbox_event_log_p{year:04}{month:02}"), start, end))
}

/// Months of partitions `outbox migrate` creates ahead (this month and the
/// next [`MONTHS_AHEAD`]): a relay role without the owner's privileges
/// finds them there.
pub const MONTHS_AHEAD: u32 = 3;

/// Creates the partitions for the month of `at` and the `ahead` months
/// after it, if missing. Returns the names it created.
pub fn ensure_partitions(conn: &mut PgConnection, at: DateTime<Utc>, ahead: u32) -> Result<Vec<String>> {
    let mut created = Vec::new();
    let (mut year, mut month) = (at.year(), at.month());
    for _ in 0..=ahead {
        let (name, start, end) = partition_of(year, month)?;
        #[derive(QueryableByName)]
        struct Exists {
            #[diesel(sql_type = Bool)]
            exists: bool,
        }
        let exists = diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS exists")
            .bind::<Text, _>(&name)
            .get_result::<Exists>(conn)?
            .exists;
        if !exists {
            // The name and bounds are made here from numbers, never input.
            diesel::sql_query(format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF outbox_event_log
                 FOR VALUES FROM ('{}') TO ('{}')",
                start.to_rfc3339(),
                end.to_rfc3339()
            ))
            .execute(conn)?;
            created.push(name);
        }
        (year, month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
    }
    Ok(created)
}

/// The log's partitions, oldest first, with the end of the month each holds.
pub fn partitions(conn: &mut PgConnection) -> Result<Vec<(String, DateTime<Utc>)>> {
    #[derive(QueryableByName)]
    struct Partition {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let names = diesel::sql_query(
        "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'outbox_event_log'::regclass ORDER BY c.relname",
    )
    .load::<Partition>(conn)?;
    let mut out = Vec::new();
    for Partition { name } in names {
        // Ours are named by month; a partition someone else attached is
        // left alone.
        let Some(stamp) = name.strip_prefix("outbox_event_log_p") else {
            continue;
        };
        let (Ok(year), Ok(month)) = (
            stamp.get(..4).unwrap_or_default().parse::<i32>(),
            stamp.get(4..).unwrap_or_default().parse::<u32>(),
        ) else {
            continue;
        };
        if let Ok((_, _, end)) = partition_of(year, month) {
            out.push((name, end));
        }
    }
    Ok(out)
}

/// Drops the partitions whose whole month ended more than `retention`
/// ago. Returns the names dropped.
pub fn drop_partitions_older_than(
    conn: &mut PgConnection,
    retention: std::time::Duration,
) -> Result<Vec<String>> {
    let cutoff = Utc::now()
        - chrono::Duration::from_std(retention)
            .map_err(|_| Error::Config(format!("log retention {retention:?} is too long")))?;
    let mut dropped = Vec::new();
    for (name, end) in partitions(conn)? {
        if end <= cutoff {
            diesel::sql_query(format!("DROP TABLE IF EXISTS {name}")).execute(conn)?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Moves up to `batch` published rows older than `older_than_secs` from
/// `outbox_events` into the log, oldest seq first, in one transaction.
/// Returns how many; 0 also when another relay is moving right now.
pub fn move_published(conn: &mut PgConnection, older_than_secs: f64, batch: i64) -> Result<usize> {
    #[derive(QueryableByName)]
    struct Waiting {
        #[diesel(sql_type = Bool)]
        waiting: bool,
    }
    let waiting = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM outbox_events
                        WHERE published_at IS NOT NULL
                          AND published_at < now() - make_interval(secs => $1)) AS waiting",
    )
    .bind::<Double, _>(older_than_secs)
    .get_result::<Waiting>(conn)?
    .waiting;
    if !waiting {
        return Ok(0);
    }
    conn.transaction::<usize, Error, _>(|conn| {
        #[derive(QueryableByName)]
        struct Locked {
            #[diesel(sql_type = Bool)]
            locked: bool,
        }
        let locked = diesel::sql_query("SELECT pg_try_advisory_xact_lock($1, $2) AS locked")
            .bind::<diesel::sql_types::Integer, _>(MOVE_LOCK.0)
            .bind::<diesel::sql_types::Integer, _>(MOVE_LOCK.1)
            .get_result::<Locked>(conn)?
            .locked;
        if !locked {
            return Ok(0);
        }
        ensure_partitions(conn, Utc::now(), 1)?;
        Ok(diesel::sql_query(concat!(
            "WITH moved AS (
                 DELETE FROM outbox_events WHERE seq IN (
                     SELECT seq FROM outbox_events
                     WHERE published_at IS NOT NULL
                       AND published_at < now() - make_interval(secs => $1)
                     ORDER BY seq
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING *)
             INSERT INTO outbox_event_log (",
            envelope_columns!(),
            ", payload, published_at)
             SELECT ",
            envelope_columns!(),
            ", payload, published_at FROM moved ORDER BY seq"
        ))
        .bind::<Double, _>(older_than_secs)
        .bind::<BigInt, _>(batch)
        .execute(conn)?)
    })
}

/// The columns of a [`LoggedEvent`] read from the log.
const LOG_COLUMNS: &str = concat!(
    "position, ",
    envelope_columns!(),
    ", payload::text AS payload, 0 AS attempts, 0::bigint AS lease_id"
);

/// The same columns of an event still in `outbox_events` (no position yet).
const UNLOGGED_COLUMNS: &str = concat!(
    "0::bigint AS position, ",
    envelope_columns!(),
    ", payload::text AS payload, 0 AS attempts, 0::bigint AS lease_id"
);

/// Up to `limit` logged events after `position`, in log order; only those
/// of `event_types` when given.
pub fn read_after(
    conn: &mut PgConnection,
    position: i64,
    event_types: Option<&[String]>,
    limit: i64,
) -> Result<Vec<LoggedEvent>> {
    Ok(diesel::sql_query(format!(
        "SELECT {LOG_COLUMNS} FROM outbox_event_log
         WHERE position > $1 AND ($2::text[] IS NULL OR event_type = ANY($2))
         ORDER BY position LIMIT $3"
    ))
    .bind::<BigInt, _>(position)
    .bind::<Nullable<diesel::sql_types::Array<Text>>, _>(event_types)
    .bind::<BigInt, _>(limit.max(1))
    .load(conn)?)
}

/// The highest position in the log (0 when empty).
pub fn last_position(conn: &mut PgConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct Last {
        #[diesel(sql_type = BigInt)]
        last: i64,
    }
    Ok(
        diesel::sql_query("SELECT COALESCE(max(position), 0)::bigint AS last FROM outbox_event_log")
            .get_result::<Last>(conn)?
            .last,
    )
}

/// The events of `event_types` (all when `None`) still in `outbox_events`
/// (published within the retention, or not yet published), in seq order:
/// what a reader of the whole history takes after the log, under the same
/// snapshot.
pub fn not_yet_logged(conn: &mut PgConnection, event_types: Option<&[String]>) -> Result<Vec<LoggedEvent>> {
    Ok(diesel::sql_query(format!(
        "SELECT {UNLOGGED_COLUMNS} FROM outbox_events
         WHERE ($1::text[] IS NULL OR event_type = ANY($1))
         ORDER BY seq"
    ))
    .bind::<Nullable<diesel::sql_types::Array<Text>>, _>(event_types)
    .load(conn)?)
}

/// One aggregate's whole history, in order: its logged events, then those
/// still in `outbox_events`.
pub fn aggregate_history(
    conn: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<LoggedEvent>> {
    // One statement: one snapshot, so an event moved meanwhile is read once.
    Ok(diesel::sql_query(format!(
        "SELECT * FROM (
             SELECT {LOG_COLUMNS}, 0 AS part FROM outbox_event_log
             WHERE aggregate_type = $1 AND aggregate_id = $2
             UNION ALL
             SELECT {UNLOGGED_COLUMNS}, 1 AS part FROM outbox_events
             WHERE aggregate_type = $1 AND aggregate_id = $2) h
         ORDER BY part, position, seq"
    ))
    .bind::<Text, _>(aggregate_type)
    .bind::<Text, _>(aggregate_id)
    .load(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_and_bounded_by_month() -> Result<()> {
        let (name, start, end) = partition_of(2026, 12)?;
        assert_eq!(name, "outbox_event_log_p202612");
        assert_eq!(start.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        assert_eq!(end.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert!(partition_of(2026, 13).is_err());
        Ok(())
    }
}
