//! A row written with raw SQL right at the database's payload cap (1 MiB,
//! far over RabbitMQ's 128 KiB frame, so its body spans frames) is
//! delivered intact, in order within its aggregate, without holding up
//! other aggregates.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::testing::TestExchange;

use crate::support::{RunningRelay, eventually, record_ticks, relay_config, unpublished};

/// Characters of filler that put the row's payload just under the cap.
const FILLER: usize = 1_048_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payload_at_the_database_cap_is_delivered_intact_across_frames() {
    let started = Instant::now();
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_ticks(&mut conn, "before", 0..5);
    let insert = |conn: &mut PgConnection, aggregate: &str, filler: usize| {
        diesel::sql_query(
            "INSERT INTO outbox_events (event_id, event_type, aggregate_type, aggregate_id, occurred_at, payload)
             VALUES (gen_random_uuid(), 'blob.stored', 'blob', $1, now(),
                     jsonb_build_object('filler', repeat('x', $2)))",
        )
        .bind::<diesel::sql_types::Text, _>(aggregate)
        .bind::<diesel::sql_types::Integer, _>(i32::try_from(filler).unwrap())
        .execute(conn)
    };
    insert(&mut conn, "big", FILLER).expect("just under the cap is accepted");
    insert(&mut conn, "big", 1).unwrap();
    let over = insert(&mut conn, "big", FILLER + 1024).expect_err("over the cap is refused");
    assert!(over.to_string().contains("outbox_events_payload_size"), "{over}");
    record_ticks(&mut conn, "after", 0..5);

    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(12, Duration::from_secs(30)).await;
    eventually("every row marked published", Duration::from_secs(10), || {
        unpublished(&mut conn) == 0
    })
    .await;
    relay.stop().await;

    let received = broker.received();
    let blobs: Vec<_> = received.iter().filter(|m| m.subject() == "big").collect();
    assert_eq!(blobs.len(), 2, "each blob once");
    let filler = blobs[0].body["data"]["filler"].as_str().unwrap_or_default();
    assert_eq!(filler.len(), FILLER, "the big payload arrived whole");
    assert!(filler.bytes().all(|b| b == b'x'));
    assert_eq!(blobs[1].body["data"]["filler"], "x", "then the small one");
    assert_eq!(
        crate::support::count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE failed_at IS NOT NULL OR attempts > 0"
        ),
        0,
        "no failed or retried row"
    );
    eprintln!("1 MiB payload relayed in {:?}", started.elapsed());
}
