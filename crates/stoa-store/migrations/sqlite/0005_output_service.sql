-- Compose runs: the service a line of output came from.
ALTER TABLE run_output ADD COLUMN service TEXT;
