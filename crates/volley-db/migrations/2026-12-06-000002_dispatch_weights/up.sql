-- A key's weight in fair dispatch (`batchctl keys create/update --weight`): its owner takes
-- that many turns in a row before the next owner's. Copied onto the hold rows at submission, so
-- the dispatcher reads it without a join; a change applies to batches submitted after it.
ALTER TABLE api_keys ADD COLUMN dispatch_weight INT NOT NULL DEFAULT 1
    CHECK (dispatch_weight BETWEEN 1 AND 100);
ALTER TABLE dispatch_holds ADD COLUMN weight INT NOT NULL DEFAULT 1;
