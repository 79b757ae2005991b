//! Erasing one user from the SQLite buffer (`DELETE /v1/me`), and keeping
//! them erased.
//!
//! The erasure deletes the user's turns and scans, synced or not: a row
//! still waiting for Postgres must not reach it after Postgres was erased.
//! It also leaves a tombstone (`erased_users`): a turn or scan the user
//! started before the erasure whose record is still on its way (in
//! `CHAT_DONE` or `SCAN_DONE`, or being generated) is dropped when it
//! arrives, by a trigger, in the same statement that would have stored it.
//! Records started after the erasure are stored as usual: the user may go
//! on using the service. The tombstone keeps the user id for
//! [`TOMBSTONE_KEEP`] (as long as those streams keep a record), then goes.
//!
//! The same happens from the erasure register (KV bucket `erasures`, keyed
//! by user key, not user id): [`Wal::erase_registered`] erases the rows of
//! every registered user made up to their erasure and leaves the same
//! tombstone, for erasures this persister did not hear about (it was not
//! running); [`Wal::tombstone`] leaves one for a registered user whose
//! late record arrives when the file holds nothing else of theirs.

use std::collections::HashMap;

use bus::wire::{EraseRequest, SqliteErased};
use chrono::{DateTime, Utc};
use rusqlite::{Transaction, TransactionBehavior, params};

use super::{Wal, timestamp};
use crate::error::WalError;

/// How long a tombstone is kept: `CHAT_DONE` and `SCAN_DONE` keep records
/// 7 days, so no record of a turn started before the erasure arrives later.
pub const TOMBSTONE_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The tombstones and the triggers that read them. `julianday` compares the
/// instants (the stored texts differ in their fraction digits).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS erased_users (
    user_id     TEXT PRIMARY KEY NOT NULL,
    erased_at   TEXT NOT NULL,    -- RFC 3339: records created up to here are dropped
    recorded_at INTEGER NOT NULL  -- unix milliseconds, for the purge
);
CREATE TRIGGER IF NOT EXISTS turns_of_erased_users BEFORE INSERT ON turns
WHEN EXISTS (SELECT 1 FROM erased_users e
             WHERE e.user_id = NEW.user_id AND julianday(NEW.created_at) <= julianday(e.erased_at))
BEGIN SELECT RAISE(IGNORE); END;
CREATE TRIGGER IF NOT EXISTS scans_of_erased_users BEFORE INSERT ON scans
WHEN EXISTS (SELECT 1 FROM erased_users e
             WHERE e.user_id = NEW.user_id AND julianday(NEW.created_at) <= julianday(e.erased_at))
BEGIN SELECT RAISE(IGNORE); END;
";

impl Wal {
    /// Deletes every turn and scan of `request.user_id` from the buffer and
    /// records the tombstone, in one transaction; purges tombstones older
    /// than [`TOMBSTONE_KEEP`]. Erasing twice deletes nothing the second time.
    ///
    /// Hold [`Wal::sync_lock`] around it: a sync pass that read the rows
    /// before they went must not write them to Postgres afterwards.
    ///
    /// # Errors
    /// [`WalError`] when the transaction did not commit: nothing changed.
    pub async fn erase_user(&self, request: &EraseRequest) -> Result<SqliteErased, WalError> {
        let user_id = request.user_id.clone();
        let erased_at = timestamp(&request.requested_at);
        self.call(move |conn| {
            let now = Utc::now().timestamp_millis();
            let keep = i64::try_from(TOMBSTONE_KEEP.as_millis()).unwrap_or(i64::MAX);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            bury(&tx, &user_id, &erased_at, now)?;
            let turns = tx.execute("DELETE FROM turns WHERE user_id = ?1", params![user_id])?;
            let scans = tx.execute("DELETE FROM scans WHERE user_id = ?1", params![user_id])?;
            tx.execute(
                "DELETE FROM erased_users WHERE recorded_at < ?1",
                params![now.saturating_sub(keep)],
            )?;
            tx.commit()?;
            Ok(SqliteErased {
                turns: turns as u64,
                scans: scans as u64,
            })
        })
        .await
    }

    /// Erases, for every user of the buffer whose key `marks` holds (user
    /// key -> erased at), their turns and scans created up to that time, and
    /// leaves their tombstone, in one transaction. What they made afterwards
    /// stays. Hold [`Wal::sync_lock`] around it, as for [`Wal::erase_user`].
    ///
    /// # Errors
    /// [`WalError`] when the transaction did not commit: nothing changed.
    pub async fn erase_registered(
        &self,
        marks: HashMap<String, DateTime<Utc>>,
    ) -> Result<SqliteErased, WalError> {
        if marks.is_empty() {
            return Ok(SqliteErased::default());
        }
        self.call(move |conn| {
            let now = Utc::now().timestamp_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Rows hold user ids, the register user keys: hash each user once.
            let users: Vec<String> = tx
                .prepare("SELECT user_id FROM turns UNION SELECT user_id FROM scans")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let mut erased = SqliteErased::default();
            for user_id in users {
                let Some(at) = marks.get(&bus::subject::user_key(&user_id)) else {
                    continue;
                };
                let at = timestamp(at);
                bury(&tx, &user_id, &at, now)?;
                erased.turns += tx.execute(
                    "DELETE FROM turns WHERE user_id = ?1 AND julianday(created_at) <= julianday(?2)",
                    params![user_id, at],
                )? as u64;
                erased.scans += tx.execute(
                    "DELETE FROM scans WHERE user_id = ?1 AND julianday(created_at) <= julianday(?2)",
                    params![user_id, at],
                )? as u64;
            }
            tx.commit()?;
            Ok(erased)
        })
        .await
    }

    /// Leaves the tombstone of `user_id`, erased at `erased_at`, so their
    /// records created up to then are dropped on arrival.
    ///
    /// # Errors
    /// [`WalError`] when it did not commit.
    pub async fn tombstone(&self, user_id: &str, erased_at: DateTime<Utc>) -> Result<(), WalError> {
        let user_id = user_id.to_owned();
        let erased_at = timestamp(&erased_at);
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            bury(&tx, &user_id, &erased_at, Utc::now().timestamp_millis())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Serialises Postgres sync passes with erasures (see [`Wal::erase_user`]).
    pub async fn sync_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.sync_lock.lock().await
    }
}

/// Writes or moves forward the tombstone of `user_id` (`erased_at` in the
/// stored RFC 3339 form, `now` in unix milliseconds).
fn bury(tx: &Transaction<'_>, user_id: &str, erased_at: &str, now: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO erased_users (user_id, erased_at, recorded_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id) DO UPDATE SET
             erased_at = CASE WHEN julianday(excluded.erased_at) > julianday(erased_at)
                              THEN excluded.erased_at ELSE erased_at END,
             recorded_at = excluded.recorded_at",
        params![user_id, erased_at, now],
    )?;
    Ok(())
}
