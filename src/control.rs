//! Switches operators flip in the database, obeyed by every relay: pause
//! and resume (the seed's "disable events" rollback), and putting failed
//! rows back in line.

use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};

use crate::error::Result;

/// Pauses every relay reading this database: they stop claiming within one
/// poll interval; rows already in flight finish. `by` is recorded for
/// `outbox status`.
pub fn pause(conn: &mut PgConnection, by: Option<&str>) -> Result<()> {
    diesel::sql_query("UPDATE outbox_control SET paused = TRUE, paused_by = $1, updated_at = now() WHERE id")
        .bind::<Nullable<Text>, _>(by)
        .execute(conn)?;
    Ok(())
}

/// Lets relays claim again.
pub fn resume(conn: &mut PgConnection) -> Result<()> {
    diesel::sql_query(
        "UPDATE outbox_control SET paused = FALSE, paused_by = NULL, updated_at = now() WHERE id",
    )
    .execute(conn)?;
    Ok(())
}

/// Whether relays are paused.
pub fn is_paused(conn: &mut PgConnection) -> Result<bool> {
    use crate::schema::outbox_control::dsl::*;
    Ok(outbox_control.select(paused).first::<bool>(conn)?)
}

/// Who paused relays and why (`None` when not paused or no reason given).
pub fn paused_by(conn: &mut PgConnection) -> Result<Option<String>> {
    use crate::schema::outbox_control::dsl::*;
    Ok(outbox_control
        .filter(paused)
        .select(paused_by)
        .first::<Option<String>>(conn)
        .optional()?
        .flatten())
}

/// Puts rows that exhausted their publish attempts back in line (attempts
/// reset, due now), so their aggregates move again. Returns how many.
pub fn retry_failed_events(conn: &mut PgConnection) -> Result<usize> {
    Ok(diesel::sql_query(
        "UPDATE outbox_events
         SET failed_at = NULL, attempts = 0, next_attempt_at = NULL
         WHERE failed_at IS NOT NULL AND published_at IS NULL",
    )
    .execute(conn)?)
}
