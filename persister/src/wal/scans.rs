//! The `scans` table of the SQLite buffer: completed scans waiting for
//! Postgres, and recent ones kept for history.
//!
//! Unlike a turn, a scan can arrive more than once with different content
//! (a redelivered job, or a failed scan reprocessed from the DLQ that later
//! completes). The row holds the later record ([`ScanRecord::supersedes`]):
//! a later one replaces it and puts it back in the outbox, an earlier or
//! equal one changes nothing. `revision` counts replacements, so the sync
//! marks synced only the version it actually copied.

use bus::wire::{DisposalRule, ScanLabel, ScanRecord, ScanStatus};
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use super::Wal;
use crate::error::WalError;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS scans (
    scan_id      TEXT PRIMARY KEY NOT NULL,
    user_id      TEXT NOT NULL,
    status       TEXT NOT NULL,
    category     TEXT,
    confidence   REAL,
    labels       TEXT NOT NULL,    -- JSON array of {label, score}, best first
    vision_model TEXT,
    phash        TEXT,
    sha256       TEXT,
    rule         TEXT,             -- JSON DisposalRule
    answer       TEXT,
    cached       INTEGER NOT NULL,
    error        TEXT,
    created_at   TEXT NOT NULL,    -- RFC 3339, UTC, nine fraction digits (sorts as text)
    completed_at TEXT,
    reward       TEXT,             -- JSON Reward, or NULL (none earned)
    revision     INTEGER NOT NULL, -- bumped each time a later record replaces the row
    ingested_at  INTEGER NOT NULL, -- unix milliseconds
    synced_at    INTEGER,          -- unix milliseconds; NULL = this revision not yet in Postgres
    sync_error   TEXT              -- Postgres refused this revision; skipped until replaced
);
CREATE INDEX IF NOT EXISTS scans_outbox ON scans (ingested_at)
    WHERE synced_at IS NULL AND sync_error IS NULL;
CREATE INDEX IF NOT EXISTS scans_synced ON scans (synced_at) WHERE synced_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS scans_rejected ON scans (ingested_at) WHERE sync_error IS NOT NULL;
CREATE INDEX IF NOT EXISTS scans_user_created ON scans (user_id, created_at);
";

const COLUMNS: &str = "scan_id, user_id, status, category, confidence, labels, vision_model, \
    phash, sha256, rule, answer, cached, error, created_at, completed_at, reward";

const INSERT: &str = "
INSERT INTO scans (scan_id, user_id, status, category, confidence, labels, vision_model,
                   phash, sha256, rule, answer, cached, error, created_at, completed_at,
                   revision, ingested_at, reward)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, 0, ?16, ?17)";

const REPLACE: &str = "
UPDATE scans SET user_id = ?2, status = ?3, category = ?4, confidence = ?5, labels = ?6,
                 vision_model = ?7, phash = ?8, sha256 = ?9, rule = ?10, answer = ?11,
                 cached = ?12, error = ?13, created_at = ?14, completed_at = ?15, reward = ?17,
                 revision = revision + 1, ingested_at = ?16, synced_at = NULL, sync_error = NULL
WHERE scan_id = ?1";

/// What one [`Wal::insert_scans`] call stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStored {
    /// Scans that were new.
    pub inserted: usize,
    /// Stored scans replaced by a later record (queued for Postgres again).
    pub superseded: usize,
    /// Records equal to or older than the one stored: nothing changed.
    pub unchanged: usize,
}

/// An unsynced scan and the revision of its row, which
/// [`Wal::mark_scans_synced`] must be given back.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingScan {
    /// The record as stored.
    pub record: ScanRecord,
    /// The row's revision when it was read.
    pub revision: i64,
}

/// What `compare` needs of a stored scan: its id, whether it reached
/// Postgres, and the two fields the later-record rule reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanKey {
    /// The scan.
    pub scan_id: String,
    /// This revision is in Postgres.
    pub synced: bool,
    /// The stored record's status.
    pub status: ScanStatus,
    /// The stored record's completion time.
    pub completed_at: Option<DateTime<Utc>>,
}

