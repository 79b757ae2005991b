//! `history.scans` (a user's scans, newest first) and `history.scan` (one
//! scan by id), answered from Postgres plus this persister's SQLite buffer.
//!
//! Both stores can hold a record of the same scan, and not necessarily the
//! same one: an unsynced later record in SQLite, or a stale one SQLite
//! took in after Postgres had the later. Every answer keeps the later
//! record per scan ([`ScanRecord::supersedes`]), as the asker does across
//! persisters ([`bus::history::HistoryClient::scans`]). Another user's scan
//! is answered `not_found`, exactly like a scan that does not exist.

use std::collections::HashMap;

use bus::wire::{DisposalRule, HistoryScanRequest, HistoryScansRequest, ScanList, ScanRecord};
use sqlx::{PgPool, Row as _, postgres::PgRow, types::Json};

use super::{History, HistoryError};
use crate::wal::parse_scan_status;

/// Scans listed when the request sets no limit.
pub const DEFAULT_SCAN_LIMIT: u32 = 20;

const SCAN_COLUMNS: &str = "scan_id, user_id, status, category, confidence, labels, \
    vision_model, phash, sha256, rule, answer, cached, error, created_at, completed_at, reward";

/// Room left in a NATS message for everything but the scans themselves.
const REPLY_MARGIN: usize = 4 * 1024;

impl History {
    pub(super) async fn scans(&self, payload: &[u8]) -> Result<ScanList, HistoryError> {
        let request: HistoryScansRequest = serde_json::from_slice(payload)
            .map_err(|e| HistoryError::Invalid(format!("not a history.scans request: {e}")))?;
        if request.user_id.is_empty() {
            return Err(HistoryError::Invalid("user_id is empty".into()));
        }
        let limit = request
            .limit
            .unwrap_or(DEFAULT_SCAN_LIMIT)
            .clamp(1, bus::history::MAX_SCANS) as usize;
        let user = request.user_id.as_str();
        let remote = self
            .postgres(|pool| async move { pg_user_scans(&pool, user, limit).await })
            .await
            .unwrap_or_default();
        // The newest `limit` of the union are among the newest `limit` of each.
        let local = self.wal.user_scans(user, limit).await?;
        let mut by_id = HashMap::new();
        for scan in remote.into_iter().chain(local) {
            bus::history::keep_later(&mut by_id, scan);
        }
        let mut scans: Vec<ScanRecord> = by_id.into_values().collect();
        bus::history::sort_newest_first(&mut scans);
        scans.truncate(limit);
        Ok(ScanList {
            scans,
            truncated: false,
        })
    }

    pub(super) async fn scan(&self, payload: &[u8]) -> Result<ScanRecord, HistoryError> {
        let request: HistoryScanRequest = serde_json::from_slice(payload)
            .map_err(|e| HistoryError::Invalid(format!("not a history.scan request: {e}")))?;
        if request.user_id.is_empty() || request.scan_id.is_empty() {
            return Err(HistoryError::Invalid(
                "user_id and scan_id are required".into(),
            ));
        }
        let scan_id = request.scan_id.as_str();
        let remote = self
            .postgres(|pool| async move { pg_scan(&pool, scan_id).await })
            .await
            .flatten();
        let local = self.wal.scan(scan_id).await?;
        let best = match (remote, local) {
            (Some(remote), Some(local)) if local.supersedes(&remote) => Some(local),
            (Some(remote), _) => Some(remote),
            (None, local) => local,
        };
        best.filter(|scan| scan.user_id == request.user_id)
            .ok_or(HistoryError::NoScan)
    }
}

/// The most a reply may carry: the server's `max_payload` less a margin.
pub(super) fn reply_budget(client: &async_nats::Client) -> usize {
    client
        .server_info()
        .max_payload
        .saturating_sub(REPLY_MARGIN)
}

/// Drops the oldest scans until the list's JSON fits in `budget` bytes, and
/// says so in `truncated`. Listings of whole records are small (a scan is a
/// few KB, 100 of them well under the default 1 MB), so this only bites on a
/// server configured with a small `max_payload`.
pub(super) fn fit_list(mut list: ScanList, budget: usize) -> ScanList {
    // `{"scans":[` ... `],"truncated":true}` and one comma per record.
    let mut used = 40;
    let mut keep = 0;
    for scan in &list.scans {
        let size = serde_json::to_vec(scan).map_or(usize::MAX, |v| v.len()) + 1;
        if used + size > budget {
            break;
        }
        used += size;
        keep += 1;
    }
    if keep < list.scans.len() {
        tracing::warn!(
            kept = keep,
            dropped = list.scans.len() - keep,
            budget,
            "history.scans reply shortened to fit max_payload."
        );
        list.scans.truncate(keep);
        list.truncated = true;
    }
    list
}

