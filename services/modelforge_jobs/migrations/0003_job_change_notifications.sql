-- WatchJob hears of changes instead of polling: every change of a job's state, progress, attempt or worker, and
-- its deletion, sends the job id on the channel modelforge_jobs_changed when the writing transaction commits.
-- Heartbeats and other bookkeeping updates send nothing.
CREATE FUNCTION jobs.notify_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('modelforge_jobs_changed', COALESCE(NEW.id, OLD.id)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_changed AFTER UPDATE ON jobs.jobs FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.items_done IS DISTINCT FROM NEW.items_done
          OR OLD.attempt_count IS DISTINCT FROM NEW.attempt_count OR OLD.worker_id IS DISTINCT FROM NEW.worker_id)
    EXECUTE FUNCTION jobs.notify_job_changed();

CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs.jobs FOR EACH ROW
    EXECUTE FUNCTION jobs.notify_job_changed();
