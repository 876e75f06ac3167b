//! CHOM's schema: the outbox library's tables, then CHOM's own.

use diesel::pg::PgConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::error::Result;

/// CHOM's migrations in `examples/chom/migrations/`. Their versions sort
/// after the library's, and both share diesel's bookkeeping table.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Runs the outbox library's pending migrations, then CHOM's, and returns
/// the versions applied (empty when the schema is current). Safe to run
/// from several processes at once: CHOM's migrations run under the same
/// advisory lock as the library's.
pub fn migrate(conn: &mut PgConnection) -> Result<Vec<String>> {
    let mut applied = outbox::migrate(conn)?;
    let own = outbox::migrate::run_locked(conn, |conn| {
        conn.run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|e| outbox::Error::Migration(e.to_string()))
    })?;
    applied.extend(own);
    Ok(applied)
}
