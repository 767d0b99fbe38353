-- The outbox on its own: QUEUED jobs with no confirmed message. The sweeper looks for them on
-- every pass; through `jobs_unfinished` it read every QUEUED job to find them, which is the
-- whole backlog waiting in the broker (15,000 rows a pass in the benchmark, millions on a big
-- queue). This index holds a job only between its insert (or retry) and the broker's confirm.
CREATE INDEX jobs_outbox ON jobs (available_at) WHERE status = 'QUEUED' AND dispatched_at IS NULL;
