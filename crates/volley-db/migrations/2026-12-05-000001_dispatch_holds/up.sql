-- Fair dispatch: a batch's jobs of one inference type that were not published at submission,
-- because that type's queue was full or other work of it was already held. batch-state
-- releases them round-robin over owners (priority, then age, within an owner) as the queue
-- drains. One row per batch and type, not per job: holding and releasing write no job rows.
CREATE TABLE dispatch_holds (
    batch_id BIGINT NOT NULL REFERENCES batches (id),
    inference_type TEXT NOT NULL,
    owner TEXT NOT NULL,
    priority SMALLINT NOT NULL,
    jobs INT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set when batch-state publishes the jobs; the row stays a while so that the sweeper does
    -- not take the jobs' old `dispatched_at` for a lost message.
    released_at TIMESTAMPTZ,
    PRIMARY KEY (batch_id, inference_type)
);
-- What is waiting, per type and owner: all the dispatcher and the gateway read.
CREATE INDEX dispatch_holds_waiting ON dispatch_holds (inference_type, owner, batch_id)
    WHERE released_at IS NULL;
CREATE INDEX dispatch_holds_released ON dispatch_holds (released_at)
    WHERE released_at IS NOT NULL;
