-- Relay liveness: a blocked aggregate holds back only itself, and events no
-- queue is bound to are kept, not retried.

-- Unpublished rows that failed a publish (waiting for a retry, due for
-- one, or failed for good). The claim reads their aggregates to skip every
-- queued row behind a blocked head, so a blocked aggregate with any number
-- of queued events never fills a claim's window. Small: only rows that
-- failed.
CREATE INDEX outbox_events_retrying
    ON outbox_events (aggregate_type, aggregate_id)
    WHERE published_at IS NULL AND (failed_at IS NOT NULL OR next_attempt_at IS NOT NULL);

-- Set (with published_at) when the broker returned the event because no
-- queue was bound to its type: delivered to nobody, kept for replay once a
-- listener exists (`outbox replay`), counted in `outbox status`.
ALTER TABLE outbox_events ADD COLUMN unroutable_at TIMESTAMPTZ NULL;
CREATE INDEX outbox_events_unroutable
    ON outbox_events (event_type, unroutable_at)
    WHERE unroutable_at IS NOT NULL;

-- A claim in one round trip. Claims take turns on a transaction-scoped
-- advisory lock (two-key form: 'outb', 1), and the claim's query must see
-- every lease committed by the claims before it, so its snapshot must be
-- taken after the lock is granted: in a VOLATILE plpgsql function each
-- statement takes a fresh snapshot, which gives exactly that in one call
-- (outbox::relay::store::claim_batch documents the rules).
--
-- p_mine: the leases the calling relay session holds. Only rows under them
-- count as its own; any other live lease, even one with the caller's owner
-- name (left by an earlier session of the same relay, or by a statement
-- that reached the server after its session ended), blocks its aggregate
-- like another relay's. NULL: every lease owned by p_owner is the caller's.
CREATE FUNCTION outbox_claim_batch(p_owner TEXT, p_mine BIGINT[], p_batch BIGINT, p_lease_secs FLOAT8)
RETURNS TABLE (
    seq BIGINT, event_id UUID, event_type TEXT, aggregate_type TEXT, aggregate_id TEXT,
    tenant_id TEXT, occurred_at TIMESTAMPTZ, recorded_at TIMESTAMPTZ, actor TEXT,
    correlation_id TEXT, causation_id TEXT, traceparent TEXT, schema_version INTEGER,
    payload TEXT, attempts INTEGER, lease_id BIGINT
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, 1);
    RETURN QUERY
    WITH live AS MATERIALIZED (
        SELECT (CASE WHEN p_mine IS NULL THEN l.owner = p_owner ELSE l.id = ANY(p_mine) END) AS mine,
               unnest(l.seqs) AS seq
        FROM outbox_leases l WHERE l.expires_at > now()
    ),
    -- Aggregates whose head no row of this claim may pass: held by another
    -- relay, waiting for a retry, or failed. Their queued rows are kept out
    -- of the window, so a blocked aggregate with any number of queued
    -- events never crowds out the others.
    blocked AS MATERIALIZED (
        SELECT e.aggregate_type, e.aggregate_id
        FROM outbox_events e
        -- An array keeps this on the primary key instead of a scan.
        WHERE e.seq = ANY(ARRAY(SELECT v.seq FROM live v WHERE NOT v.mine))
          AND e.published_at IS NULL
        UNION
        SELECT e.aggregate_type, e.aggregate_id
        FROM outbox_events e
        -- On the small outbox_events_retrying index.
        WHERE e.published_at IS NULL
          AND (e.failed_at IS NOT NULL OR e.next_attempt_at IS NOT NULL)
          AND (e.failed_at IS NOT NULL OR e.next_attempt_at > now())
    ),
    -- The first rows in seq order that are neither leased nor behind a
    -- blocked head. Every earlier unpublished row of a chosen row's
    -- aggregate is then in this window too, or leased to this relay (any
    -- other reason to leave it out blocks the whole aggregate), so the
    -- window can be taken whole without breaking order.
    claimed AS MATERIALIZED (
        SELECT e.seq
        FROM outbox_events e
        WHERE e.published_at IS NULL
          AND e.failed_at IS NULL
          AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= now())
          -- NOT IN over a materialized set runs as one hashed lookup.
          AND e.seq NOT IN (SELECT v.seq FROM live v)
          AND (e.aggregate_type, e.aggregate_id) NOT IN (SELECT b.aggregate_type, b.aggregate_id FROM blocked b)
          AND NOT (SELECT c.paused FROM outbox_control c WHERE c.id)
        ORDER BY e.seq
        LIMIT p_batch
    ),
    lease AS (
        INSERT INTO outbox_leases (owner, expires_at, seqs)
        SELECT p_owner, now() + make_interval(secs => p_lease_secs), array_agg(k.seq ORDER BY k.seq)
        FROM claimed k
        HAVING count(*) > 0
        RETURNING outbox_leases.id
    )
    SELECT e.seq, e.event_id, e.event_type, e.aggregate_type, e.aggregate_id, e.tenant_id,
           e.occurred_at, e.recorded_at, e.actor, e.correlation_id, e.causation_id,
           e.traceparent, e.schema_version, e.payload::text, e.attempts,
           (SELECT s.id FROM lease s)
    FROM outbox_events e
    WHERE e.seq = ANY(ARRAY(SELECT k.seq FROM claimed k))
    ORDER BY e.seq;
END
$$;
