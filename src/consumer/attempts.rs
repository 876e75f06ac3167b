//! The worker's bookkeeping in Postgres: attempt counts per (listener,
//! event) in `listener_attempts`, and the move to `failed_jobs`. Counts
//! left behind are deleted by the worker's attempts pruner
//! (`src/maintenance/attempts_pruner.rs`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use std::time::Duration;

use diesel::sql_types::{Binary, Double, Integer, Jsonb, Text, Uuid as SqlUuid};
use uuid::Uuid;

use crate::error::Result;
use crate::failed_jobs::{self, AttemptError, MAX_ATTEMPT_ERROR_BYTES, NewFailedJob, bounded_text};

diesel::table! {
    /// Failed tries per (listener, event) while an event is being retried.
    listener_attempts (listener, event_id) {
        /// The listener's name.
        listener -> Text,
        /// The event.
        event_id -> Uuid,
        /// Failed tries so far.
        attempts -> Int4,
        /// `[{attempt, at, error}]`.
        errors -> Jsonb,
        /// When the first try failed.
        first_failed_at -> Timestamptz,
        /// When the last try failed.
        updated_at -> Timestamptz,
    }
}

/// Where a message stands, read when it may have been seen before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeliveryState {
    /// Failed tries recorded so far.
    pub attempts: u32,
    /// The failed job already recorded for it, if any.
    pub failed_job: Option<i64>,
}

pub(crate) fn delivery_state(
    conn: &mut PgConnection,
    listener: &str,
    event_id: Uuid,
) -> Result<DeliveryState> {
    let attempts = listener_attempts::table
        .filter(listener_attempts::listener.eq(listener))
        .filter(listener_attempts::event_id.eq(event_id))
        .select(listener_attempts::attempts)
        .first::<i32>(conn)
        .optional()?
        .unwrap_or(0);
    let failed_job = crate::schema::failed_jobs::table
        .filter(crate::schema::failed_jobs::listener.eq(listener))
        .filter(crate::schema::failed_jobs::event_id.eq(event_id))
        .select(crate::schema::failed_jobs::id)
        .first::<i64>(conn)
        .optional()?;
    Ok(DeliveryState {
        attempts: u32::try_from(attempts).unwrap_or(0),
        failed_job,
    })
}

/// What recording a failed try decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureOutcome {
    /// Try again; `attempts` tries have failed so far.
    Retry { attempts: u32 },
    /// Failed for good: the failed job's id, the tries made, and whether
    /// this call wrote the row (false when a redelivery found it).
    Failed {
        job_id: i64,
        attempts: u32,
        inserted: bool,
    },
}

/// The message a failure is about.
pub(crate) struct FailedMessage<'a> {
    pub listener: &'a str,
    pub queue: &'a str,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub body: &'a [u8],
}

#[derive(QueryableByName)]
struct Counted {
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Jsonb)]
    errors: serde_json::Value,
}

/// Where the copy of a retried event waits after each failed try: entry
/// `n - 1` is the backoff delay and retry queue after `n` failed tries.
pub(crate) type RetrySchedule = Vec<(Duration, String)>;

/// Records a failed try in one transaction: counts it in
/// `listener_attempts`, and when it was permanent or the last of `tries`,
/// moves the history into a `failed_jobs` row (one per listener and event)
/// and deletes the count. When the event is retried, the row also keeps
/// where its copy goes (`schedule`), when the broker should hand it back,
/// and the message, for the retry repairer.
pub(crate) fn record_failure(
    conn: &mut PgConnection,
    message: &FailedMessage<'_>,
    error: &str,
    permanent: bool,
    tries: u32,
    schedule: &[(Duration, String)],
) -> Result<FailureOutcome> {
    let error = bounded_text(error, MAX_ATTEMPT_ERROR_BYTES);
    conn.transaction(|conn| {
        let counted = diesel::sql_query(
            "INSERT INTO listener_attempts AS a (listener, event_id, attempts, errors)
             VALUES ($1, $2, 1, jsonb_build_array(jsonb_build_object('attempt', 1, 'at', now(), 'error', $3::text)))
             ON CONFLICT (listener, event_id) DO UPDATE SET
                 attempts = a.attempts + 1,
                 errors = a.errors || jsonb_build_array(jsonb_build_object('attempt', a.attempts + 1, 'at', now(), 'error', $3::text)),
                 updated_at = now()
             RETURNING a.attempts, a.errors",
        )
        .bind::<Text, _>(message.listener)
        .bind::<SqlUuid, _>(message.event_id)
        .bind::<Text, _>(&error)
        .get_result::<Counted>(conn)?;
        let attempts = u32::try_from(counted.attempts).unwrap_or(u32::MAX);
        if !permanent && attempts < tries {
            let copy = usize::try_from(attempts)
                .ok()
                .and_then(|n| schedule.get(n.checked_sub(1)?));
            if let Some((delay, retry_queue)) = copy.filter(|(_, queue)| !queue.is_empty()) {
                diesel::sql_query(
                    "UPDATE listener_attempts
                     SET retry_queue = $3, retry_due_at = now() + make_interval(secs => $4), retry_copy = $5,
                         retry_repairs = 0
                     WHERE listener = $1 AND event_id = $2",
                )
                .bind::<Text, _>(message.listener)
                .bind::<SqlUuid, _>(message.event_id)
                .bind::<Text, _>(retry_queue)
                .bind::<Double, _>(delay.as_secs_f64())
                .bind::<Binary, _>(message.body)
                .execute(conn)?;
            }
            return Ok(FailureOutcome::Retry { attempts });
        }
        let errors: Vec<AttemptError> = match counted.errors {
            serde_json::Value::Array(items) => items
                .into_iter()
                .filter_map(|item| serde_json::from_value(item).ok())
                .collect(),
            _ => Vec::new(),
        };
        diesel::delete(
            listener_attempts::table
                .filter(listener_attempts::listener.eq(message.listener))
                .filter(listener_attempts::event_id.eq(message.event_id)),
        )
        .execute(conn)?;
        let payload = failed_jobs::payload_for_body(message.body);
        let (job_id, inserted) = failed_jobs::insert(
            conn,
            &NewFailedJob {
                queue: message.queue,
                listener: message.listener,
                event_id: Some(message.event_id),
                event_type: Some(message.event_type),
                payload: &payload,
                exception: &error,
                attempts: counted.attempts,
                errors: &errors,
                uuid: None,
            },
        )?;
        Ok(FailureOutcome::Failed {
            job_id,
            attempts,
            inserted,
        })
    })
}

