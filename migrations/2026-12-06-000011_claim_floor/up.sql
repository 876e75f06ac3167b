-- The claim floor: where a claim's scan of the backlog starts, so that the
-- path a claim reads does not grow with rows that were already published.
--
-- A published row leaves a dead entry in the backlog index
-- (outbox_events_unpublished_by_seq) until vacuum removes it, and vacuum
-- cannot while any snapshot older than the row is open anywhere in the
-- cluster (a long analytics query, a forgotten psql session). A claim that
-- scans the index from its start walks every such entry again; one that
-- starts at the floor walks only those above it.
--
-- The invariant (src/relay/floor.rs has the argument in full): every
-- unpublished row with seq below the floor either waits for a publish retry
-- or has failed (outbox_events_retrying), or belongs to an aggregate that
-- has such a row. Claims read those below the floor through the retrying
-- index and the aggregate index, both small, and everything else from the
-- floor up.
--
-- The floor is a sequence, not a row: it is moved by every claim, and an
-- UPDATEd row would leave a dead version per claim for the same pinned
-- snapshot to keep. setval is not transactional, so the floor is only ever
-- raised to a value that holds whether or not the raising claim commits,
-- and only under the claim lock (pg_advisory_xact_lock(1869968482, 1)).
CREATE SEQUENCE outbox_claim_floor AS BIGINT MINVALUE 0 START WITH 0;

-- The helpers below run as the schema's owner (SECURITY DEFINER), so the
-- relay's role needs no grant on either sequence; search_path is pinned to
-- the one the migration ran with.

-- The floor now.
CREATE FUNCTION outbox_claim_floor() RETURNS BIGINT
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$ SELECT last_value FROM outbox_claim_floor $$;

