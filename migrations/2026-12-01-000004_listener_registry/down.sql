DROP TABLE IF EXISTS outbox_listeners;
