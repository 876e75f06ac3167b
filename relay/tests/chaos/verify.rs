//! The verdict, from the database: what committed, what each listener
//! applied, what failed, and who marked what.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Jsonb, Text, Uuid as SqlUuid};
use uuid::Uuid;

use outbox::testing::{DeliveryReport, RunRecord};
pub use outbox::testing::{count, try_count};

use crate::listeners::{AUDIT, ORDERED, fate};
use crate::writers::WriterLog;

/// Logs every row a relay marks published, with the marking session's
/// application_name (`outbox relay <relay id>`).
pub fn install_mark_log(conn: &mut PgConnection) {
    use diesel::connection::SimpleConnection;
    conn.batch_execute(
        "CREATE TABLE chaos_marks (seq bigint NOT NULL, marked_by text NOT NULL,
                                   at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION chaos_log_mark() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             -- now(): the marking statement's own time, the one its lease
             -- check (expires_at > now()) used.
             INSERT INTO chaos_marks (seq, marked_by, at) VALUES (NEW.seq, current_setting('application_name'), now());
             RETURN NULL;
         END $$;
         CREATE TRIGGER chaos_log_mark AFTER UPDATE OF published_at ON outbox_events
             FOR EACH ROW WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION chaos_log_mark();
         -- Rows a frozen relay held, and when each of its leases ended.
         CREATE TABLE chaos_zombie_holds (relay text NOT NULL, seq bigint NOT NULL, expires_at timestamptz NOT NULL);
         -- Rows a SIGKILLed relay held, and when it died.
         CREATE TABLE chaos_kill_holds (relay text NOT NULL, seq bigint NOT NULL, killed_at timestamptz NOT NULL);",
    )
    .expect("mark log");
}

/// Rows of `sql` (one text column `line`) for an error message.
fn lines(conn: &mut PgConnection, sql: &str) -> Vec<String> {
    try_lines(conn, sql).expect(sql)
}

fn try_lines(conn: &mut PgConnection, sql: &str) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text)]
        line: String,
    }
    Ok(diesel::sql_query(sql)
        .load::<Line>(conn)?
        .into_iter()
        .map(|l| l.line)
        .collect())
}

/// Committed events still waiting for a listener: 0 once the pipeline has
/// drained (each listener applied it, or it is in failed_jobs).
pub fn outstanding(conn: &mut PgConnection) -> QueryResult<i64> {
    try_count(
        conn,
        &format!(
            "SELECT (SELECT count(*) FROM outbox_events WHERE published_at IS NULL)
                  + (SELECT count(*) FROM outbox_events e WHERE NOT EXISTS
                       (SELECT 1 FROM chaos_effects f WHERE f.listener = '{ORDERED}' AND f.event_id = e.event_id))
                  + (SELECT count(*) FROM outbox_events e WHERE NOT EXISTS
                       (SELECT 1 FROM chaos_effects f WHERE f.listener = '{AUDIT}' AND f.event_id = e.event_id)
                     AND NOT EXISTS (SELECT 1 FROM failed_jobs j WHERE j.listener = '{AUDIT}' AND j.event_id = e.event_id))
               AS n"
        ),
    )
}

