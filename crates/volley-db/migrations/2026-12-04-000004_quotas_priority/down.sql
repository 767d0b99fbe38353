ALTER TABLE jobs DROP COLUMN priority;
ALTER TABLE batches DROP COLUMN priority;
DROP INDEX jobs_quota_active;
ALTER TABLE jobs DROP COLUMN quota_key_id;
DROP INDEX batches_key_recent;
ALTER TABLE batches DROP COLUMN api_key_id;
ALTER TABLE api_keys DROP COLUMN max_jobs_per_minute;
ALTER TABLE api_keys DROP COLUMN max_active_jobs;
