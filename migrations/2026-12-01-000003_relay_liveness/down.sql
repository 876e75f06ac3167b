DROP FUNCTION IF EXISTS outbox_claim_batch(TEXT, BIGINT[], BIGINT, FLOAT8);
DROP INDEX IF EXISTS outbox_events_unroutable;
ALTER TABLE outbox_events DROP COLUMN IF EXISTS unroutable_at;
DROP INDEX IF EXISTS outbox_events_retrying;
