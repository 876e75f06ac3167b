//! Retrying failed jobs: each is republished to its listener's own queue
//! (through the default exchange, so no other listener sees it again) and
//! its row deleted once the broker confirmed it. [`retry`] takes one job,
//! [`retry_many`] a list, [`retry_matching`] everything a [`Filter`]
//! matches; [`retry_many_with`] and [`retry_matching_with`] report each
//! job as it goes.
//!
//! ## Order
//!
//! A bulk retry hands each aggregate's events back to a listener in the
//! order they were recorded, whatever order the jobs were listed or named
//! in: the jobs are grouped by listener queue and aggregate (the
//! CloudEvents `source`, `aggregatetype` and `subject` of the stored
//! message) and each group is sorted by the event's position in the outbox
//! (its `seq`, read from `outbox_events` or the event log). Events no
//! longer in either (pruned without a log, or from another database) come
//! first, by their `time`, then their id; a job without an aggregate (a
//! malformed message) is a group of its own.
//!
//! The groups go out in waves: the first job of every group, then, once the
//! broker has confirmed those, the second of every group, and so on (each
//! wave [`RETRY_CHUNK`] publishes at a time). An event is therefore in its
//! queue before the next event of its aggregate is published, and a group
//! whose job is not confirmed stops there: its later jobs are kept, with
//! the reason, rather than overtaking it. Jobs of different aggregates go
//! out together, so many small groups cost one round trip per chunk.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Uuid as SqlUuid};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use uuid::Uuid;

use super::query::{Filter, matching};
use super::{FailedJob, get};
use crate::cloudevents::CONTENT_TYPE;
use crate::database::{PgPool, run_blocking};
use crate::error::{Error, Result, error_chain};
use crate::schema::failed_jobs;

/// Jobs [`retry_many`] and [`retry_matching`] publish at once before
/// awaiting their confirms and deleting their rows.
pub const RETRY_CHUNK: usize = 200;

/// Event ids looked up per statement when ordering a retry.
const POSITION_LOOKUP_CHUNK: usize = 5_000;

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
    /// Jobs republished and deleted, in the order they were published.
    pub retried: Vec<i64>,
    /// Jobs kept, with why (the publish was not confirmed, the queue is
    /// gone, an earlier event of the aggregate was kept, ...).
    pub kept: Vec<(i64, String)>,
    /// Ids asked for that had no row (already retried or forgotten).
    pub missing: Vec<i64>,
}

/// One job's outcome during a bulk retry, reported as it happens by
/// [`retry_many_with`].
#[derive(Debug)]
pub enum RetryProgress<'a> {
    /// Republished, confirmed and deleted.
    Retried(&'a FailedJob),
    /// Kept, with why.
    Kept {
        /// The job's id.
        id: i64,
        /// Why it was kept.
        reason: &'a str,
    },
    /// No such row (already retried or forgotten).
    Missing(i64),
}

/// Retries the jobs `ids`, each aggregate's events in order (see the
/// module's "Order"). A job whose publish fails is kept and reported, with
/// the later jobs of its aggregate; the others go on.
pub async fn retry_many(
    pool: &PgPool,
    channel: &Channel,
    ids: &[i64],
    confirm_timeout: Duration,
) -> Result<RetryOutcome> {
    retry_many_with(pool, channel, ids, confirm_timeout, &mut |_| {}).await
}

