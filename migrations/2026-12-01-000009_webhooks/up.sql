-- Webhooks (feature `webhooks`): outside systems subscribed to events.

CREATE TABLE webhook_endpoints (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url                  TEXT        NOT NULL CHECK (length(url) <= 2048),
    description          TEXT        NOT NULL DEFAULT '' CHECK (length(description) <= 1024),
    -- Exact types (site.created), wildcards (site.*) or * for every event.
    event_types          TEXT[]      NOT NULL CHECK (cardinality(event_types) >= 1),
    status               TEXT        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    disabled_reason      TEXT        NULL CHECK (length(disabled_reason) <= 1024),
    disabled_at          TIMESTAMPTZ NULL,
    -- OAuth2 client credentials, all set or none.
    oauth_token_url      TEXT        NULL CHECK (length(oauth_token_url) <= 2048),
    oauth_client_id      TEXT        NULL CHECK (length(oauth_client_id) <= 255),
    oauth_client_secret  TEXT        NULL CHECK (length(oauth_client_secret) <= 1024),
    oauth_scope          TEXT        NULL CHECK (length(oauth_scope) <= 1024),
    -- Deliveries that failed for good in a row, and since when.
    failed_deliveries    INTEGER     NOT NULL DEFAULT 0,
    failing_since        TIMESTAMPTZ NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((oauth_token_url IS NULL) = (oauth_client_id IS NULL) AND (oauth_client_id IS NULL) = (oauth_client_secret IS NULL))
);

-- Signing secrets (whsec_...). While a rotation is under way an endpoint
-- has two: the old one signs until retires_at, beside the new one.
CREATE TABLE webhook_secrets (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id BIGINT      NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    secret      TEXT        NOT NULL CHECK (secret LIKE 'whsec\_%'),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    retires_at  TIMESTAMPTZ NULL
);
CREATE INDEX webhook_secrets_endpoint ON webhook_secrets (endpoint_id);

-- Every delivery try: when, the answer, how long, a bounded excerpt.
CREATE TABLE webhook_deliveries (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id BIGINT      NOT NULL,
    event_id    UUID        NOT NULL,
    event_type  TEXT        NOT NULL,
    attempt     INTEGER     NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    status_code INTEGER     NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    delivered   BOOLEAN     NOT NULL,
    excerpt     TEXT        NULL CHECK (length(excerpt) <= 2048),
    error       TEXT        NULL CHECK (length(error) <= 2048)
);
CREATE INDEX webhook_deliveries_endpoint_at ON webhook_deliveries (endpoint_id, at DESC);
CREATE INDEX webhook_deliveries_at ON webhook_deliveries (at);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
