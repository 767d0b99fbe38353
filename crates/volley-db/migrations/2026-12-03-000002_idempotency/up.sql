-- `Idempotency-Key` on POST /v1/batches: per API key, the key a client sent, a SHA-256 of the
-- request body and the batch the first request created. The row is written in the same
-- transaction as the batch, so a key never points at a batch that was not committed, and a
-- retry that reaches another gateway replica finds it. Rows older than a day no longer count
-- and are purged by batch-state's sweeper in small batches (the created_at index).
CREATE TABLE idempotency_keys (
    api_key_id BIGINT NOT NULL REFERENCES api_keys (id),
    idempotency_key TEXT NOT NULL,
    request_hash BYTEA NOT NULL,
    batch_id BIGINT NOT NULL REFERENCES batches (id),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
