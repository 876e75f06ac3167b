use std::time::Duration;

use outbox::TestDatabase;
use outbox::testing::TestExchange;

use crate::support::{RelayChild, eventually, record_interleaved, scalar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_with_sigkill_mid_batch_loses_nothing_and_sigterm_stops_cleanly() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let total = record_interleaved(&mut conn, 40, 75);
    // Short leases so the successor takes over quickly.
    let fast = ["--batch-size", "50", "--lease", "2s", "--confirm-timeout", "1s"];
    let mut first = RelayChild::spawn(db.url(), outbox::DEFAULT_AMQP_URL, &exchange.exchange, &fast);
    eventually("mid-stream", Duration::from_secs(30), || {
        exchange.distinct() >= 600
    })
    .await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let delivered_at_kill = exchange.distinct();
    assert!(
        delivered_at_kill < total,
        "killed before the end ({delivered_at_kill} of {total})"
    );

    let mut second = RelayChild::spawn(db.url(), outbox::DEFAULT_AMQP_URL, &exchange.exchange, &fast);
    exchange.wait_for_distinct(total, Duration::from_secs(60)).await;
    eventually("all rows marked", Duration::from_secs(20), || {
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
        ) == 0
    })
    .await;
    let status = second.terminate();
    assert!(
        status.success(),
        "SIGTERM exits 0, got {status:?}; logs:\n{}",
        second.logs()
    );
    // The killed relay's leases merely expire; the stopped one gave its back.
    assert_eq!(
        scalar(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_leases WHERE expires_at > now()"
        ),
        0
    );
    assert!(second.logs().contains("relay stopped"), "{}", second.logs());

    for (aggregate, ns) in exchange.first_arrival_order("n") {
        assert_eq!(
            ns,
            (0..75).collect::<Vec<_>>(),
            "aggregate {aggregate} out of order"
        );
    }
    eprintln!(
        "SIGKILL mid-batch: {} duplicate deliveries of {total}",
        exchange.received().len() - total
    );
}
