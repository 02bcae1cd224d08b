-- Gemini Batch API jobs of batches in batch-price mode (mode = batch): what was sent where,
-- so that any analyzer replica can collect the answers, also after the one that sent the
-- job is gone. Items of a running job stay 'analyzing' and out of the reconciler's reach.
CREATE TABLE gemini_jobs (
    name          text PRIMARY KEY,              -- Google's name of the job, "batches/..."
    batch_id      uuid NOT NULL,
    project       text NOT NULL,                 -- the quota holder whose keys may poll it
    model         text NOT NULL,
    tasks         bytea NOT NULL,                -- msgpack list of the AnalyzeTasks (emptied once collected)
    item_ids      bigint[] NOT NULL,
    reserved_nano bigint NOT NULL DEFAULT 0,     -- its budget reservation (nano-USD), if any
    state         text NOT NULL DEFAULT 'running',
    job_state     text,                          -- Google's state when last polled
    created_at    timestamptz NOT NULL DEFAULT now(),
    polled_at     timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    CONSTRAINT gemini_jobs_state_check CHECK (state IN ('running', 'collected'))
);
CREATE INDEX gemini_jobs_running ON gemini_jobs (batch_id) WHERE state = 'running';
