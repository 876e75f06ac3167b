//! The relay's SQL: claiming rows under a lease, marking them published,
//! recording failures, releasing leases, reading backlog figures, pruning.
//!
//! Every function takes a plain connection and is blocking; the engine
//! calls them on tokio's blocking pool.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::cloudevents::EventRef;
use crate::error::Result;

/// A row the relay holds a lease on and is about to publish.
#[derive(Debug, Clone, QueryableByName)]
pub struct ClaimedEvent {
    /// Position in commit order within its aggregate.
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    /// Event id.
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    /// Type name.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Aggregate kind.
    #[diesel(sql_type = Text)]
    pub aggregate_type: String,
    /// Aggregate id.
    #[diesel(sql_type = Text)]
    pub aggregate_id: String,
    /// Tenant.
    #[diesel(sql_type = Nullable<Text>)]
    pub tenant_id: Option<String>,
    /// When it happened.
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    /// When the writer's transaction inserted it.
    #[diesel(sql_type = Timestamptz)]
    pub recorded_at: DateTime<Utc>,
    /// Who did it.
    #[diesel(sql_type = Nullable<Text>)]
    pub actor: Option<String>,
    /// Request id.
    #[diesel(sql_type = Nullable<Text>)]
    pub correlation_id: Option<String>,
    /// Cause.
    #[diesel(sql_type = Nullable<Text>)]
    pub causation_id: Option<String>,
    /// Trace context.
    #[diesel(sql_type = Nullable<Text>)]
    pub traceparent: Option<String>,
    /// Payload schema version.
    #[diesel(sql_type = Integer)]
    pub schema_version: i32,
    /// Payload as JSON text.
    #[diesel(sql_type = Text)]
    pub payload: String,
    /// Failed publish attempts so far.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
}

impl ClaimedEvent {
    /// Borrowed view for encoding.
    pub fn as_event_ref(&self) -> EventRef<'_> {
        EventRef {
            event_id: self.event_id,
            event_type: &self.event_type,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            tenant_id: self.tenant_id.as_deref(),
            occurred_at: self.occurred_at,
            actor: self.actor.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            causation_id: self.causation_id.as_deref(),
            traceparent: self.traceparent.as_deref(),
            schema_version: self.schema_version,
            payload_json: &self.payload,
        }
    }
}

/// Claims up to `batch_size` rows for `relay_id` under a lease of
/// `lease_secs`, returned in seq order.
///
/// A row is claimable only when every earlier unpublished row of its
/// aggregate is either claimed by this same statement or already leased
/// to this relay (in flight here): so an aggregate's events are only ever
/// in one relay's hands, in order, and an aggregate whose head is failed,
/// waiting for a retry, or held by another relay is skipped entirely.
/// `FOR UPDATE SKIP LOCKED` keeps concurrent relays from waiting on each
/// other; uncommitted rows are invisible, so a long open transaction
/// delays only its own aggregate's later events (which writers serialize
/// by locking the aggregate row) and nothing else. Nothing is claimed
/// while the outbox is paused.
pub fn claim_batch(
    conn: &mut PgConnection,
    relay_id: &str,
    batch_size: i64,
    lease_secs: f64,
) -> Result<Vec<ClaimedEvent>> {
    let mut rows = diesel::sql_query(
        "WITH win AS (
             SELECT seq, aggregate_type, aggregate_id
             FROM outbox_events
             WHERE published_at IS NULL
               AND failed_at IS NULL
               AND (lease_expires_at IS NULL OR lease_expires_at < now())
               AND (next_attempt_at IS NULL OR next_attempt_at <= now())
               AND NOT (SELECT paused FROM outbox_control WHERE id)
             ORDER BY seq
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ),
         aggs AS (
             SELECT aggregate_type, aggregate_id, max(seq) AS last_seq
             FROM win GROUP BY aggregate_type, aggregate_id
         ),
         lines AS (
             SELECT u.seq,
                    w.seq IS NOT NULL AS in_window,
                    -- COALESCE: an unleased row gives NULL, which bool_and
                    -- would skip, letting later rows jump the queue.
                    bool_and(w.seq IS NOT NULL OR COALESCE(u.lease_owner = $1 AND u.lease_expires_at > now(), FALSE))
                        OVER (PARTITION BY a.aggregate_type, a.aggregate_id ORDER BY u.seq) AS ready
             FROM aggs a
             CROSS JOIN LATERAL (
                 SELECT p.seq, p.lease_owner, p.lease_expires_at
                 FROM outbox_events p
                 WHERE p.aggregate_type = a.aggregate_type
                   AND p.aggregate_id = a.aggregate_id
                   AND p.published_at IS NULL
                   AND p.seq <= a.last_seq
                 ORDER BY p.seq
             ) u
             LEFT JOIN win w ON w.seq = u.seq
         )
         UPDATE outbox_events e
         SET lease_owner = $1,
             lease_expires_at = now() + make_interval(secs => $3)
         FROM lines l
         WHERE e.seq = l.seq AND l.in_window AND l.ready
         RETURNING e.seq, e.event_id, e.event_type, e.aggregate_type, e.aggregate_id, e.tenant_id,
                   e.occurred_at, e.recorded_at, e.actor, e.correlation_id, e.causation_id,
                   e.traceparent, e.schema_version, e.payload::text AS payload, e.attempts",
    )
    .bind::<Text, _>(relay_id)
    .bind::<BigInt, _>(batch_size)
    .bind::<Double, _>(lease_secs)
    .load::<ClaimedEvent>(conn)?;
    rows.sort_unstable_by_key(|row| row.seq);
    Ok(rows)
}

