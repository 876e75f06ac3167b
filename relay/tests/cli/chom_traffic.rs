use std::collections::HashMap;
use std::time::Duration;

use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::testing::TestExchange;

use crate::support::{RelayChild, count, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_beside_chom_traffic_delivers_every_event() {
    let db = TestDatabase::create_empty().unwrap();
    chom::migrate(&mut db.connect().unwrap()).unwrap();
    let exchange = TestExchange::new().await.unwrap();
    let mut relay = RelayChild::spawn(db.url(), outbox::DEFAULT_AMQP_URL, &exchange.exchange, &[]);

    // CHOM's own load generator, writing while the relay runs.
    let url = db.url().to_owned();
    let report = tokio::task::spawn_blocking(move || {
        let pool = outbox::pool(&url, 8, Duration::from_secs(10)).unwrap();
        let config = chom::simulate::SimulateConfig {
            tenants: 3,
            sites: 60,
            writers: 8,
            ..Default::default()
        };
        chom::simulate::run(&pool, &outbox::Outbox::new(), &config).unwrap()
    })
    .await
    .unwrap();
    let mut conn = db.connect().unwrap();
    let recorded = count(&mut conn, "SELECT count(*) AS n FROM outbox_events") as usize;
    assert!(recorded > 60, "simulate recorded {recorded} events: {report:?}");
    exchange
        .wait_for_distinct(recorded, Duration::from_secs(60))
        .await;
    eventually("all marked", Duration::from_secs(20), || {
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL",
        ) == 0
    })
    .await;
    assert!(relay.terminate().success());

    // Every message: message_id = event_id, the CloudEvents body of that event.
    use outbox::schema::outbox_events::dsl::*;
    let stored: HashMap<String, (String, String)> = outbox_events
        .select((event_id, event_type, aggregate_id))
        .load::<(uuid::Uuid, String, String)>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|(id, kind, aggregate)| (id.to_string(), (kind, aggregate)))
        .collect();
    for message in exchange.received() {
        let (kind, aggregate) = stored
            .get(&message.message_id())
            .expect("message_id is a stored event id");
        assert_eq!(message.body["specversion"], "1.0");
        assert_eq!(message.body["id"], message.message_id());
        assert_eq!(&message.body["type"], kind.as_str());
        assert_eq!(&message.routing_key, kind);
        assert_eq!(message.subject(), *aggregate);
    }
}
