DROP INDEX processed_events_processed_at;
DROP INDEX failed_jobs_listener_event_id;
DROP TABLE listener_attempts;
