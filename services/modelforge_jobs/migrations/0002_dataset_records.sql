-- Dataset contents move from files in a dataset directory into PostgreSQL, so that the jobs API and its workers
-- share nothing but PostgreSQL, Redis and gRPC. Each dataset owns its records: one row per DatasetRecord of the
-- upload, in order, with the items it covers. Two uploads of the same bytes are stored twice; in exchange a
-- dataset's contents go with its row (ON DELETE CASCADE) and need no reference counting.
CREATE TABLE jobs.dataset_records (
    dataset_id uuid NOT NULL REFERENCES jobs.datasets (id) ON DELETE CASCADE,
    record_index integer NOT NULL,   -- 0, 1, 2 ... in upload order
    first_item bigint NOT NULL,      -- the dataset index of the record's first item
    item_count integer NOT NULL CHECK (item_count > 0),
    record bytea NOT NULL,           -- one serialized modelforge.jobs.v1.DatasetRecord
    PRIMARY KEY (dataset_id, record_index),
    UNIQUE (dataset_id, first_item)  -- finds the records of an item range (a job's batch)
);

-- The bytes of the datasets uploaded before this migration were files in the dataset directory, which nothing reads
-- any more: those datasets are dropped (upload them again). Jobs that named one keep their results; like jobs whose
-- dataset was deleted, they cannot run again.
DELETE FROM jobs.datasets;
