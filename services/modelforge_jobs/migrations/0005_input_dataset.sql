-- The dataset a job was submitted with, kept when that dataset is deleted (dataset_id, the reference the job reads
-- through, becomes NULL then): GetJob still says which dataset the job read, and that it is gone.
ALTER TABLE jobs.jobs ADD COLUMN input_dataset_id uuid;
UPDATE jobs.jobs SET input_dataset_id = dataset_id WHERE dataset_id IS NOT NULL;
