DROP TABLE IF EXISTS tenant_activity;
