//! The inbox (`processed_events`): one row per (listener, event) whose
//! effect has committed, so a duplicate delivery has no second effect.
//!
//! The worker runs listeners with
//! [`ListenerOptions::inbox`] set through
//! `handle_in_transaction` here: one transaction claims the inbox row
//! (guarded against a concurrent delivery of the same event), runs the
//! listener's effect on the same connection and commits both together. A
//! duplicate finds the row and is acknowledged without running the
//! listener. [`claim`] and [`is_processed`] are public for services that
//! consume events some other way. Old rows are deleted by the worker's
//! inbox pruner (`src/maintenance/inbox_pruner.rs`), or by [`prune`].

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use uuid::Uuid;

use crate::consumer::attempts;
use crate::consumer::listener::{
    HandlerContext, HandlerRun, ListenerError, ListenerOptions, QueuedListener, guarded,
};
use crate::consumer::message::ReceivedEvent;
use crate::database::PgPool;
use crate::error::{Error, Result};
use crate::prepared::{Bind, Prepared};

/// Deleting old inbox rows; a worker runs it on a schedule (see
/// [`WorkerConfig::inbox_retention`](crate::WorkerConfig::inbox_retention)).
pub use crate::maintenance::inbox_pruner::prune;

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

/// How the inbox transaction failed, for the outcome it means.
enum TxError {
    Setup(diesel::result::Error),
    Busy,
    Listener(ListenerError),
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for TxError {
    fn from(error: diesel::result::Error) -> Self {
        Self::Database(error)
    }
}

/// One delivery to run in an inbox transaction.
pub(crate) struct InboxTry<'a> {
    pub(crate) event: &'a ReceivedEvent,
    /// The try number the worker counted (raised to what Postgres holds).
    pub(crate) attempt: u32,
    /// Whether an attempt count may exist and must go with the success.
    pub(crate) clear_attempts: bool,
}

/// Runs `listener` for one delivery in a transaction of its own with its
/// inbox row, under the listener's timeout: the effect and the row commit
/// together, and a duplicate (the row exists) is reported without running
/// the handler. Whether a failure is the listener's (a try) or the
/// database's (held, not counted) is decided here.
pub(crate) fn handle_in_transaction(
    pool: &PgPool,
    listener: &dyn QueuedListener,
    delivery: &InboxTry<'_>,
    options: &ListenerOptions,
) -> HandlerRun {
    use diesel::Connection;
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(error) => return HandlerRun::Infrastructure(format!("no database connection: {error}")),
    };
    let mut ran = Ran::default();
    let outcome =
        conn.transaction::<bool, TxError, _>(|conn| handle_one(conn, listener, delivery, options, &mut ran));
    let connection_lost = outcome.is_err() && diesel::r2d2::R2D2Connection::is_broken(&mut *conn);
    outcome_of(outcome, ran.handler, connection_lost)
}

