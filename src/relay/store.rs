//! The relay's SQL: claiming rows under a lease, marking them published,
//! recording failures, releasing leases, reading backlog figures, pruning.
//!
//! Every function takes a plain connection and is blocking; the engine
//! calls them on tokio's blocking pool.
//!
//! Public only with the `testing` feature (the claim and liveness tests
//! drive these functions directly); without it, what only those tests
//! use is unreachable by design.
#![cfg_attr(not(feature = "testing"), allow(unreachable_pub, dead_code))]

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use uuid::Uuid;

use crate::cloudevents::EventRef;
use crate::error::Result;
use crate::prepared::{Bind, Prepared};

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
    /// The lease (claimed batch) this row was claimed under.
    #[diesel(sql_type = BigInt)]
    pub lease_id: i64,
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

/// Claims up to `batch_size` rows for `relay_id` under one new lease of
/// `lease_secs`, returned in seq order (all with the same `lease_id`).
///
/// A row is claimable only when every earlier unpublished row of its
/// aggregate is either claimed by this same statement or already leased
/// to this relay (in flight here): so an aggregate's events are only ever
/// in one relay's hands, in order, and an aggregate whose head is failed,
/// waiting for a retry, or held by another relay is skipped entirely: its
/// queued rows are not even read into the claim's window, so however many
/// there are, they never keep other aggregates' rows from being claimed.
/// Claims take turns: each first takes a transaction-scoped advisory lock
/// ([`CLAIM_LOCK`]), and only then runs its query, whose snapshot
/// therefore sees every lease committed by claims before it (both inside
/// the `outbox_claim_batch` function, one round trip). (Row locks
/// alone are not enough: they end with the other claim's commit, and a
/// statement whose snapshot predates that commit cannot see its lease, so
/// two relays could take the same rows.) A claim holds the lock for one
/// statement, a few milliseconds; publishing runs in parallel. Each lease
/// names the aggregates it holds (`aggregate_keys`, a 64-bit hash of type
/// and id), so a claim learns what other relays hold from one array per
/// lease instead of reading each of their rows: its cost does not grow
/// with the number of relays. An aggregate stays another relay's until
/// that lease is dropped (all its rows settled) or expires. Rows are
/// not locked (a row lock writes to every claimed row): marks and failure
/// records change only rows under a live lease, which the claim's snapshot
/// already leaves out; a row whose lease ended while its mark was running
/// may be claimed again and published twice, which at-least-once allows.
/// Uncommitted rows are invisible, so a long open transaction
/// delays only its own aggregate's later events (which writers serialize
/// by locking the aggregate row) and nothing else. Nothing is claimed
/// while the outbox is paused.
///
/// Every live lease owned by `relay_id` counts as the caller's here; a
/// relay process uses [`claim_batch_holding`] instead.
pub fn claim_batch(
    conn: &mut PgConnection,
    relay_id: &str,
    batch_size: i64,
    lease_secs: f64,
) -> Result<Vec<ClaimedEvent>> {
    claim(conn, relay_id, None, batch_size, lease_secs, None)
}

/// [`claim_batch`] for a relay session that holds exactly the leases
/// `held`: rows under any other lease, even one in `relay_id`'s name (left
/// by an earlier session, or written by a statement that reached the
/// server after its session had ended), block their aggregate as another
/// relay's would. Without this, an earlier session's lease that nobody
/// publishes would let this session take the rows queued behind it, out
/// of order.
pub fn claim_batch_holding(
    conn: &mut PgConnection,
    relay_id: &str,
    held: &[i64],
    batch_size: i64,
    lease_secs: f64,
) -> Result<Vec<ClaimedEvent>> {
    claim(conn, relay_id, Some(held), batch_size, lease_secs, None)
}

/// [`claim_batch_holding`] that then raises the claim floor as far as
/// `frontier` allows: every row with a seq at or below `frontier` must be
/// committed or gone for good (a settled [`CommitTick`]; see
/// [`super::floor`]). `None` leaves the floor where it is. Claims read the
/// backlog from the floor up (and below it only the aggregates whose
/// publish retry is due) whatever the frontier.
pub fn claim_batch_raising_floor(
    conn: &mut PgConnection,
    relay_id: &str,
    held: &[i64],
    batch_size: i64,
    lease_secs: f64,
    frontier: Option<i64>,
) -> Result<Vec<ClaimedEvent>> {
    claim(conn, relay_id, Some(held), batch_size, lease_secs, frontier)
}

