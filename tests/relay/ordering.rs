use std::time::Duration;

use outbox::TestDatabase;

use outbox::testing::TestExchange;

use crate::support::{RunningRelay, record_interleaved, relay_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_relays_keep_each_aggregates_order_on_hot_aggregates() {
    const AGGREGATES: usize = 12;
    const BEFORE: i64 = 40;
    const DURING: i64 = 30;
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_interleaved(&mut conn, AGGREGATES, BEFORE);
    // Small batches so the relays interleave claims constantly.
    let relays: Vec<_> = (0..4)
        .map(|n| {
            RunningRelay::start(outbox::RelayConfig {
                batch_size: 3 + n * 4,
                max_in_flight: 64,
                ..relay_config(&db, &broker)
            })
        })
        .collect();
    // More writes while the relays run.
    let url = db.url().to_owned();
    let writer = tokio::task::spawn_blocking(move || {
        let mut conn = outbox::connect(&url).unwrap();
        let outbox = outbox::Outbox::new();
        for n in BEFORE..BEFORE + DURING {
            let envelopes: Vec<_> = (0..AGGREGATES)
                .map(|a| {
                    outbox
                        .envelope(
                            &crate::support::Ticked {
                                aggregate: format!("a{a}"),
                                n,
                            },
                            &outbox::Metadata::system(),
                        )
                        .unwrap()
                })
                .collect();
            diesel::Connection::transaction::<_, outbox::Error, _>(&mut conn, |conn| {
                outbox.record_batch(conn, &envelopes)
            })
            .unwrap();
        }
    });
    writer.await.unwrap();
    let total = AGGREGATES * (BEFORE + DURING) as usize;
    broker.wait_for_distinct(total, Duration::from_secs(60)).await;
    for relay in relays {
        relay.stop().await;
    }
    let order = broker.first_arrival_order("n");
    assert_eq!(order.len(), AGGREGATES);
    for (aggregate, ns) in order {
        assert_eq!(
            ns,
            (0..BEFORE + DURING).collect::<Vec<_>>(),
            "aggregate {aggregate} out of order"
        );
    }
    let duplicates = broker.received().len() - total;
    eprintln!("4 relays, {total} events: {duplicates} duplicate deliveries");
}
