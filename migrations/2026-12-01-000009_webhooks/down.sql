DROP TABLE IF EXISTS webhook_deliveries;
DROP TABLE IF EXISTS webhook_secrets;
DROP TABLE IF EXISTS webhook_endpoints;
