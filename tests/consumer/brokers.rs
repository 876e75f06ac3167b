//! Several broker addresses in `AMQP_URL`: the relay and the worker skip
//! one that does not answer, and after losing their connection they move
//! on to the next address of the list.

use std::time::Duration;

use outbox::testing::{TcpProxy, count, eventually, record_ticks};
use outbox::{Registry, Relay, RelayConfig};

use crate::broker::{TestBroker, amqp_url};
use crate::harness::{Running, Scripted, database, effect, fast};

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_worker_skip_a_dead_address_and_move_on_after_a_loss() {
    let (db, mut conn) = database();
    let mut broker = TestBroker::new().await;
    // The list: a closed port, a proxy in front of the real broker (cut
    // later), the real broker.
    let proxy = TcpProxy::start("127.0.0.1:5672").await.unwrap();
    let list = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f,{},{}",
        closed_port(),
        proxy.amqp_url(),
        amqp_url()
    );
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let registry = Registry::new()
        .queued_listener_with(&["counter.ticked"], listener.clone(), fast(3, &[50]))
        .unwrap();
    let worker_list = list.clone();
    let worker = Running::start_with(&db, &mut broker, &registry, move |config| {
        config.amqp_url = worker_list;
        config.reconnect_max = Duration::from_millis(500);
    })
    .await;
    let relay = Relay::new(RelayConfig {
        database_url: db.url().to_owned(),
        amqp_url: list,
        exchange: broker.exchange.clone(),
        poll_max: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(500),
        ..RelayConfig::default()
    })
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });

    let effects = |conn: &mut diesel::PgConnection| count(conn, "SELECT count(*) AS n FROM effects");
    record_ticks(&mut conn, "c1", 0..20).unwrap();
    eventually(
        "20 effects through the second address",
        Duration::from_secs(20),
        || effects(&mut conn) == 20,
    )
    .await;

    // The second address goes away for good: both move on to the third.
    proxy.cut(true);
    record_ticks(&mut conn, "c1", 20..40).unwrap();
    eventually(
        "40 effects through the third address",
        Duration::from_secs(30),
        || effects(&mut conn) == 40,
    )
    .await;
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM (SELECT event_id FROM effects GROUP BY event_id HAVING count(*) > 1) d"
        ),
        0,
        "no effect twice"
    );
    eventually("every row marked published", Duration::from_secs(10), || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
        ) == 0
    })
    .await;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), relay)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    worker.stop().await;
}
