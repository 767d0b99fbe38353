DROP INDEX batches_owner_label;
ALTER TABLE batches DROP COLUMN metadata;
DROP INDEX jobs_custom_id;
ALTER TABLE jobs DROP COLUMN custom_id;
