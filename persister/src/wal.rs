//! The local SQLite buffer, in WAL mode with `synchronous=FULL`.
//!
//! It owns the SQLite file and the one connection to it, which lives on a
//! dedicated thread: rusqlite is blocking, and a single writer is what SQLite
//! wants anyway. Callers send closures to that thread and await the answer.
//! The `turns` table is also the outbox: a row with `synced_at` NULL has not
//! reached Postgres yet ([`crate::sync`] copies it and then marks it).
//! Acking JetStream after [`Wal::insert_turns`] returns is what makes
//! "accepted means persisted" hold; that decision lives in [`crate::ingest`].
//! The `scans` table is the same outbox for completed scans, with one
//! difference: a scan's row can be replaced by a later record ([`scans`]).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use bus::wire::{FinishReason, TurnRecord, Usage};
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use crate::error::WalError;

mod erase;
mod scans;
mod schema;

use schema::open_connection;

pub(crate) use scans::parse_status as parse_scan_status;
pub use scans::{PendingScan, ScanKey, ScanStored};

const INSERT_TURN: &str = "
INSERT INTO turns (turn_id, conversation_id, user_id, request_id, model, finish_reason,
                   user_text, assistant_text, prompt_tokens, completion_tokens, error,
                   created_at, first_token_at, completed_at, ingested_at, sources)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
ON CONFLICT (turn_id) DO NOTHING";

const SELECT_TURN_COLUMNS: &str = "turn_id, conversation_id, user_id, request_id, model, \
    finish_reason, user_text, assistant_text, prompt_tokens, completion_tokens, error, \
    created_at, first_token_at, completed_at, sources";

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the SQLite buffer. Cheap to clone; every clone talks to the
/// same connection thread, which stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Wal {
    /// Jobs for the connection thread; the thread owns the receiver.
    jobs: mpsc::Sender<Job>,
    /// The file, for messages.
    path: PathBuf,
    /// The last failed write's error, cleared by the next successful one.
    /// Readiness reports it: a full disk must be loud.
    write_error: Arc<Mutex<Option<String>>>,
    /// Held by a Postgres sync pass and by an erasure ([`Wal::erase_user`]).
    sync_lock: Arc<tokio::sync::Mutex<()>>,
}

/// What one [`Wal::insert_turns`] call stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// Rows that were new.
    pub inserted: usize,
    /// Records whose `turn_id` was already stored (a redelivery or a repeat).
    pub duplicates: usize,
}

/// [`Backlog`] per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlogs {
    /// The `turns` table.
    pub turns: Backlog,
    /// The `scans` table.
    pub scans: Backlog,
}

/// What the buffer holds that is not in Postgres yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Rows waiting to be copied to Postgres.
    pub pending: u64,
    /// Rows Postgres refused; kept here, skipped by the sync, an operator must look.
    pub rejected: u64,
}

