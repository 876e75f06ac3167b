-- The dashboard's search by correlation id (see 000006 on CONCURRENTLY).
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_events_by_correlation ON outbox_events (correlation_id) WHERE correlation_id IS NOT NULL
