//! The buffer's schema and the one connection to it: WAL with
//! `synchronous=FULL` (checked, not assumed), the tables of every concern
//! ([`super::scans`], [`super::erase`]) and the upgrade of older files.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use rusqlite::Connection;

use super::{erase, scans};

/// Version of the schema below, kept in `PRAGMA user_version`. 2 added the
/// `scans` table: an older persister would leave its unsynced rows behind.
/// 3 added `scans.reward` (added to an older file at open). 4 added the
/// erasure tombstones (`erased_users`) and their triggers: an older
/// persister would store records of erased users again. 5 added
/// `turns.sources` (added to an older file at open).
pub(super) const SCHEMA_VERSION: i64 = 5;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS turns (
    turn_id           TEXT PRIMARY KEY NOT NULL,
    conversation_id   TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    request_id        TEXT NOT NULL,
    model             TEXT NOT NULL,
    finish_reason     TEXT NOT NULL,
    user_text         TEXT NOT NULL,
    assistant_text    TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    error             TEXT,
    created_at        TEXT NOT NULL,    -- RFC 3339, UTC, full precision
    first_token_at    TEXT,
    completed_at      TEXT NOT NULL,
    ingested_at       INTEGER NOT NULL, -- unix milliseconds
    synced_at         INTEGER,          -- unix milliseconds; NULL = not yet in Postgres
    sync_error        TEXT,             -- Postgres refused this row itself; skipped until cleared
    sources           TEXT              -- JSON array of rule categories, NULL for none; last, as ALTER adds it to older files
);
CREATE INDEX IF NOT EXISTS turns_outbox ON turns (ingested_at)
    WHERE synced_at IS NULL AND sync_error IS NULL;
CREATE INDEX IF NOT EXISTS turns_synced ON turns (synced_at) WHERE synced_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS turns_rejected ON turns (ingested_at) WHERE sync_error IS NOT NULL;
CREATE INDEX IF NOT EXISTS turns_conversation ON turns (conversation_id);
CREATE INDEX IF NOT EXISTS turns_user ON turns (user_id);
";

pub(super) fn open_connection(path: &Path) -> anyhow::Result<Connection> {
    let hint = || {
        format!(
            "cannot open the SQLite buffer at {} (set PERSISTER_SQLITE_PATH to a writable file on a local disk)",
            path.display()
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(hint)?;
    }
    let conn = Connection::open(path).with_context(hint)?;
    conn.busy_timeout(Duration::from_secs(5))
        .with_context(hint)?;
    // SQLite answers `PRAGMA journal_mode=WAL` with the mode now in force, and
    // when it cannot switch (an in-memory database, a file system without the
    // shared memory WAL needs, another connection holding the file) it keeps
    // the old mode without an error. Our durability rests on WAL with
    // synchronous=FULL, so read the mode back and refuse to run without it.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .with_context(hint)?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "the SQLite buffer at {} stayed in journal mode {mode:?} instead of WAL \
         (set PERSISTER_SQLITE_PATH to a file on a local disk)",
        path.display()
    );
    // FULL: a commit is fsynced before it returns, so an acked turn survives
    // power loss. NORMAL is faster but may lose the last commits.
    conn.pragma_update(None, "synchronous", "FULL")
        .with_context(hint)?;
    let synchronous: i64 = conn
        .pragma_query_value(None, "synchronous", |row| row.get(0))
        .with_context(hint)?;
    anyhow::ensure!(
        synchronous == 2,
        "the SQLite buffer at {} did not accept synchronous=FULL (got {synchronous})",
        path.display()
    );
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .with_context(hint)?;
    anyhow::ensure!(
        version <= SCHEMA_VERSION,
        "the SQLite buffer at {} was written by a newer persister (schema {version}); \
         upgrade, or set PERSISTER_SQLITE_PATH to another file",
        path.display()
    );
    conn.execute_batch(SCHEMA).with_context(hint)?;
    conn.execute_batch(scans::SCHEMA).with_context(hint)?;
    conn.execute_batch(erase::SCHEMA).with_context(hint)?;
    // Columns added after a table's first release: older files get them here.
    add_column(&conn, "scans", "reward").with_context(hint)?;
    add_column(&conn, "turns", "sources").with_context(hint)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .with_context(hint)?;
    Ok(conn)
}

/// Adds `column` (TEXT, NULL) to `table` when an older file lacks it.
fn add_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<()> {
    let present: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        [table, column],
        |row| row.get(0),
    )?;
    if present == 0 {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))?;
    }
    Ok(())
}
