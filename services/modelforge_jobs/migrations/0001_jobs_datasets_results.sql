-- Datasets uploaded for jobs; the bytes live in the dataset store, named by sha256.
CREATE TABLE jobs.datasets (
    id uuid PRIMARY KEY,
    sha256 text NOT NULL,
    size_bytes bigint NOT NULL,
    item_count bigint NOT NULL,
    record_count bigint NOT NULL,
    tensors jsonb NOT NULL,           -- [{"name", "dtype", "item_shape"}]
    display_name text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}',
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX datasets_sha256 ON jobs.datasets (sha256);

CREATE TABLE jobs.jobs (
    id uuid PRIMARY KEY,
    request_id text UNIQUE,
    inline_input boolean NOT NULL,
    model_name text NOT NULL,
    ref_version bigint,               -- the reference as submitted: a version, an alias, or neither
    ref_alias text,
    model_version bigint NOT NULL,    -- what it resolved to at submit time; the job always runs this
    state text NOT NULL CHECK (state IN ('QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    dataset_id uuid REFERENCES jobs.datasets (id) ON DELETE SET NULL,  -- NULL: inline input, or dataset deleted
    items_total bigint NOT NULL,
    batch_size integer NOT NULL,
    batches_total bigint NOT NULL,
    items_done bigint NOT NULL DEFAULT 0,
    batches_done bigint NOT NULL DEFAULT 0,
    priority smallint NOT NULL,
    labels jsonb NOT NULL DEFAULT '{}',
    max_attempts integer NOT NULL,
    time_limit_seconds double precision,
    attempt_count integer NOT NULL DEFAULT 0,
    worker_id text NOT NULL DEFAULT '',
    heartbeat_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    start_time timestamptz,
    finish_time timestamptz,
    update_time timestamptz NOT NULL DEFAULT now(),
    enqueue_time timestamptz NOT NULL DEFAULT now(),   -- when its message was last sent
    queued_since timestamptz,                          -- when it last became QUEUED; NULL while not QUEUED
    queued_seconds double precision NOT NULL DEFAULT 0,
    inference_seconds double precision NOT NULL DEFAULT 0,
    run_start_time timestamptz,                        -- the current run: for items per second
    run_items_start bigint NOT NULL DEFAULT 0,
    error_code text,
    error_reason text,
    error_message text
);
CREATE INDEX jobs_newest ON jobs.jobs (create_time DESC, id DESC);
CREATE INDEX jobs_live ON jobs.jobs (state) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX jobs_finished ON jobs.jobs (finish_time) WHERE finish_time IS NOT NULL;
CREATE INDEX jobs_dataset ON jobs.jobs (dataset_id) WHERE dataset_id IS NOT NULL;

-- A job's inline input: one serialized modelforge.jobs.v1.DatasetRecord.
CREATE TABLE jobs.inputs (
    job_id uuid PRIMARY KEY REFERENCES jobs.jobs (id) ON DELETE CASCADE,
    record bytea NOT NULL
);

-- The outputs of each finished batch; the primary key makes a batch's outputs impossible to store twice.
CREATE TABLE jobs.results (
    job_id uuid NOT NULL REFERENCES jobs.jobs (id) ON DELETE CASCADE,
    batch_index bigint NOT NULL,
    first_item bigint NOT NULL,
    item_count integer NOT NULL,
    record bytea NOT NULL,           -- one serialized modelforge.jobs.v1.DatasetRecord
    PRIMARY KEY (job_id, batch_index)
);