impl Wal {
    /// Stores `records` in one transaction, keeping per scan the later record
    /// ([`ScanRecord::supersedes`]). When this returns `Ok` the rows are on
    /// disk (`synchronous=FULL`) and may be acked.
    ///
    /// # Errors
    /// [`WalError`] when the transaction did not commit: nothing was stored.
    pub async fn insert_scans(&self, records: Vec<ScanRecord>) -> Result<ScanStored, WalError> {
        let result = self
            .call(move |conn| {
                let now = Utc::now().timestamp_millis();
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut stored = ScanStored::default();
                // One record at a time, in delivery order: a batch may hold
                // two versions of the same scan, and the second must see the
                // first.
                for r in &records {
                    let held = select_one(&tx, &r.scan_id)?;
                    let statement = match held {
                        None => {
                            stored.inserted += 1;
                            INSERT
                        }
                        Some(Ok(held)) if !r.supersedes(&held) => {
                            stored.unchanged += 1;
                            continue;
                        }
                        Some(held) => {
                            if let Err(error) = held {
                                // A later, readable record is the best repair.
                                tracing::warn!(%error, "Replacing an unreadable scan row.");
                            }
                            stored.superseded += 1;
                            REPLACE
                        }
                    };
                    tx.prepare_cached(statement)?.execute(params![
                        r.scan_id,
                        r.user_id,
                        r.status.as_str(),
                        r.category,
                        r.confidence,
                        to_json(&r.labels),
                        r.vision_model,
                        r.phash,
                        r.sha256,
                        r.rule.as_ref().map(to_json),
                        r.answer,
                        r.cached,
                        r.error,
                        sortable(&r.created_at),
                        r.completed_at.as_ref().map(sortable),
                        now,
                        r.reward.as_ref().map(to_json),
                    ])?;
                }
                tx.commit()?;
                Ok(stored)
            })
            .await;
        let mut write_error = self.write_error.lock().expect("lock is never poisoned");
        *write_error = result.as_ref().err().map(ToString::to_string);
        result
    }

    /// Up to `limit` scans whose current revision is not in Postgres yet,
    /// oldest first.
    ///
    /// # Errors
    /// [`WalError`] when the query fails or a row cannot be read back.
    pub async fn unsynced_scans(&self, limit: usize) -> Result<Vec<PendingScan>, WalError> {
        self.call(move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {COLUMNS}, revision FROM scans \
                 WHERE synced_at IS NULL AND sync_error IS NULL \
                 ORDER BY ingested_at LIMIT ?1"
            ))?;
            let rows = select.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                let revision: i64 = row.get(16)?;
                Ok(read_row(row)?.map(|record| PendingScan { record, revision }))
            })?;
            rows.map(|row| row?).collect()
        })
        .await
    }

    /// Marks scans as copied to Postgres, each only if its row still has the
    /// revision that was copied: a later record that replaced it meanwhile
    /// stays in the outbox. Call only after the Postgres commit.
    ///
    /// # Errors
    /// [`WalError`] when the update does not commit (the rows are then copied
    /// again later, which Postgres ignores).
    pub async fn mark_scans_synced(&self, scans: Vec<(String, i64)>) -> Result<(), WalError> {
        self.call(move |conn| {
            let now = Utc::now().timestamp_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE scans SET synced_at = ?1 WHERE scan_id = ?2 AND revision = ?3",
                )?;
                for (id, revision) in &scans {
                    update.execute(params![now, id, revision])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Sets a scan's revision aside because Postgres refused the row itself:
    /// it stays here with the reason and the sync skips it until a later
    /// record replaces it.
    ///
    /// # Errors
    /// [`WalError`] when the update fails.
    pub async fn reject_scan(
        &self,
        scan_id: String,
        revision: i64,
        reason: String,
    ) -> Result<(), WalError> {
        self.call(move |conn| {
            conn.execute(
                "UPDATE scans SET sync_error = ?1 WHERE scan_id = ?2 AND revision = ?3",
                params![reason, scan_id, revision],
            )?;
            Ok(())
        })
        .await
    }

    /// One stored scan, if present.
    ///
    /// # Errors
    /// [`WalError`] when the query fails or the row cannot be read back.
    pub async fn scan(&self, scan_id: &str) -> Result<Option<ScanRecord>, WalError> {
        let scan_id = scan_id.to_owned();
        self.call(move |conn| select_one(conn, &scan_id)?.transpose())
            .await
    }

    /// A user's `limit` newest stored scans (synced or not), newest first by
    /// `created_at`, ties by `scan_id` descending.
    ///
    /// # Errors
    /// [`WalError`] when the query fails or a row cannot be read back.
    pub async fn user_scans(
        &self,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<ScanRecord>, WalError> {
        let user_id = user_id.to_owned();
        self.call(move |conn| {
            let mut select = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM scans WHERE user_id = ?1 \
                 ORDER BY created_at DESC, scan_id DESC LIMIT ?2"
            ))?;
            let rows = select.query_map(
                params![user_id, i64::try_from(limit).unwrap_or(i64::MAX)],
                read_row,
            )?;
            rows.map(|row| row?).collect()
        })
        .await
    }

    /// Every stored scan's id, sync state and order fields (for the
    /// operator's `compare`), oldest ingested first.
    ///
    /// # Errors
    /// [`WalError`] when the buffer cannot be read.
    pub async fn all_scan_keys(&self) -> Result<Vec<ScanKey>, WalError> {
        self.call(|conn| {
            let mut statement = conn.prepare(
                "SELECT scan_id, synced_at IS NOT NULL, status, completed_at FROM scans \
                 ORDER BY ingested_at",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, bool>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, Option<String>>(3)?,
                ))
            })?;
            rows.map(|row| {
                let (scan_id, synced, status, completed_at) = row?;
                let bad = |reason: String| WalError::BadRow {
                    id: scan_id.clone(),
                    reason,
                };
                let status =
                    parse_status(&status).ok_or_else(|| bad(format!("status {status:?}")))?;
                let completed_at = completed_at
                    .as_deref()
                    .map(|t| parse_time(t).map_err(bad))
                    .transpose()?;
                Ok(ScanKey {
                    scan_id,
                    synced,
                    status,
                    completed_at,
                })
            })
            .collect()
        })
        .await
    }
}