/// Notes a deferred event's copy (no failed try counted) on the event's
/// attempts row, if it has one (it failed before): where the copy waits
/// and until when, so the retry repairer does not take it for overdue. An
/// event that never failed has no row, and its deferred copy is not
/// watched by the repairer.
pub(crate) fn note_deferred(
    conn: &mut PgConnection,
    listener: &str,
    event_id: Uuid,
    retry_queue: &str,
    delay: Duration,
) -> Result<()> {
    diesel::sql_query(
        "UPDATE listener_attempts
         SET retry_queue = $3, retry_due_at = now() + make_interval(secs => $4), retry_repairs = 0
         WHERE listener = $1 AND event_id = $2",
    )
    .bind::<Text, _>(listener)
    .bind::<SqlUuid, _>(event_id)
    .bind::<Text, _>(retry_queue)
    .bind::<Double, _>(delay.as_secs_f64())
    .execute(conn)?;
    Ok(())
}

/// Records a message that cannot name its event (malformed): a failed job
/// at once, keyed by a hash of listener and body.
pub(crate) fn record_malformed(
    conn: &mut PgConnection,
    listener: &str,
    queue: &str,
    event_type: Option<&str>,
    body: &[u8],
    error: &str,
) -> Result<(i64, bool)> {
    let payload = failed_jobs::payload_for_body(body);
    let at: DateTime<Utc> = Utc::now();
    let errors = [AttemptError {
        attempt: 1,
        at,
        error: bounded_text(error, MAX_ATTEMPT_ERROR_BYTES),
    }];
    failed_jobs::insert(
        conn,
        &NewFailedJob {
            queue,
            listener,
            event_id: None,
            event_type,
            payload: &payload,
            exception: error,
            attempts: 1,
            errors: &errors,
            uuid: Some(failed_jobs::malformed_uuid(listener, body)),
        },
    )
}

/// Forgets the failed tries of an event that has now succeeded.
pub(crate) fn clear_attempts(conn: &mut PgConnection, listener: &str, event_id: Uuid) -> Result<()> {
    diesel::delete(
        listener_attempts::table
            .filter(listener_attempts::listener.eq(listener))
            .filter(listener_attempts::event_id.eq(event_id)),
    )
    .execute(conn)?;
    Ok(())
}

/// `(listener, event, failed tries, last failure)`.
pub(crate) type RetryingEvent = (String, Uuid, i32, DateTime<Utc>);

/// The events `ids` being retried, for the timeline.
pub(crate) fn attempts_for(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<RetryingEvent>> {
    Ok(listener_attempts::table
        .filter(listener_attempts::event_id.eq_any(ids))
        .select((
            listener_attempts::listener,
            listener_attempts::event_id,
            listener_attempts::attempts,
            listener_attempts::updated_at,
        ))
        .load(conn)?)
}

/// How many events each listener is retrying: `(listener, count)`, by
/// listener.
pub fn retrying_by_listener(conn: &mut PgConnection) -> Result<Vec<(String, i64)>> {
    Ok(listener_attempts::table
        .group_by(listener_attempts::listener)
        .select((listener_attempts::listener, diesel::dsl::count_star()))
        .order(listener_attempts::listener)
        .load(conn)?)
}