/// Where the outstanding events are, for the drain's progress lines and
/// its failure message: unpublished, and missing at each listener (with
/// whether the listener's inbox has the event, which would mean the
/// effect and the inbox row disagree).
pub fn backlog(conn: &mut PgConnection) -> QueryResult<String> {
    let missing = |listener: &str, failed_ok: bool| {
        format!(
            "(SELECT count(*) FROM outbox_events e WHERE NOT EXISTS
                (SELECT 1 FROM chaos_effects f WHERE f.listener = '{listener}' AND f.event_id = e.event_id){})",
            if failed_ok {
                format!(" AND NOT EXISTS (SELECT 1 FROM failed_jobs j WHERE j.listener = '{listener}' AND j.event_id = e.event_id)")
            } else {
                String::new()
            }
        )
    };
    let unpublished = try_count(
        conn,
        "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
    )?;
    let ordered = try_count(conn, &format!("SELECT {} AS n", missing(ORDERED, false)))?;
    let audit = try_count(conn, &format!("SELECT {} AS n", missing(AUDIT, true)))?;
    let ids = try_lines(
        conn,
        &format!(
            "SELECT e.seq || ' ' || e.event_id || ' ' || e.aggregate_id || '/' || (e.payload->>'n') ||
                    CASE WHEN NOT EXISTS (SELECT 1 FROM chaos_effects f WHERE f.listener = '{ORDERED}' AND f.event_id = e.event_id)
                         THEN ' ordered' ELSE '' END ||
                    CASE WHEN NOT EXISTS (SELECT 1 FROM chaos_effects f WHERE f.listener = '{AUDIT}' AND f.event_id = e.event_id)
                          AND NOT EXISTS (SELECT 1 FROM failed_jobs j WHERE j.listener = '{AUDIT}' AND j.event_id = e.event_id)
                         THEN ' audit' ELSE '' END AS line
             FROM outbox_events e
             WHERE NOT EXISTS (SELECT 1 FROM chaos_effects f WHERE f.listener = '{ORDERED}' AND f.event_id = e.event_id)
                OR (NOT EXISTS (SELECT 1 FROM chaos_effects f WHERE f.listener = '{AUDIT}' AND f.event_id = e.event_id)
                    AND NOT EXISTS (SELECT 1 FROM failed_jobs j WHERE j.listener = '{AUDIT}' AND j.event_id = e.event_id))
             ORDER BY e.seq LIMIT 10"
        ),
    )?;
    // A failed job of the ordered listener is outstanding for good.
    let ordered_failed = try_lines(
        conn,
        &format!(
            "SELECT coalesce(event_id::text, '?') || ': ' || left(errors::text, 300) AS line FROM failed_jobs
             WHERE listener = '{ORDERED}' ORDER BY id LIMIT 3"
        ),
    )?;
    Ok(format!(
        "{unpublished} unpublished, {ordered} missing at {ORDERED}, {audit} at {AUDIT}; first: [{}]; failed jobs of {ORDERED}: [{}]",
        ids.join("; "),
        ordered_failed.join("; ")
    ))
}

/// What the run counted, for the report.
#[derive(Debug, Default)]
pub struct Figures {
    pub committed: usize,
    pub in_doubt_committed: usize,
    pub permanent_failures: usize,
    pub transient_retried: usize,
}

#[derive(QueryableByName)]
struct Committed {
    #[diesel(sql_type = SqlUuid)]
    event_id: Uuid,
    #[diesel(sql_type = Text)]
    aggregate: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Every committed event with its aggregate and tick, in commit order.
fn committed_events(conn: &mut PgConnection) -> QueryResult<Vec<Committed>> {
    diesel::sql_query(
        "SELECT event_id, aggregate_id AS aggregate, (payload->>'n')::bigint AS n FROM outbox_events ORDER BY seq",
    )
    .load(conn)
}

#[derive(QueryableByName)]
struct FailedJob {
    #[diesel(sql_type = Text)]
    listener: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<SqlUuid>)]
    event_id: Option<Uuid>,
    #[diesel(sql_type = Jsonb)]
    errors: serde_json::Value,
}

