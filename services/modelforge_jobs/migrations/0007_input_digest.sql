-- The sha256 of a job's input (the dataset file's, or the serialized inline input's), so that a CreateJob that
-- repeats a request_id with another input is refused rather than answered with this job. NULL in rows written
-- before this migration, or by an older replica during a rolling upgrade: such a job is matched on its other
-- fields only.
ALTER TABLE jobs.jobs ADD COLUMN input_digest bytea;
