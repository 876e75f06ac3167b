-- The outbox's own tables. Domain tables belong to the service that links
-- the library; these three (and the control row) are all the library owns.

-- Every domain event, written in the same transaction as the domain change
-- that caused it, plus the relay's bookkeeping for publishing it.
CREATE TABLE outbox_events (
    -- Commit-ordered within an aggregate: writers lock the aggregate row
    -- before recording, so a later event of one aggregate gets a larger seq.
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- UUIDv7; the AMQP message_id and every consumer's dedup key.
    event_id         UUID        NOT NULL UNIQUE,
    event_type       TEXT        NOT NULL CHECK (event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' AND length(event_type) <= 255),
    aggregate_type   TEXT        NOT NULL CHECK (length(aggregate_type) BETWEEN 1 AND 255),
    aggregate_id     TEXT        NOT NULL CHECK (length(aggregate_id) BETWEEN 1 AND 255),
    tenant_id        TEXT        NULL CHECK (length(tenant_id) <= 255),
    occurred_at      TIMESTAMPTZ NOT NULL,
    -- NULL means a system action.
    actor            TEXT        NULL CHECK (length(actor) <= 255),
    correlation_id   TEXT        NULL CHECK (length(correlation_id) <= 255),
    causation_id     TEXT        NULL CHECK (length(causation_id) <= 255),
    -- W3C trace context, version-traceid-parentid-flags.
    traceparent      TEXT        NULL CHECK (length(traceparent) <= 55),
    schema_version   INTEGER     NOT NULL DEFAULT 1 CHECK (schema_version >= 1),
    -- Backstop only: the library rejects payloads over its configured cap
    -- (default 256 KiB, at most 512 KiB) before any SQL runs. Measured on
    -- the stored jsonb datum (cheap; rendering it as text for the check
    -- would cost every insert), with headroom for jsonb's own overhead.
    payload          JSONB       NOT NULL CONSTRAINT outbox_events_payload_size CHECK (pg_column_size(payload) <= 1048576),
    recorded_at      TIMESTAMPTZ NOT NULL DEFAULT now(),

    -- Relay state.
    published_at     TIMESTAMPTZ NULL,
    attempts         INTEGER     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error       TEXT        NULL CHECK (length(last_error) <= 4096),
    next_attempt_at  TIMESTAMPTZ NULL,
    -- Set when a row exhausted its publish attempts; its aggregate waits
    -- behind it until an operator retries or skips it.
    failed_at        TIMESTAMPTZ NULL
)
-- Free space in each page lets retry updates (which touch no indexed
-- column) stay HOT: no new index entries for them.
WITH (fillfactor = 90);

-- The relay's claim query reads the backlog in seq order, then walks each
-- aggregate's unpublished rows in seq order. Both indexes are partial, so
-- they hold only the (small) backlog, never the retained history.
CREATE INDEX outbox_events_unpublished_by_seq
    ON outbox_events (seq)
    WHERE published_at IS NULL;
CREATE INDEX outbox_events_unpublished_by_aggregate
    ON outbox_events (aggregate_type, aggregate_id, seq)
    WHERE published_at IS NULL;

-- Relay leases: one row per claimed batch (owner + expiry + the rows'
-- seqs) rather than lease columns on every event row, so claiming a batch
-- writes one row here instead of rewriting hundreds of event rows. A row is
-- leased while its seq is in a lease that has not expired; a relay may mark
-- rows only through a live lease of its own.
CREATE TABLE outbox_leases (
    id         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner      TEXT        NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    seqs       BIGINT[]    NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_leases_expires_at ON outbox_leases (expires_at);

-- Final listener failures, modelled on Laravel's failed_jobs.
CREATE TABLE failed_jobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid        UUID        NOT NULL UNIQUE,
    queue       TEXT        NOT NULL,
    listener    TEXT        NOT NULL,
    -- NULL when the message could not even be decoded far enough to find it.
    event_id    UUID        NULL,
    event_type  TEXT        NULL,
    -- The full envelope as received (or the raw body, wrapped, if malformed).
    payload     JSONB       NOT NULL,
    exception   TEXT        NOT NULL CHECK (length(exception) <= 65536),
    attempts    INTEGER     NOT NULL CHECK (attempts >= 0),
    -- [{"attempt": 1, "at": "...", "error": "..."}, ...]
    errors      JSONB       NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(errors) = 'array'),
    failed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX failed_jobs_failed_at ON failed_jobs (failed_at DESC);
CREATE INDEX failed_jobs_listener ON failed_jobs (listener, failed_at DESC);
CREATE INDEX failed_jobs_event_id ON failed_jobs (event_id);

-- The inbox: a listener's effect and this row commit together, so a
-- duplicate delivery finds the row and has no second effect.
CREATE TABLE processed_events (
    listener     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (listener, event_id)
);

-- Switches every relay obeys (the seed's "disable events" rollback).
CREATE TABLE outbox_control (
    -- Exactly one row.
    id         BOOLEAN     PRIMARY KEY DEFAULT TRUE CHECK (id),
    paused     BOOLEAN     NOT NULL DEFAULT FALSE,
    paused_by  TEXT        NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO outbox_control (id) VALUES (TRUE);
