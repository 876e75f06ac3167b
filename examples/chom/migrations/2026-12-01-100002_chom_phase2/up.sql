-- CHOM phase 2: teams and roles, SSL certificates, VPS credentials and API
-- tokens (stored hashed), failed logins and suspicious activity, quotas and
-- usage. The services that write these tables record the phase 2 events
-- (team.*, ssl.*, security.*, quota.*) in the same transactions.

-- A user belongs to one tenant; this pair lets team_members insist on it.
ALTER TABLE users ADD CONSTRAINT users_id_tenant_unique UNIQUE (id, tenant_id);

-- A tenant's team: a row per current member, with its role. Removing a
-- member deletes the row; the user row stays (audit trail, notifications
-- already sent). Notifications go to current members.
CREATE TABLE team_members (
    user_id    BIGINT      PRIMARY KEY,
    tenant_id  BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    role       TEXT        NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT team_members_user_fkey FOREIGN KEY (user_id, tenant_id)
        REFERENCES users (id, tenant_id) ON DELETE CASCADE
);
-- At most one owner per tenant; ownership moves by transfer.
CREATE UNIQUE INDEX team_members_one_owner ON team_members (tenant_id) WHERE role = 'owner';
CREATE INDEX team_members_tenant ON team_members (tenant_id);
-- Users created before teams existed join their tenant's team: the first
-- user of each tenant as its owner, the others as members.
INSERT INTO team_members (user_id, tenant_id, role)
SELECT id, tenant_id,
       CASE WHEN id = min(id) OVER (PARTITION BY tenant_id) THEN 'owner' ELSE 'member' END
FROM users;

-- SSL certificates of sites: requested, then issued with an expiry; a newer
-- issued certificate supersedes the site's older ones.
CREATE TABLE ssl_certificates (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id      BIGINT      NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    tenant_id    BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- The site's domain when requested (sites keep theirs; this is history).
    domain       TEXT        NOT NULL CHECK (length(domain) BETWEEN 1 AND 253),
    status       TEXT        NOT NULL DEFAULT 'requested'
                             CHECK (status IN ('requested', 'issued', 'superseded')),
    issuer       TEXT        NULL CHECK (length(issuer) BETWEEN 1 AND 255),
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    issued_at    TIMESTAMPTZ NULL,
    expires_at   TIMESTAMPTZ NULL,
    CONSTRAINT ssl_certificates_issued_fields CHECK (
        (status = 'requested' AND issued_at IS NULL AND expires_at IS NULL AND issuer IS NULL)
        OR (status <> 'requested' AND issued_at IS NOT NULL AND expires_at > issued_at AND issuer IS NOT NULL)
    )
);
CREATE INDEX ssl_certificates_site ON ssl_certificates (site_id, id DESC);
-- One open request per site.
CREATE UNIQUE INDEX ssl_certificates_one_request ON ssl_certificates (site_id) WHERE status = 'requested';
-- The expiry check's scan.
CREATE INDEX ssl_certificates_expiry ON ssl_certificates (expires_at) WHERE status = 'issued';

-- ssl.certificate_expiring is recorded once per certificate and warning
-- window (30 days, 7 days, ...): the row is the write the event commits with.
CREATE TABLE ssl_expiry_warnings (
    certificate_id BIGINT      NOT NULL REFERENCES ssl_certificates (id) ON DELETE CASCADE,
    window_days    INTEGER     NOT NULL CHECK (window_days BETWEEN 1 AND 365),
    event_id       UUID        NOT NULL,
    warned_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (certificate_id, window_days)
);

-- A tenant's virtual servers, whose access credentials CHOM rotates.
CREATE TABLE vps_servers (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    hostname   TEXT        NOT NULL CHECK (length(hostname) BETWEEN 1 AND 253),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT vps_servers_hostname_unique UNIQUE (hostname)
);
CREATE INDEX vps_servers_tenant ON vps_servers (tenant_id);

-- Only the SHA-256 of a credential is stored (lower-case hex); the secret is
-- shown once, to whoever created or rotated it. One current credential per
-- server; rotated ones are kept, revoked.
CREATE TABLE vps_credentials (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vps_id        BIGINT      NOT NULL REFERENCES vps_servers (id) ON DELETE CASCADE,
    secret_sha256 TEXT        NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at    TIMESTAMPTZ NULL
);
CREATE UNIQUE INDEX vps_credentials_current ON vps_credentials (vps_id) WHERE revoked_at IS NULL;

-- API tokens of a tenant, by name; a rotation replaces the hash in place.
CREATE TABLE api_tokens (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    token_sha256 TEXT        NOT NULL CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotated_at   TIMESTAMPTZ NULL,
    CONSTRAINT api_tokens_name_unique UNIQUE (tenant_id, name),
    -- Verification looks the hash up.
    CONSTRAINT api_tokens_hash_unique UNIQUE (token_sha256)
);

-- Failed sign-ins, counted per user over a sliding window.
CREATE TABLE failed_logins (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    tenant_id    BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    source_ip    TEXT        NOT NULL CHECK (length(source_ip) BETWEEN 2 AND 45),
    attempted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX failed_logins_user ON failed_logins (user_id, attempted_at DESC);

-- What the failed-login detector found; one per user per window.
CREATE TABLE security_incidents (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id          BIGINT      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind             TEXT        NOT NULL CHECK (kind IN ('failed_logins')),
    attempts         INTEGER     NOT NULL CHECK (attempts > 0),
    window_seconds   INTEGER     NOT NULL CHECK (window_seconds > 0),
    first_attempt_at TIMESTAMPTZ NOT NULL,
    last_attempt_at  TIMESTAMPTZ NOT NULL,
    detected_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX security_incidents_user ON security_incidents (user_id, detected_at DESC);

-- A tenant's plan limits; NULL is unlimited, and a tenant without a row has
-- no limits at all.
CREATE TABLE tenant_quotas (
    tenant_id               BIGINT      PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    plan                    TEXT        NOT NULL CHECK (length(plan) BETWEEN 1 AND 64),
    max_sites               BIGINT      NULL CHECK (max_sites >= 0),
    max_storage_bytes       BIGINT      NULL CHECK (max_storage_bytes >= 0),
    monthly_bandwidth_bytes BIGINT      NULL CHECK (monthly_bandwidth_bytes >= 0),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Bytes served per site and calendar month (UTC), summed from usage reports.
CREATE TABLE bandwidth_usage (
    site_id    BIGINT      NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    tenant_id  BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    month      DATE        NOT NULL CHECK (extract(day FROM month) = 1),
    bytes      BIGINT      NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, month)
);
CREATE INDEX bandwidth_usage_tenant ON bandwidth_usage (tenant_id, month);

-- Every time a quota was exceeded: the row its quota.* event commits with.
CREATE TABLE quota_breaches (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   BIGINT      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    quota       TEXT        NOT NULL CHECK (quota IN ('sites', 'storage', 'bandwidth')),
    limit_value BIGINT      NOT NULL,
    used        BIGINT      NOT NULL,
    site_id     BIGINT      NULL,
    event_id    UUID        NOT NULL,
    detected_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX quota_breaches_tenant ON quota_breaches (tenant_id, detected_at DESC);
