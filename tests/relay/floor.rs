//! The claim floor (`src/relay/floor.rs`): claims read the backlog from
//! the floor up, so what was published below it is never walked again;
//! rows below it that are not published yet (a retry, a failed row put
//! back in line, a late commit) are still claimed, in order.

use std::time::Duration;

use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::relay::store::{self, ClaimedEvent};
use outbox::testing::TestExchange;

use crate::support::{
    OpenWriter, RunningRelay, Ticked, count, eventually, index_reads_after, record_ticks, relay_config,
};

fn seq_of(conn: &mut PgConnection, aggregate: &str, n: i64) -> i64 {
    count(
        conn,
        &format!(
            "SELECT seq AS n FROM outbox_events WHERE aggregate_id = '{aggregate}' AND (payload->>'n')::bigint = {n}"
        ),
    )
}

fn max_seq(conn: &mut PgConnection) -> i64 {
    count(conn, "SELECT max(seq) AS n FROM outbox_events")
}

/// Claims with a frontier at the last seq drawn (no writer is open in
/// these tests), as a relay whose ticks have settled does.
fn claim(conn: &mut PgConnection, batch: i64) -> Vec<ClaimedEvent> {
    let frontier = max_seq(conn);
    store::claim_batch_raising_floor(conn, "relay", &[], batch, 30.0, Some(frontier)).unwrap()
}

fn publish(conn: &mut PgConnection, rows: &[ClaimedEvent]) {
    let leased: Vec<(i64, i64)> = rows.iter().map(|row| (row.seq, row.lease_id)).collect();
    let marked = store::mark_published(conn, "relay", &leased, false).unwrap();
    assert_eq!(marked.len(), rows.len());
}

fn ticks(rows: &[ClaimedEvent], aggregate: &str) -> Vec<i64> {
    rows.iter()
        .filter(|row| row.aggregate_id == aggregate)
        .map(|row| serde_json::from_str::<Ticked>(&row.payload).unwrap().n)
        .collect()
}

#[test]
fn a_retry_below_the_floor_is_claimed_when_due_and_its_aggregate_follows_in_order() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "retried", 0..3);
    record_ticks(&mut conn, "free", 0..20);
    diesel::sql_query(
        "UPDATE outbox_events SET attempts = 1, last_error = 'nacked', next_attempt_at = now() + interval '1 hour'
         WHERE seq = (SELECT min(seq) FROM outbox_events WHERE aggregate_id = 'retried')",
    )
    .execute(&mut conn)
    .unwrap();

    // The free aggregate goes; the retried one waits behind its head.
    let first = claim(&mut conn, 100);
    assert_eq!(ticks(&first, "free"), (0..20).collect::<Vec<_>>());
    assert!(ticks(&first, "retried").is_empty());
    publish(&mut conn, &first);
    // The next claim raises the floor past everything published, and past
    // the waiting aggregate too: nothing below it is read any more.
    assert!(claim(&mut conn, 100).is_empty());
    let floor = store::claim_floor(&mut conn).unwrap();
    assert!(
        floor > max_seq(&mut conn),
        "floor {floor} should be past every row (max {})",
        max_seq(&mut conn)
    );

    // The backlog figures still count the rows below the floor.
    let stats = store::backlog_stats(&mut conn).unwrap();
    assert_eq!(
        (stats.backlog, stats.retrying, stats.failed),
        (3, 1, 0),
        "{stats:?}"
    );
    let by_type = store::backlog_by_event_type(&mut conn).unwrap();
    assert_eq!(by_type.iter().map(|t| t.backlog).sum::<i64>(), 3, "{by_type:?}");

    // The retry comes due: the head and its followers are claimed from
    // below the floor, in order.
    diesel::sql_query("UPDATE outbox_events SET next_attempt_at = now() WHERE next_attempt_at IS NOT NULL")
        .execute(&mut conn)
        .unwrap();
    let due = claim(&mut conn, 100);
    assert_eq!(ticks(&due, "retried"), vec![0, 1, 2]);

    // Only the head is published; the rest are given back. The aggregate
    // leaves the retry set, and the floor comes down to its next row.
    publish(&mut conn, &due[..1]);
    let rest: Vec<(i64, i64)> = due[1..].iter().map(|row| (row.seq, row.lease_id)).collect();
    store::release_leases(&mut conn, "relay", &rest).unwrap();
    let next = seq_of(&mut conn, "retried", 1);
    assert!(store::claim_floor(&mut conn).unwrap() <= next);
    let followers = claim(&mut conn, 100);
    assert_eq!(ticks(&followers, "retried"), vec![1, 2]);
    publish(&mut conn, &followers);
    assert!(claim(&mut conn, 100).is_empty());
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL"
        ),
        0
    );
}

