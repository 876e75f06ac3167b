-- Per-endpoint rate limits: at most `rate_limit` deliveries per second to
-- the endpoint from one worker process (NULL: none).
ALTER TABLE webhook_endpoints
    ADD COLUMN rate_limit INTEGER NULL CHECK (rate_limit BETWEEN 1 AND 1000000);

-- ed25519 (`v1a`) endpoints keep their secret key (`whsk_...`) where HMAC
-- endpoints keep their secret (`whsec_...`); the prefix says how to sign.
ALTER TABLE webhook_secrets DROP CONSTRAINT webhook_secrets_secret_check;
ALTER TABLE webhook_secrets
    ADD CONSTRAINT webhook_secrets_secret_check CHECK (secret LIKE 'whsec\_%' OR secret LIKE 'whsk\_%');