-- A commit tick: the last seq drawn so far, then the transactions that
-- hold a write lock on outbox_events. A transaction takes that lock before
-- it draws a seq (the INSERT locks its table before evaluating defaults)
-- and keeps it until it ends, so once every holder of one tick has ended,
-- every row with seq <= last_seq is committed or gone for good: the relay
-- may let the floor pass them. A transaction that writes no event (an
-- analytics query, a REPEATABLE READ snapshot) never holds the lock and
-- never holds the floor back.
CREATE FUNCTION outbox_commit_tick() RETURNS TABLE (last_seq BIGINT, holders TEXT[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
DECLARE
    v_last BIGINT;
BEGIN
    v_last := COALESCE(pg_sequence_last_value('outbox_events_seq_seq'::regclass), 0);
    -- A statement of its own, after the sequence was read.
    RETURN QUERY
    SELECT v_last,
           ARRAY(SELECT DISTINCT l.virtualtransaction
                 FROM pg_locks l
                 WHERE l.locktype = 'relation'
                   AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
                   AND l.relation = 'outbox_events'::regclass
                   AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
                   AND l.granted
                   AND l.pid IS DISTINCT FROM pg_backend_pid()
                 ORDER BY 1);
END
$$;

-- Raises the floor to the first unpublished row that is not in (or behind)
-- a publish retry, but never past p_frontier + 1, where p_frontier is a seq
-- the caller knows every row at or below which is committed or gone (from
-- commit ticks). Called by claims, under the claim lock. Only a role that
-- could mark events published anyway (UPDATE on outbox_events) may move it.
CREATE FUNCTION outbox_claim_floor_raise(p_frontier BIGINT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    v_floor BIGINT;
    v_first BIGINT;
    v_limit BIGINT;
BEGIN
    IF NOT has_table_privilege(session_user, 'outbox_events', 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied to move the claim floor (needs UPDATE on outbox_events)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM pg_advisory_xact_lock(1869968482, 1);
    SELECT last_value INTO v_floor FROM outbox_claim_floor;
    -- No frontier past the seqs drawn so far.
    v_limit := LEAST(p_frontier, COALESCE(pg_sequence_last_value('outbox_events_seq_seq'::regclass), 0)) + 1;
    IF v_limit <= v_floor THEN
        RETURN v_floor;
    END IF;
    -- Walks the backlog index from the floor to the first live entry: the
    -- dead entries it passes are the ones the next claim no longer reads.
    SELECT e.seq INTO v_first
    FROM outbox_events e
    WHERE e.published_at IS NULL
      AND e.seq >= v_floor
      AND e.seq < v_limit
      AND (e.aggregate_type, e.aggregate_id) NOT IN (
          SELECT r.aggregate_type, r.aggregate_id
          FROM outbox_events r
          WHERE r.published_at IS NULL AND (r.failed_at IS NOT NULL OR r.next_attempt_at IS NOT NULL))
    ORDER BY e.seq
    LIMIT 1;
    v_floor := COALESCE(v_first, v_limit);
    PERFORM setval('outbox_claim_floor', v_floor);
    RETURN v_floor;
END
$$;

-- A row leaving the retrying set unpublished-or-not (its retry published,
-- an operator put it back in line, it was deleted) takes its aggregate out
-- of what claims read below the floor: the floor comes down to the
-- aggregate's first unpublished row, so claims read it from there again.
-- Lowering is always safe; it costs one walk back up.
CREATE FUNCTION outbox_claim_floor_lower() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    v_next BIGINT;
BEGIN
    SELECT min(e.seq) INTO v_next
    FROM outbox_events e
    WHERE e.aggregate_type = OLD.aggregate_type
      AND e.aggregate_id = OLD.aggregate_id
      AND e.published_at IS NULL;
    IF v_next IS NOT NULL THEN
        -- Held to this transaction's end: no claim runs between the floor
        -- coming down and this change becoming visible.
        PERFORM pg_advisory_xact_lock(1869968482, 1);
        IF v_next < (SELECT last_value FROM outbox_claim_floor) THEN
            PERFORM setval('outbox_claim_floor', v_next);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_events_floor_on_update
    AFTER UPDATE ON outbox_events
    FOR EACH ROW
    WHEN (OLD.published_at IS NULL
          AND (OLD.failed_at IS NOT NULL OR OLD.next_attempt_at IS NOT NULL)
          AND (NEW.published_at IS NOT NULL OR (NEW.failed_at IS NULL AND NEW.next_attempt_at IS NULL)))
    EXECUTE FUNCTION outbox_claim_floor_lower();

CREATE TRIGGER outbox_events_floor_on_delete
    AFTER DELETE ON outbox_events
    FOR EACH ROW
    WHEN (OLD.published_at IS NULL AND (OLD.failed_at IS NOT NULL OR OLD.next_attempt_at IS NOT NULL))
    EXECUTE FUNCTION outbox_claim_floor_lower();

-- TRUNCATE ... RESTART IDENTITY starts seqs again from 1: so does the floor.
CREATE FUNCTION outbox_claim_floor_reset() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM setval('outbox_claim_floor', 0);
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_events_floor_on_truncate
    AFTER TRUNCATE ON outbox_events
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_claim_floor_reset();

-- The claim (see 000003 for the rules), reading the backlog from the floor
-- up, and below it only the aggregates whose retry is due. p_frontier: the
-- caller's commit frontier (outbox_commit_tick); NULL leaves the floor
-- where it is. The four-argument form stays for relays of an earlier
-- release (they read from the start, which is still correct).
CREATE FUNCTION outbox_claim_batch(p_owner TEXT, p_mine BIGINT[], p_batch BIGINT, p_lease_secs FLOAT8, p_frontier BIGINT)
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
-- proportion to the backlog instead of the batch. Planned for each call
-- with the floor's value (a plan cached while the table was small or
-- empty stays in the relay's session for its whole life otherwise).
SET enable_seqscan = off SET enable_bitmapscan = off SET plan_cache_mode = force_custom_plan
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
    CROSS JOIN LATERAL (SELECT x.* FROM outbox_events x WHERE x.seq = k.seq) e
    ORDER BY e.seq;
    -- After the claim's own statement, with a fresh snapshot: the rows
    -- just claimed are leased and unpublished, so the floor stays at or
    -- below them whether or not this transaction commits.
    IF p_frontier IS NOT NULL THEN
        PERFORM outbox_claim_floor_raise(p_frontier);
    END IF;
END
$$;
