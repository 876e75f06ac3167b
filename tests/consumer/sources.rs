//! Events from sources a worker does not accept (another database's relay
//! on the same broker) are set aside, while its own events flow.

use std::time::Duration;

use outbox::Registry;
use serde_json::json;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_source_event_is_dead_lettered_unapplied_while_own_events_flow() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let own = "/outbox/own_database";
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.accept_sources = vec![own.to_owned()];
    })
    .await;

    let mut foreign = TestEvent::new("widget.created", json!({"from": "elsewhere"}));
    foreign.source = "/outbox/another_database".into();
    broker.publish_event(&foreign).await;
    let mut mine = Vec::new();
    for i in 0..5 {
        let mut event = TestEvent::new("widget.created", json!({"n": i}));
        event.source = own.into();
        broker.publish_event(&event).await;
        mine.push(event.event_id);
    }

    let queues = worker.queue("audit").clone();
    eventually("the own events applied", Duration::from_secs(20), || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 5
    })
    .await;
    broker.wait_ready(&queues.dead, 1, Duration::from_secs(20)).await;
    worker.stop().await;

    assert!(
        listener.calls_for(foreign.event_id).is_empty(),
        "the foreign event never reached the listener"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"),
        0,
        "not this listener's failure"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM processed_events"), 5);
    let (properties, _) = broker.take(&queues.dead).await.expect("the dead-letter copy");
    let text = match properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(outbox::consumer::ERROR_HEADER).cloned())
    {
        Some(lapin::types::AMQPValue::LongString(text)) => {
            String::from_utf8_lossy(text.as_bytes()).into_owned()
        }
        other => panic!("no error header: {other:?}"),
    };
    assert!(
        text.contains("/outbox/another_database") && text.contains(own),
        "the reason names both sources: {text}"
    );
    assert_eq!(broker.ready(&queues.queue).await, 0);
}
