use std::thread;

use outbox::TestDatabase;

use crate::support::count;

fn migration_count() -> usize {
    diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&outbox::MIGRATIONS)
        .unwrap()
        .len()
}

#[test]
fn migrate_creates_the_tables_and_is_idempotent() {
    let db = TestDatabase::create_empty().unwrap();
    let mut conn = db.connect().unwrap();
    let applied = outbox::migrate(&mut conn).unwrap();
    assert_eq!(applied.len(), migration_count());
    for table in [
        "outbox_events",
        "failed_jobs",
        "processed_events",
        "outbox_control",
    ] {
        assert_eq!(
            count(
                &mut conn,
                &format!("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = '{table}'")
            ),
            1,
            "{table}"
        );
    }
    assert!(
        outbox::migrate(&mut conn).unwrap().is_empty(),
        "second run applies nothing"
    );
}

#[test]
fn concurrent_migrations_do_not_collide() {
    let db = TestDatabase::create_empty().unwrap();
    let applied: usize = (0..4)
        .map(|_| {
            let url = db.url().to_owned();
            thread::spawn(move || {
                outbox::migrate(&mut outbox::connect(&url).unwrap())
                    .unwrap()
                    .len()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert_eq!(applied, migration_count(), "each migration applied exactly once");
}

/// The newest migration of the previous main (what landed before this
/// release's migrations).
const PREVIOUS_RELEASE: &str = "20261201000009";

/// A database migrated by the previous main upgrades with
/// `outbox::migrate` and keeps its unpublished events, failed jobs and
/// registered listeners.
#[test]
fn a_database_of_the_previous_release_upgrades_and_keeps_its_rows() {
    use diesel::migration::MigrationSource;
    use diesel_migrations::MigrationHarness;
    let db = TestDatabase::create_empty().unwrap();
    let mut conn = db.connect().unwrap();
    let mut migrations = MigrationSource::<diesel::pg::Pg>::migrations(&outbox::MIGRATIONS).unwrap();
    migrations.sort_by(|a, b| a.name().version().cmp(&b.name().version()));
    let newer: Vec<String> = migrations
        .iter()
        .map(|m| m.name().version().to_string())
        .filter(|v| v.as_str() > PREVIOUS_RELEASE)
        .collect();
    assert!(
        !newer.is_empty(),
        "this release adds migrations after {PREVIOUS_RELEASE}"
    );
    diesel::migration::MigrationConnection::setup(&mut conn).unwrap();
    for migration in migrations
        .iter()
        .filter(|m| m.name().version().to_string().as_str() <= PREVIOUS_RELEASE)
    {
        conn.run_migration(migration).unwrap();
    }
    outbox::testing::record_ticks(&mut conn, "a1", 0..5).unwrap();
    insert_failed_job(&mut conn);
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO outbox_listeners (app, listener, exchange, queue, retry_queues, dead_queue, event_types, worker_id)
             VALUES ('app', 'audit', 'x', 'app.audit', '{}', 'app.audit.dead', '{site.created}', 'w1')",
        ),
        &mut conn,
    )
    .unwrap();

    let applied = outbox::migrate(&mut conn).unwrap();
    assert_eq!(applied, newer);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL"
        ),
        5
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 1);
    let listeners = outbox::consumer::registered_listeners(&mut conn).unwrap();
    assert_eq!(listeners.len(), 1);
    assert_eq!(
        listeners[0].inbox, None,
        "unknown for a listener registered before"
    );
    // The dashboard's new tables and indexes are in place and usable.
    assert_eq!(
        outbox::failed_jobs::count(&mut conn, &outbox::failed_jobs::Filter::default()).unwrap(),
        1
    );
    assert!(outbox::relay::presence::relays(&mut conn).unwrap().is_empty());
    assert_eq!(
        outbox::relay::history::published_per_minute(&mut conn, 60)
            .unwrap()
            .len(),
        60
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM pg_indexes WHERE indexname IN ('outbox_events_by_aggregate', 'outbox_events_by_correlation', 'outbox_events_published_at')"
        ),
        3
    );
}

