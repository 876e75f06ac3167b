DROP TABLE IF EXISTS outbox_projections;
DROP TABLE IF EXISTS outbox_event_log;
