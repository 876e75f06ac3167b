-- The per-tenant activity feed: a read model fed by CHOM's events (the
-- `tenant_activity` projection), one row an event, newest first per tenant.
-- Rebuilt from the event log with `outbox projection rebuild tenant_activity`.
CREATE TABLE tenant_activity (
    event_id     UUID        PRIMARY KEY,
    tenant_id    BIGINT      NOT NULL,
    event_type   TEXT        NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    actor        TEXT        NULL,
    subject      TEXT        NOT NULL,
    summary      TEXT        NOT NULL
);
CREATE INDEX tenant_activity_by_tenant ON tenant_activity (tenant_id, occurred_at DESC);
