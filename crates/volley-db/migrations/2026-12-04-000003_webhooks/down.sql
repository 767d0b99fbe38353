DROP TRIGGER jobs_webhook ON jobs;
DROP FUNCTION volley_webhook_transition();
DROP TABLE webhook_endpoints;
DROP TABLE webhook_events;
ALTER TABLE jobs DROP COLUMN webhook;
ALTER TABLE batches DROP COLUMN webhook_url, DROP COLUMN webhook_types,
    DROP COLUMN webhook_key_id, DROP COLUMN webhook_pending;
ALTER TABLE api_keys DROP COLUMN webhook_secret, DROP COLUMN webhook_secret_previous,
    DROP COLUMN webhook_secret_rotated_at;
