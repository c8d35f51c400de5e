-- Where the ports a run serves on are reached (`{"8888": "10.201.3.2:8888"}`), as its
-- worker reported them once its container started.
ALTER TABLE runs ADD COLUMN ports JSONB NOT NULL DEFAULT '{}';
