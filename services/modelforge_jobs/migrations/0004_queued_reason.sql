-- Why a job that ran is QUEUED again (a dependency out of reach, a transient failure, its worker stopping), for
-- GetJob and WatchJob to show while it waits; cleared when a run starts.
ALTER TABLE jobs.jobs ADD COLUMN queued_reason text;
