-- Brings back the claim of 000012, which looks up every row under another
-- relay's lease, and leases without aggregate keys.
CREATE OR REPLACE FUNCTION outbox_claim_batch(p_owner TEXT, p_mine BIGINT[], p_batch BIGINT, p_lease_secs FLOAT8, p_frontier BIGINT)
RETURNS TABLE (
    seq BIGINT, event_id UUID, event_type TEXT, aggregate_type TEXT, aggregate_id TEXT,
    tenant_id TEXT, occurred_at TIMESTAMPTZ, recorded_at TIMESTAMPTZ, actor TEXT,
    correlation_id TEXT, causation_id TEXT, traceparent TEXT, schema_version INTEGER,
    payload TEXT, attempts INTEGER, lease_id BIGINT
)
LANGUAGE plpgsql VOLATILE
-- Index scans in seq order, whatever the statistics say: a queue table's
-- statistics are usually from a moment its backlog was small, and a
-- bitmap scan of the whole backlog (then a sort) costs every claim time in
-- proportion to the backlog instead of the batch. With those off, and
-- every lookup of a row by seq a nested point lookup (OFFSET 0 keeps the
-- planner from turning one into a join that walks an index), the plan
-- depends on no parameter's value: it is planned once per session and
-- cached (planning it per call cost 1.4 ms, most of a quiet claim).
-- jit = off: the disabled scans' costs would otherwise trigger JIT
-- compilation (10 ms) in a session that has it on.
SET enable_seqscan = off SET enable_bitmapscan = off SET plan_cache_mode = force_generic_plan SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_floor BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, 1);
    v_floor := outbox_claim_floor();
    RETURN QUERY
    WITH live AS MATERIALIZED (
        SELECT (CASE WHEN p_mine IS NULL THEN l.owner = p_owner ELSE l.id = ANY(p_mine) END) AS mine,
               unnest(l.seqs) AS seq
        FROM outbox_leases l WHERE l.expires_at > now()
    ),
    -- Point lookups, one per row others hold, whatever the planner makes
    -- of the statistics (a scan of an index with a filter on seq would
    -- walk every entry, dead ones included).
    blocked AS MATERIALIZED (
        SELECT e.aggregate_type, e.aggregate_id
        FROM (SELECT DISTINCT v.seq FROM live v WHERE NOT v.mine) o
        CROSS JOIN LATERAL (
            SELECT x.aggregate_type, x.aggregate_id
            FROM outbox_events x
            WHERE x.seq = o.seq AND x.published_at IS NULL
            OFFSET 0
        ) e
        UNION
        SELECT e.aggregate_type, e.aggregate_id
        FROM outbox_events e
        WHERE e.published_at IS NULL
          AND (e.failed_at IS NOT NULL OR e.next_attempt_at IS NOT NULL)
          AND (e.failed_at IS NOT NULL OR e.next_attempt_at > now())
    ),
    -- Aggregates whose head's retry is due: the only ones that may have
    -- claimable rows below the floor.
    due AS MATERIALIZED (
        SELECT DISTINCT e.aggregate_type, e.aggregate_id
        FROM outbox_events e
        WHERE e.published_at IS NULL
          AND e.failed_at IS NULL
          AND e.next_attempt_at IS NOT NULL
          AND e.next_attempt_at <= now()
    ),
    paused AS MATERIALIZED (
        SELECT c.paused FROM outbox_control c WHERE c.id
    ),
    candidates AS (
        (SELECT e.seq
         FROM outbox_events e
         WHERE e.published_at IS NULL
           AND e.seq >= v_floor
           AND e.failed_at IS NULL
           AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= now())
           AND e.seq NOT IN (SELECT v.seq FROM live v)
           AND (e.aggregate_type, e.aggregate_id) NOT IN (SELECT b.aggregate_type, b.aggregate_id FROM blocked b)
           AND NOT (SELECT p.paused FROM paused p)
         ORDER BY e.seq
         LIMIT p_batch)
        UNION ALL
        -- Driven by the due aggregates (none, most of the time), each
        -- read on the aggregate index: never a walk below the floor.
        (SELECT e.seq
         FROM due d
         CROSS JOIN LATERAL (
             SELECT x.seq
             FROM outbox_events x
             WHERE x.aggregate_type = d.aggregate_type
               AND x.aggregate_id = d.aggregate_id
               AND x.published_at IS NULL
               AND x.seq < v_floor
               AND x.failed_at IS NULL
               AND (x.next_attempt_at IS NULL OR x.next_attempt_at <= now())
               AND x.seq NOT IN (SELECT v.seq FROM live v)
             ORDER BY x.seq
             LIMIT p_batch
         ) e
         WHERE (d.aggregate_type, d.aggregate_id) NOT IN (SELECT b.aggregate_type, b.aggregate_id FROM blocked b)
           AND NOT (SELECT p.paused FROM paused p)
         ORDER BY e.seq
         LIMIT p_batch)
    ),
    -- Each part is a prefix (in seq order) of every aggregate's claimable
    -- rows, so the first p_batch of both together are too.
    claimed AS MATERIALIZED (
        SELECT c.seq FROM candidates c ORDER BY c.seq LIMIT p_batch
    ),
    lease AS (
        INSERT INTO outbox_leases (owner, expires_at, seqs)
        SELECT p_owner, now() + make_interval(secs => p_lease_secs), array_agg(k.seq ORDER BY k.seq)
        FROM claimed k
        HAVING count(*) > 0
        RETURNING outbox_leases.id
    )
    -- One primary-key lookup per claimed row (with stale statistics a
    -- "seq = ANY(...)" may be planned as a scan of the whole table).
    SELECT e.seq, e.event_id, e.event_type, e.aggregate_type, e.aggregate_id, e.tenant_id,
           e.occurred_at, e.recorded_at, e.actor, e.correlation_id, e.causation_id,
           e.traceparent, e.schema_version, e.payload::text, e.attempts,
           (SELECT s.id FROM lease s)
    FROM claimed k
    CROSS JOIN LATERAL (SELECT x.* FROM outbox_events x WHERE x.seq = k.seq OFFSET 0) e
    ORDER BY e.seq;
    -- After the claim's own statement, with a fresh snapshot: the rows
    -- just claimed are leased and unpublished, so the floor stays at or
    -- below them whether or not this transaction commits.
    IF p_frontier IS NOT NULL THEN
        PERFORM outbox_claim_floor_raise(p_frontier);
    END IF;
END
$$;

ALTER TABLE outbox_leases DROP COLUMN aggregate_keys;
DROP FUNCTION outbox_aggregate_key(TEXT, TEXT);
