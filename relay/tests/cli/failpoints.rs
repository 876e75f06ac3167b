//! The relay crashed exactly between publish, confirm, mark and commit
//! (fail points, feature `failpoints`): a successor delivers everything,
//! each aggregate in order, and only the crash window is published twice.
//!
//! `cargo test -p outbox-relay --features failpoints --test cli failpoints`

use std::time::Duration;

use outbox::TestDatabase;
use outbox::testing::TestExchange;

use crate::support::{RelayChild, count, eventually, record_interleaved};

async fn crash_at(point: &str) {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let total = record_interleaved(&mut conn, 10, 30);
    let fast = ["--batch-size", "20", "--lease", "2s", "--confirm-timeout", "1s"];
    let failpoints = format!("{point}=return");
    let mut crashed = RelayChild::spawn_with_env(
        db.url(),
        outbox::DEFAULT_AMQP_URL,
        &exchange.exchange,
        &fast,
        &[("FAILPOINTS", failpoints.as_str())],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = crashed.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{point} never fired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // exit(70) from a blocking-pool thread can also end in a signal while
    // other threads tear down (libpq, TLS): either way the process died
    // right at the fail point, which is all a crash needs.
    assert!(
        !status.success() && (status.code() == Some(70) || status.code().is_none()),
        "{point}: {status:?}: {}",
        crashed.logs()
    );
    assert!(
        crashed.logs().contains(&format!("failpoint=\"{point}\"")) || crashed.logs().contains(point),
        "{}",
        crashed.logs()
    );
    let marked_at_crash = count(
        &mut conn,
        "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NOT NULL",
    );

    let mut successor = RelayChild::spawn(db.url(), outbox::DEFAULT_AMQP_URL, &exchange.exchange, &fast);
    exchange.wait_for_distinct(total, Duration::from_secs(60)).await;
    eventually("all rows marked", Duration::from_secs(30), || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
        ) == 0
    })
    .await;
    assert!(successor.terminate().success());
    for (aggregate, ns) in exchange.first_arrival_order("n") {
        assert_eq!(
            ns,
            (0..30).collect::<Vec<_>>(),
            "{point}: aggregate {aggregate} out of order"
        );
    }
    let duplicates = exchange.received().len() - total;
    eprintln!(
        "{point}: {marked_at_crash} rows marked at the crash, {duplicates} duplicate deliveries of {total}"
    );
    if point == "relay::after_mark" {
        assert!(marked_at_crash > 0, "the mark committed before the crash");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_publish_before_confirm() {
    crash_at("relay::after_publish").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_confirm_before_mark_is_queued() {
    crash_at("relay::after_confirm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_mark() {
    crash_at("relay::before_mark").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_mark_committed() {
    crash_at("relay::after_mark").await;
}
