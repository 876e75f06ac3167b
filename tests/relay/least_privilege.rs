//! Role separation and TLS settings against the real Postgres and
//! RabbitMQ: the relay runs as the role `docs/least-privilege.sql` creates
//! and as a broker user limited to its exchange, and can do its work and
//! nothing more; a write-path role records with INSERT alone; `sslmode`
//! and `amqps://` reach libpq and lapin's rustls and fail clearly, without
//! the password, where the server cannot satisfy them.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::testing::{TestBrokerUser, TestExchange, TestRoles, literal};
use uuid::Uuid;

use crate::support::{RunningRelay, count, eventually, record_ticks, relay_config};

fn denied(conn: &mut PgConnection, sql: &str) -> String {
    let error = conn
        .batch_execute(sql)
        .expect_err(&format!("expected permission denied for: {sql}"))
        .to_string();
    assert!(error.contains("permission denied"), "{sql}: {error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_runs_as_a_role_that_can_touch_only_the_outbox_tables() {
    let mut roles = TestRoles::new(TestDatabase::create().unwrap());
    let password = Uuid::now_v7().simple().to_string();
    let created = roles.apply_least_privilege(&password).unwrap();
    let (relay_role, writer_role) = (created.relay, created.writer);
    let mut admin = roles.db().connect().unwrap();
    admin
        .batch_execute(
            "CREATE TABLE sites (id BIGINT PRIMARY KEY, domain TEXT NOT NULL);
             INSERT INTO sites VALUES (1, 'a.example');",
        )
        .unwrap();
    // A write-path service records with INSERT alone (and cannot read back).
    let mut writer = outbox::connect(&roles.url_as(&writer_role, &password).unwrap()).unwrap();
    record_ticks(&mut writer, "c1", 0..5);
    denied(&mut writer, "SELECT count(*) FROM outbox_events");

    // The relay, as its role, claims, publishes and marks...
    // The relay's broker user may declare and publish to its exchange only.
    let broker = TestExchange::new().await.unwrap();
    let exchange = literal(&broker.exchange);
    let broker_user =
        TestBrokerUser::create(&format!("^{exchange}$"), &format!("^{exchange}$"), "^$").unwrap();
    let relay_url = roles.url_as(&relay_role, &password).unwrap();
    let config = outbox::RelayConfig {
        database_url: relay_url.clone(),
        amqp_url: broker_user.url(),
        ..relay_config(roles.db(), &broker)
    };
    let relay = RunningRelay::start(config.clone());
    broker.wait_for_distinct(5, Duration::from_secs(30)).await;
    eventually(
        "rows marked published by the relay role",
        Duration::from_secs(10),
        || {
            count(
                &mut admin,
                "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NOT NULL",
            ) == 5
        },
    )
    .await;
    relay.stop().await;
    // ...and moves published rows past retention into the event log.
    record_ticks(&mut writer, "c2", 0..3);
    let relay = RunningRelay::start(outbox::RelayConfig {
        retention: Duration::from_millis(1),
        prune_interval: Duration::from_millis(50),
        ..config
    });
    broker.wait_for_distinct(8, Duration::from_secs(30)).await;
    eventually(
        "published rows pruned by the relay role",
        Duration::from_secs(10),
        || count(&mut admin, "SELECT count(*) AS n FROM outbox_events") == 0,
    )
    .await;
    relay.stop().await;
    assert_eq!(
        count(&mut admin, "SELECT count(*) AS n FROM outbox_event_log"),
        8,
        "moved into the event log, not lost"
    );

    // Nothing else: no domain table, no inserting events, no consumer
    // tables, no switching the pause.
    let mut as_relay = outbox::connect(&relay_url).unwrap();
    let error = denied(&mut as_relay, "SELECT * FROM sites");
    assert!(error.contains("sites"), "{error}");
    denied(&mut as_relay, "UPDATE sites SET domain = 'x'");
    denied(
        &mut as_relay,
        "INSERT INTO outbox_events (event_id, event_type, aggregate_type, aggregate_id, occurred_at, payload)
         VALUES (gen_random_uuid(), 'a.b', 'a', '1', now(), '{}')",
    );
    denied(&mut as_relay, "SELECT * FROM failed_jobs");
    denied(&mut as_relay, "SELECT * FROM processed_events");
    denied(&mut as_relay, "UPDATE outbox_control SET paused = true");
    denied(&mut as_relay, "CREATE TABLE mine (id int)");
    assert!(!format!("{:?}", outbox::connect(&relay_url).err()).contains(&password));
}

fn encrypted(conn: &mut PgConnection) -> bool {
    count(
        conn,
        "SELECT count(*) AS n FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
    ) == 1
}

#[test]
fn sslmode_passes_through_to_libpq_and_fails_clearly_without_the_password() {
    const SECRET: &str = "pg-tls-hunter2";
    let db = TestDatabase::create().unwrap();
    let mut url = url::Url::parse(db.url()).unwrap();
    url.set_password(Some(SECRET)).unwrap();
    // This server offers TLS with a self-signed certificate: `require`
    // encrypts (the session says so)...
    url.set_query(Some("sslmode=require"));
    let mut conn = outbox::connect(url.as_str()).unwrap();
    assert!(encrypted(&mut conn), "sslmode=require gave an encrypted session");
    // ...`disable` does not...
    url.set_query(Some("sslmode=disable"));
    let mut conn = outbox::connect(url.as_str()).unwrap();
    assert!(!encrypted(&mut conn));
    // ...and `verify-full` refuses a certificate it cannot verify, with
    // libpq's reason and without the password.
    let ca = std::env::temp_dir().join(format!("outbox-test-missing-ca-{}.pem", Uuid::now_v7().simple()));
    url.set_query(Some(&format!("sslmode=verify-full&sslrootcert={}", ca.display())));
    let error = outbox::connect(url.as_str())
        .err()
        .expect("verify-full without the CA must fail");
    let text = format!("{error} / {error:?}");
    assert!(text.contains("root certificate"), "{text}");
    assert!(
        text.contains("sslmode=verify-full"),
        "the URL shown keeps its settings: {text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    eprintln!("verify-full without the CA: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_urls_reach_lapins_tls_and_fail_clearly_against_a_plain_port() {
    const SECRET: &str = "amqp-tls-hunter2";
    let url = format!("amqps://guest:{SECRET}@127.0.0.1:5672/%2f");
    outbox::amqp::validate_amqp_url(&url).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), outbox::amqp::connect(&url, "tls probe"))
        .await
        .expect("the TLS handshake fails within 20 s");
    let error = outcome.expect_err("amqps to the plain AMQP port must fail");
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(" / ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(text.contains("amqps://guest:***@"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    eprintln!("amqps against 5672: {text}");
}
