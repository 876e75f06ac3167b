-- The dashboard's "where is my event?": an aggregate's events in order,
-- published ones included (the older index covers unpublished rows only).
-- Built CONCURRENTLY (so outside a transaction, one statement a migration):
-- writers keep inserting while it builds on a large table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_events_by_aggregate ON outbox_events (aggregate_id, aggregate_type, seq)
