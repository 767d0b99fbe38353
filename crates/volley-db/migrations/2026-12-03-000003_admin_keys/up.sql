-- Keys marked admin may read the operator view (`GET /v1/admin/status`): queue depths,
-- consumers and dead letters of the whole stack, which no tenant should see. Off by default,
-- so every existing key stays a tenant key.
ALTER TABLE api_keys ADD COLUMN admin BOOLEAN NOT NULL DEFAULT false;
