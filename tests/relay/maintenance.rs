//! The relay's maintenance schedule (`src/maintenance/`): the published
//! pruner and the lease cleaner run every `prune_interval` while the relay
//! runs, delete what is past its time, keep the rest, and stop with the
//! relay.

use std::time::Duration;

use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::testing::TestExchange;

use crate::support::{RunningRelay, count, eventually, record_ticks, relay_config};

const LIMIT: Duration = Duration::from_secs(20);
const PERIOD: Duration = Duration::from_millis(50);

fn execute(conn: &mut PgConnection, sql: &str) {
    diesel::sql_query(sql).execute(conn).expect(sql);
}

fn count_of(conn: &mut PgConnection, aggregate: &str) -> i64 {
    count(
        conn,
        &format!("SELECT count(*) AS n FROM outbox_events WHERE aggregate_id = '{aggregate}'"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_prunes_old_published_rows_and_dead_leases_on_its_schedule_and_stops_with_it() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_ticks(&mut conn, "old", 0..4);
    record_ticks(&mut conn, "fresh", 0..3);
    execute(
        &mut conn,
        "UPDATE outbox_events SET published_at = now() - interval '2 hours' WHERE aggregate_id = 'old'",
    );
    execute(
        &mut conn,
        "UPDATE outbox_events SET published_at = now() WHERE aggregate_id = 'fresh'",
    );
    // A dead relay's lease (expired two minutes ago) and another relay's
    // live one (holding no rows).
    execute(
        &mut conn,
        "INSERT INTO outbox_leases (owner, expires_at, seqs) VALUES
             ('dead relay', now() - interval '2 minutes', '{}'),
             ('live relay', now() + interval '1 hour', '{}')",
    );
    let relay = RunningRelay::start(outbox::RelayConfig {
        retention: Duration::from_secs(3600),
        prune_interval: PERIOD,
        ..relay_config(&db, &broker)
    });
    eventually("old published rows pruned", LIMIT, || {
        count_of(&mut conn, "old") == 0
    })
    .await;
    eventually("the dead relay's lease deleted", LIMIT, || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_leases WHERE owner = 'dead relay'",
        ) == 0
    })
    .await;
    assert_eq!(count_of(&mut conn, "fresh"), 3, "rows within retention are kept");
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_leases WHERE owner = 'live relay'"
        ),
        1,
        "live leases are never touched"
    );
    relay.stop().await;

    // Stopped with the relay: rows past retention now stay, however many
    // periods go by.
    execute(
        &mut conn,
        "UPDATE outbox_events SET published_at = now() - interval '2 hours' WHERE aggregate_id = 'fresh'",
    );
    tokio::time::sleep(PERIOD * 20).await;
    assert_eq!(
        count_of(&mut conn, "fresh"),
        3,
        "no pruning after the relay stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_retention_zero_the_pruner_keeps_unroutable_rows_a_week() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_ticks(&mut conn, "week_old", 0..2);
    record_ticks(&mut conn, "day_old", 0..2);
    execute(
        &mut conn,
        "UPDATE outbox_events SET published_at = now() - interval '8 days', unroutable_at = now() - interval '8 days'
         WHERE aggregate_id = 'week_old'",
    );
    execute(
        &mut conn,
        "UPDATE outbox_events SET published_at = now() - interval '1 day', unroutable_at = now() - interval '1 day'
         WHERE aggregate_id = 'day_old'",
    );
    let relay = RunningRelay::start(outbox::RelayConfig {
        retention: Duration::ZERO,
        // Deleted on publish: the mode without the event log.
        event_log: false,
        prune_interval: PERIOD,
        ..relay_config(&db, &broker)
    });
    eventually("unroutable rows over a week old pruned", LIMIT, || {
        count_of(&mut conn, "week_old") == 0
    })
    .await;
    relay.stop().await;
    assert_eq!(
        count_of(&mut conn, "day_old"),
        2,
        "unroutable rows are kept a week for replay"
    );
}
