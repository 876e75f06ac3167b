//! Edit-and-retry: an operator corrects a failed job's payload and retries
//! it with the correction. Both versions are kept in `failed_job_edits`
//! with who edited and when, also after the job's row is gone (a retry
//! deletes it).

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use lapin::Channel;
use uuid::Uuid;

use super::retry::{republish, retry_body};
use super::{FailedJob, get};
use crate::database::{PgPool, run_blocking};
use crate::error::{Error, Result};
use crate::schema::failed_job_edits;

/// One edit of a failed job's payload.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = failed_job_edits)]
pub struct FailedJobEdit {
    /// Row id.
    pub id: i64,
    /// The failed job's stable id ([`FailedJob::uuid`]).
    pub failed_job_uuid: Uuid,
    /// Its listener.
    pub listener: String,
    /// Its queue.
    pub queue: String,
    /// Its event, when known.
    pub event_id: Option<Uuid>,
    /// Its event type, when known.
    pub event_type: Option<String>,
    /// The payload as it failed.
    pub original: serde_json::Value,
    /// The payload it was retried with.
    pub edited: serde_json::Value,
    /// Who edited it (the dashboard's operator name).
    pub edited_by: String,
    /// When.
    pub edited_at: DateTime<Utc>,
}

/// Checks an edited payload against the job's stored one: JSON (given as
/// text), an object, and for a CloudEvents document the same `id`, `type`,
/// `source` and `specversion` (the listener's inbox and failed job are
/// keyed by the event id, so an edit must not make it another event).
pub fn validate_edit(original: &serde_json::Value, edited: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(edited)
        .map_err(|error| Error::InvalidInput(format!("the edited payload is not valid JSON: {error}")))?;
    if !value.is_object() {
        return Err(Error::InvalidInput(
            "the edited payload must be a JSON object".into(),
        ));
    }
    let malformed = original.get("malformed").and_then(serde_json::Value::as_bool) == Some(true);
    if !malformed {
        for field in ["id", "type", "source", "specversion"] {
            if original.get(field) != value.get(field) {
                return Err(Error::InvalidInput(format!(
                    "the edited payload must keep the event's {field:?} ({}); edit its data instead",
                    original
                        .get(field)
                        .map_or_else(|| "absent".to_owned(), ToString::to_string)
                )));
            }
        }
    }
    if super::contains_nul(&value) {
        return Err(Error::InvalidInput(
            "the edited payload may not hold NUL characters".into(),
        ));
    }
    Ok(value)
}

/// Retries failed job `id` with `edited` (checked by [`validate_edit`])
/// instead of its stored payload: records the edit with `by`, publishes the
/// edit to the listener's queue, waits for the confirm, deletes the job's
/// row and returns the recorded edit. If the publish fails the job stays
/// (and the edit stays recorded, as tried).
pub async fn retry_edited(
    pool: &PgPool,
    channel: &Channel,
    id: i64,
    edited: &str,
    by: &str,
    confirm_timeout: Duration,
) -> Result<FailedJobEdit> {
    let job: FailedJob = run_blocking(pool, move |conn| get(conn, id))
        .await?
        .ok_or_else(|| Error::NotFound(format!("failed job {id}")))?;
    let value = validate_edit(&job.payload, edited)?;
    let record = {
        let (job, value, by) = (job.clone(), value.clone(), crate::text::bounded_text(by, 255));
        run_blocking(pool, move |conn| {
            Ok(diesel::insert_into(failed_job_edits::table)
                .values((
                    failed_job_edits::failed_job_uuid.eq(job.uuid),
                    failed_job_edits::listener.eq(&job.listener),
                    failed_job_edits::queue.eq(&job.queue),
                    failed_job_edits::event_id.eq(job.event_id),
                    failed_job_edits::event_type.eq(&job.event_type),
                    failed_job_edits::original.eq(&job.payload),
                    failed_job_edits::edited.eq(&value),
                    failed_job_edits::edited_by.eq(&by),
                ))
                .returning(FailedJobEdit::as_returning())
                .get_result(conn)?)
        })
        .await?
    };
    republish(channel, &job, &retry_body(&value), confirm_timeout).await?;
    run_blocking(pool, move |conn| super::forget(conn, id)).await?;
    Ok(record)
}

/// The edits recorded for the failed job with stable id `uuid`, or of any
/// job of `event_id`, oldest first.
pub fn edits_for(conn: &mut PgConnection, uuid: Uuid, event_id: Option<Uuid>) -> Result<Vec<FailedJobEdit>> {
    let mut query = failed_job_edits::table
        .select(FailedJobEdit::as_select())
        .filter(failed_job_edits::failed_job_uuid.eq(uuid))
        .into_boxed();
    if let Some(event_id) = event_id {
        query = query.or_filter(failed_job_edits::event_id.eq(event_id));
    }
    Ok(query.order(failed_job_edits::id).load(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_the_event_identity() {
        let original = serde_json::json!({"id": "e1", "type": "site.created", "source": "/s", "specversion": "1.0", "data": {"a": 1}});
        let ok = validate_edit(
            &original,
            r#"{"id":"e1","type":"site.created","source":"/s","specversion":"1.0","data":{"a":2}}"#,
        );
        assert_eq!(
            ok.ok().map(|v| v["data"]["a"].clone()),
            Some(serde_json::json!(2))
        );
        for (edit, says) in [
            ("{not json", "not valid JSON"),
            ("[1]", "must be a JSON object"),
            (
                r#"{"id":"e2","type":"site.created","source":"/s","specversion":"1.0"}"#,
                "\"id\"",
            ),
            (r#"{"id":"e1","source":"/s","specversion":"1.0"}"#, "\"type\""),
        ] {
            let error = validate_edit(&original, edit)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(says), "{edit}: {error}");
        }
        let nul = validate_edit(
            &original,
            r#"{"id":"e1","type":"site.created","source":"/s","specversion":"1.0","data":"a\u0000b"}"#,
        );
        assert!(nul.is_err(), "jsonb cannot store NUL");
        let malformed = serde_json::json!({"malformed": true, "raw_body": "x"});
        assert!(validate_edit(&malformed, r#"{"id":"new"}"#).is_ok());
    }
}