/// The stored record of one scan: `None` when absent, `Some(Err)` when the
/// row is unreadable.
fn select_one(
    conn: &Connection,
    scan_id: &str,
) -> Result<Option<Result<ScanRecord, WalError>>, WalError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM scans WHERE scan_id = ?1"))?
        .query_row([scan_id], read_row)
        .optional()?)
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("wire types serialize")
}

/// RFC 3339 in UTC with all nine fraction digits: exact, and fixed width so
/// that text order is time order (`ORDER BY created_at`).
fn sortable(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("timestamp {text:?}: {e}"))
}

pub(crate) fn parse_status(text: &str) -> Option<ScanStatus> {
    [
        ScanStatus::Queued,
        ScanStatus::Running,
        ScanStatus::Done,
        ScanStatus::Failed,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
}

/// Reads one row of [`COLUMNS`]. The outer error is SQLite failing to read a
/// column; the inner one is a stored value that does not parse.
fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<ScanRecord, WalError>> {
    let scan_id: String = row.get(0)?;
    let status: String = row.get(2)?;
    let labels: String = row.get(5)?;
    let rule: Option<String> = row.get(9)?;
    let created_at: String = row.get(13)?;
    let completed_at: Option<String> = row.get(14)?;
    let reward: Option<String> = row.get(15)?;
    let user_id = row.get(1)?;
    let category = row.get(3)?;
    let confidence = row.get(4)?;
    let vision_model = row.get(6)?;
    let phash = row.get(7)?;
    let sha256 = row.get(8)?;
    let answer = row.get(10)?;
    let cached = row.get(11)?;
    let error = row.get(12)?;
    let parsed = (|| {
        let status = parse_status(&status).ok_or_else(|| format!("status {status:?}"))?;
        let labels: Vec<ScanLabel> =
            serde_json::from_str(&labels).map_err(|e| format!("labels: {e}"))?;
        let rule: Option<DisposalRule> = rule
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| format!("rule: {e}"))?;
        Ok(ScanRecord {
            scan_id: scan_id.clone(),
            user_id,
            status,
            category,
            confidence,
            labels,
            vision_model,
            phash,
            sha256,
            rule,
            answer,
            cached,
            reward: reward
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| format!("reward: {e}"))?,
            error,
            created_at: parse_time(&created_at)?,
            completed_at: completed_at.as_deref().map(parse_time).transpose()?,
        })
    })();
    Ok(parsed.map_err(|reason| WalError::BadRow {
        id: scan_id,
        reason,
    }))
}

#[cfg(test)]
mod tests {
    use bus::wire::Localized;

    use super::*;

