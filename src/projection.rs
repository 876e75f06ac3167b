//! Projections: named read models fed by events, rebuilt from the event
//! log while writers keep writing.
//!
//! A [`Projection`] applies events to its tables inside a transaction the
//! library gives it. Registered with
//! [`Registry::projection`](crate::Registry::projection), it runs live as
//! a queued listener of its own (the inbox makes each event count once),
//! and a worker running it also rebuilds it when asked (`outbox projection
//! rebuild NAME`, or [`request_rebuild`]), or call [`rebuild`] yourself.
//!
//! ## A rebuild, and why it neither misses nor doubles an event
//!
//! 1. Under an exclusive lock on the projection's row in
//!    `outbox_projections` (live handlers take it shared, so they wait):
//!    [`Projection::reset`] empties the read model, the projection's inbox
//!    rows are deleted and its state becomes `rebuilding`. From here the
//!    live listener acknowledges events without applying them: the rebuild
//!    will.
//! 2. The event log is applied in log order, a batch a transaction with
//!    the checkpoint (`position`): a rebuild killed half way resumes after
//!    its last batch.
//! 3. Under the exclusive lock again and one snapshot: the rest of the log
//!    (moved in meanwhile), then every event still in `outbox_events`
//!    (each with an inbox row, since its live delivery may still come), and
//!    the state goes back to `live` with `rebuilt_through` = the last log
//!    position applied. Every event committed before that snapshot was
//!    applied once; every later one arrives live. A late live delivery of
//!    an event the rebuild took from the log (at or before
//!    `rebuilt_through`) is recognised and skipped.
//!
//! Events are brought to their current shape by the registry's upcasters
//! before `apply` sees them, live and in a rebuild. A rebuild replays what
//! the log still holds: keep the log forever
//! ([`RelayConfig::log_retention`](crate::RelayConfig::log_retention)
//! `None`, the default) for projections that must equal a recompute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};
use serde::Serialize;

use crate::consumer::{HandlerContext, ListenerOptions, QueuedListener, ReceivedEvent};
use crate::error::{Error, ListenerError, Result};
use crate::event_log::{self, LoggedEvent};
use crate::upcast::Upcasters;

/// Events a rebuild reads and applies a transaction (a projection that
/// recounts per batch, like CHOM's tenant stats, does it this often; measured
/// in `outbox bench projection`: 5,000 gave 0.38 of a plain scan, 20,000
/// 0.78).
pub const REBUILD_BATCH: i64 = 20_000;

/// A named read model fed by events.
pub trait Projection: Send + Sync + 'static {
    /// Its name: the live listener's name and its row in
    /// `outbox_projections` (lower-case letters, digits and `_`).
    fn name(&self) -> &str;

    /// The event types it reads.
    fn event_types(&self) -> Vec<String>;

    /// Empties the read model, inside the rebuild's first transaction.
    fn reset(&self, conn: &mut PgConnection) -> std::result::Result<(), ListenerError>;

    /// Applies `events` in order inside the caller's transaction (one live
    /// event, or a batch of a rebuild: aggregate a batch in memory where it
    /// pays).
    fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[ReceivedEvent],
    ) -> std::result::Result<(), ListenerError>;

    /// The live listener's options (the inbox is always on). Default:
    /// [`ListenerOptions::default`] with concurrency 1, one batch
    /// transaction at a time: read models are usually a few hot rows
    /// (totals, counters) that concurrent batches would lock in different
    /// orders, and one at a time keeps each aggregate's events in order.
    fn options(&self) -> ListenerOptions {
        ListenerOptions {
            concurrency: 1,
            ..ListenerOptions::default()
        }
    }
}

