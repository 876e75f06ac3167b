//! `failed_jobs`: the messages a queued listener could not handle, modelled
//! on Laravel's table of the same name.
//!
//! The consumer framework writes one row when a message fails for good:
//! after its last try, or at once when it is malformed, of a type the
//! listener does not handle, or the listener says retrying is pointless.
//! The same message is in the listener's dead-letter queue
//! (`<app>.<listener>.dead`). At most one row exists per (listener,
//! event id), so a redelivery after a crash cannot add a second one.
//!
//! The functions here are what operators' tools build on: [`list_page`]
//! with filters and a keyset cursor, [`count`], [`forget_matching`] and
//! [`error_groups`] (`query.rs`); [`get`],
//! [`forget`], [`flush`], [`prune`]; [`retry`], [`retry_many`] and
//! [`retry_matching`] (`retry.rs`), which republish the stored event to the
//! listener's own queue (never to the other listeners of the event),
//! each aggregate's events oldest first by their position in the outbox,
//! and delete the row once the broker has confirmed it; and [`retry_edited`]
//! (`edits.rs`), edit-and-retry with both versions kept.

use std::hash::{DefaultHasher, Hash, Hasher};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Double, Integer, Jsonb, Nullable, Text, Uuid as SqlUuid};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::schema::failed_jobs;

mod edits;
mod query;
mod retry;

pub use edits::{FailedJobEdit, edits_for, retry_edited, validate_edit};
pub use query::{Cursor, ErrorGroup, Filter, Page, count, error_groups, forget_matching, list, list_page};
pub use retry::{
    RETRY_CHUNK, RetryOutcome, RetryProgress, retry, retry_body, retry_many, retry_many_with, retry_matching,
    retry_matching_with,
};

/// Longest exception text kept, in bytes (the column allows 65,536
/// characters); longer texts are cut on a character boundary.
pub const MAX_EXCEPTION_BYTES: usize = 16 * 1024;
/// Longest text kept for one entry of the error history, in bytes.
pub const MAX_ATTEMPT_ERROR_BYTES: usize = 2 * 1024;
/// Longest raw body kept in the payload of a malformed message, in bytes.
pub const MAX_RAW_BODY_BYTES: usize = 64 * 1024;
/// The most rows [`list`] returns at once.
pub const MAX_LIST_LIMIT: i64 = 10_000;

/// One failed try, as kept in `errors` (`[{attempt, at, error}]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// 1 for the first try.
    pub attempt: i32,
    /// When the try failed.
    pub at: DateTime<Utc>,
    /// What went wrong (bounded to [`MAX_ATTEMPT_ERROR_BYTES`]).
    pub error: String,
}

/// A row of `failed_jobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedJob {
    /// Row id, what operators name a job by.
    pub id: i64,
    /// Stable unique id.
    pub uuid: Uuid,
    /// The listener's queue (`chom.record_audit_log`).
    pub queue: String,
    /// The listener's name (`record_audit_log`).
    pub listener: String,
    /// The event, when the message could be decoded far enough to name it.
    pub event_id: Option<Uuid>,
    /// The event type, when known.
    pub event_type: Option<String>,
    /// The CloudEvents document as received, or for a malformed message an
    /// object with its raw body (see [`malformed_payload`]).
    pub payload: serde_json::Value,
    /// The final error.
    pub exception: String,
    /// Tries made.
    pub attempts: i32,
    /// Every failed try, oldest first.
    pub errors: Vec<AttemptError>,
    /// When the job failed for good.
    pub failed_at: DateTime<Utc>,
}

type FailedJobColumns = (
    failed_jobs::id,
    failed_jobs::uuid,
    failed_jobs::queue,
    failed_jobs::listener,
    failed_jobs::event_id,
    failed_jobs::event_type,
    failed_jobs::payload,
    failed_jobs::exception,
    failed_jobs::attempts,
    failed_jobs::errors,
    failed_jobs::failed_at,
);

const COLUMNS: FailedJobColumns = (
    failed_jobs::id,
    failed_jobs::uuid,
    failed_jobs::queue,
    failed_jobs::listener,
    failed_jobs::event_id,
    failed_jobs::event_type,
    failed_jobs::payload,
    failed_jobs::exception,
    failed_jobs::attempts,
    failed_jobs::errors,
    failed_jobs::failed_at,
);

type Row = (
    i64,
    Uuid,
    String,
    String,
    Option<Uuid>,
    Option<String>,
    serde_json::Value,
    String,
    i32,
    serde_json::Value,
    DateTime<Utc>,
);