/// Marks rows published, but only those still leased to `relay_id` with a
/// live lease: a relay whose lease ran out (paused, partitioned, slow) can
/// no longer mark. With `delete` (retention 0) the rows are deleted
/// instead. Returns the seqs actually marked.
pub fn mark_published(
    conn: &mut PgConnection,
    relay_id: &str,
    seqs: &[i64],
    delete: bool,
) -> Result<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let sql = if delete {
        "DELETE FROM outbox_events
         WHERE seq = ANY($1) AND lease_owner = $2 AND lease_expires_at > now()
         RETURNING seq"
    } else {
        "UPDATE outbox_events
         SET published_at = now(), lease_owner = NULL, lease_expires_at = NULL
         WHERE seq = ANY($1) AND lease_owner = $2 AND lease_expires_at > now()
         RETURNING seq"
    };
    let marked = diesel::sql_query(sql)
        .bind::<Array<BigInt>, _>(seqs)
        .bind::<Text, _>(relay_id)
        .load::<Seq>(conn)?;
    Ok(marked.into_iter().map(|row| row.seq).collect())
}

/// One failed publish attempt.
#[derive(Debug, Clone)]
pub struct PublishFailure {
    /// The row.
    pub seq: i64,
    /// Why (bounded to 4 KiB when stored).
    pub error: String,
    /// When to try again.
    pub retry_in: std::time::Duration,
}

/// Records failed attempts: attempts + 1, the error, the next attempt time,
/// the lease released; a row reaching `max_attempts` is marked failed (its
/// aggregate then waits behind it until an operator acts). Only rows still
/// leased to `relay_id` under a live lease are touched. Returns how many rows became failed.
pub fn record_failures(
    conn: &mut PgConnection,
    relay_id: &str,
    failures: &[PublishFailure],
    max_attempts: i32,
) -> Result<usize> {
    #[derive(QueryableByName)]
    struct Failed {
        #[diesel(sql_type = Bool)]
        failed: bool,
    }
    if failures.is_empty() {
        return Ok(0);
    }
    let seqs: Vec<i64> = failures.iter().map(|f| f.seq).collect();
    let errors: Vec<String> = failures.iter().map(|f| truncate(&f.error, 4096)).collect();
    let delays: Vec<f64> = failures.iter().map(|f| f.retry_in.as_secs_f64()).collect();
    let rows = diesel::sql_query(
        "UPDATE outbox_events e
         SET attempts = e.attempts + 1,
             last_error = f.error,
             next_attempt_at = now() + make_interval(secs => f.delay),
             lease_owner = NULL,
             lease_expires_at = NULL,
             failed_at = CASE WHEN e.attempts + 1 >= $4 THEN now() END
         FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(seq, error, delay)
         WHERE e.seq = f.seq AND e.lease_owner = $5 AND e.lease_expires_at > now()
           AND e.published_at IS NULL
         RETURNING e.failed_at IS NOT NULL AS failed",
    )
    .bind::<Array<BigInt>, _>(&seqs)
    .bind::<Array<Text>, _>(&errors)
    .bind::<Array<Double>, _>(&delays)
    .bind::<Integer, _>(max_attempts)
    .bind::<Text, _>(relay_id)
    .load::<Failed>(conn)?;
    Ok(rows.iter().filter(|r| r.failed).count())
}

