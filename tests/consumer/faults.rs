//! Faults: the broker or the database going away, and a message that keeps
//! coming back unacknowledged (a crash loop).

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use outbox::consumer::ListenerOptions;
use outbox::testing::TcpProxy;
use outbox::{Registry, failed_jobs};
use serde_json::json;

use crate::broker::{TestBroker, TestEvent, amqp_url};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_reconnects_after_losing_the_broker() {
    let handle = outbox::metrics::install_recorder().unwrap();
    let reconnects_before = crate::support::metric(&handle, "outbox_broker_reconnects_total");
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let proxy = TcpProxy::start("127.0.0.1:5672").await.unwrap();
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let proxied = proxy.amqp_url();
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.amqp_url = proxied;
        config.reconnect_max = Duration::from_millis(300);
    })
    .await;
    broker
        .publish_event(&TestEvent::new("widget.created", json!({"n": 1})))
        .await;
    eventually("the first event", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
    })
    .await;

    // The worker's connection drops and cannot come back for a while; an
    // event arrives meanwhile (published straight to the broker).
    proxy.cut(true);
    broker
        .publish_event(&TestEvent::new("widget.created", json!({"n": 2})))
        .await;
    eventually("the worker notices the broker is gone", LIMIT, || {
        !worker.health.broker_ok()
    })
    .await;
    proxy.heal();

    eventually("the event sent during the outage", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 2
    })
    .await;
    worker.stop().await;
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert!(
        crate::support::metric(&handle, "outbox_broker_reconnects_total") > reconnects_before,
        "the lost session is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_is_waited_out_without_using_up_tries() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let proxy = TcpProxy::start("127.0.0.1:5432").await.unwrap();
    let mut proxied = url::Url::parse(db.url()).unwrap();
    proxied.set_port(Some(proxy.port)).unwrap();
    let proxied = proxied.to_string();
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    // Two tries: an outage counted as tries would end in failed_jobs.
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(2, &[50]))
        .unwrap();
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.database_url = proxied;
        config.reconnect_max = Duration::from_millis(300);
    })
    .await;
    broker
        .publish_event(&TestEvent::new("widget.created", json!({"n": 1})))
        .await;
    eventually("the first event", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
    })
    .await;

    proxy.cut(true);
    for n in 2..=4 {
        broker
            .publish_event(&TestEvent::new("widget.created", json!({ "n": n })))
            .await;
    }
    // Heal only once the worker has met the outage while handling them.
    eventually("the worker meets the database outage", LIMIT, || {
        !worker.health.database_ok()
    })
    .await;
    proxy.heal();

    eventually("the events sent during the outage", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 4
    })
    .await;
    worker.stop().await;
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM listener_attempts"),
        0,
        "no try counted"
    );
    assert_eq!(
        listener.calls().len(),
        4,
        "the handler only ran once the database was back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_redelivered_without_acks_too_often_fails_without_running_again() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |_, _, _| Ok(()));
    let options = ListenerOptions {
        max_unacked_deliveries: 2,
        ..fast(3, &[50])
    };
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), options)
        .unwrap();
    let plan = outbox::consumer::topology::declare(&broker.channel, &broker.exchange, &broker.app, &registry)
        .await
        .unwrap();
    broker.track(&plan);
    let event = TestEvent::new("widget.created", json!({}));
    broker.publish_event(&event).await;
    // Two deliveries that end without an ack, as if a worker died twice
    // while handling it.
    let crashes = outbox::amqp::connect(&amqp_url(), "crash loop").await.unwrap();
    let channel = crashes.create_channel().await.unwrap();
    for _ in 0..2 {
        let got = channel
            .basic_get(plan[0].queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("the message");
        got.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .unwrap();
    }
    let _ = crashes.close(200, "done".into()).await;

    let worker = Running::start(&db, &mut broker, &registry).await;
    broker.wait_ready(&plan[0].dead, 1, LIMIT).await;
    worker.stop().await;
    assert!(listener.calls().is_empty(), "not run a third time");
    let job = failed_jobs::find_by_event(&mut conn, "audit", event.event_id)
        .unwrap()
        .unwrap();
    assert!(
        job.exception.contains("without being acknowledged"),
        "{}",
        job.exception
    );
}
