CREATE INDEX IF NOT EXISTS failed_jobs_failed_at ON failed_jobs (failed_at DESC);
CREATE INDEX IF NOT EXISTS failed_jobs_listener ON failed_jobs (listener, failed_at DESC);
DROP INDEX IF EXISTS failed_jobs_event_type_failed_at_id;
DROP INDEX IF EXISTS failed_jobs_listener_failed_at_id;
DROP INDEX IF EXISTS failed_jobs_failed_at_id;
DROP TABLE IF EXISTS failed_job_edits;
DROP TABLE IF EXISTS outbox_relays;
ALTER TABLE outbox_listeners DROP COLUMN IF EXISTS inbox;
