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

use bus::wire::{EraseRequest, SqliteErased};
use chrono::Utc;
use rusqlite::{TransactionBehavior, params};

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
            tx.execute(
                "INSERT INTO erased_users (user_id, erased_at, recorded_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id) DO UPDATE SET
                     erased_at = CASE WHEN julianday(excluded.erased_at) > julianday(erased_at)
                                      THEN excluded.erased_at ELSE erased_at END,
                     recorded_at = excluded.recorded_at",
                params![user_id, erased_at, now],
            )?;
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

    /// Serialises Postgres sync passes with erasures (see [`Wal::erase_user`]).
    pub async fn sync_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.sync_lock.lock().await
    }
}
