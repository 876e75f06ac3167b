//! The worker's maintenance schedule (`src/maintenance/`): the inbox and
//! attempts pruners run every `prune_interval` while the worker runs,
//! delete rows past their retention, keep fresh ones, stop with the
//! worker, and survive a failing step.

use std::time::Duration;

use diesel::RunQueryDsl;
use diesel::connection::SimpleConnection;
use outbox::Registry;
use outbox::testing::TestRoles;
use serde_json::json;
use uuid::Uuid;

use crate::broker::{TestBroker, TestEvent};
use crate::harness::{Running, Scripted, database, effect, eventually, fast};
use crate::support::count;

const LIMIT: Duration = Duration::from_secs(30);
const PERIOD: Duration = Duration::from_millis(50);
/// Longer than the listeners' longest retry delay plus timeout (10 s), as
/// the worker requires.
const RETENTION: Duration = Duration::from_secs(3600);

/// Inbox rows and attempt counts of listener `old` dated two hours ago
/// (past [`RETENTION`]) and of listener `fresh` dated now.
fn seed(conn: &mut diesel::PgConnection) {
    conn.batch_execute(
        "INSERT INTO processed_events (listener, event_id, processed_at)
             SELECT 'old', gen_random_uuid(), now() - interval '2 hours' FROM generate_series(1, 3);
         INSERT INTO processed_events (listener, event_id)
             SELECT 'fresh', gen_random_uuid() FROM generate_series(1, 2);
         INSERT INTO listener_attempts (listener, event_id, attempts, first_failed_at, updated_at)
             SELECT 'old', gen_random_uuid(), 1, now() - interval '3 hours', now() - interval '2 hours'
             FROM generate_series(1, 3);
         INSERT INTO listener_attempts (listener, event_id, attempts)
             SELECT 'fresh', gen_random_uuid(), 1 FROM generate_series(1, 2);",
    )
    .unwrap();
}

fn rows(conn: &mut diesel::PgConnection, table: &str, listener: &str) -> i64 {
    count(
        conn,
        &format!("SELECT count(*) AS n FROM {table} WHERE listener = '{listener}'"),
    )
}

fn registry(listener: &Scripted) -> Registry {
    Registry::new()
        .queued_listener_with(&["widget.created"], listener.clone(), fast(3, &[50]))
        .unwrap()
}