/// Every promise of the run, checked against the database. Panics with
/// the first broken one.
pub fn verify(conn: &mut PgConnection, seed: u64, writers: &[WriterLog]) -> Figures {
    let mut figures = Figures::default();
    let committed = committed_events(conn).expect("committed events");
    figures.committed = committed.len();
    let committed_ids: HashSet<Uuid> = committed.iter().map(|c| c.event_id).collect();

    // What the writers know agrees with what committed.
    for log in writers {
        for id in &log.committed {
            assert!(
                committed_ids.contains(id),
                "event {id} was committed but is not in the outbox"
            );
        }
        for id in log.rolled_back.iter().chain(&log.killed) {
            assert!(
                !committed_ids.contains(id),
                "event {id} of a rolled-back or killed transaction is in the outbox"
            );
        }
        figures.in_doubt_committed += log
            .in_doubt
            .iter()
            .filter(|id| committed_ids.contains(id))
            .count();
    }
    // The domain write and its events committed together: each counter's
    // ticks are exactly 1..=n.
    let broken = lines(
        conn,
        "SELECT c.aggregate || ': counter ' || c.n || ', events ' || count(e.seq) || ', distinct ticks ' || count(DISTINCT (e.payload->>'n')) AS line
           FROM chaos_counters c LEFT JOIN outbox_events e ON e.aggregate_id = c.aggregate
          GROUP BY c.aggregate, c.n
         HAVING count(e.seq) <> c.n OR count(DISTINCT (e.payload->>'n')) <> c.n
             OR coalesce(max((e.payload->>'n')::bigint), 0) <> c.n
          LIMIT 5",
    );
    assert!(broken.is_empty(), "domain rows and events disagree: {broken:?}");

    // Every committed event was published, none given up on.
    assert_eq!(
        count(
            conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL OR failed_at IS NOT NULL"
        ),
        0,
        "committed events left unpublished or failed at the relay"
    );

    // Effects belong to committed events, and none happened twice.
    let stray = count(
        conn,
        "SELECT count(*) AS n FROM chaos_effects f WHERE NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.event_id = f.event_id)",
    );
    assert_eq!(stray, 0, "effects of events that never committed");
    let doubled = lines(
        conn,
        "SELECT listener || ' ' || event_id || ' x' || count(*) AS line FROM chaos_effects
          GROUP BY listener, event_id HAVING count(*) > 1 LIMIT 5",
    );
    assert!(doubled.is_empty(), "effects applied twice: {doubled:?}");

    // The ordered listener applied every event, each aggregate in order.
    let effects = |conn: &mut PgConnection, listener: &str| -> HashSet<Uuid> {
        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = SqlUuid)]
            event_id: Uuid,
        }
        diesel::sql_query("SELECT event_id FROM chaos_effects WHERE listener = $1")
            .bind::<Text, _>(listener)
            .load::<Id>(conn)
            .expect("effects")
            .into_iter()
            .map(|r| r.event_id)
            .collect()
    };
    let ordered = effects(conn, ORDERED);
    let missing = committed
        .iter()
        .filter(|c| !ordered.contains(&c.event_id))
        .count();
    assert_eq!(missing, 0, "committed events the ordered listener never applied");
    let out_of_order = lines(
        conn,
        &format!(
            "SELECT aggregate || ': ' || prev || ' then ' || n AS line FROM (
                 SELECT aggregate, n, lag(n) OVER (PARTITION BY aggregate ORDER BY id) AS prev
                   FROM chaos_effects WHERE listener = '{ORDERED}') x
              WHERE n <= prev LIMIT 5"
        ),
    );
    assert!(
        out_of_order.is_empty(),
        "ordered listener out of order: {out_of_order:?}"
    );

    // The audit listener: each permanent failure once in failed_jobs with
    // every try's error; every other event applied (transient failures
    // retried away).
    let audit = effects(conn, AUDIT);
    let jobs: Vec<FailedJob> = diesel::sql_query("SELECT listener, event_id, errors FROM failed_jobs")
        .load(conn)
        .expect("failed jobs");
    let mut failed: HashMap<Uuid, Vec<&FailedJob>> = HashMap::new();
    for job in &jobs {
        assert_eq!(
            job.listener, AUDIT,
            "a failed job of {}: {:?}",
            job.listener, job.errors
        );
        let id = job
            .event_id
            .expect("failed jobs of chaos events name their event");
        failed.entry(id).or_default().push(job);
    }
    for event in &committed {
        let fate = fate(seed, &event.aggregate, event.n);
        let jobs = failed.get(&event.event_id).map_or(&[][..], Vec::as_slice);
        if fate.permanent {
            figures.permanent_failures += 1;
            assert_eq!(
                jobs.len(),
                1,
                "permanent failure of {} in failed_jobs {} times",
                event.event_id,
                jobs.len()
            );
            let tries = jobs[0].errors.as_array().map_or(0, Vec::len);
            assert_eq!(
                tries as u32,
                fate.transient_failures + 1,
                "failed job of {} keeps {tries} errors, expected every try's: {}",
                event.event_id,
                jobs[0].errors
            );
            assert!(
                !audit.contains(&event.event_id),
                "a permanently failing event was applied"
            );
        } else {
            if fate.transient_failures > 0 {
                figures.transient_retried += 1;
            }
            assert!(
                jobs.is_empty(),
                "event {} with only transient failures ended in failed_jobs: {:?}",
                event.event_id,
                jobs[0].errors
            );
            assert!(
                audit.contains(&event.event_id),
                "audit never applied {}",
                event.event_id
            );
        }
    }

    // No zombie relay marked a row it held once that row's lease had ended.
    // (A mark it sent just before freezing may land while the lease still
    // holds: that one is allowed.)
    let late = lines(
        conn,
        "SELECT m.seq || ' by ' || m.marked_by || ' at ' || m.at || ', lease ended ' || h.expires_at AS line
           FROM chaos_marks m
           JOIN chaos_zombie_holds h ON h.seq = m.seq AND m.marked_by = 'outbox relay ' || h.relay
          WHERE m.at >= h.expires_at
          LIMIT 5",
    );
    assert!(
        late.is_empty(),
        "a zombie relay marked rows after its lease ended: {late:?}"
    );
    figures
}

