use diesel::RunQueryDsl;
use std::time::Duration;

use outbox::TestDatabase;
use outbox::testing::TestExchange;

use crate::support::{RelayChild, count, eventually, record_interleaved};

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
        count(
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
        count(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_relays_aggregates_are_taken_over_within_its_lease() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let exchange = TestExchange::new().await.unwrap();
    const PER_AGGREGATE: i64 = 100;
    let total = record_interleaved(&mut conn, 200, PER_AGGREGATE);
    // Default lease (3 s, heartbeated); two relays share the drain. The
    // doomed one starts first: a survivor started first could claim the
    // whole backlog before the other runs (on a loaded machine it did).
    let small = ["--batch-size", "100"];
    let mut doomed = RelayChild::spawn(
        db.url(),
        outbox::DEFAULT_AMQP_URL,
        &exchange.exchange,
        &[&small[..], &["--relay-id", "takeover-doomed"]].concat(),
    );
    let held_sql = "SELECT count(*) AS n FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
                      JOIN outbox_events e ON e.seq = s.seq
                     WHERE l.owner = 'takeover-doomed' AND l.expires_at > now() AND e.published_at IS NULL";
    eventually("the doomed relay holds rows", Duration::from_secs(30), || {
        count(&mut conn, held_sql) > 0
    })
    .await;
    let mut survivor = RelayChild::spawn(
        db.url(),
        outbox::DEFAULT_AMQP_URL,
        &exchange.exchange,
        &[&small[..], &["--relay-id", "takeover-survivor"]].concat(),
    );
    // The survivor is up (its heartbeat row is written at start) while the
    // doomed one still holds rows.
    eventually(
        "the survivor runs beside the doomed relay",
        Duration::from_secs(30),
        || {
            count(
                &mut conn,
                "SELECT count(*) AS n FROM outbox_relays WHERE relay_id = 'takeover-survivor'",
            ) == 1
        },
    )
    .await;
    assert!(
        count(&mut conn, held_sql) > 0,
        "the doomed relay still holds rows when killed"
    );
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    let killed = std::time::Instant::now();
    // What it still held when it died (marks it sent may have landed).
    diesel::sql_query(
        "CREATE TABLE takeover_held AS
         SELECT e.seq FROM outbox_leases l CROSS JOIN unnest(l.seqs) AS s(seq)
           JOIN outbox_events e ON e.seq = s.seq
          WHERE l.owner = 'takeover-doomed' AND e.published_at IS NULL",
    )
    .execute(&mut conn)
    .unwrap();
    let held = count(&mut conn, "SELECT count(*) AS n FROM takeover_held");
    eventually(
        "the survivor publishes the dead relay's rows",
        Duration::from_secs(30),
        || {
            count(
                &mut conn,
                "SELECT count(*) AS n FROM outbox_events WHERE seq IN (SELECT seq FROM takeover_held) AND published_at IS NULL",
            ) == 0
        },
    )
    .await;
    let takeover = killed.elapsed();
    eprintln!("SIGKILL with {held} rows held: taken over and published {takeover:?} after the kill");
    // The lease is 3 s; the rest is slack for a loaded 2-core CI machine.
    assert!(
        takeover < Duration::from_secs(8),
        "the dead relay's {held} rows waited {takeover:?}; logs:\n{}",
        survivor.logs()
    );
    exchange.wait_for_distinct(total, Duration::from_secs(60)).await;
    assert!(survivor.terminate().success(), "{}", survivor.logs());
    for (aggregate, ns) in exchange.first_arrival_order("n") {
        assert_eq!(
            ns,
            (0..PER_AGGREGATE).collect::<Vec<_>>(),
            "aggregate {aggregate} out of order"
        );
    }
}