/// Shortens the answer text of a record too large for one NATS message,
/// marking the cut with "…", so the scan is still readable; the full text
/// stays in Postgres.
pub(super) fn fit_one(mut scan: ScanRecord, budget: usize) -> ScanRecord {
    let size = serde_json::to_vec(&scan).map_or(usize::MAX, |v| v.len());
    if size <= budget {
        return scan;
    }
    if let Some(answer) = scan.answer.take() {
        let over = size - budget;
        // Every byte of text costs at least one on the wire (escapes cost
        // more), so cutting `over` bytes and room for the "…" is enough.
        let keep_bytes = answer.len().saturating_sub(over + '…'.len_utf8());
        let cut = (0..=keep_bytes)
            .rev()
            .find(|&i| answer.is_char_boundary(i))
            .unwrap_or(0);
        tracing::warn!(scan = %scan.scan_id, size, budget, "history.scan answer shortened to fit max_payload.");
        scan.answer = Some(format!("{}…", &answer[..cut]));
    }
    scan
}

async fn pg_user_scans(
    pool: &PgPool,
    user_id: &str,
    limit: usize,
) -> Result<Vec<ScanRecord>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SCAN_COLUMNS} FROM scans WHERE user_id = $1 \
         ORDER BY created_at DESC, scan_id DESC LIMIT $2"
    )))
    .bind(user_id)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?
    .iter()
    .map(scan_row)
    .collect()
}

async fn pg_scan(pool: &PgPool, scan_id: &str) -> Result<Option<ScanRecord>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SCAN_COLUMNS} FROM scans WHERE scan_id = $1"
    )))
    .bind(scan_id)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(scan_row)
    .transpose()
}

/// A `scans` row as the wire record.
pub fn scan_row(row: &PgRow) -> Result<ScanRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let Json(labels) = row.try_get("labels")?;
    let rule: Option<Json<DisposalRule>> = row.try_get("rule")?;
    let reward: Option<Json<bus::wire::Reward>> = row.try_get("reward")?;
    Ok(ScanRecord {
        scan_id: row.try_get("scan_id")?,
        user_id: row.try_get("user_id")?,
        status: parse_scan_status(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown scan status {status:?}").into()))?,
        category: row.try_get("category")?,
        confidence: row.try_get("confidence")?,
        labels,
        vision_model: row.try_get("vision_model")?,
        phash: row.try_get("phash")?,
        sha256: row.try_get("sha256")?,
        rule: rule.map(|Json(rule)| rule),
        answer: row.try_get("answer")?,
        cached: row.try_get("cached")?,
        reward: reward.map(|Json(reward)| reward),
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

#[cfg(test)]
mod tests {
    use bus::wire::ScanStatus;
    use chrono::Utc;

    use super::*;

    fn scan(n: usize, answer: &str) -> ScanRecord {
        ScanRecord {
            scan_id: format!("s{n}"),
            user_id: "u".into(),
            status: ScanStatus::Done,
            category: None,
            confidence: None,
            labels: Vec::new(),
            vision_model: None,
            phash: None,
            sha256: None,
            rule: None,
            answer: Some(answer.into()),
            cached: false,
            reward: None,
            error: None,
            created_at: Utc::now(),
            completed_at: None,
        }
    }

    #[test]
    fn a_list_too_large_for_one_message_loses_its_oldest_scans_and_says_so() {
        let list = ScanList {
            scans: (0..10).map(|n| scan(n, &"x".repeat(1000))).collect(),
            truncated: false,
        };
        let whole = serde_json::to_vec(&list).unwrap().len();
        assert_eq!(fit_list(list.clone(), whole + 100), list);

        let fitted = fit_list(list.clone(), 4000);
        assert!(fitted.truncated);
        assert!(!fitted.scans.is_empty() && fitted.scans.len() < 10);
        assert_eq!(fitted.scans[..], list.scans[..fitted.scans.len()]);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= 4000);
    }

    #[test]
    fn a_scan_too_large_for_one_message_has_its_answer_shortened() {
        let big = scan(1, &"가\"\n".repeat(2000));
        assert_eq!(fit_one(big.clone(), 1 << 20), big);
        let fitted = fit_one(big, 3000);
        assert!(serde_json::to_vec(&fitted).unwrap().len() <= 3000);
        assert!(fitted.answer.unwrap().ends_with('…'));
    }
}
