//! The worker end to end against RabbitMQ and Postgres, with messages
//! published straight to the exchange or to a listener's queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox::consumer::{ListenerError, ListenerOptions};
use outbox::failed_jobs::{self, Filter};
use outbox::{Registry, failed_jobs::FailedJob};
use serde_json::json;

use crate::broker::{TestBroker, TestEvent, int_header};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

const LIMIT: Duration = Duration::from_secs(20);

fn only_failed_job(conn: &mut diesel::PgConnection) -> FailedJob {
    let mut jobs = failed_jobs::list(conn, &Filter::default()).unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    jobs.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failure_then_success_leaves_no_failed_job() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("flaky", |event, ctx, before| {
        if before == 0 {
            return Err(ListenerError::transient("service unavailable"));
        }
        effect(ctx, "flaky", event)
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;

    let event = TestEvent::new("widget.created", json!({"widget_id": 1}));
    broker.publish_event(&event).await;

    eventually("the retry to succeed", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
    })
    .await;
    let queues = worker.queue("flaky").clone();
    worker.stop().await;
    let calls = listener.calls_for(event.event_id);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM listener_attempts"),
        0,
        "the attempt count is cleared on success"
    );
    assert_eq!(broker.ready(&queues.dead).await, 0);
    assert_eq!(broker.ready(&queues.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permanent_failure_after_exactly_the_configured_tries_and_delays() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("doomed", |_, _, before| {
        Err(ListenerError::transient(format!(
            "still down (call {})",
            before + 1
        )))
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[300, 600]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let queues = worker.queue("doomed").clone();
    assert_eq!(
        queues.retries.iter().map(|(_, q)| q.as_str()).collect::<Vec<_>>(),
        vec![
            format!("{}.retry.300ms", queues.queue),
            format!("{}.retry.600ms", queues.queue)
        ]
    );

    let event = TestEvent::new("widget.created", json!({"widget_id": 2}));
    broker.publish_event(&event).await;

    broker.wait_ready(&queues.dead, 1, LIMIT).await;
    let job = only_failed_job(&mut conn);
    let calls = listener.calls_for(event.event_id);
    assert_eq!(calls.len(), 3, "exactly the configured tries");
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), vec![1, 2, 3]);
    let gaps = [calls[1].at - calls[0].at, calls[2].at - calls[1].at];
    assert!(
        gaps[0] >= Duration::from_millis(300) && gaps[0] < Duration::from_millis(300 + 2000),
        "first delay {:?}",
        gaps[0]
    );
    assert!(
        gaps[1] >= Duration::from_millis(600) && gaps[1] < Duration::from_millis(600 + 2000),
        "second delay {:?}",
        gaps[1]
    );

    assert_eq!(job.listener, "doomed");
    assert_eq!(job.queue, queues.queue);
    assert_eq!(job.event_id, Some(event.event_id));
    assert_eq!(job.event_type.as_deref(), Some("widget.created"));
    assert_eq!(job.attempts, 3);
    assert_eq!(job.exception, "still down (call 3)");
    assert_eq!(
        job.errors
            .iter()
            .map(|e| (e.attempt, e.error.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (1, "still down (call 1)"),
            (2, "still down (call 2)"),
            (3, "still down (call 3)")
        ]
    );
    assert!(job.errors.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(job.payload["id"], event.event_id.to_string());
    assert_eq!(job.payload["data"]["widget_id"], 2, "the full payload");

    let (properties, body) = broker.take(&queues.dead).await.unwrap();
    assert_eq!(int_header(&properties, "x-outbox-failed-job"), Some(job.id));
    let dead: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(dead["id"], event.event_id.to_string());

    // Nothing loops: after well over the longest delay there is still one
    // row, three calls, and every queue is empty.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    worker.stop().await;
    assert_eq!(listener.calls_for(event.event_id).len(), 3);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM listener_attempts"), 0);
    for queue in queues.all_queues() {
        assert_eq!(broker.ready(queue).await, 0, "{queue}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permanent_error_and_panics() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let permanent = Scripted::new("strict", |_, _, _| {
        Err(ListenerError::permanent("invariant broken"))
    });
    let panicking = Scripted::new("buggy", |_, _, _| panic!("listener bug"));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], permanent.clone(), fast(3, &[50]))
        .unwrap()
        .queued_listener_with(&["widget.created"], panicking.clone(), fast(2, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let event = TestEvent::new("widget.created", json!({}));
    broker.publish_event(&event).await;
    broker.wait_ready(&worker.queue("strict").dead, 1, LIMIT).await;
    broker.wait_ready(&worker.queue("buggy").dead, 1, LIMIT).await;
    worker.stop().await;

    assert_eq!(permanent.calls().len(), 1, "a permanent error is not retried");
    assert_eq!(panicking.calls().len(), 2, "a panic is a transient failure");
    let strict = failed_jobs::find_by_event(&mut conn, "strict", event.event_id)
        .unwrap()
        .unwrap();
    assert_eq!(strict.attempts, 1);
    assert_eq!(strict.exception, "invariant broken");
    let buggy = failed_jobs::find_by_event(&mut conn, "buggy", event.event_id)
        .unwrap()
        .unwrap();
    assert_eq!(buggy.attempts, 2);
    assert_eq!(buggy.exception, "listener panicked: listener bug");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_message_ends_in_failed_jobs_with_a_decode_error() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |_, _, _| Ok(()));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let queues = worker.queue("audit").clone();

    let garbage = b"{\"specversion\": \"1.0\", this is not json";
    broker
        .publish_to_queue(
            &queues.queue,
            garbage,
            BasicProperties::default().with_type("widget.created".into()),
        )
        .await;
    broker.wait_ready(&queues.dead, 1, LIMIT).await;
    worker.stop().await;

    assert!(listener.calls().is_empty(), "the listener never sees it");
    let job = only_failed_job(&mut conn);
    assert_eq!(job.event_id, None);
    assert_eq!(
        job.event_type.as_deref(),
        Some("widget.created"),
        "from the AMQP type"
    );
    assert!(
        job.exception.starts_with("cannot decode message"),
        "{}",
        job.exception
    );
    assert!(job.exception.contains("CloudEvents"), "{}", job.exception);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.payload["malformed"], true);
    assert_eq!(job.payload["raw_body"], String::from_utf8_lossy(garbage).as_ref());
    let (_, body) = broker.take(&queues.dead).await.unwrap();
    assert_eq!(body, garbage.to_vec(), "the dead-letter queue keeps the bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_type_the_listener_does_not_handle_fails_at_once() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |_, _, _| Ok(()));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let queues = worker.queue("audit").clone();
    let event = TestEvent::new("gadget.deleted", json!({}));
    let (body, properties) = event.encode();
    broker.publish_to_queue(&queues.queue, &body, properties).await;
    broker.wait_ready(&queues.dead, 1, LIMIT).await;
    worker.stop().await;
    assert!(listener.calls().is_empty());
    let job = only_failed_job(&mut conn);
    assert_eq!(job.event_id, Some(event.event_id));
    assert_eq!(job.attempts, 1);
    assert!(
        job.exception.contains("does not handle gadget.deleted"),
        "{}",
        job.exception
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_delivery_has_one_effect() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let options = ListenerOptions {
        concurrency: 2,
        ..fast(3, &[50])
    };
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), options)
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let event = TestEvent::new("widget.created", json!({}));
    // The relay publishes at least once: the same event three times.
    for _ in 0..3 {
        broker.publish_event(&event).await;
    }
    eventually("three deliveries handled", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM processed_events") == 1
    })
    .await;
    let queue = worker.queue("audit").queue.clone();
    broker.wait_ready(&queue, 0, LIMIT).await;
    worker.stop().await;
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM effects"),
        1,
        "one effect"
    );
    assert!(
        listener.calls().len() <= 3,
        "duplicates skip the handler once the first committed"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_listeners_failures_leave_the_others_untouched() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let failing = Scripted::new("failing", |_, _, _| Err(ListenerError::transient("down")));
    let healthy = Scripted::new("healthy", |event, ctx, _| effect(ctx, "healthy", event));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], failing.clone(), fast(3, &[100, 100]))
        .unwrap()
        .queued_listener_with(
            &["widget.created", "widget.deleted"],
            healthy.clone(),
            fast(3, &[100]),
        )
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let events: Vec<TestEvent> = (0..5)
        .map(|i| TestEvent::new("widget.created", json!({"widget_id": i})))
        .collect();
    for event in &events {
        broker.publish_event(event).await;
    }
    broker.wait_ready(&worker.queue("failing").dead, 5, LIMIT).await;
    let healthy_queues = worker.queue("healthy").clone();
    worker.stop().await;

    for event in &events {
        assert_eq!(failing.calls_for(event.event_id).len(), 3);
        assert_eq!(
            healthy.calls_for(event.event_id).len(),
            1,
            "never redelivered to healthy"
        );
    }
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM effects WHERE listener = 'healthy'"
        ),
        5
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE listener = 'failing'"
        ),
        5
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE listener = 'healthy'"
        ),
        0
    );
    for queue in healthy_queues.all_queues() {
        assert_eq!(broker.ready(queue).await, 0, "{queue}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempt_headers_from_publishers_are_not_trusted() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |_, _, _| Err(ListenerError::transient("down")));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(2, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let event = TestEvent::new("widget.created", json!({}));
    let (body, properties) = event.encode();
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert("x-outbox-retry".into(), AMQPValue::LongInt(i32::MAX));
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(i64::MAX));
    headers.insert("x-death".into(), AMQPValue::FieldTable(FieldTable::default()));
    broker
        .publish(&event.event_type, &body, properties.with_headers(headers))
        .await;
    broker.wait_ready(&worker.queue("audit").dead, 1, LIMIT).await;
    worker.stop().await;
    let calls = listener.calls_for(event.event_id);
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![1, 2],
        "both tries ran, counted from 1"
    );
    assert_eq!(only_failed_job(&mut conn).attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_timeout_counts_as_a_try() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("slow", |event, ctx, before| {
        if before == 0 {
            std::thread::sleep(Duration::from_millis(800));
            return Err(ListenerError::transient("too late anyway"));
        }
        effect(ctx, "slow", event)
    });
    let options = ListenerOptions {
        timeout: Duration::from_millis(200),
        ..fast(3, &[50])
    };
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), options)
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let event = TestEvent::new("widget.created", json!({}));
    broker.publish_event(&event).await;
    eventually("the second try", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
    })
    .await;
    worker.stop().await;
    assert_eq!(listener.calls_for(event.event_id).len(), 2);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_handlers_in_flight_and_returns_the_rest() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let started = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&started);
    let listener = Scripted::new("slow", move |event, ctx, _| {
        seen.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(500));
        effect(ctx, "slow", event)
    });
    let options = ListenerOptions {
        concurrency: 1,
        prefetch: 5,
        ..fast(3, &[50])
    };
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), options)
        .unwrap();
    let mut worker = Running::start(&db, &mut broker, &registry).await;
    let queue = worker.queue("slow").queue.clone();
    for i in 0..5 {
        broker
            .publish_event(&TestEvent::new("widget.created", json!({"i": i})))
            .await;
    }
    eventually("the first handler to start", LIMIT, || {
        started.load(Ordering::SeqCst)
    })
    .await;
    worker.signal_stop();
    worker.join().await;

    let effects = count(&mut conn, "SELECT count(*) AS n FROM effects");
    assert_eq!(
        effects,
        listener.calls().len() as i64,
        "every started handler finished"
    );
    assert!(effects >= 1);
    broker.wait_ready(&queue, 5 - effects as u32, LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retrying_a_failed_job_republishes_to_the_listeners_queue_only() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let fixed = Arc::new(AtomicBool::new(false));
    let is_fixed = Arc::clone(&fixed);
    let flaky = Scripted::new("flaky", move |event, ctx, _| {
        if is_fixed.load(Ordering::SeqCst) {
            effect(ctx, "flaky", event)
        } else {
            Err(ListenerError::permanent("bug"))
        }
    });
    let other = Scripted::new("other", |event, ctx, _| effect(ctx, "other", event));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], flaky.clone(), fast(1, &[50]))
        .unwrap()
        .queued_listener_with(&["widget.created"], other.clone(), fast(1, &[50]))
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let event = TestEvent::new("widget.created", json!({}));
    broker.publish_event(&event).await;
    broker.wait_ready(&worker.queue("flaky").dead, 1, LIMIT).await;
    let job = only_failed_job(&mut conn);

    fixed.store(true, Ordering::SeqCst);
    let pool = db.pool(2).unwrap();
    let retried = failed_jobs::retry(&pool, &broker.channel, job.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(retried.id, job.id);
    eventually("the retried job to succeed", LIMIT, || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM effects WHERE listener = 'flaky'",
        ) == 1
    })
    .await;
    worker.stop().await;
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"),
        0,
        "row deleted"
    );
    assert_eq!(other.calls().len(), 1, "the other listener did not see it again");
    assert!(matches!(
        failed_jobs::retry(&pool, &broker.channel, job.id, Duration::from_secs(1)).await,
        Err(outbox::Error::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topology_is_declared_idempotently() {
    let (_db, _conn) = database();
    let mut broker = TestBroker::new().await;
    let registry = Registry::new()
        .queued_listener_with(
            &["widget.created", "widget.deleted"],
            Scripted::new("audit", |_, _, _| Ok(())),
            ListenerOptions::default(),
        )
        .unwrap()
        .queued_listener_with(
            &["widget.created"],
            Scripted::new("ordered", |_, _, _| Ok(())),
            ListenerOptions {
                single_active_consumer: true,
                concurrency: 1,
                ..ListenerOptions::default()
            },
        )
        .unwrap();
    let plan = outbox::consumer::topology::plan(&broker.app, &registry).unwrap();
    broker.track(&plan);
    for _ in 0..2 {
        let declared =
            outbox::consumer::topology::declare(&broker.channel, &broker.exchange, &broker.app, &registry)
                .await
                .unwrap();
        assert_eq!(declared, plan);
    }
    let audit = &plan[0];
    assert_eq!(audit.queue, format!("{}.audit", broker.app));
    assert_eq!(audit.dead, format!("{}.audit.dead", broker.app));
    assert_eq!(
        audit.retries.iter().map(|(_, q)| q.clone()).collect::<Vec<_>>(),
        vec![
            format!("{}.audit.retry.30s", broker.app),
            format!("{}.audit.retry.1m", broker.app)
        ]
    );
    // Routed by event type: a widget.deleted reaches audit only.
    broker
        .publish_event(&TestEvent::new("widget.deleted", json!({})))
        .await;
    broker.wait_ready(&audit.queue, 1, LIMIT).await;
    assert_eq!(broker.ready(&plan[1].queue).await, 0);
    // A retry queue hands messages back to its listener's queue only.
    let ordered = &plan[1];
    assert!(ordered.single_active_consumer);
    let (body, properties) = TestEvent::new("widget.created", json!({})).encode();
    broker
        .publish_to_queue(
            audit.retries[0].1.as_str(),
            &body,
            properties.with_expiration("50".into()),
        )
        .await;
    broker.wait_ready(&audit.queue, 2, LIMIT).await;
    assert_eq!(broker.ready(&ordered.queue).await, 0);
}
