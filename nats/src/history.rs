//! Asking every persister for history, and merging their answers.
//!
//! Each persister answers from Postgres plus the rows only its own SQLite
//! file holds yet. With several persisters (scale-out), a turn acked by one
//! may not be in Postgres yet, so a complete answer needs all of them: the
//! request goes to every persister (no queue group), and the asker waits for
//! as many replies as there are live persisters, known from their heartbeats
//! in the `persisters` KV bucket. Answers are merged by `turn_id`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;

use crate::{
    streams::KV_PERSISTERS,
    subject,
    wire::{
        ConversationDetail, ConversationList, ConversationSummary, ErrorBody, HistoryGetRequest,
        HistoryListRequest, HistoryReply, HistoryScanRequest, HistoryScansRequest, ScanList,
        ScanRecord,
    },
};

/// How often a persister renews its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A persister not heard from for this long is no longer waited for.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(15);
/// How long [`HistoryClient::scans`] and [`HistoryClient::scan`] wait for
/// the live persisters' answers.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(3);
/// Most scans one `history.scans` answer holds; larger limits are capped.
pub const MAX_SCANS: u32 = 100;

/// Asks the live persisters; cheap to clone.
#[derive(Debug, Clone)]
pub struct HistoryClient {
    client: async_nats::Client,
    /// Persister instance -> when its heartbeat was last seen.
    live: Arc<Mutex<HashMap<String, Instant>>>,
}

impl HistoryClient {
    /// Starts following the persisters' heartbeats.
    ///
    /// # Errors
    /// When the `persisters` bucket is missing or cannot be watched.
    pub async fn start(
        client: async_nats::Client,
        js: &jetstream::Context,
    ) -> anyhow::Result<Self> {
        let kv = js
            .get_key_value(KV_PERSISTERS)
            .await
            .context("KV bucket persisters is missing")?;
        let mut watch = kv
            .watch_with_history(">")
            .await
            .context("cannot watch persister heartbeats")?;
        let live = Arc::new(Mutex::new(HashMap::new()));
        let seen = live.clone();
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let mut live = seen.lock().expect("live lock");
                match entry.operation {
                    jetstream::kv::Operation::Put => {
                        live.insert(entry.key, Instant::now());
                    }
                    _ => {
                        live.remove(&entry.key);
                    }
                }
            }
        });
        Ok(Self { client, live })
    }

    /// How many persisters should answer.
    fn expected(&self) -> usize {
        let mut live = self.live.lock().expect("live lock");
        live.retain(|_, seen| seen.elapsed() < HEARTBEAT_STALE);
        live.len().max(1)
    }

    async fn ask(
        &self,
        subject: &'static str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Bytes>> {
        let expected = self.expected();
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await?;
        self.client
            .publish_with_reply(subject, inbox, body.into())
            .await?;
        let mut out = Vec::with_capacity(expected);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < expected {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(message)) if message.status.is_none() => out.push(message.payload),
                // No responders, or the subscription ended.
                Ok(_) => break,
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// One conversation's turns from every persister, merged; `None` when no
    /// persister answered in time.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn get(
        &self,
        request: &HistoryGetRequest,
        timeout: Duration,
    ) -> anyhow::Result<Option<HistoryReply<ConversationDetail>>> {
        let replies = self
            .ask(subject::HISTORY_GET, serde_json::to_vec(request)?, timeout)
            .await?;
        Ok(merge_get(
            replies
                .iter()
                .filter_map(|r| serde_json::from_slice(r).ok())
                .collect(),
        ))
    }

    /// A user's conversations from every persister, merged.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn list(
        &self,
        request: &HistoryListRequest,
        timeout: Duration,
    ) -> anyhow::Result<Option<HistoryReply<ConversationList>>> {
        let replies = self
            .ask(subject::HISTORY_LIST, serde_json::to_vec(request)?, timeout)
            .await?;
        let limit = request.limit.unwrap_or(u32::MAX) as usize;
        Ok(merge_list(
            replies
                .iter()
                .filter_map(|r| serde_json::from_slice(r).ok())
                .collect(),
            limit,
        ))
    }
}