#[test]
fn a_failed_row_put_back_in_line_below_the_floor_is_claimed_with_its_aggregate() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "failed", 0..2);
    record_ticks(&mut conn, "free", 0..5);
    diesel::sql_query(
        "UPDATE outbox_events SET attempts = 20, last_error = 'nacked', next_attempt_at = now(), failed_at = now()
         WHERE seq = (SELECT min(seq) FROM outbox_events WHERE aggregate_id = 'failed')",
    )
    .execute(&mut conn)
    .unwrap();
    let first = claim(&mut conn, 100);
    assert_eq!(ticks(&first, "free").len(), 5);
    publish(&mut conn, &first);
    assert!(claim(&mut conn, 100).is_empty());
    assert!(store::claim_floor(&mut conn).unwrap() > max_seq(&mut conn));

    assert_eq!(outbox::control::retry_failed_events(&mut conn).unwrap(), 1);
    assert!(store::claim_floor(&mut conn).unwrap() <= seq_of(&mut conn, "failed", 0));
    let retried = claim(&mut conn, 100);
    assert_eq!(ticks(&retried, "failed"), vec![0, 1]);
}

#[test]
fn truncating_the_outbox_with_restart_identity_resets_the_floor() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "a", 0..5);
    let rows = claim(&mut conn, 100);
    publish(&mut conn, &rows);
    assert!(claim(&mut conn, 100).is_empty());
    assert!(store::claim_floor(&mut conn).unwrap() > 5);
    // The leases go too: they name seqs that are about to be drawn again.
    diesel::sql_query("TRUNCATE outbox_events, outbox_leases RESTART IDENTITY")
        .execute(&mut conn)
        .unwrap();
    assert_eq!(store::claim_floor(&mut conn).unwrap(), 0);
    record_ticks(&mut conn, "a", 0..2);
    assert_eq!(ticks(&claim(&mut conn, 100), "a"), vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_floor_stays_below_an_open_writers_row_and_rises_once_it_commits() {
    let db = TestDatabase::create().unwrap();
    let broker = TestExchange::new().await.unwrap();
    // An open transaction holding the lowest seq.
    let open = OpenWriter::start(&db, "slow");
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "fast", 0..50);
    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(50, Duration::from_secs(20)).await;
    eventually("the fast rows marked", Duration::from_secs(10), || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NOT NULL",
        ) == 50
    })
    .await;
    // The open writer's row is invisible and holds the lowest seq: the
    // floor, whatever the claims since, has not passed it.
    let slow_seq = 1;
    assert!(store::claim_floor(&mut conn).unwrap() <= slow_seq);
    open.commit();
    broker.wait_for_distinct(51, Duration::from_secs(20)).await;
    // Once it committed and was published, the floor passes everything.
    let last = max_seq(&mut conn);
    eventually(
        "the floor past every published row",
        Duration::from_secs(10),
        || store::claim_floor(&mut conn).unwrap() > last,
    )
    .await;
    relay.stop().await;
    assert_eq!(broker.first_arrival_order("n")["slow"], vec![0]);
}

/// The point of the floor: while a snapshot pins the xmin horizon, every
/// published row stays in the indexes as an entry vacuum cannot remove. A
/// claim must not read them, whatever the others relays hold.
#[test]
fn a_claim_under_a_pinned_snapshot_reads_no_entry_of_what_was_published() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    diesel::sql_query("SET stats_fetch_consistency = none")
        .execute(&mut conn)
        .unwrap();
    let mut pinned = db.connect().unwrap();
    diesel::sql_query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut pinned)
        .unwrap();
    assert_eq!(count(&mut pinned, "SELECT count(*) AS n FROM outbox_control"), 1);

    let published = 3_000;
    outbox::testing::record_interleaved(&mut conn, 100, 0..(published / 100)).unwrap();
    loop {
        let rows = claim(&mut conn, 500);
        if rows.is_empty() {
            break;
        }
        publish(&mut conn, &rows);
        // As a relay does once a lease's rows are all marked.
        let mut leases: Vec<i64> = rows.iter().map(|row| row.lease_id).collect();
        leases.dedup();
        store::drop_leases(&mut conn, "relay", &leases).unwrap();
    }
    // Live rows on aggregates of their own, one of them leased by another
    // relay (so the claim looks its aggregate up).
    for aggregate in 0..10 {
        record_ticks(&mut conn, &format!("late-{aggregate}"), 0..1);
    }
    let frontier = max_seq(&mut conn);
    let other = store::claim_batch_raising_floor(&mut conn, "other", &[], 1, 30.0, Some(frontier)).unwrap();
    assert_eq!(other.len(), 1);

    let before = index_reads_after(&mut conn, 0);
    let rows = claim(&mut conn, 500);
    assert_eq!(rows.len(), 9, "every live row but the other relay's");
    let after = index_reads_after(&mut conn, before.0 + 1);
    let read = after.1 - before.1;
    // The 9 rows claimed, the other relay's row, their aggregates' heads:
    // a few dozen entries at most. Walking what was published reads
    // thousands.
    assert!(
        read < 200,
        "a claim read {read} index entries with {published} published rows kept by a pinned snapshot"
    );
    diesel::sql_query("ROLLBACK").execute(&mut pinned).unwrap();
}
