DROP INDEX IF EXISTS listener_attempts_retry_due;
ALTER TABLE listener_attempts
    DROP COLUMN IF EXISTS retry_repairs,
    DROP COLUMN IF EXISTS retry_copy,
    DROP COLUMN IF EXISTS retry_due_at,
    DROP COLUMN IF EXISTS retry_queue;
