-- The Slurm job a Slurm bridge submitted a run as (`stoa worker --slurm`).
ALTER TABLE runs ADD COLUMN slurm_job_id TEXT;