impl Wal {
    /// Opens (or creates) the buffer at `path`, switches it to WAL mode with
    /// `synchronous=FULL`, and creates the schema. The parent directory is
    /// created if missing.
    ///
    /// # Errors
    /// One actionable line naming the path and `PERSISTER_SQLITE_PATH` when the
    /// file cannot be opened or written, or does not accept WAL mode.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let (jobs, mut receiver) = mpsc::channel::<Job>(64);
        let (opened_tx, opened_rx) = oneshot::channel();
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("persister-sqlite".into())
            .spawn(move || {
                let mut conn = match open_connection(&thread_path) {
                    Ok(conn) => {
                        let _ = opened_tx.send(Ok(()));
                        conn
                    }
                    Err(error) => {
                        let _ = opened_tx.send(Err(error));
                        return;
                    }
                };
                while let Some(job) = receiver.blocking_recv() {
                    job(&mut conn);
                }
                // Dropping the connection closes it and checkpoints the WAL.
            })
            .context("cannot start the SQLite thread")?;
        opened_rx
            .await
            .context("the SQLite thread stopped while opening the buffer")??;
        Ok(Self {
            jobs,
            path: path.to_owned(),
            write_error: Arc::default(),
            sync_lock: Arc::default(),
        })
    }

    /// The file this buffer lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection thread.
    async fn call<R, F>(&self, f: F) -> Result<R, WalError>
    where
        F: FnOnce(&mut Connection) -> Result<R, WalError> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.jobs.send(job).await.map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Stores `records` in one transaction; a `turn_id` already stored is
    /// skipped, so a redelivered record is harmless. When this returns `Ok`
    /// the rows are on disk (`synchronous=FULL`) and may be acked.
    ///
    /// # Errors
    /// [`WalError`] when the transaction did not commit: nothing was stored.
    pub async fn insert_turns(&self, records: Vec<TurnRecord>) -> Result<Inserted, WalError> {
        let result = self
            .call(move |conn| {
                let now = Utc::now().timestamp_millis();
                // IMMEDIATE takes the write lock up front, so a busy file fails
                // here (after busy_timeout) rather than half-way through.
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut inserted = 0;
                {
                    // `ON CONFLICT (turn_id) DO NOTHING` rather than `INSERT OR
                    // IGNORE`: OR IGNORE would also silently drop a row that
                    // breaks a NOT NULL constraint, and then we would ack it.
                    let mut insert = tx.prepare_cached(INSERT_TURN)?;
                    for r in &records {
                        inserted += insert.execute(params![
                            r.turn_id,
                            r.conversation_id,
                            r.user_id,
                            r.request_id,
                            r.model,
                            r.finish_reason.as_str(),
                            r.user_text,
                            r.assistant_text,
                            i64::from(r.usage.prompt_tokens),
                            i64::from(r.usage.completion_tokens),
                            r.error,
                            timestamp(&r.created_at),
                            r.first_token_at.as_ref().map(timestamp),
                            timestamp(&r.completed_at),
                            now,
                            (!r.sources.is_empty()).then(|| {
                                serde_json::to_string(&r.sources).expect("strings serialize")
                            }),
                        ])?;
                    }
                }
                tx.commit()?;
                Ok(Inserted {
                    inserted,
                    duplicates: records.len() - inserted,
                })
            })
            .await;
        let mut write_error = self.write_error.lock().expect("lock is never poisoned");
        *write_error = result.as_ref().err().map(ToString::to_string);
        result
    }

    /// Up to `limit` rows not yet in Postgres, oldest first.
    ///
    /// # Errors
    /// [`WalError`] when the query fails or a row cannot be read back.
    pub async fn unsynced(&self, limit: usize) -> Result<Vec<TurnRecord>, WalError> {
        self.call(move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {SELECT_TURN_COLUMNS} FROM turns \
                 WHERE synced_at IS NULL AND sync_error IS NULL \
                 ORDER BY ingested_at LIMIT ?1"
            ))?;
            let rows = select.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], read_row)?;
            rows.map(|row| row?).collect()
        })
        .await
    }

    /// Marks rows as copied to Postgres. Call only after the Postgres commit.
    ///
    /// # Errors
    /// [`WalError`] when the update does not commit (the rows are then copied
    /// again later, which Postgres ignores).
    pub async fn mark_synced(&self, turn_ids: Vec<String>) -> Result<(), WalError> {
        self.call(move |conn| {
            let now = Utc::now().timestamp_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut update =
                    tx.prepare_cached("UPDATE turns SET synced_at = ?1 WHERE turn_id = ?2")?;
                for id in &turn_ids {
                    update.execute(params![now, id])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Sets a row aside because Postgres refused the row itself (not an
    /// outage): it stays here with the reason and the sync skips it.
    ///
    /// # Errors
    /// [`WalError`] when the update fails.
    pub async fn reject(&self, turn_id: String, reason: String) -> Result<(), WalError> {
        self.call(move |conn| {
            conn.execute(
                "UPDATE turns SET sync_error = ?1 WHERE turn_id = ?2",
                params![reason, turn_id],
            )?;
            Ok(())
        })
        .await
    }

    /// How many rows (turns and scans) are waiting for Postgres, and how
    /// many it refused.
    ///
    /// # Errors
    /// [`WalError`] when the buffer cannot be read.
    pub async fn backlog(&self) -> Result<Backlog, WalError> {
        let backlogs = self.backlogs().await?;
        Ok(Backlog {
            pending: backlogs.turns.pending + backlogs.scans.pending,
            rejected: backlogs.turns.rejected + backlogs.scans.rejected,
        })
    }

    /// When the oldest row still waiting for Postgres (turns or scans) reached
    /// this buffer, in unix milliseconds; `None` when nothing waits. Rows
    /// Postgres refused are left out: they wait for an operator, not for the
    /// sync, and `persister_rows_rejected_sync` counts them.
    ///
    /// # Errors
    /// [`WalError`] when the buffer cannot be read.
    pub async fn oldest_pending_ms(&self) -> Result<Option<i64>, WalError> {
        self.call(|conn| {
            // Each `min` is answered from its table's partial outbox index.
            let oldest: Option<i64> = conn
                .prepare_cached(
                    "SELECT min(m) FROM (
                        SELECT min(ingested_at) AS m FROM turns
                            WHERE synced_at IS NULL AND sync_error IS NULL
                        UNION ALL
                        SELECT min(ingested_at) FROM scans
                            WHERE synced_at IS NULL AND sync_error IS NULL)",
                )?
                .query_row([], |row| row.get(0))?;
            Ok(oldest)
        })
        .await
    }

    /// [`Wal::backlog`] for each table.
    ///
    /// # Errors
    /// [`WalError`] when the buffer cannot be read.
    pub async fn backlogs(&self) -> Result<Backlogs, WalError> {
        self.call(|conn| {
            let count = |sql: &str| -> Result<u64, WalError> {
                let n: i64 = conn.prepare_cached(sql)?.query_row([], |row| row.get(0))?;
                Ok(u64::try_from(n).unwrap_or(0))
            };
            let table = |table: &str| -> Result<Backlog, WalError> {
                Ok(Backlog {
                    pending: count(&format!(
                        "SELECT count(*) FROM {table} WHERE synced_at IS NULL AND sync_error IS NULL"
                    ))?,
                    rejected: count(&format!(
                        "SELECT count(*) FROM {table} WHERE sync_error IS NOT NULL"
                    ))?,
                })
            };
            Ok(Backlogs {
                turns: table("turns")?,
                scans: table("scans")?,
            })
        })
        .await
    }

    /// Checkpoints the WAL into the database file and truncates it to zero,
    /// so the `-wal` file does not keep its high-water size after a purge
    /// (the freed pages in the main file are reused by later inserts).
    ///
    /// # Errors
    /// [`WalError`] when the checkpoint fails.
    pub async fn checkpoint(&self) -> Result<(), WalError> {
        self.call(|conn| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    /// Every turn id in the buffer with whether it reached Postgres (for the
    /// operator's `compare`).
    ///
    /// # Errors
    /// [`WalError`] when the buffer cannot be read.
    pub async fn all_turn_ids(&self) -> Result<Vec<(String, bool)>, WalError> {
        self.call(|conn| {
            let mut statement = conn
                .prepare("SELECT turn_id, synced_at IS NOT NULL FROM turns ORDER BY ingested_at")?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, bool>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Deletes turns and scans that reached Postgres before `before`;
    /// returns how many.
    ///
    /// # Errors
    /// [`WalError`] when the delete fails.
    pub async fn purge_synced(&self, before: DateTime<Utc>) -> Result<usize, WalError> {
        let before = before.timestamp_millis();
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut purged = 0;
            for table in ["turns", "scans"] {
                purged += tx.execute(
                    &format!("DELETE FROM {table} WHERE synced_at IS NOT NULL AND synced_at < ?1"),
                    [before],
                )?;
            }
            tx.commit()?;
            Ok(purged)
        })
        .await
    }

    /// The journal mode in force, as SQLite reports it (`"wal"`).
    ///
    /// # Errors
    /// [`WalError`] when the pragma fails.
    pub async fn journal_mode(&self) -> Result<String, WalError> {
        self.call(|conn| Ok(conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?))
            .await
    }

    /// One stored turn, if present (for checks and tests).
    ///
    /// # Errors
    /// [`WalError`] when the query fails.
    pub async fn turn(&self, turn_id: &str) -> Result<Option<TurnRecord>, WalError> {
        let turn_id = turn_id.to_owned();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SELECT_TURN_COLUMNS} FROM turns WHERE turn_id = ?1"
            ))?
            .query_row([turn_id], read_row)
            .optional()?
            .transpose()
        })
        .await
    }

    /// A conversation's stored turns, in no order: only those not yet in
    /// Postgres when `unsynced_only`, else every one still kept here.
    ///
    /// # Errors
    /// [`WalError`] when the query fails or a row cannot be read back.
    pub async fn conversation_turns(
        &self,
        conversation_id: &str,
        unsynced_only: bool,
    ) -> Result<Vec<TurnRecord>, WalError> {
        let conversation_id = conversation_id.to_owned();
        self.call(move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {SELECT_TURN_COLUMNS} FROM turns \
                 WHERE conversation_id = ?1 AND (synced_at IS NULL OR NOT ?2)"
            ))?;
            let rows = select.query_map(params![conversation_id, unsynced_only], read_row)?;
            rows.map(|row| row?).collect()
        })
        .await
    }

    /// A user's stored turns, in no order: only those not yet in Postgres
    /// when `unsynced_only`, else every one still kept here.
    ///
    /// # Errors
    /// [`WalError`] when the query fails or a row cannot be read back.
    pub async fn user_turns(
        &self,
        user_id: &str,
        unsynced_only: bool,
    ) -> Result<Vec<TurnRecord>, WalError> {
        let user_id = user_id.to_owned();
        self.call(move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {SELECT_TURN_COLUMNS} FROM turns \
                 WHERE user_id = ?1 AND (synced_at IS NULL OR NOT ?2)"
            ))?;
            let rows = select.query_map(params![user_id, unsynced_only], read_row)?;
            rows.map(|row| row?).collect()
        })
        .await
    }

    /// The last failed write's error, until a later write succeeds.
    pub fn write_error(&self) -> Option<String> {
        self.write_error
            .lock()
            .expect("lock is never poisoned")
            .clone()
    }
}

