use outbox::testing::{TcpProxy, TestExchange};
use std::time::Duration;

use outbox::TestDatabase;

use crate::support::{RunningRelay, count, eventually, record_interleaved, relay_config, unpublished};

fn assert_in_order(broker: &TestExchange, aggregates: usize, per_aggregate: i64) {
    let order = broker.first_arrival_order("n");
    assert_eq!(order.len(), aggregates);
    for (aggregate, ns) in order {
        assert_eq!(
            ns,
            (0..per_aggregate).collect::<Vec<_>>(),
            "aggregate {aggregate} out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_connection_loss_mid_stream_loses_nothing_and_holds_nothing_while_down() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let proxy = TcpProxy::start("127.0.0.1:5672").await.unwrap();
    let total = record_interleaved(&mut conn, 50, 60);
    let config = outbox::RelayConfig {
        amqp_url: proxy.amqp_url(),
        batch_size: 50,
        max_in_flight: 200,
        ..relay_config(&db, &broker)
    };
    let relay = RunningRelay::start(config);
    eventually("some delivered", Duration::from_secs(20), || {
        broker.distinct() >= 300
    })
    .await;
    proxy.cut(true);
    eventually("relay notices", Duration::from_secs(10), || {
        !relay.health.broker_ok()
    })
    .await;
    // While the broker is unreachable the relay holds no rows.
    eventually("leases given back", Duration::from_secs(10), || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_leases WHERE expires_at > now()",
        ) == 0
    })
    .await;
    assert!(unpublished(&mut conn) > 0, "the cut came mid-stream");
    proxy.heal();
    broker.wait_for_distinct(total, Duration::from_secs(60)).await;
    eventually("all marked", Duration::from_secs(20), || {
        unpublished(&mut conn) == 0
    })
    .await;
    relay.stop().await;
    assert_in_order(&broker, 50, 60);
    eprintln!(
        "broker cut: {} duplicate deliveries of {total}",
        broker.received().len() - total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_dropped_mid_stream_lose_nothing() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let total = record_interleaved(&mut conn, 40, 50);
    let relay = RunningRelay::start(outbox::RelayConfig {
        batch_size: 40,
        ..relay_config(&db, &broker)
    });
    let kill = format!(
        "SELECT count(pg_terminate_backend(pid))::bigint AS n FROM pg_stat_activity
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name()
    );
    for round in 1..=3 {
        let target = total * round / 4;
        eventually("progress", Duration::from_secs(30), || {
            broker.distinct() >= target
        })
        .await;
        count(&mut conn, &kill);
    }
    broker.wait_for_distinct(total, Duration::from_secs(60)).await;
    eventually("all marked", Duration::from_secs(30), || {
        unpublished(&mut conn) == 0
    })
    .await;
    relay.stop().await;
    assert_in_order(&broker, 40, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_stop_marks_what_was_confirmed_and_releases_every_lease() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    let total = record_interleaved(&mut conn, 100, 40);
    let relay = RunningRelay::start(outbox::RelayConfig {
        batch_size: 100,
        ..relay_config(&db, &broker)
    });
    eventually("mid-stream", Duration::from_secs(20), || broker.distinct() >= 500).await;
    relay.stop().await;
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_leases"), 0);
    let marked = count(
        &mut conn,
        "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NOT NULL",
    );
    // Everything marked was delivered; nothing delivered is lost to a
    // restart (it is either marked or published again).
    eventually("deliveries settle", Duration::from_secs(5), || {
        broker.distinct() as i64 >= marked
    })
    .await;
    assert!(
        marked > 0 && (marked as usize) < total,
        "stopped mid-stream ({marked} of {total})"
    );
    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(total, Duration::from_secs(60)).await;
    relay.stop().await;
    assert_in_order(&broker, 100, 40);
}
