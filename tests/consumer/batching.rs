//! Batched inbox transactions: many deliveries of one listener in one
//! transaction (a savepoint each), committed once, then acknowledged.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Text, Uuid as SqlUuid};
use outbox::Registry;
use outbox::consumer::{HandlerContext, ListenerError, ListenerOptions, ReceivedEvent};
use serde_json::json;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, eventually, fast};
use crate::support::count;

const LIMIT: Duration = Duration::from_secs(30);

/// An effect row that names the transaction it was written in, so a test
/// can tell that several deliveries committed together.
fn effect_in_transaction(ctx: &mut HandlerContext<'_>, event: &ReceivedEvent) -> Result<(), ListenerError> {
    diesel::sql_query("INSERT INTO effects (listener, event_id) VALUES ($1, $2)")
        .bind::<Text, _>(format!("tx{}", transaction_id(ctx)?))
        .bind::<SqlUuid, _>(event.event_id)
        .execute(ctx.conn()?)?;
    Ok(())
}

fn transaction_id(ctx: &mut HandlerContext<'_>) -> Result<i64, ListenerError> {
    #[derive(QueryableByName)]
    struct Xid {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        xid: i64,
    }
    Ok(diesel::sql_query("SELECT txid_current() AS xid")
        .get_result::<Xid>(ctx.conn()?)?
        .xid)
}

