-- The system of record for conversations, turns and scans.
-- Written by the persister only; rows are copied from its SQLite buffer and
-- every insert is idempotent on the primary key.

CREATE TABLE conversations (
    conversation_id text PRIMARY KEY,
    user_id         text NOT NULL,           -- the JWT `sub` of the owner
    created_at      timestamptz NOT NULL,    -- the first turn's created_at
    updated_at      timestamptz NOT NULL     -- the latest turn's completed_at
);
CREATE INDEX conversations_user_updated ON conversations (user_id, updated_at DESC);

CREATE TABLE turns (
    turn_id           text PRIMARY KEY,
    conversation_id   text NOT NULL REFERENCES conversations (conversation_id),
    user_id           text NOT NULL,
    request_id        text NOT NULL,
    model             text NOT NULL,
    finish_reason     text NOT NULL
        CHECK (finish_reason IN ('stop', 'length', 'cancelled', 'error')),
    user_text         text NOT NULL,         -- verbatim
    assistant_text    text NOT NULL,         -- verbatim, partial when cancelled or failed
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    error             text,
    created_at        timestamptz NOT NULL,  -- accepted by the gateway
    first_token_at    timestamptz,
    completed_at      timestamptz NOT NULL
);
CREATE INDEX turns_conversation_created ON turns (conversation_id, created_at);
CREATE INDEX turns_user ON turns (user_id);

CREATE TABLE scans (
    scan_id      text PRIMARY KEY,
    user_id      text NOT NULL,
    status       text NOT NULL,              -- queued | running | done | failed
    category     text,
    confidence   double precision,
    phash        text,                       -- perceptual hash, hex
    sha256       text,                       -- of the uploaded bytes, hex
    rule         jsonb,                      -- the disposal rule that matched
    answer       text,
    cached       boolean NOT NULL DEFAULT false,
    error        text,
    created_at   timestamptz NOT NULL,
    completed_at timestamptz
);
CREATE INDEX scans_user_created ON scans (user_id, created_at);
CREATE INDEX scans_phash ON scans (phash);
