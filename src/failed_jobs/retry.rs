//! Retrying failed jobs: each is republished to its listener's own queue
//! (through the default exchange, so no other listener sees it again) and
//! its row deleted once the broker confirmed it. [`retry`] takes one job,
//! [`retry_many`] a list (publishes in flight together, one delete),
//! [`retry_matching`] everything a [`Filter`] matches.

use std::time::Duration;

use diesel::prelude::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use super::query::{Cursor, Filter, list_page};
use super::{FailedJob, get};
use crate::cloudevents::CONTENT_TYPE;
use crate::database::{PgPool, run_blocking};
use crate::error::{Error, Result, error_chain};
use crate::schema::failed_jobs;

/// Jobs [`retry_many`] and [`retry_matching`] publish before awaiting their
/// confirms and deleting their rows.
pub const RETRY_CHUNK: usize = 200;

/// Republishes failed job `id`, waits for the broker's confirm, then
/// deletes the row and returns it.
///
/// `channel` must be in confirm mode (`confirm_select`). The retried
/// message starts with a fresh attempt count. If the confirm does not come
/// within `confirm_timeout`, or the queue does not exist, the row stays.
pub async fn retry(
    pool: &PgPool,
    channel: &Channel,
    id: i64,
    confirm_timeout: Duration,
) -> Result<FailedJob> {
    let job = run_blocking(pool, move |conn| get(conn, id))
        .await?
        .ok_or_else(|| Error::NotFound(format!("failed job {id}")))?;
    republish(channel, &job, &retry_body(&job.payload), confirm_timeout).await?;
    run_blocking(pool, move |conn| super::forget(conn, id)).await?;
    Ok(job)
}

/// What a bulk retry did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Jobs republished and deleted.
    pub retried: Vec<i64>,
    /// Jobs kept, with why (the publish was not confirmed, the queue is
    /// gone, ...).
    pub kept: Vec<(i64, String)>,
    /// Ids asked for that had no row (already retried or forgotten).
    pub missing: Vec<i64>,
}

impl RetryOutcome {
    fn absorb(&mut self, other: RetryOutcome) {
        self.retried.extend(other.retried);
        self.kept.extend(other.kept);
        self.missing.extend(other.missing);
    }
}

/// Retries the jobs `ids`, [`RETRY_CHUNK`] at a time: a chunk's publishes
/// are in flight together, and the confirmed ones are deleted in one
/// statement. A job whose publish fails is kept and reported; the others
/// go on.
pub async fn retry_many(
    pool: &PgPool,
    channel: &Channel,
    ids: &[i64],
    confirm_timeout: Duration,
) -> Result<RetryOutcome> {
    let mut outcome = RetryOutcome::default();
    for chunk in ids.chunks(RETRY_CHUNK) {
        let wanted = chunk.to_vec();
        let jobs = run_blocking(pool, move |conn| load(conn, &wanted)).await?;
        outcome
            .missing
            .extend(chunk.iter().filter(|id| !jobs.iter().any(|job| job.id == **id)));
        outcome.absorb(retry_loaded(pool, channel, jobs, confirm_timeout).await?);
    }
    Ok(outcome)
}

/// Retries every job `filter` matches (its limit and cursor ignored),
/// newest first. Jobs that fail after the walk started are not taken.
pub async fn retry_matching(
    pool: &PgPool,
    channel: &Channel,
    filter: &Filter,
    confirm_timeout: Duration,
) -> Result<RetryOutcome> {
    let mut outcome = RetryOutcome::default();
    let mut after: Option<Cursor> = None;
    loop {
        let walk = Filter {
            after,
            limit: Some(RETRY_CHUNK as i64),
            ..filter.clone()
        };
        let page = run_blocking(pool, move |conn| list_page(conn, &walk)).await?;
        let Some(last) = page.jobs.last().map(Cursor::of) else {
            break;
        };
        after = Some(last);
        let more = page.next.is_some();
        outcome.absorb(retry_loaded(pool, channel, page.jobs, confirm_timeout).await?);
        if !more {
            break;
        }
    }
    Ok(outcome)
}

fn load(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<FailedJob>> {
    let rows = failed_jobs::table
        .filter(failed_jobs::id.eq_any(ids))
        .select(super::COLUMNS)
        .order(failed_jobs::id)
        .load::<super::Row>(conn)?;
    Ok(rows.into_iter().map(super::from_row).collect())
}

async fn retry_loaded(
    pool: &PgPool,
    channel: &Channel,
    jobs: Vec<FailedJob>,
    confirm_timeout: Duration,
) -> Result<RetryOutcome> {
    let publishes = jobs.iter().map(|job| async move {
        let body = retry_body(&job.payload);
        (job.id, republish(channel, job, &body, confirm_timeout).await)
    });
    let mut outcome = RetryOutcome::default();
    for (id, published) in futures_util::future::join_all(publishes).await {
        match published {
            Ok(()) => outcome.retried.push(id),
            Err(error) => outcome.kept.push((id, error_chain(&error))),
        }
    }
    let confirmed = outcome.retried.clone();
    if !confirmed.is_empty() {
        run_blocking(pool, move |conn| {
            Ok(
                diesel::delete(failed_jobs::table.filter(failed_jobs::id.eq_any(&confirmed)))
                    .execute(conn)?,
            )
        })
        .await?;
    }
    Ok(outcome)
}

/// Publishes `body` as job `job`'s retry to its queue and waits for the
/// confirm.
pub(super) async fn republish(
    channel: &Channel,
    job: &FailedJob,
    body: &[u8],
    confirm_timeout: Duration,
) -> Result<()> {
    let id = job.id;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-outbox-retried-failed-job".into(),
        AMQPValue::LongLongInt(job.id),
    );
    let mut properties = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_app_id("outbox-failed-retry".into())
        .with_headers(headers);
    if let Some(event_id) = job.event_id {
        properties = properties.with_message_id(event_id.to_string().into());
    }
    if let Some(event_type) = job.event_type.as_deref()
        && let Ok(short) = lapin::types::ShortString::try_new(event_type)
    {
        properties = properties.with_type(short);
    }
    crate::amqp::publish_to_queue(channel, &job.queue, body, properties, confirm_timeout)
        .await
        .map_err(|error| error.in_context(|context| format!("failed job {id} kept: {context}")))
}

/// The bytes to republish for a stored payload: the CloudEvents document,
/// or the raw body of a malformed message.
pub fn retry_body(payload: &serde_json::Value) -> Vec<u8> {
    if payload.get("malformed").and_then(serde_json::Value::as_bool) == Some(true)
        && let Some(raw) = payload.get("raw_body").and_then(serde_json::Value::as_str)
    {
        return raw.as_bytes().to_vec();
    }
    serde_json::to_vec(payload).unwrap_or_default()
}