impl HistoryClient {
    /// A user's completed scans, newest first by `created_at`, at most
    /// `limit` (capped at [`MAX_SCANS`]), merged across every live persister
    /// by `scan_id` with the later record winning
    /// ([`ScanRecord::supersedes`]). Fewer than `limit` can come back when
    /// the persisters had to shorten their replies to fit a NATS message.
    ///
    /// # Errors
    /// When the request cannot be sent, no persister answered within
    /// [`SCAN_TIMEOUT`], or every answer was an error.
    pub async fn scans(&self, user_id: &str, limit: u32) -> anyhow::Result<Vec<ScanRecord>> {
        let limit = limit.clamp(1, MAX_SCANS);
        let request = HistoryScansRequest {
            user_id: user_id.to_owned(),
            limit: Some(limit),
        };
        let replies = self
            .ask(
                subject::HISTORY_SCANS,
                serde_json::to_vec(&request)?,
                SCAN_TIMEOUT,
            )
            .await?;
        let replies = replies
            .iter()
            .filter_map(|r| serde_json::from_slice(r).ok())
            .collect();
        match merge_scans(replies, limit as usize) {
            Some(HistoryReply::Ok(list)) => {
                if list.truncated {
                    tracing::debug!(
                        user_id,
                        returned = list.scans.len(),
                        "history.scans was shortened to fit a NATS message."
                    );
                }
                Ok(list.scans)
            }
            Some(HistoryReply::Err(body)) => Err(history_error(subject::HISTORY_SCANS, body)),
            None => anyhow::bail!("no persister answered {} in time", subject::HISTORY_SCANS),
        }
    }

    /// One scan, merged across every live persister with the later record
    /// winning. `None` when no persister has it, and also when it belongs to
    /// another user: the two are indistinguishable, so a caller cannot learn
    /// which scan ids exist.
    ///
    /// # Errors
    /// When the request cannot be sent, no persister answered within
    /// [`SCAN_TIMEOUT`], or every answer was an error other than `not_found`.
    pub async fn scan(&self, user_id: &str, scan_id: &str) -> anyhow::Result<Option<ScanRecord>> {
        let request = HistoryScanRequest {
            user_id: user_id.to_owned(),
            scan_id: scan_id.to_owned(),
        };
        let replies = self
            .ask(
                subject::HISTORY_SCAN,
                serde_json::to_vec(&request)?,
                SCAN_TIMEOUT,
            )
            .await?;
        let replies = replies
            .iter()
            .filter_map(|r| serde_json::from_slice(r).ok())
            .collect();
        match merge_scan(replies) {
            // The persisters check the owner; checking again costs nothing.
            Some(HistoryReply::Ok(record)) if record.user_id == user_id => Ok(Some(record)),
            Some(HistoryReply::Ok(_)) => Ok(None),
            Some(HistoryReply::Err(body)) if body.error.code == "not_found" => Ok(None),
            Some(HistoryReply::Err(body)) => Err(history_error(subject::HISTORY_SCAN, body)),
            None => anyhow::bail!("no persister answered {} in time", subject::HISTORY_SCAN),
        }
    }
}

fn history_error(subject: &str, body: ErrorBody) -> anyhow::Error {
    anyhow::anyhow!(
        "{subject} failed: {} ({})",
        body.error.message,
        body.error.code
    )
}

/// Unions scan listings by `scan_id`, keeping the later record of each
/// ([`ScanRecord::supersedes`]), newest first by `created_at`, at most
/// `limit`. `truncated` is set when any persister shortened its reply.
/// Errors win only when nobody answered.
pub fn merge_scans(
    replies: Vec<HistoryReply<ScanList>>,
    limit: usize,
) -> Option<HistoryReply<ScanList>> {
    let mut by_id: HashMap<String, ScanRecord> = HashMap::new();
    let mut error = None;
    let mut any_ok = false;
    let mut truncated = false;
    for reply in replies {
        match reply {
            HistoryReply::Ok(list) => {
                any_ok = true;
                truncated |= list.truncated;
                for scan in list.scans {
                    keep_later(&mut by_id, scan);
                }
            }
            HistoryReply::Err(body) => error = Some(body),
        }
    }
    if !any_ok {
        return error.map(HistoryReply::Err);
    }
    let mut scans: Vec<ScanRecord> = by_id.into_values().collect();
    sort_newest_first(&mut scans);
    scans.truncate(limit);
    Some(HistoryReply::Ok(ScanList { scans, truncated }))
}

