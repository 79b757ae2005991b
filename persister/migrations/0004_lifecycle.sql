-- Data lifecycle: retention anonymisation and erasure (DELETE /v1/me).
--
-- Rows older than PERSISTER_PG_RETENTION_DAYS get a keyed hash
-- (HMAC-SHA256 with PERSISTER_ANON_KEY, hex) in place of user_id;
-- anonymised_at marks them so a later run never hashes a hash.

ALTER TABLE conversations       ADD COLUMN anonymised_at timestamptz;
ALTER TABLE turns               ADD COLUMN anonymised_at timestamptz;
ALTER TABLE scans               ADD COLUMN anonymised_at timestamptz;
ALTER TABLE reward_grants       ADD COLUMN anonymised_at timestamptz;
ALTER TABLE character_ownership ADD COLUMN anonymised_at timestamptz;
ALTER TABLE my_characters       ADD COLUMN anonymised_at timestamptz;

-- What each retention run did: one row per run that held the lock.
CREATE TABLE retention_runs (
    run_id  bigserial PRIMARY KEY,
    ran_at  timestamptz NOT NULL DEFAULT now(),
    cutoff  timestamptz NOT NULL,            -- rows older than this were anonymised
    rows    jsonb NOT NULL                   -- {"turns": n, "scans": n, ...}
);

-- What each erasure (DELETE /v1/me) deleted here: one row per erase id,
-- no user id (the point of an erasure). A redelivered erasure deletes
-- again (nothing, normally) and keeps the first row.
CREATE TABLE erasures (
    erase_id     text PRIMARY KEY,
    requested_at timestamptz NOT NULL,
    erased_at    timestamptz NOT NULL DEFAULT now(),
    rows         jsonb NOT NULL
);
