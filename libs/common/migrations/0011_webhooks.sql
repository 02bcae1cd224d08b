-- Webhooks: where a batch's events go, the outbox of events to deliver, and every attempt.

-- The receiver of a batch's events and the Standard Webhooks secret ("whsec_" + base64)
-- that signs them, fixed when the batch is created (the caller's, its token's, the
-- WEBHOOK_SECRET of the api, or generated and shown once). Never returned by a read.
ALTER TABLE batches ADD COLUMN webhook_url text, ADD COLUMN webhook_secret text;
-- A token's secret signs the events of the batches created with it (unless they bring one).
ALTER TABLE api_tokens ADD COLUMN webhook_secret text;

-- The outbox: one row per event, written in the transaction that changes the state the
-- event announces (the triggers below), so neither a crash nor a Redis loss loses one.
-- Delivered in id order per batch by the delivery loops of ``pipeline`` (imagestream.common.
-- webhooks): one holds an event at a time (a lease), retries until ``due_since + max age``.
CREATE TABLE webhook_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The webhook-id header: the same on every attempt, so receivers can drop repeats.
    message_id      text NOT NULL UNIQUE
                    DEFAULT 'msg_' || replace(gen_random_uuid()::text, '-', ''),
    batch_id        uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    pipeline        text NOT NULL,
    type            text NOT NULL,
    url             text NOT NULL,
    payload         jsonb NOT NULL,                    -- the body: {type, timestamp, data}
    state           text NOT NULL DEFAULT 'pending',
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    due_since       timestamptz NOT NULL DEFAULT now(),  -- retries stop WEBHOOK_MAX_AGE_S after
    leased_by       text,
    leased_until    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT webhook_events_state_check CHECK (state IN ('pending', 'delivered', 'failed'))
);
CREATE INDEX webhook_events_batch ON webhook_events (batch_id, id);
CREATE INDEX webhook_events_due ON webhook_events (pipeline, next_attempt_at)
    WHERE state = 'pending';

-- Every delivery attempt: when, how long, the HTTP status or the error.
CREATE TABLE webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     bigint NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL,
    duration_s   double precision NOT NULL,
    status       int,                                   -- the receiver's HTTP status
    error        text                                   -- or why there was none / it failed
);
CREATE INDEX webhook_attempts_event ON webhook_attempts (event_id, id);

-- What an event says about its batch (also the data of an export.completed event).
CREATE FUNCTION webhook_batch_data(b batches) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'batch_id', b.id, 'name', b.name, 'state', b.state, 'reason', b.state_reason,
        'counts', jsonb_build_object(
            'total', b.total, 'succeeded', b.succeeded, 'failed', b.failed,
            'skipped', b.skipped, 'cancelled', b.cancelled, 'duplicates', b.duplicates,
            'invalid', b.invalid),
        'cost_usd', b.cost_usd, 'budget_usd', b.budget_usd,
        'tokens', jsonb_build_object('input', b.input_tokens, 'output', b.output_tokens),
        'analyzer', b.analyzer, 'profile', b.profile, 'model', b.model,
        'created_at', b.created_at, 'started_at', b.started_at, 'finished_at', b.finished_at)
$$;

CREATE FUNCTION webhook_event(b batches, event_pipeline text, event_type text, extra jsonb)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO webhook_events (batch_id, pipeline, type, url, payload)
    VALUES (b.id, event_pipeline, event_type, b.webhook_url, jsonb_build_object(
        'type', event_type,
        'timestamp', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', webhook_batch_data(b) || extra))
$$;

-- Triggers rather than a call in each code path: every way a batch reaches one of these
-- states (settle, fail, pause, the analyzer's budget pause, cancel, and any added later)
-- records its event in its own transaction. The WHEN clause is evaluated without calling
-- the function, so the writer's frequent counter updates pay nothing.
CREATE FUNCTION webhook_batch_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM webhook_event(NEW, NEW.pipeline, CASE NEW.state
        WHEN 'completed_with_errors' THEN 'batch.completed'
        ELSE 'batch.' || NEW.state END, '{}'::jsonb);
    RETURN NULL;
END $$;
CREATE TRIGGER batches_webhook AFTER UPDATE OF state ON batches FOR EACH ROW
    WHEN (NEW.webhook_url IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state
          AND NEW.state IN ('completed', 'completed_with_errors', 'failed', 'paused',
                            'cancelled'))
    EXECUTE FUNCTION webhook_batch_state();

CREATE FUNCTION webhook_export_completed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    b batches;
BEGIN
    SELECT * INTO b FROM batches WHERE id = NEW.batch_id;
    IF b.webhook_url IS NOT NULL THEN
        PERFORM webhook_event(b, NEW.pipeline, 'export.completed', jsonb_build_object(
            'export', jsonb_build_object(
                'id', NEW.id, 'format', NEW.format, 'destination', NEW.destination,
                'files', NEW.files, 'rows', NEW.rows_written, 'bytes', NEW.bytes_written)));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER export_jobs_webhook AFTER UPDATE OF state ON export_jobs FOR EACH ROW
    WHEN (NEW.state = 'completed' AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION webhook_export_completed();