/// Runs `listener` for every delivery of `batch` in one transaction, each
/// in a savepoint of its own, and commits once: a failing delivery rolls
/// back only its own effect and inbox row. The outcomes are in `batch`
/// order and hold only once the commit did: a commit that fails turns
/// every success into a failure (or, when the connection broke, into a
/// database problem, not counted as a try).
///
/// Round trips: one claim for the whole batch (locks, inbox rows, earlier
/// tries), then one per delivery (releasing its savepoint and opening the
/// next's), plus the handlers' own statements and the commit.
pub(crate) fn handle_batch_in_transaction(
    pool: &PgPool,
    listener: &dyn QueuedListener,
    batch: &[InboxTry<'_>],
    options: &ListenerOptions,
) -> Vec<HandlerRun> {
    use diesel::Connection;
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(error) => {
            let reason = format!("no database connection: {error}");
            return batch
                .iter()
                .map(|_| HandlerRun::Infrastructure(reason.clone()))
                .collect();
        }
    };
    let mut outcomes: Vec<std::result::Result<bool, TxError>> = Vec::with_capacity(batch.len());
    let mut ran: Vec<bool> = Vec::with_capacity(batch.len());
    let committed = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        let claims = match claim_batch(conn, listener.name(), batch, options) {
            Ok(claims) => claims,
            Err(error) => {
                // Nothing ran; report it for every delivery (the commit of
                // an aborted transaction fails too).
                let reason = error.to_string();
                for _ in batch {
                    outcomes.push(Err(TxError::Setup(diesel::result::Error::QueryBuilderError(
                        reason.clone().into(),
                    ))));
                    ran.push(false);
                }
                return Ok(());
            }
        };
        conn.batch_execute("SAVEPOINT outbox_delivery")?;
        for (delivery, claim) in batch.iter().zip(claims) {
            let mut run = Ran::default();
            let outcome = run_claimed(conn, listener, delivery, &claim, options, &mut run);
            // The next delivery gets a fresh savepoint, so that rolling it
            // back cannot undo this one's effect (or give-back). A delivery
            // that sent nothing on the connection leaves the savepoint as it
            // was: no round trip.
            const NEXT: &str = "RELEASE SAVEPOINT outbox_delivery; SAVEPOINT outbox_delivery";
            let step = match &outcome {
                Ok(_) | Err(TxError::Busy) if !run.touched => Ok(()),
                Ok(_) | Err(TxError::Busy) => conn.batch_execute(NEXT),
                // Undo the effect, then give back the inbox row claimed
                // before it.
                Err(_) => {
                    let undone = if run.touched {
                        conn.batch_execute("ROLLBACK TO SAVEPOINT outbox_delivery")
                    } else {
                        Ok(())
                    };
                    undone
                        .and_then(|()| {
                            if claim.inserted {
                                unclaim(conn, listener.name(), delivery.event.event_id)
                            } else {
                                Ok(())
                            }
                        })
                        .and_then(|()| conn.batch_execute(NEXT))
                }
            };
            let broken = diesel::r2d2::R2D2Connection::is_broken(&mut **conn);
            outcomes.push(outcome);
            ran.push(run.handler);
            if let Err(error) = step {
                if broken {
                    // Nothing more can run on this connection; the commit
                    // below fails and every delivery is held.
                    break;
                }
                return Err(error);
            }
        }
        Ok(())
    });
    let connection_lost = diesel::r2d2::R2D2Connection::is_broken(&mut *conn);
    let mut runs = Vec::with_capacity(batch.len());
    for (outcome, handler_ran) in outcomes.into_iter().zip(ran) {
        runs.push(match (outcome, &committed) {
            (Ok(_), Err(_)) if connection_lost => {
                HandlerRun::Infrastructure("the database connection was lost during the batch".to_owned())
            }
            // COMMIT failed (serialization, deferred constraint): no effect
            // of the batch happened; a try for those whose handler ran.
            (Ok(false), Err(error)) => HandlerRun::Failed(ListenerError::transient(format!(
                "the batch's commit failed: {error}"
            ))),
            (Ok(true), Err(error)) => {
                HandlerRun::Infrastructure(format!("the batch's commit failed: {error}"))
            }
            (Ok(duplicate), Ok(())) => HandlerRun::Done { duplicate },
            (Err(error), _) => outcome_of_error(error, handler_ran, connection_lost),
        });
    }
    // Deliveries after a broken connection never ran.
    while runs.len() < batch.len() {
        runs.push(HandlerRun::Infrastructure(
            "the database connection was lost during the batch".to_owned(),
        ));
    }
    runs
}

/// What the batch's claim found for one delivery.
#[derive(diesel::QueryableByName)]
struct BatchClaim {
    /// No other session handles this event right now.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    locked: bool,
    /// The inbox row is new: run the handler.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    inserted: bool,
    /// Failed tries so far.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    previous: i32,
}

