use std::time::Duration;

use diesel::prelude::*;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox::{Error, Metadata, RelayConfig, TestDatabase};

use outbox::testing::TestExchange;

use crate::support::{RunningRelay, Ticked, count, eventually, record_reset, relay_config, unpublished};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_committed_events_with_the_contract_envelope() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let metadata = Metadata::by("user:42")
        .correlation_id("req-9")
        .traceparent(TRACEPARENT);
    let ids: Vec<_> = (0..3)
        .map(|n| {
            conn.transaction::<_, Error, _>(|conn| {
                outbox::record_with(
                    conn,
                    &Ticked {
                        aggregate: "c1".into(),
                        n,
                    },
                    &metadata,
                )
            })
            .unwrap()
        })
        .collect();
    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(3, Duration::from_secs(20)).await;
    eventually("rows marked published", Duration::from_secs(10), || {
        unpublished(&mut conn) == 0
    })
    .await;
    relay.stop().await;

    let received = broker.received();
    let first = &received[0];
    assert_eq!(
        first.message_id(),
        ids[0].to_string(),
        "message_id is the event id"
    );
    assert_eq!(first.routing_key, "counter.ticked");
    let p = &first.properties;
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("counter.ticked"));
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("outbox-relay"));
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("req-9"));
    assert!(p.timestamp().is_some());
    let headers = p.headers().clone().unwrap_or_default();
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(header("aggregate_type"), "counter");
    assert_eq!(header("aggregate_id"), "c1");
    assert_eq!(header("tenant_id"), "tenant-1");
    assert_eq!(header("traceparent"), TRACEPARENT);

    let body = &first.body;
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["id"], ids[0].to_string());
    assert_eq!(body["type"], "counter.ticked");
    // The default source names the database the event was relayed from.
    assert_eq!(body["source"], format!("/outbox/{}", db.name()));
    assert_eq!(body["subject"], "c1");
    assert_eq!(body["tenantid"], "tenant-1");
    assert_eq!(body["actor"], "user:42");
    assert_eq!(body["correlationid"], "req-9");
    assert_eq!(body["traceparent"], TRACEPARENT);
    assert_eq!(body["aggregatetype"], "counter");
    assert_eq!(body["schemaversion"], 1);
    assert_eq!(body["data"], serde_json::json!({"aggregate": "c1", "n": 0}));
    assert!(body["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM outbox_leases"),
        0,
        "no lease left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_strict_routing_an_unroutable_event_retries_and_holds_back_its_aggregate_only() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    // Only counter.ticked is routed: counter.reset comes back unroutable.
    let broker = TestExchange::with_binding(Some("counter.ticked")).await.unwrap();
    record_reset(&mut conn, "held");
    crate::support::record_ticks(&mut conn, "held", 1..3);
    crate::support::record_ticks(&mut conn, "free", 0..3);
    let relay = RunningRelay::start(RelayConfig {
        strict_routing: true,
        ..relay_config(&db, &broker)
    });

    broker.wait_for_distinct(3, Duration::from_secs(20)).await;
    eventually(
        "the unroutable row retried twice",
        Duration::from_secs(20),
        || {
            count(
                &mut conn,
                "SELECT max(attempts)::bigint AS n FROM outbox_events WHERE event_type = 'counter.reset'",
            ) >= 2
        },
    )
    .await;
    let error: String = outbox::schema::outbox_events::table
        .filter(outbox::schema::outbox_events::event_type.eq("counter.reset"))
        .select(outbox::schema::outbox_events::last_error.assume_not_null())
        .first(&mut conn)
        .unwrap();
    assert!(error.contains("NO_ROUTE"), "{error}");
    // The held aggregate's later events were never published, not even once.
    assert!(!broker.first_arrival_order("n").contains_key("held"));
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE aggregate_id = 'held' AND event_type = 'counter.ticked' AND (attempts > 0 OR published_at IS NOT NULL)"
        ),
        0
    );

    // Once routable, the head goes out and the rest follow in order.
    broker.bind("#").await.unwrap();
    broker.wait_for_distinct(6, Duration::from_secs(20)).await;
    relay.stop().await;
    let order: Vec<String> = broker
        .received()
        .iter()
        .filter(|m| m.subject() == "held")
        .map(|m| m.routing_key.clone())
        .collect();
    assert_eq!(order.first().map(String::as_str), Some("counter.reset"));
    assert_eq!(broker.first_arrival_order("n")["held"], vec![-1, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_no_queue_is_bound_to_is_kept_as_unroutable_and_its_aggregate_goes_on() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    // A bound and an unbound type on one aggregate: counter.reset (unbound)
    // is its head, counter.ticked (bound) follows.
    let broker = TestExchange::with_binding(Some("counter.ticked")).await.unwrap();
    record_reset(&mut conn, "mixed");
    crate::support::record_ticks(&mut conn, "mixed", 1..4);
    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(3, Duration::from_secs(20)).await;
    assert_eq!(broker.first_arrival_order("n")["mixed"], vec![1, 2, 3]);
    eventually("every row marked", Duration::from_secs(20), || {
        unpublished(&mut conn) == 0
    })
    .await;
    relay.stop().await;
    // The unbound event was tried once, is kept and flagged, not failed.
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events
             WHERE event_type = 'counter.reset' AND unroutable_at IS NOT NULL
               AND published_at IS NOT NULL AND attempts = 0 AND failed_at IS NULL"
        ),
        1
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE event_type = 'counter.ticked' AND unroutable_at IS NOT NULL"
        ),
        0
    );
    let stats = outbox::relay::store::backlog_stats(&mut conn).unwrap();
    assert_eq!((stats.unroutable, stats.backlog), (1, 0));
    let by_type = outbox::relay::store::unroutable_by_event_type(&mut conn).unwrap();
    assert_eq!(by_type.len(), 1);
    assert_eq!(
        (by_type[0].event_type.as_str(), by_type[0].count),
        ("counter.reset", 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_retention_zero_unroutable_events_are_still_kept() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::with_binding(Some("counter.ticked")).await.unwrap();
    record_reset(&mut conn, "kept");
    crate::support::record_ticks(&mut conn, "kept", 1..3);
    let relay = RunningRelay::start(RelayConfig {
        retention: Duration::ZERO,
        // Deleted on publish: the mode without the event log.
        event_log: false,
        ..relay_config(&db, &broker)
    });
    broker.wait_for_distinct(2, Duration::from_secs(20)).await;
    eventually(
        "the routed rows deleted on publish",
        Duration::from_secs(20),
        || count(&mut conn, "SELECT count(*) AS n FROM outbox_events") == 1,
    )
    .await;
    relay.stop().await;
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE event_type = 'counter.reset' AND unroutable_at IS NOT NULL"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_attempts_mark_the_row_failed_until_an_operator_retries() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::with_binding(Some("counter.ticked")).await.unwrap();
    record_reset(&mut conn, "a");
    crate::support::record_ticks(&mut conn, "a", 1..2);
    let config = outbox::RelayConfig {
        max_attempts: 2,
        strict_routing: true,
        ..relay_config(&db, &broker)
    };
    let relay = RunningRelay::start(config);
    eventually("the row marked failed", Duration::from_secs(20), || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE failed_at IS NOT NULL AND attempts = 2",
        ) == 1
    })
    .await;
    let stats = outbox::relay::store::backlog_stats(&mut conn).unwrap();
    assert_eq!((stats.failed, stats.backlog), (1, 2));
    broker.bind("#").await.unwrap();
    // Failed rows stay put even now that the route exists.
    assert_eq!(unpublished(&mut conn), 2);
    assert_eq!(outbox::control::retry_failed_events(&mut conn).unwrap(), 1);
    broker.wait_for_distinct(2, Duration::from_secs(20)).await;
    relay.stop().await;
    assert_eq!(broker.first_arrival_order("n")["a"], vec![-1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nacked_publish_is_retried() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::with_binding(None).await.unwrap();
    // A full queue that rejects publishes makes the broker nack.
    let full = format!("{}.full", broker.queue);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    broker
        .channel
        .queue_bind(
            full.as_str().into(),
            broker.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    crate::support::record_ticks(&mut conn, "n", 0..2);
    let relay = RunningRelay::start(relay_config(&db, &broker));
    eventually("a nacked attempt recorded", Duration::from_secs(20), || {
        count(&mut conn, "SELECT count(*) AS n FROM outbox_events WHERE attempts > 0 AND last_error LIKE '%negatively acknowledged%'") == 1
    })
    .await;
    broker
        .channel
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    broker.bind("#").await.unwrap();
    broker.wait_for_distinct(2, Duration::from_secs(20)).await;
    relay.stop().await;
    assert_eq!(broker.first_arrival_order("n")["n"], vec![0, 1]);
}