/// The later of the records the persisters hold for one scan. A scan one
/// persister does not know (`not_found`) while another holds it unsynced is
/// found; errors other than `not_found` outrank it only when nobody has the
/// scan.
pub fn merge_scan(replies: Vec<HistoryReply<ScanRecord>>) -> Option<HistoryReply<ScanRecord>> {
    let mut best: Option<ScanRecord> = None;
    let mut error: Option<ErrorBody> = None;
    for reply in replies {
        match reply {
            HistoryReply::Ok(record) => {
                if best.as_ref().is_none_or(|b| record.supersedes(b)) {
                    best = Some(record);
                }
            }
            HistoryReply::Err(body) => {
                // Something failed is more useful than "not here".
                if error.as_ref().is_none_or(|e| e.error.code == "not_found") {
                    error = Some(body);
                }
            }
        }
    }
    match best {
        Some(record) => Some(HistoryReply::Ok(record)),
        None => error.map(HistoryReply::Err),
    }
}

/// Inserts `scan`, or replaces the record held for its id when `scan` is later.
pub fn keep_later(by_id: &mut HashMap<String, ScanRecord>, scan: ScanRecord) {
    match by_id.get(&scan.scan_id) {
        Some(held) if !scan.supersedes(held) => {}
        _ => {
            by_id.insert(scan.scan_id.clone(), scan);
        }
    }
}

/// Newest first by `created_at`; ties by `scan_id`, descending, so every
/// persister and the merge agree on the order.
pub fn sort_newest_first(scans: &mut [ScanRecord]) {
    scans.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.scan_id.cmp(&a.scan_id))
    });
}

/// Unions the turns of every successful reply by `turn_id`, oldest first. A
/// conversation one persister does not know (`not_found`) while another
/// holds its unsynced turns is found; errors win only when nobody answered.
pub fn merge_get(
    replies: Vec<HistoryReply<ConversationDetail>>,
) -> Option<HistoryReply<ConversationDetail>> {
    let mut merged: Option<ConversationDetail> = None;
    let mut error = None;
    for reply in replies {
        match reply {
            HistoryReply::Ok(detail) => match &mut merged {
                None => merged = Some(detail),
                Some(into) => {
                    for turn in detail.turns {
                        if !into.turns.iter().any(|t| t.turn_id == turn.turn_id) {
                            into.turns.push(turn);
                        }
                    }
                }
            },
            // Forbidden outranks not_found, which outranks unavailable.
            HistoryReply::Err(body) => {
                let rank = |code: &str| match code {
                    "forbidden" => 3,
                    "invalid_request" => 2,
                    "not_found" => 1,
                    _ => 0,
                };
                if error.as_ref().is_none_or(|e: &crate::wire::ErrorBody| {
                    rank(&body.error.code) > rank(&e.error.code)
                }) {
                    error = Some(body);
                }
            }
        }
    }
    match (merged, error) {
        (_, Some(e)) if e.error.code == "forbidden" => Some(HistoryReply::Err(e)),
        (Some(mut detail), _) => {
            detail.turns.sort_by(|a, b| {
                a.created_at
                    .cmp(&b.created_at)
                    .then(a.turn_id.cmp(&b.turn_id))
            });
            Some(HistoryReply::Ok(detail))
        }
        (None, error) => error.map(HistoryReply::Err),
    }
}

