DROP TABLE outbox_control;
DROP TABLE outbox_leases;
DROP TABLE processed_events;
DROP TABLE failed_jobs;
DROP TABLE outbox_events;
