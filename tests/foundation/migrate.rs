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
