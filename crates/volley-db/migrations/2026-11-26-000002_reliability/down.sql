ALTER TABLE jobs DROP COLUMN operator_retries;
ALTER TABLE jobs DROP COLUMN attempt_base;