fn from_row(row: Row) -> FailedJob {
    let (id, uuid, queue, listener, event_id, event_type, payload, exception, attempts, errors, failed_at) =
        row;
    FailedJob {
        id,
        uuid,
        queue,
        listener,
        event_id,
        event_type,
        payload,
        exception,
        attempts,
        // Written by this module; an entry edited by hand into another
        // shape is dropped rather than failing the whole listing.
        errors: match errors {
            serde_json::Value::Array(items) => items
                .into_iter()
                .filter_map(|item| serde_json::from_value(item).ok())
                .collect(),
            _ => Vec::new(),
        },
        failed_at,
    }
}

/// A failed job to record.
#[derive(Debug, Clone)]
pub struct NewFailedJob<'a> {
    /// The listener's queue.
    pub queue: &'a str,
    /// The listener's name.
    pub listener: &'a str,
    /// The event, if known.
    pub event_id: Option<Uuid>,
    /// The event type, if known.
    pub event_type: Option<&'a str>,
    /// The message body: the CloudEvents document, or for a malformed
    /// message what [`malformed_payload`] makes of it.
    pub payload: &'a serde_json::Value,
    /// The final error (cut to [`MAX_EXCEPTION_BYTES`]).
    pub exception: &'a str,
    /// Tries made.
    pub attempts: i32,
    /// Every failed try (each cut to [`MAX_ATTEMPT_ERROR_BYTES`]).
    pub errors: &'a [AttemptError],
    /// Used as the row's uuid when the event id is unknown, so the same
    /// malformed message redelivered after a crash maps to the same row.
    /// Derive it with [`malformed_uuid`].
    pub uuid: Option<Uuid>,
}

