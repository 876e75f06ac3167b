-- What the operator's dashboard (`outbox dashboard`) reads and keeps.

-- Relays alive: each relay upserts its row when it starts and every few
-- seconds after (the relay_heartbeat maintenance service), and deletes it
-- when it stops. A row whose heartbeat is old belongs to a relay that died.
CREATE TABLE outbox_relays (
    relay_id     TEXT        PRIMARY KEY CHECK (length(relay_id) <= 255),
    hostname     TEXT        NOT NULL CHECK (length(hostname) <= 255),
    pid          INTEGER     NOT NULL,
    version      TEXT        NOT NULL CHECK (length(version) <= 64),
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Edit-and-retry: the payload a failed job held and the one an operator
-- retried it with, who and when. Kept after the failed job is retried (the
-- failed_jobs row is deleted then), so no foreign key.
CREATE TABLE failed_job_edits (
    id              BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    failed_job_uuid UUID        NOT NULL,
    listener        TEXT        NOT NULL,
    queue           TEXT        NOT NULL,
    event_id        UUID        NULL,
    event_type      TEXT        NULL,
    original        JSONB       NOT NULL,
    edited          JSONB       NOT NULL,
    edited_by       TEXT        NOT NULL CHECK (length(edited_by) <= 255),
    edited_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX failed_job_edits_event_id ON failed_job_edits (event_id);
CREATE INDEX failed_job_edits_failed_job_uuid ON failed_job_edits (failed_job_uuid);

-- Whether each registered listener keeps an inbox (processed_events): the
-- timeline tells "handled" from "not yet" only for those. NULL: registered
-- by an earlier release, unknown.
ALTER TABLE outbox_listeners ADD COLUMN inbox BOOLEAN NULL;

-- Keyset pagination of failed jobs, newest first, overall and per filter
-- column: (failed_at, id) is the page cursor.
CREATE INDEX failed_jobs_failed_at_id ON failed_jobs (failed_at DESC, id DESC);
CREATE INDEX failed_jobs_listener_failed_at_id ON failed_jobs (listener, failed_at DESC, id DESC);
CREATE INDEX failed_jobs_event_type_failed_at_id ON failed_jobs (event_type, failed_at DESC, id DESC);
DROP INDEX failed_jobs_failed_at;
DROP INDEX failed_jobs_listener;
