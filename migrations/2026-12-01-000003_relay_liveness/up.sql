-- Relay liveness: a blocked aggregate holds back only itself, and events no
-- queue is bound to are kept, not retried.

-- Rows that failed a publish at least once and are still unpublished: the
-- retrying and failed heads. The claim reads their aggregates to skip every
-- queued row behind them, so a blocked aggregate with any number of queued
-- events never fills a claim's window. Small: only rows that failed.
CREATE INDEX outbox_events_retrying
    ON outbox_events (aggregate_type, aggregate_id)
    WHERE published_at IS NULL AND attempts > 0;

-- Set (with published_at) when the broker returned the event because no
-- queue was bound to its type: delivered to nobody, kept for replay once a
-- listener exists (`outbox replay`), counted in `outbox status`.
ALTER TABLE outbox_events ADD COLUMN unroutable_at TIMESTAMPTZ NULL;
CREATE INDEX outbox_events_unroutable
    ON outbox_events (event_type, unroutable_at)
    WHERE unroutable_at IS NOT NULL;
