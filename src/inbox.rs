//! The inbox (`processed_events`): one row per (listener, event) whose
//! effect has committed, so a duplicate delivery has no second effect.
//!
//! The consumer framework uses it for listeners with
//! [`ListenerOptions::inbox`](crate::consumer::ListenerOptions::inbox) set:
//! it opens a transaction, calls [`claim`], runs the listener's effect on
//! the same connection and commits both together. A duplicate finds the row
//! and is acknowledged without running the listener. The functions are
//! public for services that consume events some other way.

use diesel::prelude::*;
use diesel::sql_types::Double;
use uuid::Uuid;

use crate::error::Result;

/// Inserts the inbox row of (`listener`, `event_id`) in the transaction open
/// on `conn`. Returns `true` when the row is new (run the effect), `false`
/// when it already existed (a duplicate: skip the effect).
///
/// A concurrent delivery of the same event waits on the uncommitted row and
/// then sees it (if the first commits) or claims it (if it rolls back), so
/// at most one effect commits.
pub fn claim(conn: &mut PgConnection, listener: &str, event_id: Uuid) -> Result<bool> {
    use crate::schema::processed_events::dsl;
    // The query builder (not sql_query) so the statement stays prepared.
    let inserted = diesel::insert_into(dsl::processed_events)
        .values((dsl::listener.eq(listener), dsl::event_id.eq(event_id)))
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(inserted == 1)
}

/// Whether (`listener`, `event_id`) has been processed.
pub fn is_processed(conn: &mut PgConnection, listener: &str, event_id: Uuid) -> Result<bool> {
    use crate::schema::processed_events::dsl;
    let found = dsl::processed_events
        .filter(dsl::listener.eq(listener))
        .filter(dsl::event_id.eq(event_id))
        .select(dsl::event_id)
        .first::<Uuid>(conn)
        .optional()?;
    Ok(found.is_some())
}

/// Deletes inbox rows older than `older_than_hours`, at most `batch` of
/// them, and returns how many. Keep rows for longer than a message can
/// take to arrive twice (the relay's retries plus the listeners' retry
/// delays); a week is plenty. Call it repeatedly until it returns less
/// than `batch`.
pub fn prune(conn: &mut PgConnection, older_than_hours: f64, batch: i64) -> Result<usize> {
    Ok(diesel::sql_query(
        "DELETE FROM processed_events WHERE ctid IN (
             SELECT ctid FROM processed_events
             WHERE processed_at < now() - make_interval(secs => $1 * 3600)
             LIMIT $2)",
    )
    .bind::<Double, _>(older_than_hours)
    .bind::<diesel::sql_types::BigInt, _>(batch)
    .execute(conn)?)
}
