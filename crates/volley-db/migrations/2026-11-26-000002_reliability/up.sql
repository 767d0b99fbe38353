-- Operator retries (`batchctl batches retry-failed`) put a FAILED job back to QUEUED under the
-- same id. Its attempt number keeps counting (earlier attempts' outcomes stay fenced off), so
-- the retry budget counts from `attempt_base`, the attempts used before the latest retry.
ALTER TABLE jobs ADD COLUMN attempt_base INT NOT NULL DEFAULT 0;
-- How many times an operator re-ran the job: each run may apply one terminal outcome, so a
-- job that finished twice without an operator asking has `outcomes > 1 + operator_retries`.
ALTER TABLE jobs ADD COLUMN operator_retries INT NOT NULL DEFAULT 0;
