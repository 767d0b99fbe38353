-- Webhooks (Standard Webhooks): a batch may name an endpoint and the event types it wants.
-- Events are recorded by a trigger on jobs, in the very transaction that moves a job into or
-- out of a terminal state, whichever statement does it (outcome events, the sweeper, expiry,
-- cancels, operator retries): none of those paths can forget to record one, and none can
-- commit a state change without its event.

-- The signing secret of each key (`whsec_<base64>`). Kept readable, unlike the key itself:
-- batch-state must sign with it. After a rotation the previous secret still signs (a second
-- signature) until the configured grace has passed since `webhook_secret_rotated_at`.
ALTER TABLE api_keys
    ADD COLUMN webhook_secret TEXT,
    ADD COLUMN webhook_secret_previous TEXT,
    ADD COLUMN webhook_secret_rotated_at TIMESTAMPTZ;
-- Keys made before webhooks get a secret too: 32 bytes from gen_random_uuid(), which draws
-- from the server's strong random source (122 random bits per UUID). New keys get 32 random
-- bytes from batchctl. Shown by `batchctl keys rotate-webhook-secret`.
UPDATE api_keys SET webhook_secret = 'whsec_' || encode(decode(
    replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''),
    'hex'), 'base64');
ALTER TABLE api_keys ALTER COLUMN webhook_secret SET NOT NULL;

-- `webhook_pending` counts the batch's unfinished jobs, for webhook batches only: the trigger
-- moves it with every transition, and the transition that brings it to 0 records the batch
-- event. An UPDATE of the batch row re-reads the latest committed count and holds the row
-- until commit, so two transactions finishing a batch's last jobs at once count correctly and
-- exactly one of them records the event.
ALTER TABLE batches
    ADD COLUMN webhook_url TEXT,
    ADD COLUMN webhook_types TEXT[],
    ADD COLUMN webhook_key_id BIGINT REFERENCES api_keys (id),
    ADD COLUMN webhook_pending INT;

-- Copied from the batch at insert so that the trigger's WHEN clause can skip every job of a
-- batch without a webhook without even calling the function: such batches pay nothing.
ALTER TABLE jobs ADD COLUMN webhook BOOLEAN NOT NULL DEFAULT false;

CREATE TABLE webhook_events (
    id BIGSERIAL PRIMARY KEY,
    -- `webhook-id`: the same on every attempt, so receivers can de-duplicate.
    msg_id TEXT NOT NULL UNIQUE DEFAULT ('msg_' || replace(gen_random_uuid()::text, '-', '')),
    batch_id BIGINT NOT NULL REFERENCES batches (id),
    job_id BIGINT REFERENCES jobs (id),
    key_id BIGINT NOT NULL REFERENCES api_keys (id),
    owner TEXT NOT NULL,
    type TEXT NOT NULL
        CHECK (type IN ('batch.completed', 'batch.cancelled', 'job.completed', 'job.failed')),
    url TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INT NOT NULL DEFAULT 0,
    -- When the next attempt is due; a claim moves it forward by the delivery lease, so an
    -- attempt cut short by a crash is made again once the lease has passed. NULL once final.
    next_attempt_at TIMESTAMPTZ DEFAULT now(),
    -- Set by a client's redelivery request: one attempt, even to a paused endpoint.
    manual BOOLEAN NOT NULL DEFAULT false,
    last_attempt_at TIMESTAMPTZ,
    last_status_code INT,
    last_error TEXT,
    -- The start of the last response's body (capped), for the delivery log.
    last_response TEXT,
    delivered_at TIMESTAMPTZ
);
CREATE INDEX webhook_events_due ON webhook_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_events_by_batch ON webhook_events (batch_id, id);
-- The backlog counts (batchctl status, metrics) read pending and failed events only, never
-- the delivered ones that make up most of the table.
CREATE INDEX webhook_events_failed ON webhook_events (id) WHERE status = 'failed';

-- An endpoint whose event exhausted its retries is paused: its events wait (nothing is
-- dropped) until a delivery to it succeeds again (a client's redelivery request).
CREATE TABLE webhook_endpoints (
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    paused_at TIMESTAMPTZ,
    paused_reason TEXT,
    PRIMARY KEY (owner, url)
);

CREATE FUNCTION volley_webhook_transition() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_final BOOLEAN := OLD.status IN ('PROCESSED', 'FAILED', 'CANCELLED');
    is_final BOOLEAN := NEW.status IN ('PROCESSED', 'FAILED', 'CANCELLED');
    b RECORD;
    kind TEXT;
BEGIN
    IF was_final = is_final THEN
        RETURN NULL;
    END IF;
    UPDATE batches
       SET webhook_pending = webhook_pending + CASE WHEN is_final THEN -1 ELSE 1 END
     WHERE id = NEW.batch_id AND webhook_url IS NOT NULL
     RETURNING id, owner, webhook_url, webhook_types, webhook_key_id, webhook_pending INTO b;
    IF NOT FOUND OR NOT is_final THEN
        RETURN NULL;
    END IF;
    kind := CASE NEW.status WHEN 'PROCESSED' THEN 'job.completed'
                            WHEN 'FAILED' THEN 'job.failed' END;
    IF kind IS NOT NULL AND kind = ANY (b.webhook_types) THEN
        INSERT INTO webhook_events (batch_id, job_id, key_id, owner, type, url)
        VALUES (b.id, NEW.id, b.webhook_key_id, b.owner, kind, b.webhook_url);
    END IF;
    IF b.webhook_pending = 0 THEN
        -- The batch ended with this transition: cancelled if a cancel ended it.
        kind := CASE WHEN NEW.status = 'CANCELLED' THEN 'batch.cancelled'
                     ELSE 'batch.completed' END;
        IF kind = ANY (b.webhook_types) THEN
            INSERT INTO webhook_events (batch_id, job_id, key_id, owner, type, url)
            VALUES (b.id, NULL, b.webhook_key_id, b.owner, kind, b.webhook_url);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_webhook AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.webhook AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION volley_webhook_transition();
