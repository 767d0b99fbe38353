-- API keys: only a SHA-256 of the key is kept; the key itself is shown once at creation.
CREATE TABLE api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    -- Whose batches the key sees; keys with the same owner share batches.
    owner TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    -- The first characters of the key, to tell keys apart in listings.
    key_prefix TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);

CREATE TABLE batches (
    id BIGSERIAL PRIMARY KEY,
    owner TEXT NOT NULL,
    label TEXT,
    total INT NOT NULL CHECK (total BETWEEN 1 AND 256),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX batches_owner_newest ON batches (owner, id DESC);

-- Jobs double as the outbox: `dispatched_at` is set once the broker confirmed the message,
-- and the sweeper publishes QUEUED jobs that have none once `available_at` has passed.
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    batch_id BIGINT NOT NULL REFERENCES batches (id),
    owner TEXT NOT NULL,
    inference_type TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    body JSONB NOT NULL,
    status TEXT NOT NULL DEFAULT 'QUEUED'
        CHECK (status IN ('QUEUED', 'PROCESSING', 'PROCESSED', 'FAILED', 'CANCELLED')),
    -- Incremented by every claim; outcomes must carry it (fencing token).
    attempt INT NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    dispatched_at TIMESTAMPTZ,
    started_at TIMESTAMPTZ,
    lease_until TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    result JSONB,
    error_type TEXT,
    error_message TEXT,
    last_error TEXT,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    total_tokens BIGINT,
    -- How many outcomes were applied; above 1 would mean a job finished twice.
    outcomes INT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_batch ON jobs (batch_id, id);
CREATE INDEX jobs_unfinished ON jobs (status, available_at)
    WHERE status IN ('QUEUED', 'PROCESSING');