fn claim(
    conn: &mut PgConnection,
    relay_id: &str,
    held: Option<&[i64]>,
    batch_size: i64,
    lease_secs: f64,
    frontier: Option<i64>,
) -> Result<Vec<ClaimedEvent>> {
    // One round trip: the function takes the claim lock, then runs the
    // claim with a snapshot taken after the lock was granted (see the
    // migrations that create it for the query).
    struct ClaimSql;
    Ok(Prepared::<ClaimSql>::new(
        "SELECT * FROM outbox_claim_batch($1, $2, $3, $4, $5)",
        vec![
            Bind::Text(relay_id),
            Bind::NullableBigIntArray(held),
            Bind::BigInt(batch_size),
            Bind::Double(lease_secs),
            Bind::NullableBigInt(frontier),
        ],
    )
    .load::<ClaimedEvent>(conn)?)
}

/// One commit tick (`outbox_commit_tick`): the last seq drawn when it was
/// taken, and the transactions then holding a write lock on
/// `outbox_events` (virtual transaction ids). Once none of them holds it
/// any more, every row with a seq at or below `last_seq` is committed or
/// gone for good.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct CommitTick {
    /// The last seq drawn from `outbox_events`' identity.
    #[diesel(sql_type = BigInt)]
    pub last_seq: i64,
    /// Transactions that may still commit rows at or below `last_seq`.
    #[diesel(sql_type = diesel::sql_types::Array<Text>)]
    pub holders: Vec<String>,
    /// The server the tick was taken on ([`server_identity`]): seqs and
    /// transaction ids are a server's own, so a tick says nothing about
    /// another (a standby promoted after a failover).
    #[diesel(sql_type = BigInt)]
    pub server: i64,
}

/// The server's start time in microseconds: tells two servers behind the
/// same address apart (a promoted standby was started at another moment
/// than the primary it replaces; a restarted server gets a new one too).
macro_rules! server_identity_sql {
    () => {
        "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint"
    };
}

/// Takes a [`CommitTick`].
pub fn commit_tick(conn: &mut PgConnection) -> Result<CommitTick> {
    struct CommitTickSql;
    Ok(Prepared::<CommitTickSql>::new(
        concat!(
            "SELECT t.last_seq, t.holders, ",
            server_identity_sql!(),
            " AS server FROM outbox_commit_tick() t"
        ),
        vec![],
    )
    .get_result(conn)?)
}

/// The identity of the server `conn` is connected to, as [`CommitTick::server`]
/// names it.
pub fn server_identity(conn: &mut PgConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct Server {
        #[diesel(sql_type = BigInt)]
        server: i64,
    }
    Ok(
        diesel::sql_query(concat!("SELECT ", server_identity_sql!(), " AS server"))
            .get_result::<Server>(conn)?
            .server,
    )
}

/// The claim floor now: every unpublished row below it waits for (or
/// failed) a publish retry, or is behind one in its aggregate.
pub fn claim_floor(conn: &mut PgConnection) -> Result<i64> {
    #[derive(QueryableByName)]
    struct Floor {
        #[diesel(sql_type = BigInt)]
        floor: i64,
    }
    Ok(diesel::sql_query("SELECT outbox_claim_floor() AS floor")
        .get_result::<Floor>(conn)?
        .floor)
}

/// The advisory lock (two-key form, which no single-key lock can collide
/// with) that claims take turns on: `outb`, 1. `outbox_claim_batch` takes
/// it with these numbers.
pub const CLAIM_LOCK: (i32, i32) = (0x6f75_7462, 1);

/// A row and the lease it is held under.
pub type LeasedSeq = (i64, i64);

fn split(rows: &[LeasedSeq]) -> (Vec<i64>, Vec<i64>) {
    rows.iter().copied().unzip()
}