/// A projection's row: where it stands.
#[derive(Debug, Clone, QueryableByName, Serialize)]
pub struct ProjectionStatus {
    /// The projection.
    #[diesel(sql_type = Text)]
    pub name: String,
    /// `live`, `rebuild_requested` or `rebuilding`.
    #[diesel(sql_type = Text)]
    pub state: String,
    /// The last log position a rebuild applied.
    #[diesel(sql_type = BigInt)]
    pub position: i64,
    /// The last log position the last finished rebuild covered.
    #[diesel(sql_type = BigInt)]
    pub rebuilt_through: i64,
    /// Events the last rebuild applied.
    #[diesel(sql_type = BigInt)]
    pub rebuilt_events: i64,
    /// When the last rebuild started.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub rebuild_started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it finished.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub rebuild_finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The log's last position now.
    #[diesel(sql_type = BigInt)]
    pub log_head: i64,
    /// Events still in `outbox_events`, not yet moved into the log (the
    /// relay moves them past its retention, 7 days by default): a
    /// rebuild applies them at its hand-over, after the log.
    #[diesel(sql_type = BigInt)]
    pub not_yet_logged: i64,
}

impl ProjectionStatus {
    /// Log events a rebuild under way still has to apply (0 when live).
    pub fn rebuild_lag(&self) -> i64 {
        if self.state == "live" {
            0
        } else {
            (self.log_head - self.position).max(0)
        }
    }
}

/// Every projection's row, by name.
pub fn statuses(conn: &mut PgConnection) -> Result<Vec<ProjectionStatus>> {
    Ok(diesel::sql_query(
        "SELECT name, state, position, rebuilt_through, rebuilt_events, rebuild_started_at,
                rebuild_finished_at,
                (SELECT COALESCE(max(position), 0)::bigint FROM outbox_event_log) AS log_head,
                (SELECT count(*) FROM outbox_events) AS not_yet_logged
         FROM outbox_projections ORDER BY name",
    )
    .load(conn)?)
}

