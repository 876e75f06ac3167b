DROP INDEX IF EXISTS failed_jobs_exception_trgm;
-- pg_trgm stays: other tables may use it.
DROP INDEX IF EXISTS failed_jobs_listener_error_group;
ALTER TABLE failed_jobs DROP COLUMN IF EXISTS error_group;
DROP FUNCTION IF EXISTS outbox_error_group(TEXT);
DROP TABLE IF EXISTS dashboard_sessions;
DROP TABLE IF EXISTS dashboard_audit;
