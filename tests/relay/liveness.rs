//! A blocked aggregate holds back only itself: whatever blocks its head (a
//! dead relay's lease, a retry wait, a failed row, an event no queue is
//! bound to under strict routing), and however many events queue behind
//! it (here four claim batches), every other aggregate keeps flowing.

use std::time::Duration;

use diesel::prelude::*;
use outbox::relay::store;
use outbox::testing::TestExchange;
use outbox::{Error, RelayConfig, TestDatabase};

use crate::support::{RunningRelay, Ticked, count, record_reset, relay_config};

const BATCH: usize = 50;
const QUEUED: i64 = 4 * BATCH as i64;

#[derive(Clone, Copy, Debug)]
enum Blocker {
    /// The head is leased by a relay that died (its lease outlives the test).
    DeadRelay,
    /// The head failed a publish and waits an hour for its retry.
    Retrying,
    /// The head exhausted its attempts.
    Failed,
    /// The head's type has no queue, and the relay retries it (strict).
    UnroutableStrict,
}

/// Records `ticks` of `aggregate` in one transaction.
fn record_queue(conn: &mut PgConnection, aggregate: &str, ticks: std::ops::Range<i64>) {
    conn.transaction::<_, Error, _>(|conn| {
        for n in ticks {
            outbox::record(
                conn,
                &Ticked {
                    aggregate: aggregate.to_owned(),
                    n,
                },
            )?;
        }
        Ok(())
    })
    .unwrap();
}

async fn blocked_aggregate_never_delays_another(blocker: Blocker) {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = match blocker {
        Blocker::UnroutableStrict => TestExchange::with_binding(Some("counter.ticked")).await.unwrap(),
        _ => TestExchange::new().await.unwrap(),
    };
    match blocker {
        Blocker::UnroutableStrict => record_reset(&mut conn, "stuck"),
        _ => record_queue(&mut conn, "stuck", 0..1),
    }
    record_queue(&mut conn, "stuck", 1..QUEUED + 1);
    let head = "(SELECT min(seq) FROM outbox_events WHERE aggregate_id = 'stuck')";
    match blocker {
        Blocker::DeadRelay => {
            let held = store::claim_batch(&mut conn, "dead-relay", 1, 600.0).unwrap();
            assert_eq!(held.len(), 1);
        }
        Blocker::Retrying => {
            diesel::sql_query(format!(
                "UPDATE outbox_events SET attempts = 1, last_error = 'test',
                        next_attempt_at = now() + interval '1 hour' WHERE seq = {head}"
            ))
            .execute(&mut conn)
            .unwrap();
        }
        Blocker::Failed => {
            diesel::sql_query(format!(
                "UPDATE outbox_events SET attempts = 20, last_error = 'test',
                        next_attempt_at = now(), failed_at = now() WHERE seq = {head}"
            ))
            .execute(&mut conn)
            .unwrap();
        }
        Blocker::UnroutableStrict => {}
    }
    // Recorded last: every one of these sorts after the stuck queue.
    outbox::testing::record_ticks(&mut conn, "free", 0..50).unwrap();
    let relay = RunningRelay::start(RelayConfig {
        batch_size: BATCH,
        max_in_flight: 4 * BATCH,
        strict_routing: matches!(blocker, Blocker::UnroutableStrict),
        ..relay_config(&db, &broker)
    });
    let started = std::time::Instant::now();
    broker.wait_for_distinct(50, Duration::from_secs(20)).await;
    eprintln!(
        "{blocker:?}: the free aggregate's 50 events delivered in {:?}",
        started.elapsed()
    );
    relay.stop().await;
    let arrived = broker.first_arrival_order("n");
    assert_eq!(arrived["free"], (0..50).collect::<Vec<_>>(), "{blocker:?}");
    assert!(
        !arrived.contains_key("stuck"),
        "{blocker:?}: the blocked aggregate's queue went out"
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE aggregate_id = 'stuck' AND published_at IS NULL"
        ),
        QUEUED + 1,
        "{blocker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aggregate_held_by_a_dead_relay_never_delays_another() {
    blocked_aggregate_never_delays_another(Blocker::DeadRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aggregate_waiting_for_a_retry_never_delays_another() {
    blocked_aggregate_never_delays_another(Blocker::Retrying).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aggregate_behind_a_failed_row_never_delays_another() {
    blocked_aggregate_never_delays_another(Blocker::Failed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aggregate_behind_an_unroutable_row_under_strict_routing_never_delays_another() {
    blocked_aggregate_never_delays_another(Blocker::UnroutableStrict).await;
}
