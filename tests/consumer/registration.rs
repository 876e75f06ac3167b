//! A worker registers the listeners it runs, and their queues, in
//! `outbox_listeners` when it starts.

use std::time::Duration;

use outbox::Registry;

use crate::broker::TestBroker;
use crate::harness::{Running, Scripted, database, eventually, fast};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_registers_its_listeners_and_their_queues() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |_, _, _| Ok(()));
    let registry = Registry::new()
        .queued_listener_with(
            &["widget.created", "widget.deleted"],
            listener,
            fast(3, &[50, 100]),
        )
        .unwrap();
    let worker = Running::start(&db, &mut broker, &registry).await;
    let queues = worker.queue("audit").clone();
    eventually("the registration", Duration::from_secs(20), || {
        !outbox::consumer::registered_listeners(&mut conn)
            .unwrap()
            .is_empty()
    })
    .await;
    worker.stop().await;

    let registered = outbox::consumer::registered_listeners(&mut conn).unwrap();
    assert_eq!(registered.len(), 1, "{registered:?}");
    let row = &registered[0];
    assert_eq!(
        (row.app.as_str(), row.listener.as_str()),
        (broker.app.as_str(), "audit")
    );
    assert_eq!(row.exchange, broker.exchange);
    assert_eq!(row.queue, queues.queue);
    assert_eq!(row.dead_queue, queues.dead);
    assert_eq!(
        row.retry_queues,
        queues
            .retries
            .iter()
            .map(|(_, name)| name.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(row.retry_queues.len(), 2);
    let mut types = row.event_types.clone();
    types.sort();
    assert_eq!(types, vec!["widget.created", "widget.deleted"]);
}
