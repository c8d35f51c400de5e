-- Dashboard sessions of a key signed in before this time are over (its sign-out).
ALTER TABLE api_keys ADD COLUMN sessions_after TEXT;