fn pruning_fast(config: &mut outbox::WorkerConfig) {
    config.prune_interval = Some(PERIOD);
    config.inbox_retention = RETENTION;
    config.attempts_retention = RETENTION;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_prunes_old_inbox_and_attempts_rows_keeps_fresh_ones_and_stops_pruning_when_it_stops() {
    let (db, mut conn) = database();
    seed(&mut conn);
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let worker = Running::start_with(&db, &mut broker, &registry(&listener), pruning_fast).await;
    // The worker's own inbox row, written now, is fresh too.
    broker
        .publish_event(&TestEvent::new("widget.created", json!({})))
        .await;
    eventually("old inbox rows pruned", LIMIT, || {
        rows(&mut conn, "processed_events", "old") == 0
    })
    .await;
    eventually("old attempt counts pruned", LIMIT, || {
        rows(&mut conn, "listener_attempts", "old") == 0
    })
    .await;
    eventually("the event handled", LIMIT, || {
        rows(&mut conn, "processed_events", "audit") == 1
    })
    .await;
    assert_eq!(rows(&mut conn, "processed_events", "fresh"), 2);
    assert_eq!(rows(&mut conn, "listener_attempts", "fresh"), 2);
    assert!(worker.health.is_healthy());
    worker.stop().await;

    // Stopped with the worker: old rows now stay, however many periods go
    // by.
    seed(&mut conn);
    tokio::time::sleep(PERIOD * 20).await;
    assert_eq!(
        rows(&mut conn, "processed_events", "old"),
        3,
        "no pruning after stop"
    );
    assert_eq!(
        rows(&mut conn, "listener_attempts", "old"),
        3,
        "no pruning after stop"
    );
    assert_eq!(rows(&mut conn, "processed_events", "audit"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_pruning_off_deletes_nothing() {
    let (db, mut conn) = database();
    seed(&mut conn);
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let worker = Running::start_with(&db, &mut broker, &registry(&listener), |config| {
        pruning_fast(config);
        config.prune_interval = None;
    })
    .await;
    broker
        .publish_event(&TestEvent::new("widget.created", json!({})))
        .await;
    eventually("the event handled", LIMIT, || {
        rows(&mut conn, "processed_events", "audit") == 1
    })
    .await;
    tokio::time::sleep(PERIOD * 20).await;
    worker.stop().await;
    assert_eq!(rows(&mut conn, "processed_events", "old"), 3);
    assert_eq!(rows(&mut conn, "listener_attempts", "old"), 3);
}

/// `outbox_maintenance_failures_total{service="<service>"}` in this
/// process's metrics.
fn failures(handle: &metrics_exporter_prometheus::PrometheusHandle, service: &str) -> u64 {
    crate::support::metric(
        handle,
        &format!("outbox_maintenance_failures_total{{service=\"{service}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_prune_step_is_counted_and_retried_and_the_worker_goes_on() {
    let handle = outbox::metrics::install_recorder().unwrap();
    let (db, mut conn) = database();
    seed(&mut conn);
    // The worker role of docs/least-privilege.sql without its DELETE on
    // the inbox: the inbox pruner's every step is refused.
    let mut roles = TestRoles::new(db);
    let password = Uuid::now_v7().simple().to_string();
    let worker_role = roles.apply_least_privilege(&password).unwrap().worker;
    for sql in [
        format!("GRANT SELECT, INSERT ON effects TO \"{worker_role}\""),
        format!("REVOKE DELETE ON processed_events FROM \"{worker_role}\""),
    ] {
        diesel::sql_query(&sql).execute(&mut conn).expect(&sql);
    }
    let database_url = roles.url_as(&worker_role, &password).unwrap();
    let mut broker = TestBroker::new().await;
    let listener = Scripted::new("audit", |event, ctx, _| effect(ctx, "audit", event));
    let before = failures(&handle, "inbox_pruner");
    let worker = Running::start_with(roles.db(), &mut broker, &registry(&listener), |config| {
        pruning_fast(config);
        config.database_url = database_url.clone();
    })
    .await;
    // Refused, counted, and tried again: several failed periods.
    eventually("inbox prune steps failing", LIMIT, || {
        failures(&handle, "inbox_pruner") >= before + 3
    })
    .await;
    assert_eq!(
        rows(&mut conn, "processed_events", "old"),
        3,
        "the refused delete deleted nothing"
    );
    // The other service and the listeners go on.
    eventually("old attempt counts pruned", LIMIT, || {
        rows(&mut conn, "listener_attempts", "old") == 0
    })
    .await;
    broker
        .publish_event(&TestEvent::new("widget.created", json!({})))
        .await;
    eventually("the event handled", LIMIT, || {
        count(&mut conn, "SELECT count(*) AS n FROM effects") == 1
    })
    .await;
    assert!(worker.health.is_healthy());
    // Once the grant is back, the next period prunes.
    let grant = format!("GRANT DELETE ON processed_events TO \"{worker_role}\"");
    diesel::sql_query(&grant).execute(&mut conn).expect(&grant);
    eventually("old inbox rows pruned after the grant", LIMIT, || {
        rows(&mut conn, "processed_events", "old") == 0
    })
    .await;
    assert_eq!(rows(&mut conn, "processed_events", "fresh"), 2);
    assert_eq!(rows(&mut conn, "processed_events", "audit"), 1);
    worker.stop().await;
}

#[test]
fn an_attempts_retention_a_retry_could_outlast_is_refused() {
    let listener = Scripted::new("audit", |_, _, _| Ok(()));
    let registry = Registry::new()
        .queued_listener_with(
            &["widget.created"],
            listener,
            fast(3, &[50, 60_000]), // timeout 10 s: a count may sit 70 s untouched
        )
        .unwrap();
    let config = |attempts_retention| outbox::WorkerConfig {
        attempts_retention,
        ..outbox::WorkerConfig::default()
    };
    let error = outbox::Worker::new(config(Duration::from_secs(60)), &registry)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("attempts retention"), "{error}");
    assert!(outbox::Worker::new(config(Duration::from_secs(71)), &registry).is_ok());
    let off = outbox::WorkerConfig {
        prune_interval: None,
        ..config(Duration::from_secs(60))
    };
    assert!(
        outbox::Worker::new(off, &registry).is_ok(),
        "nothing to check when pruning is off"
    );
}
