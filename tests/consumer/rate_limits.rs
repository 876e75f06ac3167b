//! Per-listener rate limits: deliveries beyond the rate wait in the queue.

use std::time::{Duration, Instant};

use outbox::Registry;
use outbox::consumer::{ListenerOptions, RateLimit};
use serde_json::json;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_listener_handles_n_messages_in_no_less_than_n_over_the_rate() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("quota", |event, ctx, _| effect(ctx, "quota", event));
    let options = ListenerOptions {
        rate_limit: Some(RateLimit::per_second(20).with_burst(1)),
        prefetch: 16,
        ..fast(3, &[50])
    };
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), options)
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;

    let started = Instant::now();
    for i in 0..30 {
        broker
            .publish_event(&TestEvent::new("widget.created", json!({"n": i})))
            .await;
    }
    eventually("all 30 handled", Duration::from_secs(20), || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 30
    })
    .await;
    let took = started.elapsed();
    worker.stop().await;
    // 30 deliveries at 20/s with bursts of one: the last starts no sooner
    // than 29 / 20 = 1.45 s after the first (a margin for clock reads).
    assert!(
        took >= Duration::from_millis(1300),
        "30 deliveries took only {took:?}"
    );
    let calls = listener.calls();
    let span = calls.last().unwrap().at - calls.first().unwrap().at;
    assert!(
        span >= Duration::from_millis(1300),
        "handlings spread over only {span:?}"
    );
}
