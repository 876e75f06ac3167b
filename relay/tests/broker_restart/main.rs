//! RabbitMQ itself restarted under a running relay (`rabbitmqctl
//! stop_app` / `start_app`). A test binary of its own with a single test:
//! cargo runs test binaries one after another, so no other test sees the
//! broker go away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use outbox::TestDatabase;

const OUTBOX: &str = env!("CARGO_BIN_EXE_outbox");

fn record(conn: &mut PgConnection, ticks: std::ops::Range<i64>) {
    outbox::testing::record_interleaved(conn, 20, ticks).unwrap();
}

fn unpublished(conn: &mut PgConnection) -> i64 {
    use outbox::schema::outbox_events::dsl::*;
    outbox_events
        .filter(published_at.is_null())
        .count()
        .get_result(conn)
        .unwrap()
}

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(status.is_ok_and(|s| s.success()), "rabbitmqctl {args:?} failed");
}

async fn wait_for_broker() -> lapin::Connection {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(connection) = outbox::amqp::connect(outbox::DEFAULT_AMQP_URL, "restart test").await {
            return connection;
        }
        assert!(Instant::now() < deadline, "broker did not come back within 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_mid_stream_loses_nothing() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let exchange = format!("outbox_test.{id}");
    let queue = format!("outbox_test.{id}.durable");
    {
        let connection = wait_for_broker().await;
        let channel = connection.create_channel().await.unwrap();
        outbox::amqp::declare_exchange(&channel, &exchange).await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "ok".into()).await;
    }
    record(&mut conn, 0..100);
    let mut relay = Command::new(OUTBOX)
        .args([
            "relay",
            "--exchange",
            &exchange,
            "--metrics-addr",
            "off",
            "--batch-size",
            "20",
        ])
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while unpublished(&mut conn) > 1000 {
        assert!(Instant::now() < deadline, "relay made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rabbitmqctl(&["stop_app"]);
    // Writes go on while the broker is down.
    record(&mut conn, 100..150);
    rabbitmqctl(&["start_app"]);
    let connection = wait_for_broker().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while unpublished(&mut conn) > 0 {
        assert!(Instant::now() < deadline, "backlog not drained after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    assert!(relay.wait().unwrap().success());

    // Every event is in the durable queue, each aggregate in order.
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let total = 20 * 150;
    let mut seen = HashSet::new();
    let mut order: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let mut deliveries = 0usize;
    while seen.len() < total {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the queue holds every event")
            .unwrap()
            .unwrap();
        deliveries += 1;
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
        if seen.insert(body["id"].as_str().unwrap().to_owned()) {
            order
                .entry(body["subject"].as_str().unwrap().to_owned())
                .or_default()
                .push(body["data"]["n"].as_i64().unwrap());
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    for (aggregate, ns) in order {
        assert_eq!(
            ns,
            (0..150).collect::<Vec<_>>(),
            "aggregate {aggregate} out of order"
        );
    }
    eprintln!(
        "broker restart: {} duplicate deliveries of {total}",
        deliveries - total
    );
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
}
