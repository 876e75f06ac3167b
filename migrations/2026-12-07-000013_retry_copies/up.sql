-- Where each event being retried has its copy on the broker: the retry
-- queue the worker confirmed it into, when the broker should hand it back
-- (the queue's TTL dead-letters it to the listener's queue), and the
-- message itself. The worker's retry repairer (src/maintenance/
-- retry_repairer.rs) finds copies the broker did not hand back in time
-- (RabbitMQ keeps an expired copy whose dead-letter path is broken; see
-- README, Guarantees) and publishes them to the listener's queue again.
-- `retry_repairs` counts those publishes; rows written before this
-- migration have no copy and are left alone.
ALTER TABLE listener_attempts
    ADD COLUMN retry_queue   TEXT        NULL,
    ADD COLUMN retry_due_at  TIMESTAMPTZ NULL,
    ADD COLUMN retry_copy    BYTEA       NULL,
    ADD COLUMN retry_repairs INTEGER     NOT NULL DEFAULT 0;

CREATE INDEX listener_attempts_retry_due ON listener_attempts (listener, retry_due_at)
    WHERE retry_due_at IS NOT NULL;