/// Marks rows published, but only through a live lease of `relay_id`: a
/// relay whose lease ran out (paused, partitioned, slow) can no longer mark.
/// With `delete` (retention 0) the rows are deleted instead. Returns the
/// seqs actually marked.
pub fn mark_published(
    conn: &mut PgConnection,
    relay_id: &str,
    rows: &[LeasedSeq],
    delete: bool,
) -> Result<Vec<i64>> {
    struct DeletePublishedSql;
    struct MarkPublishedSql;
    if delete {
        mark::<DeletePublishedSql>(
            conn,
            "DELETE FROM outbox_events e
             USING unnest($1::bigint[], $2::bigint[]) AS m(seq, lease_id)
             JOIN outbox_leases l ON l.id = m.lease_id AND l.owner = $3 AND l.expires_at > now()
             WHERE e.seq = m.seq AND e.published_at IS NULL
             RETURNING e.seq",
            relay_id,
            rows,
        )
    } else {
        mark::<MarkPublishedSql>(
            conn,
            "UPDATE outbox_events e
             SET published_at = now()
             FROM unnest($1::bigint[], $2::bigint[]) AS m(seq, lease_id)
             JOIN outbox_leases l ON l.id = m.lease_id AND l.owner = $3 AND l.expires_at > now()
             WHERE e.seq = m.seq AND e.published_at IS NULL
             RETURNING e.seq",
            relay_id,
            rows,
        )
    }
}

/// Marks rows the broker returned as unroutable (no queue bound to their
/// type) published to nobody: `published_at` and `unroutable_at` are set,
/// and the row is kept (also with retention 0) so it can be replayed once
/// a listener exists. Guarded by a live lease of `relay_id` like
/// [`mark_published`]. Returns the seqs marked.
pub fn mark_unroutable(conn: &mut PgConnection, relay_id: &str, rows: &[LeasedSeq]) -> Result<Vec<i64>> {
    struct MarkUnroutableSql;
    mark::<MarkUnroutableSql>(
        conn,
        "UPDATE outbox_events e
         SET published_at = now(), unroutable_at = now()
         FROM unnest($1::bigint[], $2::bigint[]) AS m(seq, lease_id)
         JOIN outbox_leases l ON l.id = m.lease_id AND l.owner = $3 AND l.expires_at > now()
         WHERE e.seq = m.seq AND e.published_at IS NULL
         RETURNING e.seq",
        relay_id,
        rows,
    )
}

/// Runs a mark statement `sql` (`$1` seqs, `$2` their leases, `$3` the
/// relay; returning the seqs it changed), prepared under marker `M`.
fn mark<M: 'static>(
    conn: &mut PgConnection,
    sql: &'static str,
    relay_id: &str,
    rows: &[LeasedSeq],
) -> Result<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (seqs, leases) = split(rows);
    let marked = Prepared::<M>::new(
        sql,
        vec![
            Bind::BigIntArray(&seqs),
            Bind::BigIntArray(&leases),
            Bind::Text(relay_id),
        ],
    )
    .load::<Seq>(conn)?;
    Ok(marked.into_iter().map(|row| row.seq).collect())
}

/// The heartbeat: extends the live leases `held` of `relay_id` to
/// `lease_secs` from now and returns the ids it extended. A lease that
/// already ended is not revived (another relay may hold its rows now); its
/// id is missing from the answer, and the relay must stop publishing its
/// rows. Only the caller's own leases are named: a lease its relay no
/// longer knows of (an earlier session's) must run out, not live forever.
pub fn renew_leases(
    conn: &mut PgConnection,
    relay_id: &str,
    held: &[i64],
    lease_secs: f64,
) -> Result<Vec<i64>> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    struct RenewLeasesSql;
    let renewed = Prepared::<RenewLeasesSql>::new(
        "UPDATE outbox_leases SET expires_at = now() + make_interval(secs => $2)
         WHERE owner = $1 AND id = ANY($3) AND expires_at > now()
         RETURNING id",
        vec![
            Bind::Text(relay_id),
            Bind::Double(lease_secs),
            Bind::BigIntArray(held),
        ],
    )
    .load::<Id>(conn)?;
    Ok(renewed.into_iter().map(|row| row.id).collect())
}

/// One failed publish attempt.
#[derive(Debug, Clone)]
pub struct PublishFailure {
    /// The row.
    pub seq: i64,
    /// The lease it was held under.
    pub lease_id: i64,
    /// Why (bounded to 4 KiB when stored).
    pub error: String,
    /// When to try again.
    pub retry_in: std::time::Duration,
}

