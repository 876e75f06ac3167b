-- The event log: where events live after publishing, once the relay's
-- retention in outbox_events is over (RelayConfig::event_log). The relay
-- moves rows here (deleted from outbox_events and inserted here in one
-- transaction, so an event is always in exactly one of the two tables),
-- in seq order, one relay at a time; `position` is the log's global order,
-- which keeps each aggregate's order.
--
-- Partitioned by month of `logged_at`: a retention drops whole partitions
-- (no row-by-row DELETE, no bloat, no vacuum debt). Partitions are created
-- by the relay ahead of the rows that need them (outbox::event_log).
CREATE TABLE outbox_event_log (
    position         BIGINT      GENERATED ALWAYS AS IDENTITY,
    -- outbox_events.seq: the event's order within its aggregate.
    seq              BIGINT      NOT NULL,
    event_id         UUID        NOT NULL,
    event_type       TEXT        NOT NULL,
    aggregate_type   TEXT        NOT NULL,
    aggregate_id     TEXT        NOT NULL,
    tenant_id        TEXT        NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    actor            TEXT        NULL,
    correlation_id   TEXT        NULL,
    causation_id     TEXT        NULL,
    traceparent      TEXT        NULL,
    schema_version   INTEGER     NOT NULL,
    payload          JSONB       NOT NULL,
    recorded_at      TIMESTAMPTZ NOT NULL,
    published_at     TIMESTAMPTZ NOT NULL,
    logged_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (position, logged_at)
) PARTITION BY RANGE (logged_at);

-- Reading an aggregate's history in order, finding an event by id, and
-- replays by time.
CREATE INDEX outbox_event_log_by_aggregate ON outbox_event_log (aggregate_type, aggregate_id, position);
CREATE INDEX outbox_event_log_by_event_id ON outbox_event_log (event_id);
-- The dashboard's "where is my event?" search: by aggregate id alone and by
-- correlation id.
CREATE INDEX outbox_event_log_by_aggregate_id ON outbox_event_log (aggregate_id);
CREATE INDEX outbox_event_log_by_correlation ON outbox_event_log (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX outbox_event_log_by_recorded_at ON outbox_event_log USING brin (recorded_at);

-- Projections: named read models fed by events. `state` is `live` (fed by
-- its listener), `rebuild_requested` (`outbox projection rebuild`; a worker
-- running the projection starts it) or `rebuilding` (the listener leaves
-- events to the rebuild, which applies them in log order); `position` is
-- the last log position a rebuild applied (a killed rebuild resumes after
-- it), `rebuilt_through` the last log position the finished rebuild covered
-- (a late live delivery of an event at or before it was applied by the
-- rebuild).
CREATE TABLE outbox_projections (
    name             TEXT        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 255),
    state            TEXT        NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'rebuild_requested', 'rebuilding')),
    position         BIGINT      NOT NULL DEFAULT 0,
    rebuilt_through  BIGINT      NOT NULL DEFAULT 0,
    -- Events the last rebuild applied.
    rebuilt_events   BIGINT      NOT NULL DEFAULT 0,
    rebuild_started_at  TIMESTAMPTZ NULL,
    rebuild_finished_at TIMESTAMPTZ NULL,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
