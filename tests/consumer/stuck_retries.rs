//! Retry copies the broker does not hand back: a quorum retry queue whose
//! dead-letter path is broken keeps an expired copy out of sight (no
//! count, no `basic.get` shows it) and RabbitMQ's dead-letter worker tries
//! again only every 180 s; the worker's retry repairer
//! (`src/maintenance/retry_repairer.rs`) finds the copy from its own
//! record and moves it to the listener's queue.

use std::time::{Duration, Instant};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use outbox::Registry;
use outbox::consumer::ListenerError;
use outbox::testing::TEST_AMQP_PREFIX;
use serde_json::json;
use uuid::Uuid;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

/// Replaces `retry_queue` with one of the same TTL that dead-letters to an
/// exchange that does not exist (test only: what RabbitMQ saw when it
/// could not find the default exchange after a node restart).
async fn break_dead_letter_path(broker: &TestBroker, retry_queue: &str, ttl: Duration, target: &str) {
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    broker
        .channel
        .queue_delete(retry_queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), text("quorum"));
    arguments.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(ttl.as_millis() as i64),
    );
    let missing = format!("{TEST_AMQP_PREFIX}{}.missing", Uuid::now_v7().simple());
    arguments.insert("x-dead-letter-exchange".into(), text(&missing));
    arguments.insert("x-dead-letter-routing-key".into(), text(target));
    arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    arguments.insert("x-overflow".into(), text("reject-publish"));
    broker
        .channel
        .queue_declare(
            retry_queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
}

/// A listener whose first try of each event fails (transient) and whose
/// second writes its effect.
fn failing_first_try(name: &'static str) -> Scripted {
    Scripted::new(name, move |event, ctx, before| {
        if before == 0 {
            return Err(ListenerError::transient("first try fails"));
        }
        effect(ctx, name, event)
    })
}

/// The issue-27 chaos failure, on purpose: the first try fails, its copy
/// is confirmed into the retry queue, and the broker cannot dead-letter it
/// back. Without the repairer the event waits for RabbitMQ's own
/// redelivery (180 s at the earliest, never while the exchange is
/// missing); with it, the event is handled within the deadline, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_copy_stuck_behind_a_broken_dead_letter_path_is_moved_on() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = failing_first_try("stuck");
    let delay = Duration::from_millis(200);
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[200]))
        .unwrap();
    let grace = Duration::from_secs(1);
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        // The worker must not declare the retry queue back to health.
        config.declare_topology = false;
        config.retry_repair_interval = Some(Duration::from_millis(200));
        config.retry_repair_grace = grace;
    })
    .await;
    let handle = outbox::metrics::install_recorder().unwrap();
    let queues = worker.queue("stuck").clone();
    let retry_queue = queues.retry_queue(delay).unwrap().to_owned();
    let repaired =
        format!("outbox_retry_copies_repaired_total{{listener=\"stuck\",queue=\"{retry_queue}\"}}");
    break_dead_letter_path(&broker, &retry_queue, delay, &queues.queue).await;

    let event = TestEvent::new("widget.created", json!({"widget_id": 1}));
    let sent = Instant::now();
    broker.publish_event(&event).await;
    eventually("the first try", Duration::from_secs(20), || {
        !listener.calls_for(event.event_id).is_empty()
    })
    .await;
    // The copy expires out of sight: the retry queue shows nothing ready
    // while the event has not been handled.
    tokio::time::sleep(delay * 3).await;
    if count(&mut conn, "SELECT count(*) AS n FROM effects") == 0 {
        assert_eq!(
            broker.ready(&retry_queue).await,
            0,
            "an expired copy is not ready"
        );
    }
    eventually(
        "the event handled after the repair",
        Duration::from_secs(30),
        || count(&mut conn, "SELECT count(*) AS n FROM effects") == 1,
    )
    .await;
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "handled in {took:?}: by the repairer, not the broker's 180 s redelivery"
    );
    let calls = listener.calls_for(event.event_id);
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![1, 2],
        "the repaired copy is the second try"
    );
    eventually("the attempt count cleared", Duration::from_secs(10), || {
        count(&mut conn, "SELECT count(*) AS n FROM listener_attempts") == 0
    })
    .await;
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(crate::support::metric(&handle, &repaired), 1, "one copy repaired");
    worker.stop().await;
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM effects"),
        1,
        "handled once"
    );
}

/// A healthy retry queue hands its copies back by itself: the repairer
/// moves nothing, and the row of an event being retried says where its
/// copy is and when it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_retry_queue_needs_no_repair_and_the_copy_is_recorded() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = failing_first_try("healthy");
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[1500]))
        .unwrap();
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.retry_repair_interval = Some(Duration::from_millis(100));
        config.retry_repair_grace = Duration::from_secs(1);
    })
    .await;
    let queues = worker.queue("healthy").clone();
    let event = TestEvent::new("widget.created", json!({"widget_id": 2}));
    broker.publish_event(&event).await;
    eventually("the copy recorded", Duration::from_secs(20), || {
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM listener_attempts
                 WHERE retry_queue = '{}' AND retry_due_at > now() AND retry_copy IS NOT NULL AND retry_repairs = 0",
                queues.retry_queue(Duration::from_millis(1500)).unwrap()
            ),
        ) == 1
    })
    .await;
    eventually("the retry to succeed", Duration::from_secs(20), || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
    })
    .await;
    worker.stop().await;
    assert_eq!(
        listener.calls_for(event.event_id).len(),
        2,
        "no repaired duplicate"
    );
}
