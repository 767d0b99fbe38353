-- Per-key quotas, checked by the gateway in the batch's own transaction. NULL is no limit.
-- `max_active_jobs` caps the key's jobs that are QUEUED or PROCESSING; `max_jobs_per_minute`
-- caps the jobs the key submitted in the last 60 seconds (a sliding window over `batches`,
-- so every gateway replica sees the same count).
ALTER TABLE api_keys ADD COLUMN max_active_jobs INT CHECK (max_active_jobs > 0);
ALTER TABLE api_keys ADD COLUMN max_jobs_per_minute INT CHECK (max_jobs_per_minute > 0);

-- The key that submitted the batch (NULL for batches older than this column). The index
-- serves the per-minute window: one key's batches of the last minute.
ALTER TABLE batches ADD COLUMN api_key_id BIGINT REFERENCES api_keys (id);
CREATE INDEX batches_key_recent ON batches (api_key_id, created_at) WHERE api_key_id IS NOT NULL;

-- Set only on jobs of keys that have `max_active_jobs`, so the partial index below holds only
-- capped keys' unfinished jobs: tenants without a cap pay nothing for it on the job path.
ALTER TABLE jobs ADD COLUMN quota_key_id BIGINT;
CREATE INDEX jobs_quota_active ON jobs (quota_key_id)
    WHERE quota_key_id IS NOT NULL AND status IN ('QUEUED', 'PROCESSING');

-- A batch's priority (-1 low, 0 normal, 1 high), copied onto its jobs so that the dispatcher
-- orders an owner's waiting jobs without a join.
ALTER TABLE batches ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1 AND 1);
ALTER TABLE jobs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