/// Records failed attempts: attempts + 1, the error, the next attempt time;
/// a row reaching `max_attempts` is marked failed (its aggregate then waits
/// behind it until an operator acts). The rows leave their leases. Only
/// rows held under a live lease of `relay_id` are touched. Returns how
/// many rows became failed.
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
    let leases: Vec<i64> = failures.iter().map(|f| f.lease_id).collect();
    let errors: Vec<String> = failures
        .iter()
        .map(|f| crate::text::prefix_within(&f.error, 4096).to_owned())
        .collect();
    let delays: Vec<f64> = failures.iter().map(|f| f.retry_in.as_secs_f64()).collect();
    struct RecordFailuresSql;
    let rows = Prepared::<RecordFailuresSql>::new(
        "UPDATE outbox_events e
         SET attempts = e.attempts + 1,
             last_error = f.error,
             next_attempt_at = now() + make_interval(secs => f.delay),
             failed_at = CASE WHEN e.attempts + 1 >= $5 THEN now() END
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::float8[]) AS f(seq, lease_id, error, delay)
         JOIN outbox_leases l ON l.id = f.lease_id AND l.owner = $6 AND l.expires_at > now()
         WHERE e.seq = f.seq AND e.published_at IS NULL
         RETURNING e.failed_at IS NOT NULL AS failed",
        vec![
            Bind::BigIntArray(&seqs),
            Bind::BigIntArray(&leases),
            Bind::TextArray(&errors),
            Bind::DoubleArray(&delays),
            Bind::Integer(max_attempts),
            Bind::Text(relay_id),
        ],
    )
    .load::<Failed>(conn)?;
    let released: Vec<LeasedSeq> = failures.iter().map(|f| (f.seq, f.lease_id)).collect();
    release_leases(conn, relay_id, &released)?;
    Ok(rows.iter().filter(|r| r.failed).count())
}

/// Takes rows out of this relay's leases so any relay can claim them at
/// once (rows it will not publish after all). Returns how many leases
/// changed. The leases' aggregate keys are rewritten from their rows left
/// unpublished, so the released aggregates (and those whose rows there are
/// all published) are no longer blocked for other relays.
pub fn release_leases(conn: &mut PgConnection, relay_id: &str, rows: &[LeasedSeq]) -> Result<usize> {
    if rows.is_empty() {
        return Ok(0);
    }
    let (seqs, leases) = split(rows);
    struct ReleaseLeasesSql;
    Ok(Prepared::<ReleaseLeasesSql>::new(
        "UPDATE outbox_leases l
         SET seqs = ARRAY(SELECT s FROM unnest(l.seqs) AS s WHERE s <> ALL(r.seqs)),
             aggregate_keys = CASE WHEN l.aggregate_keys IS NOT NULL THEN ARRAY(
                 SELECT DISTINCT outbox_aggregate_key(e.aggregate_type, e.aggregate_id)
                 FROM unnest(l.seqs) AS s
                 CROSS JOIN LATERAL (SELECT x.aggregate_type, x.aggregate_id FROM outbox_events x WHERE x.seq = s AND x.published_at IS NULL OFFSET 0) e
                 WHERE s <> ALL(r.seqs)) END
         FROM (SELECT lease_id, array_agg(seq) AS seqs
               FROM unnest($1::bigint[], $2::bigint[]) AS x(seq, lease_id)
               GROUP BY lease_id) r
         WHERE l.id = r.lease_id AND l.owner = $3",
        vec![
            Bind::BigIntArray(&seqs),
            Bind::BigIntArray(&leases),
            Bind::Text(relay_id),
        ],
    )
    .execute(conn)?)
}

/// Deletes leases whose rows are all settled.
pub fn drop_leases(conn: &mut PgConnection, relay_id: &str, lease_ids: &[i64]) -> Result<usize> {
    if lease_ids.is_empty() {
        return Ok(0);
    }
    struct DropLeasesSql;
    Ok(Prepared::<DropLeasesSql>::new(
        "DELETE FROM outbox_leases WHERE id = ANY($1) AND owner = $2",
        vec![Bind::BigIntArray(lease_ids), Bind::Text(relay_id)],
    )
    .execute(conn)?)
}

/// Gives back every lease this relay holds (at shutdown).
pub fn release_all_leases(conn: &mut PgConnection, relay_id: &str) -> Result<usize> {
    Ok(diesel::sql_query("DELETE FROM outbox_leases WHERE owner = $1")
        .bind::<Text, _>(relay_id)
        .execute(conn)?)
}