/// RFC 3339 in UTC with every digit chrono holds, so a round trip is exact.
fn timestamp(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Reads one row. The outer error is SQLite failing to read a column; the
/// inner one is a stored value that does not parse (a bad row).
fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TurnRecord, WalError>> {
    let raw = StoredTurn {
        turn_id: row.get(0)?,
        conversation_id: row.get(1)?,
        user_id: row.get(2)?,
        request_id: row.get(3)?,
        model: row.get(4)?,
        finish_reason: row.get(5)?,
        user_text: row.get(6)?,
        assistant_text: row.get(7)?,
        prompt_tokens: row.get(8)?,
        completion_tokens: row.get(9)?,
        error: row.get(10)?,
        created_at: row.get(11)?,
        first_token_at: row.get(12)?,
        completed_at: row.get(13)?,
        sources: row.get(14)?,
    };
    Ok(raw.parse())
}

/// A row as SQLite holds it.
struct StoredTurn {
    turn_id: String,
    conversation_id: String,
    user_id: String,
    request_id: String,
    model: String,
    finish_reason: String,
    user_text: String,
    assistant_text: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    error: Option<String>,
    created_at: String,
    first_token_at: Option<String>,
    completed_at: String,
    sources: Option<String>,
}

impl StoredTurn {
    fn parse(self) -> Result<TurnRecord, WalError> {
        let bad = |reason: String| WalError::BadRow {
            id: self.turn_id.clone(),
            reason,
        };
        let time = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad(format!("timestamp {text:?}: {e}")))
        };
        let tokens = |n: i64, what: &str| u32::try_from(n).map_err(|_| bad(format!("{what} {n}")));
        let finish_reason = parse_finish_reason(&self.finish_reason)
            .ok_or_else(|| bad(format!("finish_reason {:?}", self.finish_reason)))?;
        let usage = Usage {
            prompt_tokens: tokens(self.prompt_tokens, "prompt_tokens")?,
            completion_tokens: tokens(self.completion_tokens, "completion_tokens")?,
        };
        let created_at = time(&self.created_at)?;
        let first_token_at = self.first_token_at.as_deref().map(time).transpose()?;
        let completed_at = time(&self.completed_at)?;
        let sources = match self.sources.as_deref() {
            None => Vec::new(),
            Some(text) => {
                serde_json::from_str(text).map_err(|e| bad(format!("sources {text:?}: {e}")))?
            }
        };
        Ok(TurnRecord {
            turn_id: self.turn_id,
            conversation_id: self.conversation_id,
            user_id: self.user_id,
            request_id: self.request_id,
            model: self.model,
            user_text: self.user_text,
            assistant_text: self.assistant_text,
            finish_reason,
            usage,
            sources,
            error: self.error,
            created_at,
            first_token_at,
            completed_at,
        })
    }
}

pub(crate) fn parse_finish_reason(text: &str) -> Option<FinishReason> {
    [
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::Cancelled,
        FinishReason::Error,
    ]
    .into_iter()
    .find(|r| r.as_str() == text)
}

#[cfg(test)]
mod tests;
