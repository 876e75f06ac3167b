//! `chom demo` as a user runs it: it creates what it needs, finishes on
//! its own, and reports every section.

use std::process::Command;
use std::time::{Duration, Instant};

use chom::listeners::ListenerConfig;
use outbox::TestDatabase;

use crate::pipeline::{BrokerNames, amqp_url};
use crate::support::count;

#[test]
fn chom_demo_runs_to_completion_and_reports() {
    let db = TestDatabase::create_empty().unwrap();
    // The demo's queue names (its millisecond retries), deleted at the end.
    let broker = BrokerNames::new(&ListenerConfig {
        retries: Some(chom::demo::demo_retries()),
        ..ListenerConfig::default()
    });
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
    drop(broker);
}
