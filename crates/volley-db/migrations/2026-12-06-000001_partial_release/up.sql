-- Partial release: one turn releases at most what the queue has room for, so a held batch of
-- slow jobs may go out over several turns instead of running its queue 255 jobs over the limit.
-- `released_upto` is the highest job id released so far (NULL: none) and `released_jobs` how
-- many; `released_at` is still set only once the whole row is released.
ALTER TABLE dispatch_holds
    ADD COLUMN released_upto BIGINT,
    ADD COLUMN released_jobs INT NOT NULL DEFAULT 0;
