//! `chom demo` as a user runs it: it creates what it needs, finishes on
//! its own, and reports every section.

use std::process::Command;
use std::time::{Duration, Instant};

use chom::listeners::ListenerConfig;
use outbox::TestDatabase;

use crate::pipeline::{BrokerNames, amqp_url};
use crate::support::count;

fn demo_listeners() -> ListenerConfig {
    ListenerConfig {
        retries: Some(chom::demo::demo_retries()),
        ..ListenerConfig::default()
    }
}

#[test]
fn chom_demo_runs_to_completion_and_reports() {
    let db = TestDatabase::create_empty().unwrap();
    // The demo's queue names (its millisecond retries), deleted at the end.
    let broker = BrokerNames::new(&demo_listeners());
    let stdout = run_demo_and_check(&db, &broker);
    assert!(
        stdout.contains("foreign"),
        "the outcomes table has a foreign column:\n{stdout}"
    );
}

/// A broker that holds events another database's relay published into the
/// same queues (an earlier `chom simulate` on another database): the demo
/// sets them aside and reports the same as on a clean broker.
#[test]
fn chom_demo_sets_aside_leftovers_of_another_database() {
    let db = TestDatabase::create_empty().unwrap();
    let broker = BrokerNames::new(&demo_listeners());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let connection = outbox::amqp::connect(&amqp_url(), "chom demo test")
            .await
            .unwrap();
        let channel = outbox::amqp::open_channel(&connection, true).await.unwrap();
        let registry = chom::listeners::registry(&demo_listeners()).unwrap();
        outbox::consumer::topology::declare(&channel, &broker.exchange, &broker.app, &registry)
            .await
            .unwrap();
        for i in 0..10 {
            let (id, aggregate, payload) = (
                uuid::Uuid::now_v7(),
                format!("{}", 900 + i),
                format!(
                    "{{\"site_id\": {}, \"tenant_id\": 424242, \"domain\": \"left{i}.example\"}}",
                    900 + i
                ),
            );
            let event = outbox::cloudevents::EventRef {
                event_id: id,
                event_type: "site.created",
                aggregate_type: "site",
                aggregate_id: &aggregate,
                tenant_id: Some("424242"),
                occurred_at: chrono::Utc::now(),
                actor: None,
                correlation_id: None,
                causation_id: None,
                traceparent: None,
                schema_version: 1,
                payload_json: &payload,
            };
            let body = outbox::cloudevents::encode_body(&event, "/outbox/another_database").unwrap();
            let properties = outbox::cloudevents::amqp_properties(&event, "leftovers").unwrap();
            channel
                .basic_publish(
                    broker.exchange.as_str().into(),
                    "site.created".into(),
                    lapin::options::BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let _ = connection.close(200, "done".into()).await;
    });
    let stdout = run_demo_and_check(&db, &broker);
    let mut conn = db.connect().unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE exception LIKE '%no tenant%'"
        ),
        0,
        "no leftover was applied"
    );
    assert!(stdout.contains("foreign"), "{stdout}");
}

/// Runs `chom demo` on `db` with `broker`'s names, checks every section of
/// its report and the database after it, and returns its stdout.
fn run_demo_and_check(db: &TestDatabase, broker: &BrokerNames) -> String {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_chom"))
        .args([
            "demo",
            "--exchange",
            &broker.exchange,
            "--app",
            &broker.app,
            "--sites",
            "12",
            "--outage-sites",
            "4",
        ])
        .env("DATABASE_URL", db.url())
        .env("AMQP_URL", amqp_url())
        .env_remove("RUST_LOG")
        .output()
        .expect("run chom demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chom demo failed:\n{stdout}\n{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "well under a minute");
    for section in [
        "== events (this run) ==",
        "== listener outcomes ==",
        "demo mode: 3 tries",
        "== audit log ==",
        "== tenant stats (UpdateTenantMetrics) ==",
        "== failed jobs ==",
        "send_notification",
        "notifier unavailable",
        "chom_sites_created_total",
    ] {
        assert!(stdout.contains(section), "{section} missing from:\n{stdout}");
    }
    assert!(stderr.contains("[demo] notifier outage"), "{stderr}");

    let mut conn = db.connect().unwrap();
    let events = count(&mut conn, "SELECT count(*) AS n FROM outbox_events");
    assert!(events > 0);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL"
        ),
        0,
        "everything published"
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) AS n FROM audit_logs"),
        events,
        "one audit row per event"
    );
    let failed = count(&mut conn, "SELECT count(*) AS n FROM failed_jobs");
    assert!(
        failed >= 2,
        "the outage's notifications failed for good ({failed})"
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM failed_jobs WHERE listener <> 'send_notification'"
        ),
        0
    );
    // The account events ran: each of its twelve event types, reported and notified.
    for event_type in chom::events::ACCOUNT_EVENT_TYPES {
        let sql = format!("SELECT count(*) AS n FROM outbox_events WHERE event_type = '{event_type}'");
        assert!(count(&mut conn, &sql) > 0, "{event_type} in the demo");
        assert!(stdout.contains(event_type), "{event_type} in the report");
    }
    assert!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM notifications WHERE kind LIKE 'quota.%' OR kind LIKE 'ssl.%'"
        ) > 0
    );
    stdout.into_owned()
}