/// Deletes leases that expired more than a minute ago (their relay died or
/// lost them); live ones are never touched.
pub fn delete_expired_leases(conn: &mut PgConnection) -> Result<usize> {
    Ok(
        diesel::sql_query("DELETE FROM outbox_leases WHERE expires_at < now() - interval '1 minute'")
            .execute(conn)?,
    )
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

/// Every unpublished row, read as claims read them (`floor.rs`): from the
/// claim floor up, and below it only the aggregates with a row in the
/// retry set, so counting the backlog walks no entry of a row already
/// published however long a snapshot has kept vacuum from removing them.
const UNPUBLISHED: &str = "SELECT e.* FROM outbox_events e
     WHERE e.published_at IS NULL AND e.seq >= (SELECT outbox_claim_floor())
     UNION ALL
     SELECT e.* FROM (SELECT DISTINCT r.aggregate_type, r.aggregate_id
                      FROM outbox_events r
                      WHERE r.published_at IS NULL AND (r.failed_at IS NOT NULL OR r.next_attempt_at IS NOT NULL)) a
     CROSS JOIN LATERAL (SELECT x.* FROM outbox_events x
                         WHERE x.aggregate_type = a.aggregate_type AND x.aggregate_id = a.aggregate_id
                           AND x.published_at IS NULL AND x.seq < (SELECT outbox_claim_floor())) e";

/// Backlog figures for metrics and `outbox status`.
#[derive(Debug, Clone, Default, QueryableByName, serde::Serialize)]
pub struct BacklogStats {
    /// Unpublished rows (including failed and leased ones).
    #[diesel(sql_type = BigInt)]
    pub backlog: i64,
    /// Age in seconds of the oldest unpublished row that has not failed (0
    /// when none): failed rows wait for an operator and are counted in
    /// `failed` instead, so one failed row does not hold the age up.
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
    /// Kept rows the broker returned as unroutable (no queue was bound to
    /// their type), published to nobody; see `mark_unroutable`.
    #[diesel(sql_type = BigInt)]
    pub unroutable: i64,
}

/// Reads the backlog figures.
pub fn backlog_stats(conn: &mut PgConnection) -> Result<BacklogStats> {
    Ok(diesel::sql_query(format!(
        "SELECT count(*) AS backlog,
                COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at) FILTER (WHERE failed_at IS NULL))::float8, 0)
                    AS oldest_unpublished_age_seconds,
                count(*) FILTER (WHERE seq IN (
                    SELECT unnest(seqs) FROM outbox_leases WHERE expires_at > now()
                )) AS in_flight,
                count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed,
                count(*) FILTER (WHERE failed_at IS NULL AND next_attempt_at > now()) AS retrying,
                (SELECT paused FROM outbox_control WHERE id) AS paused,
                (SELECT count(*) FROM outbox_events WHERE unroutable_at IS NOT NULL) AS unroutable
         FROM ({UNPUBLISHED}) outbox_events"
    ))
    .get_result(conn)?)
}

/// Unpublished rows of one event type, for `outbox status`.
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct EventTypeBacklog {
    /// The event type.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Unpublished rows of this type (including failed ones).
    #[diesel(sql_type = BigInt)]
    pub backlog: i64,
    /// Age in seconds of its oldest unpublished row.
    #[diesel(sql_type = Double)]
    pub oldest_unpublished_age_seconds: f64,
    /// Rows of this type that exhausted their publish attempts.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
}

/// The backlog per event type, largest first.
pub fn backlog_by_event_type(conn: &mut PgConnection) -> Result<Vec<EventTypeBacklog>> {
    Ok(diesel::sql_query(format!(
        "SELECT event_type,
                count(*) AS backlog,
                COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at))::float8, 0) AS oldest_unpublished_age_seconds,
                count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed
         FROM ({UNPUBLISHED}) outbox_events
         GROUP BY event_type
         ORDER BY backlog DESC, event_type"
    ))
    .load(conn)?)
}

/// Kept unroutable rows of one event type, for `outbox status`.
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct UnroutableEvents {
    /// The event type no queue was bound to.
    #[diesel(sql_type = Text)]
    pub event_type: String,
    /// Rows of this type kept as unroutable.
    #[diesel(sql_type = BigInt)]
    pub count: i64,
    /// When the latest of them was returned.
    #[diesel(sql_type = Timestamptz)]
    pub last_at: DateTime<Utc>,
}

/// Unroutable rows per event type, largest first.
pub fn unroutable_by_event_type(conn: &mut PgConnection) -> Result<Vec<UnroutableEvents>> {
    Ok(diesel::sql_query(
        "SELECT event_type, count(*) AS count, max(unroutable_at) AS last_at
         FROM outbox_events WHERE unroutable_at IS NOT NULL
         GROUP BY event_type
         ORDER BY count DESC, event_type",
    )
    .load(conn)?)
}
