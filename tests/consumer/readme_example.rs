//! The consuming guide (`docs/consuming.md`) shows `examples/orders.rs`
//! whole: this runs it against a database and broker names of its own, and
//! checks that the guide shows exactly that file.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use outbox::{Settings, TestDatabase};

use crate::broker::{TestBroker, amqp_url};

#[allow(dead_code)] // its `main` is for `cargo run --example orders`
#[path = "../../examples/orders.rs"]
mod orders;

#[test]
fn the_readme_shows_the_example_file_verbatim() {
    let readme = include_str!("../../docs/consuming.md");
    let example = include_str!("../../examples/orders.rs");
    assert!(
        readme.contains(&format!("```rust,no_run\n{example}```\n")),
        "docs/consuming.md must show examples/orders.rs, whole and unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_service_records_consumes_retries_and_stops() {
    let db = TestDatabase::create_empty().unwrap();
    let mut broker = TestBroker::new().await;
    let (mailer, _mailbox) = tokio::sync::mpsc::unbounded_channel();
    broker.track(&outbox::consumer::topology::plan(&broker.app, &orders::registry(mailer).unwrap()).unwrap());
    let settings = Settings {
        database_url: db.url().to_owned(),
        amqp_url: amqp_url(),
        exchange: broker.exchange.clone(),
    };

    let order_id = orders::run(settings, &broker.app).await.unwrap();

    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = db.connect().unwrap();
    let count = |conn: &mut PgConnection, sql: &str| {
        diesel::sql_query(sql)
            .bind::<BigInt, _>(order_id)
            .get_result::<N>(conn)
            .unwrap()
            .n
    };
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM order_history WHERE order_id = $1"
        ),
        1
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE aggregate_id = $1::text AND published_at IS NOT NULL"
        ),
        1,
        "the relay published the order's event"
    );
    // The inbox row of the listener with an inbox, none for the other.
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM processed_events p JOIN outbox_events e ON e.event_id = p.event_id \
             WHERE e.aggregate_id = $1::text AND p.listener = 'record_history'"
        ),
        1
    );
    let failed = diesel::sql_query("SELECT count(*) AS n FROM failed_jobs")
        .get_result::<N>(&mut conn)
        .unwrap()
        .n;
    assert_eq!(failed, 0, "the retried confirmation did not fail for good");
}