/// Unions conversation listings by id, newest first, at most `limit`.
/// A conversation's `turns` is the largest count any persister saw: exact
/// once every turn is in Postgres, a lower bound while some are unsynced on
/// different persisters.
pub fn merge_list(
    replies: Vec<HistoryReply<ConversationList>>,
    limit: usize,
) -> Option<HistoryReply<ConversationList>> {
    let mut by_id: HashMap<String, ConversationSummary> = HashMap::new();
    let mut error = None;
    let mut any_ok = false;
    for reply in replies {
        match reply {
            HistoryReply::Ok(list) => {
                any_ok = true;
                for c in list.conversations {
                    by_id
                        .entry(c.conversation_id.clone())
                        .and_modify(|m| {
                            m.turns = m.turns.max(c.turns);
                            m.created_at = m.created_at.min(c.created_at);
                            m.updated_at = m.updated_at.max(c.updated_at);
                        })
                        .or_insert(c);
                }
            }
            HistoryReply::Err(body) => error = Some(body),
        }
    }
    if !any_ok {
        return error.map(HistoryReply::Err);
    }
    let mut conversations: Vec<_> = by_id.into_values().collect();
    conversations.sort_by_key(|c| std::cmp::Reverse(c.updated_at));
    conversations.truncate(limit);
    Some(HistoryReply::Ok(ConversationList { conversations }))
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::wire::{ErrorDetail, ScanStatus};

    fn scan(id: &str, status: ScanStatus, created: i64, completed: Option<i64>) -> ScanRecord {
        let at = |s: i64| DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).unwrap();
        ScanRecord {
            scan_id: id.into(),
            user_id: "u".into(),
            status,
            category: None,
            confidence: None,
            labels: Vec::new(),
            vision_model: None,
            phash: None,
            sha256: None,
            rule: None,
            answer: None,
            cached: false,
            error: None,
            created_at: at(created),
            completed_at: completed.map(at),
        }
    }

    fn error(code: &str) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: code.into(),
            },
        }
    }

    #[test]
    fn the_later_record_supersedes_and_done_wins_a_tie() {
        let failed = scan("s", ScanStatus::Failed, 0, Some(10));
        let done_later = scan("s", ScanStatus::Done, 0, Some(20));
        let done_same = scan("s", ScanStatus::Done, 0, Some(10));
        let unfinished = scan("s", ScanStatus::Running, 0, None);
        assert!(done_later.supersedes(&failed));
        assert!(!failed.supersedes(&done_later));
        assert!(done_same.supersedes(&failed));
        assert!(!failed.supersedes(&done_same));
        assert!(!failed.supersedes(&failed.clone()), "a repeat is a no-op");
        assert!(failed.supersedes(&unfinished));
        // A sub-microsecond difference is not "later": Postgres could not tell.
        let mut nanos = failed.clone();
        nanos.completed_at = nanos
            .completed_at
            .map(|t| t + chrono::Duration::nanoseconds(999));
        assert!(!nanos.supersedes(&failed));
    }

    #[test]
    fn scan_listings_merge_by_id_keep_the_later_record_newest_first() {
        let a_failed = scan("a", ScanStatus::Failed, 1, Some(5));
        let a_done = scan("a", ScanStatus::Done, 1, Some(9));
        let b = scan("b", ScanStatus::Done, 3, Some(4));
        let c = scan("c", ScanStatus::Done, 2, Some(4));
        let merged = merge_scans(
            vec![
                HistoryReply::Ok(ScanList {
                    scans: vec![b.clone(), a_done.clone()],
                    truncated: false,
                }),
                HistoryReply::Err(error("unavailable")),
                HistoryReply::Ok(ScanList {
                    scans: vec![c.clone(), a_failed],
                    truncated: true,
                }),
            ],
            10,
        );
        assert_eq!(
            merged,
            Some(HistoryReply::Ok(ScanList {
                scans: vec![b.clone(), c, a_done],
                truncated: true,
            }))
        );
        let Some(HistoryReply::Ok(one)) = merge_scans(
            vec![HistoryReply::Ok(ScanList {
                scans: vec![b.clone()],
                truncated: false,
            })],
            1,
        ) else {
            panic!("one answer is an answer");
        };
        assert_eq!(one.scans, [b]);
        assert_eq!(
            merge_scans(vec![HistoryReply::Err(error("unavailable"))], 10),
            Some(HistoryReply::Err(error("unavailable")))
        );
        assert_eq!(merge_scans(Vec::new(), 10), None);
    }

    #[test]
    fn one_scan_merges_to_the_later_record_and_not_found_yields_to_it() {
        let failed = scan("s", ScanStatus::Failed, 0, Some(10));
        let done = scan("s", ScanStatus::Done, 0, Some(12));
        assert_eq!(
            merge_scan(vec![
                HistoryReply::Ok(done.clone()),
                HistoryReply::Err(error("not_found")),
                HistoryReply::Ok(failed),
            ]),
            Some(HistoryReply::Ok(done))
        );
        assert_eq!(
            merge_scan(vec![
                HistoryReply::Err(error("not_found")),
                HistoryReply::Err(error("unavailable")),
                HistoryReply::Err(error("not_found")),
            ]),
            Some(HistoryReply::Err(error("unavailable")))
        );
        assert_eq!(merge_scan(Vec::new()), None);
    }
}