/// [`retry_many`], calling `progress` for each job as its outcome is known
/// (for progress bars and per-job output).
pub async fn retry_many_with(
    pool: &PgPool,
    channel: &Channel,
    ids: &[i64],
    confirm_timeout: Duration,
    progress: &mut (dyn FnMut(RetryProgress<'_>) + Send),
) -> Result<RetryOutcome> {
    let wanted = ids.to_vec();
    let planned = run_blocking(pool, move |conn| plan_ids(conn, &wanted)).await?;
    let mut outcome = RetryOutcome::default();
    let found: HashSet<i64> = planned.iter().map(|job| job.id).collect();
    let mut seen = HashSet::new();
    for &id in ids {
        if seen.insert(id) && !found.contains(&id) {
            outcome.missing.push(id);
            progress(RetryProgress::Missing(id));
        }
    }
    retry_planned(pool, channel, planned, confirm_timeout, progress, &mut outcome).await?;
    Ok(outcome)
}

/// Retries every job `filter` matches (its limit and cursor ignored), each
/// aggregate's events in order (see the module's "Order"). Jobs that fail
/// after the retry started are not taken.
pub async fn retry_matching(
    pool: &PgPool,
    channel: &Channel,
    filter: &Filter,
    confirm_timeout: Duration,
) -> Result<RetryOutcome> {
    retry_matching_with(pool, channel, filter, confirm_timeout, &mut |_| {}).await
}

/// [`retry_matching`], calling `progress` for each job as its outcome is
/// known.
pub async fn retry_matching_with(
    pool: &PgPool,
    channel: &Channel,
    filter: &Filter,
    confirm_timeout: Duration,
    progress: &mut (dyn FnMut(RetryProgress<'_>) + Send),
) -> Result<RetryOutcome> {
    let filter = filter.clone();
    let planned = run_blocking(pool, move |conn| plan_matching(conn, &filter)).await?;
    let mut outcome = RetryOutcome::default();
    retry_planned(pool, channel, planned, confirm_timeout, progress, &mut outcome).await?;
    Ok(outcome)
}

/// A job to retry, as far as ordering needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlannedJob {
    id: i64,
    /// Jobs with the same group are one aggregate's events at one queue.
    group: Group,
    /// The event's place within its group.
    position: Position,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Group {
    /// `(queue, source, aggregate type, aggregate id)`.
    Aggregate(String, String, String, String),
    /// A job whose message names no aggregate: alone in its group.
    Alone(i64),
}

/// Sorts events no longer in the outbox or the log first (they were
/// pruned, so recorded earlier), by time and id; then by `seq`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    seq: Option<i64>,
    time: Option<DateTime<Utc>>,
    event_id: Option<Uuid>,
    id: i64,
}

/// `(id, queue, event_id, source, aggregatetype, subject, time)` of a job.
type KeyRow = (
    i64,
    String,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// A text attribute of the stored CloudEvents document.
type Attribute = diesel::expression::SqlLiteral<Nullable<Text>>;

/// The columns of a [`KeyRow`].
type KeyColumns = (
    failed_jobs::id,
    failed_jobs::queue,
    failed_jobs::event_id,
    Attribute,
    Attribute,
    Attribute,
    Attribute,
);

fn key_columns() -> KeyColumns {
    (
        failed_jobs::id,
        failed_jobs::queue,
        failed_jobs::event_id,
        sql::<Nullable<Text>>("failed_jobs.payload->>'source'"),
        sql::<Nullable<Text>>("failed_jobs.payload->>'aggregatetype'"),
        sql::<Nullable<Text>>("failed_jobs.payload->>'subject'"),
        sql::<Nullable<Text>>("failed_jobs.payload->>'time'"),
    )
}

fn plan_ids(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<PlannedJob>> {
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(POSITION_LOOKUP_CHUNK) {
        rows.extend(
            failed_jobs::table
                .filter(failed_jobs::id.eq_any(chunk))
                .select(key_columns())
                .load::<KeyRow>(conn)?,
        );
    }
    planned(conn, rows)
}

fn plan_matching(conn: &mut PgConnection, filter: &Filter) -> Result<Vec<PlannedJob>> {
    let rows = matching(filter).select(key_columns()).load::<KeyRow>(conn)?;
    planned(conn, rows)
}

fn planned(conn: &mut PgConnection, rows: Vec<KeyRow>) -> Result<Vec<PlannedJob>> {
    let event_ids: Vec<Uuid> = rows.iter().filter_map(|row| row.2).collect();
    let positions = positions(conn, &event_ids)?;
    Ok(rows
        .into_iter()
        .map(|(id, queue, event_id, source, aggregate_type, subject, time)| {
            let group = match (aggregate_type, subject) {
                (Some(aggregate_type), Some(subject)) => {
                    Group::Aggregate(queue, source.unwrap_or_default(), aggregate_type, subject)
                }
                _ => Group::Alone(id),
            };
            let position = Position {
                seq: event_id.and_then(|event_id| positions.get(&event_id).copied()),
                time: time
                    .and_then(|time| DateTime::parse_from_rfc3339(&time).ok())
                    .map(|time| time.with_timezone(&Utc)),
                event_id,
                id,
            };
            PlannedJob { id, group, position }
        })
        .collect())
}

/// The `seq` of each of `event_ids` still in `outbox_events` or the event
/// log.
fn positions(conn: &mut PgConnection, event_ids: &[Uuid]) -> Result<HashMap<Uuid, i64>> {
    #[derive(QueryableByName)]
    struct Located {
        #[diesel(sql_type = SqlUuid)]
        event_id: Uuid,
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    let mut found = HashMap::with_capacity(event_ids.len());
    for chunk in event_ids.chunks(POSITION_LOOKUP_CHUNK) {
        let located = diesel::sql_query(
            "SELECT event_id, seq FROM outbox_events WHERE event_id = ANY($1)
             UNION ALL
             SELECT event_id, seq FROM outbox_event_log WHERE event_id = ANY($1)",
        )
        .bind::<Array<SqlUuid>, _>(chunk)
        .load::<Located>(conn)?;
        found.extend(located.into_iter().map(|row| (row.event_id, row.seq)));
    }
    Ok(found)
}

/// Each group's job ids, oldest event first; groups in a stable order.
fn ordered_groups(mut jobs: Vec<PlannedJob>) -> Vec<(Group, VecDeque<i64>)> {
    jobs.sort_by(|a, b| (&a.group, &a.position).cmp(&(&b.group, &b.position)));
    let mut groups: BTreeMap<Group, VecDeque<i64>> = BTreeMap::new();
    for job in jobs {
        groups.entry(job.group).or_default().push_back(job.id);
    }
    groups.into_iter().collect()
}

/// Retries `planned` wave by wave (see the module's "Order").
async fn retry_planned(
    pool: &PgPool,
    channel: &Channel,
    planned: Vec<PlannedJob>,
    confirm_timeout: Duration,
    progress: &mut (dyn FnMut(RetryProgress<'_>) + Send),
    outcome: &mut RetryOutcome,
) -> Result<()> {
    let mut groups = ordered_groups(planned);
    loop {
        // The head of every group still going.
        let wave: Vec<(usize, i64)> = groups
            .iter_mut()
            .enumerate()
            .filter_map(|(index, (_, ids))| ids.pop_front().map(|id| (index, id)))
            .collect();
        if wave.is_empty() {
            return Ok(());
        }
        for chunk in wave.chunks(RETRY_CHUNK) {
            let wanted: Vec<i64> = chunk.iter().map(|(_, id)| *id).collect();
            let jobs = run_blocking(pool, move |conn| load(conn, &wanted)).await?;
            let publishes = jobs.iter().map(|job| async move {
                let body = retry_body(&job.payload);
                (job, republish(channel, job, &body, confirm_timeout).await)
            });
            let published = futures_util::future::join_all(publishes).await;
            let confirmed: Vec<i64> = published
                .iter()
                .filter(|(_, result)| result.is_ok())
                .map(|(job, _)| job.id)
                .collect();
            if !confirmed.is_empty() {
                let deleted = confirmed.clone();
                run_blocking(pool, move |conn| {
                    Ok(
                        diesel::delete(failed_jobs::table.filter(failed_jobs::id.eq_any(&deleted)))
                            .execute(conn)?,
                    )
                })
                .await?;
            }
            for (index, id) in chunk {
                match published.iter().find(|(job, _)| job.id == *id) {
                    Some((job, Ok(()))) => {
                        outcome.retried.push(*id);
                        progress(RetryProgress::Retried(job));
                    }
                    Some((job, Err(error))) => {
                        let reason = error_chain(error);
                        progress(RetryProgress::Kept {
                            id: *id,
                            reason: &reason,
                        });
                        outcome.kept.push((*id, reason));
                        // Its later events wait behind it.
                        let (_, later) = &mut groups[*index];
                        for held in later.drain(..) {
                            let reason = format!(
                                "held back: failed job {}, an earlier event of the same aggregate for {}, was not retried",
                                job.id, job.listener
                            );
                            progress(RetryProgress::Kept {
                                id: held,
                                reason: &reason,
                            });
                            outcome.kept.push((held, reason));
                        }
                    }
                    None => {
                        // Retried or forgotten by someone else meanwhile.
                        outcome.missing.push(*id);
                        progress(RetryProgress::Missing(*id));
                    }
                }
            }
        }
    }
}

fn load(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<FailedJob>> {
    let rows = failed_jobs::table
        .filter(failed_jobs::id.eq_any(ids))
        .select(super::COLUMNS)
        .order(failed_jobs::id)
        .load::<super::Row>(conn)?;
    Ok(rows.into_iter().map(super::from_row).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64, aggregate: &str, seq: Option<i64>, seconds: i64) -> PlannedJob {
        PlannedJob {
            id,
            group: Group::Aggregate("q".into(), "/s".into(), "counter".into(), aggregate.into()),
            position: Position {
                seq,
                time: DateTime::from_timestamp(seconds, 0),
                event_id: None,
                id,
            },
        }
    }

    /// Each aggregate oldest first by seq, whatever the ids and times say;
    /// events gone from the outbox first, by time; a job without an
    /// aggregate alone.
    #[test]
    fn groups_are_per_aggregate_and_ordered_by_position() {
        let alone = PlannedJob {
            id: 9,
            group: Group::Alone(9),
            position: Position {
                seq: None,
                time: None,
                event_id: None,
                id: 9,
            },
        };
        let groups = ordered_groups(vec![
            job(1, "a", Some(30), 100),
            job(2, "b", Some(20), 50),
            job(3, "a", Some(10), 300),
            job(4, "a", None, 200),
            job(5, "a", None, 150),
            alone,
            job(6, "b", Some(5), 60),
        ]);
        let ids: Vec<Vec<i64>> = groups.into_iter().map(|(_, ids)| ids.into()).collect();
        assert_eq!(ids, vec![vec![5, 4, 3, 1], vec![6, 2], vec![9]]);
    }
}
