DELETE FROM webhook_secrets WHERE secret LIKE 'whsk\_%';
ALTER TABLE webhook_secrets DROP CONSTRAINT webhook_secrets_secret_check;
ALTER TABLE webhook_secrets ADD CONSTRAINT webhook_secrets_secret_check CHECK (secret LIKE 'whsec\_%');
ALTER TABLE webhook_endpoints DROP COLUMN rate_limit;
