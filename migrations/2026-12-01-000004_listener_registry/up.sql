-- The queued listeners workers run, registered by each worker when it
-- starts: operators' tools (`outbox status`) find every listener's queues
-- without being told the app and listener names.
CREATE TABLE outbox_listeners (
    app TEXT NOT NULL,
    listener TEXT NOT NULL,
    exchange TEXT NOT NULL,
    queue TEXT NOT NULL,
    retry_queues TEXT[] NOT NULL,
    dead_queue TEXT NOT NULL,
    event_types TEXT[] NOT NULL,
    -- The worker that registered it last, and when.
    worker_id TEXT NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (app, listener)
);
