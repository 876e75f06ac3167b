//! The event log (`src/event_log.rs`): published rows past the retention
//! move from `outbox_events` into `outbox_event_log`, each once, in each
//! aggregate's order; replays and aggregate histories read both tables;
//! months past the log retention are dropped whole.

use std::time::Duration;

use chrono::{Months, Utc};
use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::replay::ReplayFilter;
use outbox::testing::TestExchange;

use crate::support::{RunningRelay, count, eventually, record_interleaved, relay_config};

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_rows_move_into_the_log_once_each_in_aggregate_order_and_stay_readable() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let recorded = record_interleaved(&mut conn, 20, 25) as i64;
    let relay = RunningRelay::start(outbox::RelayConfig {
        retention: Duration::ZERO,
        prune_interval: Duration::from_millis(50),
        prune_batch: 64,
        ..relay_config(&db, &broker)
    });
    // More while the relay publishes and moves.
    let more = record_interleaved(&mut conn, 20, 5) as i64;
    eventually("every event in the log", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM outbox_event_log") == recorded + more
    })
    .await;
    relay.stop().await;
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 0);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(DISTINCT event_id) AS n FROM outbox_event_log"
        ),
        recorded + more,
        "each event once"
    );
    // Log order keeps each aggregate's seq order.
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM (
                 SELECT seq < lag(seq) OVER (PARTITION BY aggregate_id ORDER BY position) AS back
                 FROM outbox_event_log) o WHERE back"
        ),
        0
    );
    let history = outbox::event_log::aggregate_history(&mut conn, "counter", "a3").unwrap();
    assert_eq!(history.len(), 30);
    assert!(
        history
            .windows(2)
            .all(|w| w[0].event.seq < w[1].event.seq && w[0].position < w[1].position)
    );
    let page = outbox::event_log::read_after(&mut conn, history[0].position, None, 10).unwrap();
    assert_eq!(page.len(), 10);
    assert!(page.iter().all(|e| e.position > history[0].position));
    let replayable = outbox::replay::select(
        &mut conn,
        &ReplayFilter {
            aggregate_id: Some("a3".into()),
            limit: 100,
            ..ReplayFilter::default()
        },
    )
    .unwrap();
    assert_eq!(
        replayable.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        history.iter().map(|e| e.event.event_id).collect::<Vec<_>>(),
        "replay reads the log, in order"
    );
    // The dashboard's search and timeline see logged events too.
    assert_eq!(outbox::timeline::search(&mut conn, "a3", 100).unwrap().len(), 30);
    assert_eq!(
        outbox::timeline::aggregate_timeline(&mut conn, "counter", "a3", 100)
            .unwrap()
            .len(),
        30
    );
}

#[test]
fn months_past_the_log_retention_are_dropped_whole() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let now = Utc::now();
    let old = now.checked_sub_months(Months::new(3)).unwrap();
    outbox::event_log::ensure_partitions(&mut conn, old, 1).unwrap();
    outbox::event_log::ensure_partitions(&mut conn, now, 1).unwrap();
    diesel::sql_query(
        "INSERT INTO outbox_event_log (seq, event_id, event_type, aggregate_type, aggregate_id,
             occurred_at, schema_version, payload, recorded_at, published_at, logged_at)
         VALUES (1, gen_random_uuid(), 'counter.ticked', 'counter', 'c1', $1, 1, '{}', $1, $1, $1),
                (2, gen_random_uuid(), 'counter.ticked', 'counter', 'c1', now(), 1, '{}', now(), now(), now())",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(old)
    .execute(&mut conn)
    .unwrap();
    let months = outbox::event_log::partitions(&mut conn).unwrap();
    assert!(months.len() >= 3, "{months:?}");
    let dropped =
        outbox::event_log::drop_partitions_older_than(&mut conn, Duration::from_secs(24 * 3600)).unwrap();
    assert!(!dropped.is_empty(), "the month three months ago is over");
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM outbox_event_log"),
        1,
        "this month's row kept"
    );
    assert!(
        outbox::event_log::partitions(&mut conn)
            .unwrap()
            .iter()
            .all(|(_, end)| *end > now),
        "only months not yet over are left"
    );
    // `outbox migrate` made this month and the next three.
    assert!(months.len() > outbox::event_log::MONTHS_AHEAD as usize);
}
