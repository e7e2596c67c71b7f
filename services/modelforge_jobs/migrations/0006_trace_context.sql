-- The trace context (W3C traceparent) of the call that queued the job, CreateJob or RetryJob: a message the
-- maintenance pass sends again (a lost one, or a reaped job's) continues that trace.
ALTER TABLE jobs.jobs ADD COLUMN trace_context jsonb;
