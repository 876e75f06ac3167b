use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use outbox::TestDatabase;

use outbox::testing::TestExchange;

use crate::support::{RunningRelay, count, eventually, record_ticks, relay_config, unpublished};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_stops_every_relay_and_resume_lets_them_go() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    outbox::control::pause(&mut conn, Some("test")).unwrap();
    assert!(outbox::control::is_paused(&mut conn).unwrap());
    record_ticks(&mut conn, "p", 0..3);
    let relay = RunningRelay::start(relay_config(&db, &broker));
    eventually("relay connected", Duration::from_secs(10), || {
        relay.health.is_healthy()
    })
    .await;
    // The relay polls every 2-20 ms; give it many polls to misbehave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.distinct(), 0, "nothing published while paused");
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_leases"), 0);
    outbox::control::resume(&mut conn).unwrap();
    broker.wait_for_distinct(3, Duration::from_secs(10)).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_zero_deletes_rows_once_published() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_ticks(&mut conn, "r", 0..5);
    let relay = RunningRelay::start(outbox::RelayConfig {
        retention: Duration::ZERO,
        // Deleted on publish: the mode without the event log.
        event_log: false,
        ..relay_config(&db, &broker)
    });
    broker.wait_for_distinct(5, Duration::from_secs(10)).await;
    eventually("rows deleted", Duration::from_secs(10), || {
        count(&mut conn, "SELECT count(*) AS n FROM outbox_events") == 0
    })
    .await;
    relay.stop().await;
}

#[test]
fn pruning_deletes_only_old_published_rows_in_bounded_batches() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "old", 0..20);
    record_ticks(&mut conn, "new", 0..5);
    record_ticks(&mut conn, "unpublished", 0..3);
    diesel::sql_query(
        "UPDATE outbox_events SET published_at = now() - interval '8 days' WHERE aggregate_id = 'old';
         ",
    )
    .execute(&mut conn)
    .unwrap();
    diesel::sql_query("UPDATE outbox_events SET published_at = now() WHERE aggregate_id = 'new'")
        .execute(&mut conn)
        .unwrap();
    let week = 7.0 * 24.0 * 3600.0;
    let batches: Vec<usize> = (0..4)
        .map(|_| outbox::relay::store::prune_published(&mut conn, week, 7).unwrap())
        .collect();
    assert_eq!(batches, vec![7, 7, 6, 0]);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_events"), 8);
    assert_eq!(unpublished(&mut conn), 3);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_health_endpoints() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_ticks(&mut conn, "m", 0..4);
    let handle = outbox::metrics::install_recorder().unwrap();
    let relay = RunningRelay::start(relay_config(&db, &broker));
    let health = Arc::clone(&relay.health);
    let check: outbox::metrics::HealthCheck = Arc::new(move || {
        (
            health.is_healthy(),
            format!("{{\"broker\":{}}}", health.broker_ok()),
        )
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = outbox::metrics::serve("127.0.0.1:0".parse().unwrap(), handle, check, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    broker.wait_for_distinct(4, Duration::from_secs(10)).await;
    eventually("marked", Duration::from_secs(10), || unpublished(&mut conn) == 0).await;
    eventually("healthy", Duration::from_secs(10), || {
        tokio::task::block_in_place(|| http_get(addr, "/health")).0 == 200
    })
    .await;
    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/metrics"));
    assert_eq!(status, 200);
    for name in [
        "outbox_published_total",
        "outbox_publish_latency_seconds_bucket",
        "outbox_backlog",
        "outbox_in_flight",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert_eq!(tokio::task::block_in_place(|| http_get(addr, "/nope")).0, 404);
    relay.stop().await;
    let _ = stop.send(());
    server.await.unwrap();
}
