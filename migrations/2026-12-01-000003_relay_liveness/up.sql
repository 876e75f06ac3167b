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
