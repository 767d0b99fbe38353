-- The client's own name for each job (`custom_id`), unique within its batch: the gateway
-- validates that before the insert, and the index makes it a fact of the data and serves the
-- lookup `GET /v1/batches/{id}/jobs?custom_id=`. Partial: most jobs have none.
ALTER TABLE jobs ADD COLUMN custom_id TEXT;
CREATE UNIQUE INDEX jobs_custom_id ON jobs (batch_id, custom_id) WHERE custom_id IS NOT NULL;
-- The client's string pairs for a batch, returned as given. A constant default adds the
-- column without rewriting the table.
ALTER TABLE batches ADD COLUMN metadata JSONB NOT NULL DEFAULT '{}';
-- `GET /v1/batches?label=`: an owner's batches of one label, newest first, without walking
-- every batch of the owner.
CREATE INDEX batches_owner_label ON batches (owner, label, id DESC) WHERE label IS NOT NULL;
