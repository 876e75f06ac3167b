//! The library's schema, embedded: `outbox_events`, `failed_jobs`,
//! `processed_events` and `outbox_control`.

use diesel::pg::PgConnection;
use diesel::sql_types::BigInt;
use diesel::{RunQueryDsl, sql_query};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::error::{Error, Result};

/// The migrations in `migrations/`, compiled into the library.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Advisory lock key serializing concurrent `migrate` calls (two relays
/// starting at once). ASCII "outboxmg".
const MIGRATION_LOCK_KEY: i64 = 0x6f75_7462_6f78_6d67;

/// Runs the library's pending migrations on `conn` and returns the versions
/// it applied (empty when the schema is current), then creates the event
/// log's partitions for this month and the next
/// [`MONTHS_AHEAD`](crate::event_log::MONTHS_AHEAD) where missing. Safe to
/// call from several processes at once.
///
/// The service's own migrations share diesel's bookkeeping table; give
/// them versions that sort apart from the library's.
pub fn migrate(conn: &mut PgConnection) -> Result<Vec<String>> {
    run_locked(conn, |conn| {
        let versions = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(|e| Error::Migration(e.to_string()))?;
        // The event log's months ahead, made by the owner (see event_log).
        crate::event_log::ensure_partitions(conn, chrono::Utc::now(), crate::event_log::MONTHS_AHEAD)?;
        Ok(versions)
    })
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
}

/// Runs `work` while holding the migration advisory lock, releasing it
/// whatever happens.
pub fn run_locked<T>(
    conn: &mut PgConnection,
    work: impl FnOnce(&mut PgConnection) -> Result<T>,
) -> Result<T> {
    // Polled with short statements instead of one blocking
    // `pg_advisory_lock`: a migration that builds an index CONCURRENTLY
    // waits for every statement in flight on the database to finish, so a
    // second migrator blocked inside one would deadlock with it.
    loop {
        let locked = sql_query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .get_result::<Locked>(conn)?;
        if locked.locked {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let outcome = work(conn);
    let unlocked = sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
        .execute(conn);
    let value = outcome?;
    unlocked?;
    Ok(value)
}
