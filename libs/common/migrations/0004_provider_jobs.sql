-- Batch API jobs of every provider (batches in mode = batch) in one provider-neutral table:
-- what was sent where, so that any analyzer replica can collect the answers, also after the
-- one that sent the job is gone. Items of a running job stay 'analyzing' and out of the
-- reconciler's reach. The Gemini jobs of 0003 are carried over, every row and column.
CREATE TABLE provider_jobs (
    provider      text NOT NULL,                 -- the analyzer's name: gemini, openai...
    name          text NOT NULL,                 -- the provider's name of the job
    batch_id      uuid NOT NULL,
    project       text NOT NULL,                 -- the quota holder whose keys may poll it
    model         text NOT NULL,
    tasks         bytea NOT NULL,                -- msgpack list of the AnalyzeTasks (emptied once collected)
    item_ids      bigint[] NOT NULL,
    reserved_nano bigint NOT NULL DEFAULT 0,     -- its budget reservation (nano-USD), if any
    state         text NOT NULL DEFAULT 'running',
    job_state     text,                          -- the provider's state when last polled
    created_at    timestamptz NOT NULL DEFAULT now(),
    polled_at     timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    PRIMARY KEY (provider, name),
    CONSTRAINT provider_jobs_state_check CHECK (state IN ('running', 'collected'))
);
CREATE INDEX provider_jobs_running ON provider_jobs (batch_id) WHERE state = 'running';

INSERT INTO provider_jobs (provider, name, batch_id, project, model, tasks, item_ids,
                           reserved_nano, state, job_state, created_at, polled_at, finished_at)
SELECT 'gemini', name, batch_id, project, model, tasks, item_ids,
       reserved_nano, state, job_state, created_at, polled_at, finished_at
FROM gemini_jobs;

DROP TABLE gemini_jobs;
