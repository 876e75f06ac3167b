-- Per-endpoint rate limits: at most `rate_limit` deliveries per second to
-- the endpoint from one worker process (NULL: none). ed25519 (`v1a`)
-- endpoints need no column: their secret key (`whsk_...`) is kept in
-- webhook_secrets.secret like an HMAC secret (`whsec_...`), and its prefix
-- says how to sign.
ALTER TABLE webhook_endpoints
    ADD COLUMN rate_limit INTEGER NULL CHECK (rate_limit BETWEEN 1 AND 1000000);
