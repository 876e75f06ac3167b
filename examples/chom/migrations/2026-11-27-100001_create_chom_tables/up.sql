-- CHOM's domain tables. The outbox library's own tables come from its
-- migrations (2026-11-27-000001), which chom::migrate runs first.

CREATE TABLE tenants (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The people notifications go to.
CREATE TABLE users (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- Stored lower-cased by the service, so plain uniqueness is
    -- case-insensitive.
    email      TEXT        NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    name       TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT users_email_unique UNIQUE (email)
);
CREATE INDEX users_tenant_id ON users (tenant_id);

CREATE TABLE sites (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- Stored lower-cased by the service.
    domain          TEXT        NOT NULL CHECK (length(domain) BETWEEN 1 AND 253),
    status          TEXT        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'provisioning', 'active', 'failed')),
    provision_error TEXT        NULL CHECK (length(provision_error) <= 4096),
    storage_bytes   BIGINT      NOT NULL DEFAULT 0 CHECK (storage_bytes >= 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Soft delete: the row stays for history, the domain becomes free.
    deleted_at      TIMESTAMPTZ NULL
);
-- A domain belongs to at most one live site; a deleted site's domain can
-- be reused.
CREATE UNIQUE INDEX sites_domain_live ON sites (domain) WHERE deleted_at IS NULL;
-- Listing a tenant's live sites, and the tenant stats recount.
CREATE INDEX sites_tenant_id ON sites (tenant_id) WHERE deleted_at IS NULL;

CREATE TABLE backups (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id      BIGINT      NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    -- Copied from the site so tenant-wide counts need no join.
    tenant_id    BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    status       TEXT        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    size_bytes   BIGINT      NULL CHECK (size_bytes >= 0),
    duration_ms  BIGINT      NULL CHECK (duration_ms >= 0),
    error        TEXT        NULL CHECK (length(error) <= 4096),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at TIMESTAMPTZ NULL
);
CREATE INDEX backups_site_id ON backups (site_id, created_at DESC);
CREATE INDEX backups_tenant_id ON backups (tenant_id, status);

-- Written by the RecordAuditLog listener, one row per event. No foreign
-- keys: the audit trail outlives the tenants and rows it talks about.
CREATE TABLE audit_logs (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      BIGINT      NULL,
    -- NULL for a system action.
    actor          TEXT        NULL,
    -- The event type (site.created, ...).
    action         TEXT        NOT NULL,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    -- A redelivered event cannot log twice.
    event_id       UUID        NOT NULL CONSTRAINT audit_logs_event_id_unique UNIQUE,
    details        JSONB       NOT NULL DEFAULT '{}'::jsonb,
    occurred_at    TIMESTAMPTZ NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX audit_logs_tenant ON audit_logs (tenant_id, occurred_at DESC);
CREATE INDEX audit_logs_aggregate ON audit_logs (aggregate_type, aggregate_id, occurred_at);

-- Written by the SendNotification listener.
CREATE TABLE notifications (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id    BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind       TEXT        NOT NULL,
    subject    TEXT        NOT NULL,
    body       TEXT        NOT NULL,
    event_id   UUID        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- One notification per recipient per event, even on redelivery.
    CONSTRAINT notifications_event_user_unique UNIQUE (event_id, user_id)
);
CREATE INDEX notifications_user ON notifications (user_id, created_at DESC);
CREATE INDEX notifications_tenant ON notifications (tenant_id, created_at DESC);

-- Written by the UpdateTenantMetrics listener: counters recalculated from
-- the source tables, replacing the seed's cached stats.
CREATE TABLE tenant_stats (
    tenant_id           BIGINT      PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    site_count          BIGINT      NOT NULL DEFAULT 0 CHECK (site_count >= 0),
    active_site_count   BIGINT      NOT NULL DEFAULT 0 CHECK (active_site_count >= 0),
    storage_bytes       BIGINT      NOT NULL DEFAULT 0 CHECK (storage_bytes >= 0),
    backup_count        BIGINT      NOT NULL DEFAULT 0 CHECK (backup_count >= 0),
    failed_backup_count BIGINT      NOT NULL DEFAULT 0 CHECK (failed_backup_count >= 0),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