/// Makes sure `name` has its row (a live projection never rebuilt).
pub fn ensure_row(conn: &mut PgConnection, name: &str) -> Result<()> {
    diesel::sql_query("INSERT INTO outbox_projections (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind::<Text, _>(name)
        .execute(conn)?;
    Ok(())
}

/// Asks the workers running projection `name` to rebuild it (they look
/// every [`REBUILD_POLL`]). Refused for a projection no worker has
/// registered (no row) or one already rebuilding.
pub fn request_rebuild(conn: &mut PgConnection, name: &str) -> Result<()> {
    let updated = diesel::sql_query(
        "UPDATE outbox_projections SET state = 'rebuild_requested', updated_at = now()
         WHERE name = $1 AND state = 'live'",
    )
    .bind::<Text, _>(name)
    .execute(conn)?;
    if updated == 1 {
        return Ok(());
    }
    let statuses = statuses(conn)?;
    match statuses.iter().find(|s| s.name == name) {
        None if statuses.is_empty() => Err(Error::NotFound(format!(
            "projection {name}: no projection is registered in this database (a worker records each projection it runs when it starts)"
        ))),
        None => Err(Error::NotFound(format!(
            "projection {name}: not registered in this database; registered: {} (a projection a worker has never run is not listed)",
            statuses
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        Some(status) => Err(Error::InvalidInput(format!(
            "projection {name} is {} already",
            status.state.replace('_', " ")
        ))),
    }
}

/// How often a worker looks for a requested rebuild of its projections.
pub const REBUILD_POLL: Duration = Duration::from_secs(1);

/// What a rebuild did.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// Events applied (log and not yet logged).
    pub events: i64,
    /// The last log position applied.
    pub rebuilt_through: i64,
    /// Whether it resumed a rebuild that had stopped half way.
    pub resumed: bool,
    /// How long it took.
    pub seconds: f64,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    position: i64,
    #[diesel(sql_type = BigInt)]
    rebuilt_events: i64,
}

fn lock_row(conn: &mut PgConnection, name: &str) -> Result<Row> {
    ensure_row(conn, name)?;
    Ok(diesel::sql_query(
        "SELECT state, position, rebuilt_events FROM outbox_projections WHERE name = $1 FOR UPDATE",
    )
    .bind::<Text, _>(name)
    .get_result(conn)?)
}

/// A stored event as a listener receives it, in its current shape.
fn received(projection: &str, upcasters: &Upcasters, stored: &LoggedEvent) -> Result<ReceivedEvent> {
    let row = &stored.event;
    let refused = |reason: String| Error::Projection {
        name: projection.to_owned(),
        reason: format!("event {} ({}): {reason}", row.event_id, row.event_type),
    };
    let data =
        serde_json::value::RawValue::from_string(row.payload.clone()).map_err(|e| refused(e.to_string()))?;
    let mut event = ReceivedEvent {
        event_id: row.event_id,
        event_type: row.event_type.clone(),
        source: "outbox_event_log".to_owned(),
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        tenant_id: row.tenant_id.clone(),
        occurred_at: row.occurred_at,
        actor: row.actor.clone(),
        correlation_id: row.correlation_id.clone(),
        causation_id: row.causation_id.clone(),
        traceparent: row.traceparent.clone(),
        schema_version: row.schema_version,
        data,
    };
    upcasters.upcast(&mut event).map_err(|e| refused(e.to_string()))?;
    Ok(event)
}

fn apply_stored(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    upcasters: &Upcasters,
    stored: &[LoggedEvent],
) -> Result<()> {
    let events = stored
        .iter()
        .map(|e| received(projection.name(), upcasters, e))
        .collect::<Result<Vec<_>>>()?;
    projection.apply(conn, &events).map_err(|e| Error::Projection {
        name: projection.name().to_owned(),
        reason: e.to_string(),
    })
}

/// Rebuilds `projection` (see the module docs), resuming a rebuild that
/// stopped half way; `batch` events a transaction. Blocks: run it on the
/// blocking pool. Writers and the live listener go on meanwhile.
pub fn rebuild(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    upcasters: &Upcasters,
    batch: i64,
) -> Result<RebuildReport> {
    let name = projection.name().to_owned();
    let started = Instant::now();
    let types = projection.event_types();
    let batch = batch.clamp(1, 1_000_000);
    // 1. Reset, or resume.
    let (mut position, mut applied, resumed) = conn.transaction::<_, Error, _>(|conn| {
        let row = lock_row(conn, &name)?;
        if row.state == "rebuilding" {
            return Ok((row.position, row.rebuilt_events, true));
        }
        projection.reset(conn).map_err(|e| Error::Projection {
            name: name.clone(),
            reason: format!("reset: {e}"),
        })?;
        diesel::sql_query("DELETE FROM processed_events WHERE listener = $1")
            .bind::<Text, _>(&name)
            .execute(conn)?;
        diesel::sql_query(
            "UPDATE outbox_projections SET state = 'rebuilding', position = 0, rebuilt_events = 0,
                 rebuild_started_at = now(), rebuild_finished_at = NULL, updated_at = now()
             WHERE name = $1",
        )
        .bind::<Text, _>(&name)
        .execute(conn)?;
        Ok((0, 0, false))
    })?;
    tracing::info!(projection = %name, resumed, position, "projection rebuild started");
    // 2. The log, a batch a transaction with its checkpoint.
    loop {
        let page = event_log::read_after(conn, position, Some(types.as_slice()), batch)?;
        let Some(last) = page.last().map(|e| e.position) else {
            break;
        };
        conn.transaction::<_, Error, _>(|conn| {
            apply_stored(conn, projection, upcasters, &page)?;
            checkpoint(conn, &name, last, applied + page.len() as i64)
        })?;
        position = last;
        applied += page.len() as i64;
    }
    // 3. The rest, under the lock and one snapshot, then live again.
    let (position, applied) = conn
        .build_transaction()
        .repeatable_read()
        .run::<_, Error, _>(|conn| {
            lock_row(conn, &name)?;
            let (mut position, mut applied) = (position, applied);
            loop {
                let page = event_log::read_after(conn, position, Some(types.as_slice()), batch)?;
                let Some(last) = page.last().map(|e| e.position) else {
                    break;
                };
                apply_stored(conn, projection, upcasters, &page)?;
                position = last;
                applied += page.len() as i64;
            }
            let pending = event_log::not_yet_logged(conn, Some(types.as_slice()))?;
            for chunk in pending.chunks(usize::try_from(batch).unwrap_or(5_000)) {
                apply_stored(conn, projection, upcasters, chunk)?;
                let ids: Vec<uuid::Uuid> = chunk.iter().map(|e| e.event.event_id).collect();
                // Their live deliveries may still come: the inbox has them.
                diesel::sql_query(
                    "INSERT INTO processed_events (listener, event_id)
                     SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING",
                )
                .bind::<Text, _>(&name)
                .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
                .execute(conn)?;
                applied += chunk.len() as i64;
            }
            diesel::sql_query(
                "UPDATE outbox_projections SET state = 'live', position = $2, rebuilt_through = $2,
                     rebuilt_events = $3, rebuild_finished_at = now(), updated_at = now()
                 WHERE name = $1",
            )
            .bind::<Text, _>(&name)
            .bind::<BigInt, _>(position)
            .bind::<BigInt, _>(applied)
            .execute(conn)?;
            Ok((position, applied))
        })?;
    let report = RebuildReport {
        events: applied,
        rebuilt_through: position,
        resumed,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(projection = %name, events = report.events, rebuilt_through = report.rebuilt_through, seconds = report.seconds, "projection rebuilt; live again");
    Ok(report)
}

fn checkpoint(conn: &mut PgConnection, name: &str, position: i64, applied: i64) -> Result<()> {
    diesel::sql_query(
        "UPDATE outbox_projections SET position = $2, rebuilt_events = $3, updated_at = now() WHERE name = $1",
    )
    .bind::<Text, _>(name)
    .bind::<BigInt, _>(position)
    .bind::<BigInt, _>(applied)
    .execute(conn)?;
    Ok(())
}

/// The live side of a projection: a queued listener with the inbox.
pub(crate) struct ProjectionListener {
    pub(crate) projection: Arc<dyn Projection>,
    pub(crate) name: String,
    /// As registered, the inbox on.
    pub(crate) options: ListenerOptions,
}

#[derive(QueryableByName)]
struct LiveState {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Bool)]
    covered: bool,
}

impl QueuedListener for ProjectionListener {
    fn name(&self) -> &str {
        &self.name
    }

    fn options(&self) -> ListenerOptions {
        self.options.clone()
    }

    fn handle(
        &self,
        event: &ReceivedEvent,
        ctx: &mut HandlerContext<'_>,
    ) -> std::result::Result<(), ListenerError> {
        let conn = ctx.conn()?;
        let read = |conn: &mut PgConnection| {
            // Shared: a rebuild's reset and hand-over wait for this
            // transaction, and it for them.
            diesel::sql_query(
                "SELECT p.state,
                        (p.rebuilt_through > 0 AND EXISTS (
                            SELECT 1 FROM outbox_event_log l
                            WHERE l.event_id = $2 AND l.position <= p.rebuilt_through)) AS covered
                 FROM outbox_projections p WHERE p.name = $1 FOR SHARE OF p",
            )
            .bind::<Text, _>(&self.name)
            .bind::<diesel::sql_types::Uuid, _>(event.event_id)
            .get_results::<LiveState>(conn)
        };
        let mut found = read(conn)?;
        if found.is_empty() {
            ensure_row(conn, &self.name).map_err(ListenerError::transient)?;
            found = read(conn)?;
        }
        match found.first() {
            // Left to the rebuild, which applies it.
            Some(live) if live.state != "live" => Ok(()),
            // The rebuild took it from the log.
            Some(live) if live.covered => Ok(()),
            _ => self.projection.apply(conn, std::slice::from_ref(event)),
        }
    }
}
