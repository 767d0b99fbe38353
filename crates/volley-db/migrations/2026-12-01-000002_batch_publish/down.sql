-- Jobs of batches whose confirms were never recorded go back to the per-job outbox.
UPDATE jobs SET dispatched_at = NULL
    WHERE status = 'QUEUED'
      AND batch_id IN (SELECT id FROM batches WHERE published_at IS NULL);
DROP INDEX batches_unpublished;
ALTER TABLE batches DROP COLUMN published_at;