/// How fast the rows of SIGKILLed relays were published by another.
pub struct Takeover {
    /// Rows the killed relays held.
    pub rows: i64,
    /// The longest from a relay's death to one of its rows' mark, seconds.
    pub worst_seconds: f64,
}

/// Measures [`Takeover`] from the mark log.
pub fn takeover_after_kills(conn: &mut PgConnection) -> Takeover {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        rows: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        worst: f64,
    }
    let row: Row = diesel::sql_query(
        "SELECT count(*) AS rows,
                COALESCE(max(EXTRACT(EPOCH FROM first_mark - h.killed_at)), 0)::float8 AS worst
           FROM chaos_kill_holds h
           CROSS JOIN LATERAL (SELECT min(m.at) AS first_mark FROM chaos_marks m WHERE m.seq = h.seq) m",
    )
    .get_result(conn)
    .expect("takeover figures");
    Takeover {
        rows: row.rows,
        worst_seconds: row.worst,
    }
}

/// The Jepsen-style delivery report of each listener (see
/// `outbox::testing::DeliveryReport`), from the database and the worker
/// processes' logs in `logs` (the inbox logs each duplicate it drops).
pub fn delivery_reports(
    conn: &mut PgConnection,
    seed: u64,
    writers: &[WriterLog],
    logs: &std::path::Path,
) -> QueryResult<Vec<DeliveryReport>> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = SqlUuid)]
        event_id: Uuid,
    }
    let committed = committed_events(conn)?;
    let in_doubt: HashSet<Uuid> = writers.iter().flat_map(|w| w.in_doubt.iter().copied()).collect();
    let duplicates = logged_duplicates(logs);
    let mut reports = Vec::new();
    for listener in [ORDERED, AUDIT] {
        let applied: Vec<Uuid> =
            diesel::sql_query("SELECT event_id FROM chaos_effects WHERE listener = $1 ORDER BY id")
                .bind::<Text, _>(listener)
                .load::<Id>(conn)?
                .into_iter()
                .map(|r| r.event_id)
                .collect();
        let given_up: HashSet<Uuid> = diesel::sql_query(
            "SELECT event_id FROM failed_jobs WHERE listener = $1 AND event_id IS NOT NULL",
        )
        .bind::<Text, _>(listener)
        .load::<Id>(conn)?
        .into_iter()
        .map(|r| r.event_id)
        .collect();
        let mut recovered: HashSet<Uuid> = in_doubt.clone();
        if listener == AUDIT {
            recovered.extend(
                committed
                    .iter()
                    .filter(|e| fate(seed, &e.aggregate, e.n).transient_failures > 0)
                    .map(|e| e.event_id),
            );
        }
        // The handler ran for every effect and every given-up event; the
        // inbox dropped the logged duplicates before it.
        let mut deliveries: Vec<Uuid> = applied.iter().chain(&given_up).copied().collect();
        deliveries.extend(duplicates.get(listener).into_iter().flatten());
        let record = RunRecord {
            committed: committed
                .iter()
                .map(|e| (e.event_id, e.aggregate.clone()))
                .collect(),
            deliveries,
            applied,
            given_up,
            recovered,
            ordered: listener == ORDERED,
        };
        reports.push(DeliveryReport::check(listener, &record));
    }
    Ok(reports)
}

/// Per listener, the event id of every "duplicate delivery" line in the
/// processes' logs.
fn logged_duplicates(logs: &std::path::Path) -> HashMap<String, Vec<Uuid>> {
    let mut found: HashMap<String, Vec<Uuid>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(logs) else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines().filter(|l| l.contains("duplicate delivery:")) {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            if let (Some(listener), Some(Ok(id))) =
                (field("listener="), field("event_id=").map(|v| v.parse::<Uuid>()))
            {
                found.entry(listener).or_default().push(id);
            }
        }
    }
    found
}
