-- Exports: the types of each batch's analysis fields, and export jobs.

-- The JSON Schema of each analysis field (column name -> schema), declared by the batch's
-- provider beside analysis_columns: Parquet exports type their columns by it.
ALTER TABLE batches ADD COLUMN analysis_schema jsonb;

-- An export written in the background to a destination (a file or object URL, or a
-- prefix ending in "/" for part files), with its progress. A destination never holds
-- credentials (refused when it does): storage clients take theirs from the environment.
CREATE TABLE export_jobs (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    batch_id      uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    -- The api processes that may run it: those of the deployment (Redis key prefix)
    -- whose api accepted it, whichever pipeline analyzed the batch.
    pipeline      text NOT NULL,
    format        text NOT NULL,
    destination   text NOT NULL,
    filters       jsonb NOT NULL DEFAULT '{}'::jsonb,   -- as the API took them
    shard_rows    bigint,                               -- rows per part file (a prefix)
    state         text NOT NULL DEFAULT 'queued',
    attempts      int NOT NULL DEFAULT 0,               -- times started
    rows_total    bigint,                               -- counted when it starts
    rows_written  bigint NOT NULL DEFAULT 0,
    bytes_written bigint NOT NULL DEFAULT 0,
    files         text[] NOT NULL DEFAULT '{}',         -- what it wrote, once completed
    error         text,
    worker        text,                                 -- the api process running it
    heartbeat_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    CONSTRAINT export_jobs_state_check CHECK (state IN ('queued', 'running', 'completed', 'failed'))
);
CREATE INDEX export_jobs_batch ON export_jobs (batch_id, created_at DESC);
CREATE INDEX export_jobs_unfinished ON export_jobs (pipeline, created_at)
    WHERE state IN ('queued', 'running');
