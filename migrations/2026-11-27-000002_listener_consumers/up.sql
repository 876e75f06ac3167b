-- What the consumer framework (outbox::consumer) adds to the library's
-- schema: trusted attempt counts for listener retries, one failed job per
-- (listener, event), and pruning support for the inbox.

-- Failed tries of a listener for an event, counted by the framework in
-- Postgres (never read from a message header a publisher could forge).
-- A row lives from the first failed try until the event succeeds or ends
-- in failed_jobs, so the table holds only events being retried.
CREATE TABLE listener_attempts (
    listener        TEXT        NOT NULL,
    event_id        UUID        NOT NULL,
    attempts        INTEGER     NOT NULL CHECK (attempts >= 1),
    -- [{"attempt": 1, "at": "...", "error": "..."}, ...]
    errors          JSONB       NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(errors) = 'array'),
    first_failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (listener, event_id)
);
-- Pruning rows abandoned by a message that was purged or deleted by hand.
CREATE INDEX listener_attempts_updated_at ON listener_attempts (updated_at);

-- At most one failed job per listener and event: a redelivery after a
-- crash between writing the row and acknowledging the message finds the
-- row instead of adding a second one. (Rows without an event id, from
-- messages too malformed to name one, are kept apart by their uuid, which
-- the framework derives from the listener and the message body.)
CREATE UNIQUE INDEX failed_jobs_listener_event_id
    ON failed_jobs (listener, event_id)
    WHERE event_id IS NOT NULL;

-- Pruning the inbox by age.
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);
