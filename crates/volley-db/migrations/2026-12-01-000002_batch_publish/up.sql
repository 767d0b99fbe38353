-- The broker's confirms for a new batch are recorded once, on the batch, instead of once per
-- job: one row written instead of 256. A new batch's jobs are inserted with `dispatched_at`
-- already set; while `published_at` is NULL their messages are not known to be confirmed, and
-- past the dispatch grace the sweeper hands such a batch's QUEUED jobs to the outbox.
ALTER TABLE batches ADD COLUMN published_at TIMESTAMPTZ;
UPDATE batches SET published_at = created_at;
CREATE INDEX batches_unpublished ON batches (created_at) WHERE published_at IS NULL;
