-- The reward chain (reward.grant.<scan>, written in batches by the
-- persister's `persister-rewards` consumer).
--
-- reward_grants keeps one row per scan: a grant redelivered, republished by
-- a reprocessed scan or sent after the stream's duplicate window is skipped
-- here, so it never counts twice below. Only grants new to this table
-- touch character_ownership and my_characters, in the same statement.

CREATE TABLE reward_grants (
    scan_id      text PRIMARY KEY,
    user_id      text NOT NULL,          -- the JWT sub, verbatim
    character_id text NOT NULL,
    category     text NOT NULL,
    new          boolean NOT NULL,       -- the streamer's answer to the client
    granted_at   timestamptz NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now()
);

-- The character domain: who owns which character since when, and the scan
-- that first earned it.
CREATE TABLE character_ownership (
    user_id         text NOT NULL,
    character_id    text NOT NULL,
    first_earned_at timestamptz NOT NULL,
    scan_id         text NOT NULL,
    PRIMARY KEY (user_id, character_id)
);

-- The "my" domain: a user's record per character.
CREATE TABLE my_characters (
    user_id        text NOT NULL,
    character_id   text NOT NULL,
    times_earned   integer NOT NULL CHECK (times_earned > 0),
    last_earned_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, character_id)
);

-- The scan record's reward (bus::wire::ScanRecord::reward), as the SSE
-- `result` carried it; NULL when the scan earned none.
ALTER TABLE scans ADD COLUMN reward jsonb;