/// Claims the whole batch in one statement: bounds the transaction's
/// statements by the handler timeout, takes each event's advisory lock
/// (without waiting), inserts the inbox rows of those locked, and reads
/// their earlier tries; one row per delivery, in batch order. An event
/// twice in one batch is claimed by its first delivery only.
fn claim_batch(
    conn: &mut PgConnection,
    listener: &str,
    batch: &[InboxTry<'_>],
    options: &ListenerOptions,
) -> diesel::QueryResult<Vec<BatchClaim>> {
    use diesel::RunQueryDsl;
    let ids: Vec<uuid::Uuid> = batch.iter().map(|d| d.event.event_id).collect();
    let millis = options.timeout.as_millis().max(1).to_string();
    struct InboxBatchClaimSql;
    let claims = Prepared::<InboxBatchClaimSql>::new(
        "WITH settings AS (SELECT set_config('statement_timeout', $3, true) AS timeout),
         input AS (
             SELECT event_id, ord,
                    ord = min(ord) OVER (PARTITION BY event_id) AS first
             FROM unnest($2::uuid[]) WITH ORDINALITY AS t(event_id, ord)),
         guard AS (
             SELECT event_id, ord, first,
                    pg_try_advisory_xact_lock(hashtextextended($1 || '/' || event_id::text, 0)) AS locked
             FROM input, settings),
         claimed AS (
             INSERT INTO processed_events (listener, event_id)
             SELECT $1, event_id FROM guard WHERE locked AND first
             ON CONFLICT DO NOTHING
             RETURNING event_id)
         SELECT g.locked,
                (g.first AND c.event_id IS NOT NULL) AS inserted,
                COALESCE(a.attempts, 0) AS previous
         FROM guard g
         LEFT JOIN claimed c ON c.event_id = g.event_id
         LEFT JOIN listener_attempts a ON a.listener = $1 AND a.event_id = g.event_id
         ORDER BY g.ord",
        vec![Bind::Text(listener), Bind::UuidArray(&ids), Bind::Text(&millis)],
    )
    .load::<BatchClaim>(conn)?;
    if claims.len() != batch.len() {
        return Err(diesel::result::Error::QueryBuilderError(
            format!(
                "the batch claim returned {} rows for {} deliveries",
                claims.len(),
                batch.len()
            )
            .into(),
        ));
    }
    Ok(claims)
}

/// Gives back the inbox row of a delivery whose effect was rolled back.
fn unclaim(conn: &mut PgConnection, listener: &str, event_id: uuid::Uuid) -> diesel::QueryResult<()> {
    use crate::schema::processed_events::dsl;
    diesel::delete(
        dsl::processed_events
            .filter(dsl::listener.eq(listener))
            .filter(dsl::event_id.eq(event_id)),
    )
    .execute(conn)
    .map(|_| ())
}

/// One delivery of a claimed batch: a duplicate, busy, or the handler run
/// (with the attempts clean-up) on `conn`, inside its savepoint.
fn run_claimed(
    conn: &mut PgConnection,
    listener: &dyn QueuedListener,
    delivery: &InboxTry<'_>,
    claim: &BatchClaim,
    options: &ListenerOptions,
    ran: &mut Ran,
) -> std::result::Result<bool, TxError> {
    let claimed = Claimed::of(delivery, claim.locked, claim.inserted, claim.previous)?;
    finish_claimed(conn, listener, delivery, options, claimed, ran)
}

/// What a delivery's run did: whether its handler ran, and whether
/// anything (handler or framework) was sent on the connection.
#[derive(Default)]
struct Ran {
    handler: bool,
    touched: bool,
}

/// A claimed delivery: whether its inbox row is new, its try number, and
/// whether an attempt count must go with a success.
struct Claimed {
    inserted: bool,
    attempt: u32,
    clear_attempts: bool,
}

impl Claimed {
    /// What a claim found for `delivery`: busy when another session holds
    /// the event; else whether its row is new, and its try number and
    /// attempts clean-up raised to what Postgres holds.
    fn of(delivery: &InboxTry<'_>, locked: bool, inserted: bool, previous: i32) -> Result<Self, TxError> {
        if !locked {
            return Err(TxError::Busy);
        }
        let previous = u32::try_from(previous).unwrap_or(0);
        Ok(Self {
            inserted,
            attempt: delivery.attempt.max(previous + 1),
            clear_attempts: delivery.clear_attempts || previous > 0,
        })
    }
}

/// After the claim: a duplicate is acknowledged (its attempt count
/// cleared), a new one runs the handler and clears its count on success.
fn finish_claimed(
    conn: &mut PgConnection,
    listener: &dyn QueuedListener,
    delivery: &InboxTry<'_>,
    options: &ListenerOptions,
    claimed: Claimed,
    ran: &mut Ran,
) -> std::result::Result<bool, TxError> {
    let (name, event) = (listener.name(), delivery.event);
    if !claimed.inserted {
        if claimed.clear_attempts {
            ran.touched = true;
            // A retry whose event another copy already handled.
            attempts::clear_attempts(conn, name, event.event_id).map_err(|e| match e {
                Error::Database(db) => TxError::Setup(db),
                other => TxError::Listener(ListenerError::transient(other)),
            })?;
        }
        return Ok(true);
    }
    ran.handler = true;
    let mut ctx = HandlerContext::with_transaction(conn, claimed.attempt, options.tries);
    let handled = guarded(|| listener.handle(event, &mut ctx));
    ran.touched = ctx.used_conn();
    handled.map_err(TxError::Listener)?;
    if claimed.clear_attempts {
        ran.touched = true;
        attempts::clear_attempts(conn, name, event.event_id).map_err(|e| match e {
            Error::Database(db) => TxError::Database(db),
            other => TxError::Listener(ListenerError::transient(other)),
        })?;
    }
    Ok(false)
}

/// The claim, the handler and the attempts clean-up of one delivery, in
/// the transaction (or savepoint) open on `conn`. `Ok(true)` is a
/// duplicate: the inbox row existed, nothing ran.
fn handle_one(
    conn: &mut PgConnection,
    listener: &dyn QueuedListener,
    delivery: &InboxTry<'_>,
    options: &ListenerOptions,
    ran: &mut Ran,
) -> std::result::Result<bool, TxError> {
    use diesel::RunQueryDsl;
    let event = delivery.event;
    let name = listener.name();
    // One round trip: bound the transaction by the handler's timeout, make
    // sure no other delivery of this event is being handled right now (a
    // duplicate would otherwise wait on the uncommitted inbox row, and the
    // wait would count as its try), and claim the inbox row.
    #[derive(diesel::QueryableByName)]
    struct Claim {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        inserted: i64,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        previous: i32,
    }
    let millis = options.timeout.as_millis().max(1).to_string();
    struct InboxClaimSql;
    let claim = Prepared::<InboxClaimSql>::new(
        "WITH guard AS (
             SELECT pg_try_advisory_xact_lock(hashtextextended($1 || '/' || $2::text, 0)) AS locked,
                    set_config('statement_timeout', $3, true) AS timeout),
         claimed AS (
             INSERT INTO processed_events (listener, event_id)
             SELECT $1, $2 FROM guard WHERE locked
             ON CONFLICT DO NOTHING
             RETURNING 1)
         SELECT (SELECT locked FROM guard) AS locked, (SELECT count(*) FROM claimed) AS inserted,
                -- Failed tries so far, also for a copy that carries no
                -- marker (a relay's duplicate publish): the handler's
                -- attempt number stays true at no extra round trip.
                COALESCE((SELECT attempts FROM listener_attempts
                          WHERE listener = $1 AND event_id = $2), 0) AS previous",
        vec![Bind::Text(name), Bind::Uuid(event.event_id), Bind::Text(&millis)],
    )
    .get_result::<Claim>(conn)
    .map_err(TxError::Setup)?;
    let claimed = Claimed::of(delivery, claim.locked, claim.inserted > 0, claim.previous)?;
    finish_claimed(conn, listener, delivery, options, claimed, ran)
}

/// What a single delivery's transaction outcome means for the worker.
fn outcome_of(
    outcome: std::result::Result<bool, TxError>,
    handler_ran: bool,
    connection_lost: bool,
) -> HandlerRun {
    match outcome {
        Ok(duplicate) => HandlerRun::Done { duplicate },
        Err(error) => outcome_of_error(error, handler_ran, connection_lost),
    }
}

fn outcome_of_error(error: TxError, handler_ran: bool, connection_lost: bool) -> HandlerRun {
    match error {
        // A connection that broke under the handler (Postgres restarted,
        // the backend was terminated, the network dropped) is the
        // database's trouble, not the listener's: hold the message and run
        // it again without counting a try. The inbox makes the rerun safe
        // if the COMMIT did reach the server.
        TxError::Listener(_) | TxError::Database(_) if connection_lost => {
            HandlerRun::Infrastructure("the database connection was lost during the try".to_owned())
        }
        TxError::Listener(error) => HandlerRun::Failed(error),
        TxError::Busy => HandlerRun::Busy,
        TxError::Setup(error) => {
            HandlerRun::Infrastructure(format!("cannot open the inbox transaction: {error}"))
        }
        TxError::Database(error) if !handler_ran => {
            HandlerRun::Infrastructure(format!("cannot open the inbox transaction: {error}"))
        }
        // COMMIT failed (serialization, deferred constraint, lost
        // connection): the effect did not happen; a try of the listener.
        TxError::Database(error) => HandlerRun::Failed(ListenerError::transient(error)),
    }
}