/// Gives back leases on rows this relay will not publish after all, so any
/// relay can claim them at once.
pub fn release_leases(conn: &mut PgConnection, relay_id: &str, seqs: &[i64]) -> Result<usize> {
    if seqs.is_empty() {
        return Ok(0);
    }
    Ok(diesel::sql_query(
        "UPDATE outbox_events SET lease_owner = NULL, lease_expires_at = NULL
         WHERE seq = ANY($1) AND lease_owner = $2 AND published_at IS NULL",
    )
    .bind::<Array<BigInt>, _>(seqs)
    .bind::<Text, _>(relay_id)
    .execute(conn)?)
}

/// Gives back every lease this relay holds (at shutdown).
pub fn release_all_leases(conn: &mut PgConnection, relay_id: &str) -> Result<usize> {
    Ok(diesel::sql_query(
        "UPDATE outbox_events SET lease_owner = NULL, lease_expires_at = NULL
         WHERE lease_owner = $1 AND published_at IS NULL",
    )
    .bind::<Text, _>(relay_id)
    .execute(conn)?)
}

/// Deletes up to `batch` published rows older than `older_than_secs`,
/// oldest first. Returns how many it deleted; call again while it returns
/// a full batch.
pub fn prune_published(conn: &mut PgConnection, older_than_secs: f64, batch: i64) -> Result<usize> {
    Ok(diesel::sql_query(
        "DELETE FROM outbox_events WHERE seq IN (
             SELECT seq FROM outbox_events
             WHERE published_at IS NOT NULL
               AND published_at < now() - make_interval(secs => $1)
             ORDER BY seq
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )",
    )
    .bind::<Double, _>(older_than_secs)
    .bind::<BigInt, _>(batch)
    .execute(conn)?)
}

/// Backlog figures for metrics and `outbox status`.
#[derive(Debug, Clone, Default, QueryableByName, serde::Serialize)]
pub struct BacklogStats {
    /// Unpublished rows (including failed and leased ones).
    #[diesel(sql_type = BigInt)]
    pub backlog: i64,
    /// Age in seconds of the oldest unpublished row (0 when none).
    #[diesel(sql_type = Double)]
    pub oldest_unpublished_age_seconds: f64,
    /// Rows leased to a relay right now.
    #[diesel(sql_type = BigInt)]
    pub in_flight: i64,
    /// Rows that exhausted their publish attempts.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    /// Rows waiting for a retry after a failed attempt.
    #[diesel(sql_type = BigInt)]
    pub retrying: i64,
    /// Whether relays are paused.
    #[diesel(sql_type = Bool)]
    pub paused: bool,
}

/// Reads the backlog figures.
pub fn backlog_stats(conn: &mut PgConnection) -> Result<BacklogStats> {
    Ok(diesel::sql_query(
        "SELECT count(*) AS backlog,
                COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at))::float8, 0) AS oldest_unpublished_age_seconds,
                count(*) FILTER (WHERE lease_expires_at > now()) AS in_flight,
                count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed,
                count(*) FILTER (WHERE failed_at IS NULL AND next_attempt_at > now()) AS retrying,
                (SELECT paused FROM outbox_control WHERE id) AS paused
         FROM outbox_events WHERE published_at IS NULL",
    )
    .get_result(conn)?)
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