/// Records a failed job unless (listener, event id) — or, without an event
/// id, the uuid — already has one. Returns the id of the row now in the
/// table and whether this call inserted it.
pub fn insert(conn: &mut PgConnection, job: &NewFailedJob<'_>) -> Result<(i64, bool)> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let errors: Vec<AttemptError> = job
        .errors
        .iter()
        .map(|e| AttemptError {
            attempt: e.attempt,
            at: e.at,
            error: bounded_text(&e.error, MAX_ATTEMPT_ERROR_BYTES),
        })
        .collect();
    let errors = serde_json::to_value(&errors).map_err(|source| Error::Serialize {
        event_type: job.event_type.unwrap_or("unknown").to_owned(),
        source,
    })?;
    let uuid = job.uuid.unwrap_or_else(Uuid::now_v7);
    let inserted = diesel::sql_query(
        "INSERT INTO failed_jobs (uuid, queue, listener, event_id, event_type, payload, exception, attempts, errors)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind::<SqlUuid, _>(uuid)
    .bind::<Text, _>(job.queue)
    .bind::<Text, _>(job.listener)
    .bind::<Nullable<SqlUuid>, _>(job.event_id)
    .bind::<Nullable<Text>, _>(job.event_type)
    .bind::<Jsonb, _>(job.payload)
    .bind::<Text, _>(bounded_text(job.exception, MAX_EXCEPTION_BYTES))
    .bind::<Integer, _>(job.attempts.max(0))
    .bind::<Jsonb, _>(&errors)
    .get_result::<Id>(conn)
    .optional()?;
    if let Some(row) = inserted {
        return Ok((row.id, true));
    }
    let existing = match job.event_id {
        Some(event_id) => failed_jobs::table
            .filter(failed_jobs::listener.eq(job.listener))
            .filter(failed_jobs::event_id.eq(event_id))
            .select(failed_jobs::id)
            .first::<i64>(conn)
            .optional()?,
        None => None,
    };
    let existing = match existing {
        Some(id) => Some(id),
        None => failed_jobs::table
            .filter(failed_jobs::uuid.eq(uuid))
            .select(failed_jobs::id)
            .first::<i64>(conn)
            .optional()?,
    };
    // The conflicting row was deleted between the insert and the lookup
    // (an operator forgot it): report it as not inserted, id 0.
    Ok((existing.unwrap_or(0), false))
}

/// The failed job with id `id`.
pub fn get(conn: &mut PgConnection, id: i64) -> Result<Option<FailedJob>> {
    Ok(failed_jobs::table
        .find(id)
        .select(COLUMNS)
        .first::<Row>(conn)
        .optional()?
        .map(from_row))
}

/// The failed job of `listener` for `event_id`, if there is one.
pub fn find_by_event(conn: &mut PgConnection, listener: &str, event_id: Uuid) -> Result<Option<FailedJob>> {
    Ok(failed_jobs::table
        .filter(failed_jobs::listener.eq(listener))
        .filter(failed_jobs::event_id.eq(event_id))
        .select(COLUMNS)
        .first::<Row>(conn)
        .optional()?
        .map(from_row))
}

/// How many failed jobs each listener has: `(listener, queue, count)`,
/// ordered by listener.
pub fn count_by_listener(conn: &mut PgConnection) -> Result<Vec<(String, String, i64)>> {
    Ok(failed_jobs::table
        .group_by((failed_jobs::listener, failed_jobs::queue))
        .select((
            failed_jobs::listener,
            failed_jobs::queue,
            diesel::dsl::count_star(),
        ))
        .order((failed_jobs::listener, failed_jobs::queue))
        .load(conn)?)
}

/// Deletes the failed job `id` without retrying it. Returns whether it
/// existed.
pub fn forget(conn: &mut PgConnection, id: i64) -> Result<bool> {
    Ok(diesel::delete(failed_jobs::table.find(id)).execute(conn)? == 1)
}

/// Deletes the failed jobs `ids` without retrying them. Returns how many
/// existed.
pub fn forget_many(conn: &mut PgConnection, ids: &[i64]) -> Result<usize> {
    Ok(diesel::delete(failed_jobs::table.filter(failed_jobs::id.eq_any(ids))).execute(conn)?)
}

/// Deletes every failed job, or with `older_than_hours` only those that
/// failed longer ago than that. Returns how many.
pub fn flush(conn: &mut PgConnection, older_than_hours: Option<f64>) -> Result<usize> {
    match older_than_hours {
        None => Ok(diesel::delete(failed_jobs::table).execute(conn)?),
        Some(hours) => prune(conn, hours),
    }
}

/// Deletes failed jobs older than `hours` (Laravel's `queue:prune-failed`,
/// whose default is 24). Returns how many.
pub fn prune(conn: &mut PgConnection, hours: f64) -> Result<usize> {
    if !hours.is_finite() || hours < 0.0 {
        return Err(Error::Config(format!(
            "hours must be a non-negative number, not {hours}"
        )));
    }
    Ok(diesel::sql_query(
        "DELETE FROM failed_jobs WHERE failed_at < now() - make_interval(secs => $1 * 3600)",
    )
    .bind::<Double, _>(hours)
    .execute(conn)?)
}

/// What `failed_jobs.payload` holds for a message body: the JSON document
/// itself when the body is JSON Postgres can store, else an object with the
/// body as (lossy, at most [`MAX_RAW_BODY_BYTES`]) text:
/// `{"malformed": true, "raw_body": "...", "bytes": n, "truncated": false}`.
pub fn payload_for_body(body: &[u8]) -> serde_json::Value {
    if body.len() <= MAX_RAW_BODY_BYTES * 16
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(body)
        && !contains_nul(&value)
    {
        return value;
    }
    malformed_payload(body)
}

/// The payload object of a malformed message: its body as text, NUL
/// characters (which Postgres cannot store) replaced, cut to
/// [`MAX_RAW_BODY_BYTES`].
pub fn malformed_payload(body: &[u8]) -> serde_json::Value {
    let kept = &body[..body.len().min(MAX_RAW_BODY_BYTES)];
    let text = String::from_utf8_lossy(kept).replace('\0', "\u{fffd}");
    serde_json::json!({
        "malformed": true,
        "raw_body": text,
        "bytes": body.len(),
        "truncated": kept.len() < body.len(),
    })
}

/// The uuid of the failed job of a message without a usable event id: a
/// hash of listener and body, so the same message maps to the same row.
pub fn malformed_uuid(listener: &str, body: &[u8]) -> Uuid {
    let half = |salt: u64| {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        listener.hash(&mut hasher);
        body.hash(&mut hasher);
        hasher.finish()
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&half(0x6f75_7462_6f78_0001).to_be_bytes());
    bytes[8..].copy_from_slice(&half(0x6f75_7462_6f78_0002).to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Whether `value` holds a NUL character anywhere (jsonb cannot store one).
pub(super) fn contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(contains_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

pub use crate::text::bounded_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_of_json_and_garbage() {
        let doc = payload_for_body(br#"{"id":"x","data":{"a":1}}"#);
        assert_eq!(doc["data"]["a"], 1);
        let garbage = payload_for_body(b"\xff\x00not json");
        assert_eq!(garbage["malformed"], true);
        assert_eq!(garbage["bytes"], 10);
        assert!(!garbage["raw_body"].as_str().unwrap_or_default().contains('\0'));
        let nul = payload_for_body(br#"{"a":"x\u0000"}"#);
        assert_eq!(nul["malformed"], true, "jsonb cannot store NUL");
        let big = vec![b'x'; MAX_RAW_BODY_BYTES + 10];
        let cut = malformed_payload(&big);
        assert_eq!(cut["truncated"], true);
        assert_eq!(retry_body(&garbage), b"\xef\xbf\xbd\xef\xbf\xbdnot json".to_vec());
    }

    #[test]
    fn malformed_uuids_are_stable_per_listener_and_body() {
        let a = malformed_uuid("l", b"body");
        assert_eq!(a, malformed_uuid("l", b"body"));
        assert_ne!(a, malformed_uuid("m", b"body"));
        assert_ne!(a, malformed_uuid("l", b"body2"));
    }
}
