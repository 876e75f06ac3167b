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
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO failed_jobs (uuid, listener, queue, event_id, payload, exception, attempts)
             VALUES (gen_random_uuid(), 'audit', 'app.audit', gen_random_uuid(), '{}', 'boom', 3)",
        ),
        &mut conn,
    )
    .unwrap();
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
