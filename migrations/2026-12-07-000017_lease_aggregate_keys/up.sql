-- Leases name the aggregates they hold, so a claim finds what other
-- relays hold without reading their rows.
--
-- A claim skips every aggregate another relay holds a row of. Until now it
-- found those aggregates by looking up each row under another relay's
-- lease: one index probe and heap visit per held row. Each relay holds up
-- to max_in_flight rows (2,000 by default), so with four relays every claim
-- made 6,000 lookups, under the lock claims take turns on: measured with
-- pgbench, a claim of 500 rows took 6.9 ms with no other lease held, 18 ms
-- with 1,500 rows held by others and 64 ms with 6,000. The claim grew with
-- the number of relays, and the relays queued behind it.
--
-- Now each lease stores the keys of the aggregates it holds (a 64-bit hash
-- of the aggregate type and id, outbox_aggregate_key), written by the
-- claim that creates it and rewritten when rows are released from it. A
-- claim reads the keys of the live leases that are not its own: one array
-- per lease, no row read. Leases written by relays of earlier releases have
-- no keys (NULL); their rows are still looked up one by one, so relays of
-- both releases can run side by side during an upgrade.
--
-- What changes: an aggregate stays blocked for other relays while any live
-- lease names it, even once its rows there are published, until the lease
-- is dropped (when all of its rows are settled, a batch's publish time) or
-- expires. Blocking more is always safe; it only keeps an aggregate with
-- the relay that publishes it. A hash collision blocks an unrelated
-- aggregate for as long, with a chance of about one in 2^64 per pair.

-- The aggregate's key: a 64-bit hash of its type and id. The type's length
-- comes first so that no two (type, id) pairs hash the same text.
CREATE FUNCTION outbox_aggregate_key(p_type TEXT, p_id TEXT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT hashtextextended(length(p_type)::text || ':' || p_type || p_id, 0) $$;

-- NULL: a lease of an earlier relay, whose rows a claim looks up.
ALTER TABLE outbox_leases ADD COLUMN aggregate_keys BIGINT[] NULL;

CREATE OR REPLACE FUNCTION outbox_claim_batch(p_owner TEXT, p_mine BIGINT[], p_batch BIGINT, p_lease_secs FLOAT8, p_frontier BIGINT)
RETURNS TABLE (
    seq BIGINT, event_id UUID, event_type TEXT, aggregate_type TEXT, aggregate_id TEXT,
    tenant_id TEXT, occurred_at TIMESTAMPTZ, recorded_at TIMESTAMPTZ, actor TEXT,
    correlation_id TEXT, causation_id TEXT, traceparent TEXT, schema_version INTEGER,
    payload TEXT, attempts INTEGER, lease_id BIGINT
)
LANGUAGE plpgsql VOLATILE
-- As in 000012: index scans in seq order, the plan made once per session,
-- lookups by seq kept point lookups, no JIT.
SET enable_seqscan = off SET enable_bitmapscan = off SET plan_cache_mode = force_generic_plan SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_floor BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, 1);
    v_floor := outbox_claim_floor();
    RETURN QUERY
    WITH leases AS MATERIALIZED (
        SELECT (CASE WHEN p_mine IS NULL THEN l.owner = p_owner ELSE l.id = ANY(p_mine) END) AS mine,
               l.seqs, l.aggregate_keys
        FROM outbox_leases l WHERE l.expires_at > now()
    ),
    -- The caller's own rows in flight: not claimed again, but the rows
    -- queued behind them are its to claim.
    mine AS MATERIALIZED (
        SELECT DISTINCT unnest(m.seqs) AS seq FROM leases m WHERE m.mine
    ),
    -- Aggregates others hold (by key), and aggregates blocked behind a
    -- retry that is not due or a failed row.
    blocked AS MATERIALIZED (
        SELECT unnest(o.aggregate_keys) AS k
        FROM leases o
        WHERE NOT o.mine AND o.aggregate_keys IS NOT NULL
        UNION
        -- A lease of an earlier relay: its rows, one point lookup each.
        SELECT outbox_aggregate_key(e.aggregate_type, e.aggregate_id)
        FROM (SELECT DISTINCT unnest(o.seqs) AS seq FROM leases o WHERE NOT o.mine AND o.aggregate_keys IS NULL) o
        CROSS JOIN LATERAL (
            SELECT x.aggregate_type, x.aggregate_id
            FROM outbox_events x
            WHERE x.seq = o.seq AND x.published_at IS NULL
            OFFSET 0
        ) e
        UNION
        SELECT outbox_aggregate_key(e.aggregate_type, e.aggregate_id)
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
        (SELECT e.seq, outbox_aggregate_key(e.aggregate_type, e.aggregate_id) AS k
         FROM outbox_events e
         WHERE e.published_at IS NULL
           AND e.seq >= v_floor
           AND e.failed_at IS NULL
           AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= now())
           AND e.seq NOT IN (SELECT m.seq FROM mine m)
           AND outbox_aggregate_key(e.aggregate_type, e.aggregate_id) NOT IN (SELECT b.k FROM blocked b)
           AND NOT (SELECT p.paused FROM paused p)
         ORDER BY e.seq
         LIMIT p_batch)
        UNION ALL
        -- Driven by the due aggregates (none, most of the time), each
        -- read on the aggregate index: never a walk below the floor.
        (SELECT e.seq, e.k
         FROM due d
         CROSS JOIN LATERAL (
             SELECT x.seq, outbox_aggregate_key(x.aggregate_type, x.aggregate_id) AS k
             FROM outbox_events x
             WHERE x.aggregate_type = d.aggregate_type
               AND x.aggregate_id = d.aggregate_id
               AND x.published_at IS NULL
               AND x.seq < v_floor
               AND x.failed_at IS NULL
               AND (x.next_attempt_at IS NULL OR x.next_attempt_at <= now())
               AND x.seq NOT IN (SELECT m.seq FROM mine m)
             ORDER BY x.seq
             LIMIT p_batch
         ) e
         WHERE outbox_aggregate_key(d.aggregate_type, d.aggregate_id) NOT IN (SELECT b.k FROM blocked b)
           AND NOT (SELECT p.paused FROM paused p)
         ORDER BY e.seq
         LIMIT p_batch)
    ),
    -- Each part is a prefix (in seq order) of every aggregate's claimable
    -- rows, so the first p_batch of both together are too.
    claimed AS MATERIALIZED (
        SELECT c.seq, c.k FROM candidates c ORDER BY c.seq LIMIT p_batch
    ),
    lease AS (
        INSERT INTO outbox_leases (owner, expires_at, seqs, aggregate_keys)
        SELECT p_owner, now() + make_interval(secs => p_lease_secs),
               array_agg(k.seq ORDER BY k.seq), array_agg(DISTINCT k.k)
        FROM claimed k
        HAVING count(*) > 0
        RETURNING outbox_leases.id
    )
    -- One primary-key lookup per claimed row.
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