fn kind(event: &ReceivedEvent) -> String {
    event
        .data_as::<serde_json::Value>()
        .ok()
        .and_then(|v| v["kind"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn batched() -> ListenerOptions {
    ListenerOptions {
        prefetch: 64,
        concurrency: 2,
        batch_size: 32,
        batch_wait: Duration::from_millis(50),
        ..fast(3, &[50])
    }
}

/// Twenty `widget.created` events of kind `good`, with `special` at the
/// given positions instead.
fn twenty_events(special: &[(usize, &str)]) -> Vec<TestEvent> {
    let mut events: Vec<TestEvent> = (0..20)
        .map(|i| TestEvent::new("widget.created", json!({"n": i, "kind": "good"})))
        .collect();
    for (at, kind) in special {
        events[*at] = TestEvent::new("widget.created", json!({"kind": kind}));
    }
    events
}

/// Publishes `events` into the listener's queue before any worker runs, so
/// the worker gets them all at once.
async fn queue_before_start(broker: &mut TestBroker, registry: &Registry, events: &[TestEvent]) {
    let plan = outbox::consumer::topology::declare(&broker.channel, &broker.exchange, &broker.app, registry)
        .await
        .unwrap();
    broker.track(&plan);
    for event in events {
        broker.publish_event(event).await;
    }
    let queue = plan[0].queue.clone();
    let expected = u32::try_from(events.len()).unwrap();
    broker.wait_ready(&queue, expected, LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_commits_the_good_ones_once_and_sends_the_failed_ones_on() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("batched", |event, ctx, before| {
        // Every delivery writes its effect first: a failure must roll back
        // only its own.
        effect_in_transaction(ctx, event)?;
        match (kind(event).as_str(), before) {
            ("permanent", _) => Err(ListenerError::permanent("this widget cannot be handled")),
            ("transient", 0) => Err(ListenerError::transient("the service is busy")),
            _ => Ok(()),
        }
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), batched())
        .unwrap();
    let events = twenty_events(&[(7, "permanent"), (13, "transient")]);
    let (permanent, transient) = (events[7].event_id, events[13].event_id);
    queue_before_start(&mut broker, &registry, &events).await;
    let worker = Running::start(&db, &mut broker, &registry).await;

    eventually("19 effects and one failed job", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 19
            && count(&mut conn, "SELECT count(*) AS n FROM failed_jobs") == 1
    })
    .await;
    let queues = worker.queue("batched").clone();
    worker.stop().await;

    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM (SELECT event_id FROM effects GROUP BY event_id HAVING count(*) > 1) twice"
        ),
        0,
        "no effect twice"
    );
    assert_eq!(
        count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM effects WHERE event_id = '{permanent}'")
        ),
        0,
        "the permanent failure's effect was rolled back with its savepoint"
    );
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM failed_jobs WHERE event_id = '{permanent}' AND exception LIKE '%cannot be handled%'"
            )
        ),
        1
    );
    assert_eq!(
        listener.calls_for(transient).len(),
        2,
        "the transient one succeeded on its retry"
    );
    assert_eq!(
        count(
            &mut conn,
            &format!("SELECT count(*) AS n FROM processed_events WHERE event_id = '{permanent}'")
        ),
        0,
        "the failed delivery's inbox row was rolled back too"
    );
    assert!(
        count(
            &mut conn,
            "SELECT coalesce(max(n), 0) AS n FROM (SELECT count(*) AS n FROM effects GROUP BY listener) per_transaction"
        ) > 1,
        "several deliveries committed in one transaction"
    );
    assert_eq!(broker.ready(&queues.queue).await, 0);
    assert_eq!(broker.ready(&queues.dead).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_terminated_mid_batch_loses_nothing_and_uses_no_try() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("batched", |event, ctx, before| {
        effect_in_transaction(ctx, event)?;
        if kind(event) == "terminate" && before == 0 {
            // The batch's own backend dies under it, as in a Postgres
            // restart or a killed connection.
            diesel::sql_query("SELECT pg_terminate_backend(pg_backend_pid())").execute(ctx.conn()?)?;
        }
        Ok(())
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), batched())
        .unwrap();
    let events = twenty_events(&[(10, "terminate")]);
    let terminated = events[10].event_id;
    queue_before_start(&mut broker, &registry, &events).await;
    let worker = Running::start(&db, &mut broker, &registry).await;

    eventually("an effect for every event", LIMIT, || {
        count(&mut conn, "SELECT count(DISTINCT event_id) AS n FROM effects") == 20
    })
    .await;
    worker.stop().await;

    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM effects"),
        20,
        "no effect twice"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM listener_attempts"),
        0,
        "the lost connection counted as no try"
    );
    assert_eq!(listener.calls_for(terminated).len(), 2);
    assert!(
        listener.calls_for(terminated).iter().all(|c| c.attempt == 1),
        "both runs were the first try"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_connection_lost_between_a_batchs_commit_and_its_acks_has_no_second_effect() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    let proxy = std::sync::Arc::new(outbox::testing::TcpProxy::start("127.0.0.1:5672").await.unwrap());
    let cutter = std::sync::Arc::clone(&proxy);
    let listener = Scripted::new("batched", move |event, ctx, before| {
        effect_in_transaction(ctx, event)?;
        if kind(event) == "cut" && before == 0 {
            // The acks of this batch can no longer reach the broker: as if
            // the worker died right after the commit. The messages come
            // back, and the inbox must make them no-ops.
            cutter.cut(false);
        }
        Ok(())
    });
    let registry = Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), batched())
        .unwrap();
    let events = twenty_events(&[(5, "cut")]);
    let cut = events[5].event_id;
    queue_before_start(&mut broker, &registry, &events).await;
    let proxied = proxy.amqp_url();
    let worker = Running::start_with(&db, &mut broker, &registry, |config| {
        config.amqp_url = proxied;
        config.reconnect_max = Duration::from_millis(300);
    })
    .await;
    let queues = worker.queue("batched").clone();

    eventually("every event handled", LIMIT, || {
        count(&mut conn, "SELECT count(DISTINCT event_id) AS n FROM effects") == 20
    })
    .await;
    // The worker notices the cut, reconnects, and gets the unacknowledged
    // copies again: the queue holds nothing ready once it has them.
    eventually("the worker to notice the lost connection", LIMIT, || {
        !worker.health.broker_ok()
    })
    .await;
    eventually("the worker to reconnect", LIMIT, || worker.health.broker_ok()).await;
    let ready = std::time::Instant::now() + LIMIT;
    while broker.ready(&queues.queue).await > 0 {
        assert!(
            std::time::Instant::now() < ready,
            "the copies were not taken again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;

    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM effects"),
        20,
        "no effect twice"
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 0);
    assert_eq!(
        listener.calls_for(cut).len(),
        1,
        "the redelivered copy was a duplicate: no second run"
    );
    assert!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) AS n FROM effects WHERE listener = (SELECT listener FROM effects WHERE event_id = '{cut}')"
            )
        ) > 1,
        "the cut batch committed several deliveries whose acks were lost"
    );
    // Copies the stopped worker had not reached yet go back to the queue:
    // each is of an event already applied, so nothing is lost.
    while let Some((_, body)) = broker.take(&queues.queue).await {
        let event = outbox::consumer::decode(&body).unwrap();
        assert_eq!(
            count(
                &mut conn,
                &format!(
                    "SELECT count(*) AS n FROM effects WHERE event_id = '{}'",
                    event.event_id
                )
            ),
            1
        );
    }
}
