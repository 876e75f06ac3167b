//! The wake-up path: a commit through an outbox built with `wake_relays`
//! reaches an idle relay at once, long before its next poll; wake-ups
//! coalesce instead of costing a NOTIFY per commit.

use std::time::{Duration, Instant};

use outbox::testing::TestExchange;
use outbox::{Outbox, RelayConfig, TestDatabase};

use crate::support::{RunningRelay, Ticked, eventually, relay_config};

/// A relay that, once idle, polls only every 5 s.
fn slow_polling(db: &TestDatabase, broker: &TestExchange, wake_up: bool) -> RelayConfig {
    RelayConfig {
        poll_min: Duration::from_secs(5),
        poll_max: Duration::from_secs(5),
        wake_up,
        ..relay_config(db, broker)
    }
}

async fn record_one_after_the_relay_went_idle(wake_up: bool) -> Duration {
    let db = TestDatabase::create().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let relay = RunningRelay::start(slow_polling(&db, &broker, wake_up));
    // The first claim (empty) has run: the next poll is 5 s away.
    eventually("the relay's first claim", Duration::from_secs(20), || {
        relay.health.database_ok()
    })
    .await;
    let outbox = Outbox::builder().wake_relays(db.url()).build().unwrap();
    let mut conn = db.connect().unwrap();
    let committed = Instant::now();
    outbox
        .transaction::<_, outbox::Error, _>(&mut conn, |tx| {
            tx.record(&Ticked {
                aggregate: "woken".into(),
                n: 0,
            })
        })
        .unwrap();
    broker.wait_for_distinct(1, Duration::from_secs(20)).await;
    let waited = committed.elapsed();
    relay.stop().await;
    waited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_wakes_an_idle_relay_long_before_its_next_poll() {
    let waited = record_one_after_the_relay_went_idle(true).await;
    eprintln!("commit -> delivered with the wake-up path, relay polling every 5 s: {waited:?}");
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_wake_up_path_the_relay_finds_the_event_at_its_next_poll() {
    // The control: the same relay with wake-ups off waits for its poll.
    let waited = record_one_after_the_relay_went_idle(false).await;
    eprintln!("commit -> delivered by polling every 5 s: {waited:?}");
    assert!(waited > Duration::from_secs(2), "waited {waited:?}");
}

#[test]
fn wake_ups_coalesce_into_few_notifies() {
    let db = TestDatabase::create().unwrap();
    let sender = outbox::wake::WakeSender::start(db.url()).unwrap();
    let wakes = 10_000;
    for _ in 0..wakes {
        sender.wake();
    }
    outbox::testing::eventually_blocking("a NOTIFY sent", Duration::from_secs(20), || sender.sent() > 0);
    let sent = sender.sent();
    assert!(sent < 100, "{sent} NOTIFYs for {wakes} wake-ups");
}