    fn scan(scan_id: &str, status: ScanStatus, completed_at: DateTime<Utc>) -> ScanRecord {
        let text = |s: &str| Localized {
            ko: format!("{s} 한국어"),
            en: s.into(),
        };
        ScanRecord {
            scan_id: scan_id.into(),
            user_id: "u1".into(),
            status,
            category: Some("plastic".into()),
            confidence: Some(0.8125),
            labels: vec![ScanLabel {
                label: "water bottle".into(),
                score: 0.8125,
            }],
            vision_model: Some("local/mobilenet".into()),
            phash: Some("00ff00ff00ff00ff".into()),
            sha256: Some("ab".repeat(32)),
            rule: Some(DisposalRule {
                category: "plastic".into(),
                items: Default::default(),
                name: text("Plastic"),
                bin: text("Plastics bin"),
                steps: vec![text("Rinse"), text("Label off")],
                why: text("Recycled \"as is\"\n"),
            }),
            answer: Some("Rinse it.\u{1F642}".into()),
            cached: false,
            reward: None,
            error: None,
            created_at: completed_at - chrono::Duration::seconds(5),
            completed_at: Some(completed_at),
        }
    }

    #[tokio::test]
    async fn the_later_record_wins_and_a_repeat_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("persister-scans-{}", uuid::Uuid::new_v4()));
        let wal = Wal::open(&dir.join("buffer.db")).await.unwrap();
        let at = Utc::now();
        let mut failed = scan("s1", ScanStatus::Failed, at);
        failed.rule = None;
        failed.error = Some("vision timed out".into());
        let done = scan("s1", ScanStatus::Done, at + chrono::Duration::seconds(60));

        let stored = wal.insert_scans(vec![failed.clone()]).await.unwrap();
        assert_eq!(stored.inserted, 1);
        assert_eq!(wal.scan("s1").await.unwrap(), Some(failed.clone()));
        let pending = wal.unsynced_scans(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        // Copied to Postgres as revision 0 while the later record arrives.
        let stored = wal
            .insert_scans(vec![done.clone(), failed.clone(), done.clone()])
            .await
            .unwrap();
        assert_eq!(
            stored,
            ScanStored {
                inserted: 0,
                superseded: 1,
                unchanged: 2
            }
        );
        wal.mark_scans_synced(vec![("s1".into(), pending[0].revision)])
            .await
            .unwrap();
        // The stale mark did not hide the later record from the sync.
        let pending = wal.unsynced_scans(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].record, done);
        wal.mark_scans_synced(vec![("s1".into(), pending[0].revision)])
            .await
            .unwrap();
        assert!(wal.unsynced_scans(10).await.unwrap().is_empty());

        // A done record at the same instant as a failed one beats it.
        let tie_failed = scan("s2", ScanStatus::Failed, at);
        let tie_done = scan("s2", ScanStatus::Done, at);
        wal.insert_scans(vec![tie_done.clone(), tie_failed])
            .await
            .unwrap();
        assert_eq!(wal.scan("s2").await.unwrap(), Some(tie_done.clone()));

        assert_eq!(
            wal.user_scans("u1", 10).await.unwrap(),
            vec![done.clone(), tie_done]
        );
        assert_eq!(wal.user_scans("u1", 1).await.unwrap(), vec![done]);
        assert_eq!(wal.backlogs().await.unwrap().scans.pending, 1);

        // Retention purges synced scans only.
        let purged = wal
            .purge_synced(Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap();
        assert_eq!(purged, 1);
        assert_eq!(wal.scan("s1").await.unwrap(), None);
        assert!(wal.scan("s2").await.unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_buffer_from_before_rewards_gains_the_column_and_keeps_its_rows() {
        let dir = std::env::temp_dir().join(format!("persister-scans-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("buffer.db");
        {
            // The schema-2 file: `scans` without `reward`, one unsynced row.
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(&SCHEMA.replace(
                "    reward       TEXT,             -- JSON Reward, or NULL (none earned)\n",
                "",
            ))
            .unwrap();
            conn.execute(
                "INSERT INTO scans (scan_id, user_id, status, labels, cached, created_at, revision, ingested_at) \
                 VALUES ('old', 'u1', 'failed', '[]', 0, '2026-01-01T00:00:00.000000000Z', 0, 1)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
        }
        let wal = Wal::open(&path).await.unwrap();
        let old = wal.scan("old").await.unwrap().unwrap();
        assert_eq!(old.reward, None);
        let mut earned = scan("new", ScanStatus::Done, Utc::now());
        earned.reward = Some(bus::wire::Reward {
            character_id: "plasty".into(),
            name: Localized {
                ko: "플라스티".into(),
                en: "Plasty".into(),
            },
            new: false,
        });
        wal.insert_scans(vec![earned.clone()]).await.unwrap();
        assert_eq!(wal.scan("new").await.unwrap(), Some(earned));
        assert_eq!(wal.unsynced_scans(10).await.unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