/// A database migrated by main before the claim floor (its last migration,
/// the event log) upgrades and keeps every unpublished event, including
/// one waiting for a publish retry and one failed, a failed job and a
/// logged event; the new claim then reads all of them.
#[test]
fn a_database_from_before_the_claim_floor_upgrades_and_its_backlog_is_claimed() {
    const BEFORE_THE_FLOOR: &str = "20261201000010";
    let db = TestDatabase::create_empty().unwrap();
    let mut conn = db.connect().unwrap();
    migrated_to(&mut conn, BEFORE_THE_FLOOR);
    outbox::event_log::ensure_partitions(&mut conn, chrono::Utc::now(), 1).unwrap();
    outbox::testing::record_ticks(&mut conn, "logged", 0..2).unwrap();
    diesel::RunQueryDsl::execute(
        diesel::sql_query("UPDATE outbox_events SET published_at = now() - interval '1 hour'"),
        &mut conn,
    )
    .unwrap();
    assert_eq!(outbox::event_log::move_published(&mut conn, 0.0, 100).unwrap(), 2);
    outbox::testing::record_ticks(&mut conn, "waiting", 0..3).unwrap();
    outbox::testing::record_ticks(&mut conn, "failed", 0..2).unwrap();
    outbox::testing::record_ticks(&mut conn, "fresh", 0..4).unwrap();
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "UPDATE outbox_events SET attempts = 1, next_attempt_at = now() - interval '1 second'
             WHERE seq = (SELECT min(seq) FROM outbox_events WHERE aggregate_id = 'waiting');
             ",
        ),
        &mut conn,
    )
    .unwrap();
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "UPDATE outbox_events SET attempts = 20, next_attempt_at = now(), failed_at = now()
             WHERE seq = (SELECT min(seq) FROM outbox_events WHERE aggregate_id = 'failed')",
        ),
        &mut conn,
    )
    .unwrap();
    insert_failed_job(&mut conn);

    let applied = outbox::migrate(&mut conn).unwrap();
    assert!(
        applied.iter().any(|v| v.as_str() > BEFORE_THE_FLOOR),
        "{applied:?}"
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NULL"
        ),
        9
    );
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM outbox_event_log"), 2);
    assert_eq!(count(&mut conn, "SELECT count(*) AS n FROM failed_jobs"), 1);
    assert_eq!(outbox::relay::store::claim_floor(&mut conn).unwrap(), 0);

    // The new claim, raising the floor as a relay does, takes every row
    // that may go now: the fresh aggregate and the due retry with its
    // followers; the failed aggregate waits.
    let last = count(&mut conn, "SELECT max(seq) AS n FROM outbox_events");
    let claimed =
        outbox::relay::store::claim_batch_raising_floor(&mut conn, "relay", &[], 100, 30.0, Some(last))
            .unwrap();
    let mut aggregates: Vec<&str> = claimed.iter().map(|row| row.aggregate_id.as_str()).collect();
    aggregates.dedup();
    assert_eq!(claimed.len(), 7, "{aggregates:?}");
    assert!(!aggregates.contains(&"failed"));
    // Once put back in line, the failed aggregate is claimed too.
    assert_eq!(outbox::control::retry_failed_events(&mut conn).unwrap(), 1);
    let retried =
        outbox::relay::store::claim_batch_raising_floor(&mut conn, "relay", &[], 100, 30.0, Some(last))
            .unwrap();
    assert_eq!(retried.len(), 2);
    assert!(retried.iter().all(|row| row.aggregate_id == "failed"));
}

/// The library's migrations up to and including `version`, on an empty
/// database: the schema an earlier main left.
fn migrated_to(conn: &mut diesel::PgConnection, version: &str) {
    use diesel::migration::MigrationSource;
    use diesel_migrations::MigrationHarness;
    let mut migrations = MigrationSource::<diesel::pg::Pg>::migrations(&outbox::MIGRATIONS).unwrap();
    migrations.sort_by(|a, b| a.name().version().cmp(&b.name().version()));
    diesel::migration::MigrationConnection::setup(conn).unwrap();
    for migration in migrations
        .iter()
        .filter(|m| m.name().version().to_string().as_str() <= version)
    {
        conn.run_migration(migration).unwrap();
    }
}

/// One failed job, as a worker writes it.
fn insert_failed_job(conn: &mut diesel::PgConnection) {
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO failed_jobs (uuid, listener, queue, event_id, payload, exception, attempts)
             VALUES (gen_random_uuid(), 'audit', 'app.audit', gen_random_uuid(), '{}', 'boom', 3)",
        ),
        conn,
    )
    .unwrap();
}
