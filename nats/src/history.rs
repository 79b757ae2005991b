//! Asking every persister for history, and merging their answers.
//!
//! Each persister answers from Postgres plus the rows only its own SQLite
//! file holds yet. With several persisters (scale-out), a turn acked by one
//! may not be in Postgres yet, so a complete answer needs all of them: the
//! request goes to every persister (no queue group), and the asker waits for
//! as many replies as there are live persisters, known from their heartbeats
//! in the `persisters` KV bucket. Answers are merged by `turn_id`.
//!
//! A conversation is read in pages ([`TurnCursor`], [`merge_get`]), never
//! whole: a reply larger than the server's max payload would be dropped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;

use crate::{
    streams::KV_PERSISTERS,
    subject,
    wire::{
        ConversationDetail, ConversationList, ConversationSummary, ErrorBody, HistoryGetRequest,
        HistoryListRequest, HistoryReply, HistoryScanRequest, HistoryScansRequest, ScanList,
        ScanRecord, TurnRecord,
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
/// Conversations in a `history.list` answer when the request sets no limit.
pub const DEFAULT_CONVERSATIONS: u32 = 50;
/// Most conversations one `history.list` answer holds.
pub const MAX_CONVERSATIONS: u32 = 200;
/// Turns in a `history.get` page when the request sets no limit.
pub const DEFAULT_TURNS: u32 = 50;
/// Most turns one `history.get` page holds; larger limits are capped.
pub const MAX_TURNS: u32 = 200;

/// The number of turns a `history.get` page asking for `limit` holds at most.
pub fn page_limit(limit: Option<u32>) -> u32 {
    limit.unwrap_or(DEFAULT_TURNS).clamp(1, MAX_TURNS)
}

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
    pub(crate) fn expected(&self) -> usize {
        let mut live = self.live.lock().expect("live lock");
        live.retain(|_, seen| seen.elapsed() < HEARTBEAT_STALE);
        live.len().max(1)
    }

    pub(crate) async fn ask(
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

    /// One page of a conversation's turns from every persister, merged
    /// ([`merge_get`]); `None` when no persister answered in time.
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
            page_limit(request.limit) as usize,
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

/// A position in a conversation's turn order, which is `created_at` to the
/// microsecond, then `turn_id` (bytewise). Microseconds because Postgres
/// keeps no finer, so a turn read from Postgres and the same turn read from
/// a persister's SQLite file sit at the same place. On the wire (`before`,
/// `next_cursor`) it is `<micros>_<turn_id>`, opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TurnCursor {
    micros: i64,
    turn_id: String,
}

impl TurnCursor {
    /// Where `turn` sits.
    pub fn of(turn: &TurnRecord) -> Self {
        Self::at(turn.created_at, &turn.turn_id)
    }

    /// The position of a turn created at `created_at` with id `turn_id`.
    pub fn at(created_at: DateTime<Utc>, turn_id: &str) -> Self {
        Self {
            micros: created_at.timestamp_micros(),
            turn_id: turn_id.to_owned(),
        }
    }

    /// Reads a cursor this module wrote; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (micros, turn_id) = text.split_once('_')?;
        subject::token(turn_id).ok()?;
        Some(Self {
            micros: micros.parse().ok()?,
            turn_id: turn_id.to_owned(),
        })
    }

    /// `created_at` to the microsecond.
    pub fn created_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.micros).unwrap_or_default()
    }

    /// The turn id.
    pub fn turn_id(&self) -> &str {
        &self.turn_id
    }
}

impl std::fmt::Display for TurnCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.micros, self.turn_id)
    }
}

/// Sorts turns oldest first, in [`TurnCursor`] order.
pub fn sort_oldest_first(turns: &mut [TurnRecord]) {
    turns.sort_by(|a, b| {
        (a.created_at.timestamp_micros(), &a.turn_id)
            .cmp(&(b.created_at.timestamp_micros(), &b.turn_id))
    });
}

/// Unions the pages every persister answered into one page of at most
/// `limit` turns, oldest first. A page that says `has_more` covers only back
/// to its oldest turn: older turns from other pages are left for the next
/// page, since that persister may hold (unsynced) turns among them. A
/// conversation one persister does not know (`not_found`) while another
/// holds its unsynced turns is found; errors win only when nobody answered.
pub fn merge_get(
    replies: Vec<HistoryReply<ConversationDetail>>,
    limit: usize,
) -> Option<HistoryReply<ConversationDetail>> {
    let mut merged: Option<ConversationDetail> = None;
    let mut by_id: HashMap<String, TurnRecord> = HashMap::new();
    // The newest of the oldest positions the cut-short pages reach.
    let mut covered_from: Option<TurnCursor> = None;
    let mut error = None;
    for reply in replies {
        match reply {
            HistoryReply::Ok(mut detail) => {
                if detail.has_more
                    && let Some(oldest) = detail.turns.iter().map(TurnCursor::of).min()
                {
                    covered_from = covered_from.max(Some(oldest));
                }
                for turn in std::mem::take(&mut detail.turns) {
                    by_id.entry(turn.turn_id.clone()).or_insert(turn);
                }
                merged.get_or_insert(detail);
            }
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
            let mut turns: Vec<TurnRecord> = by_id
                .into_values()
                .filter(|t| {
                    covered_from
                        .as_ref()
                        .is_none_or(|c| TurnCursor::of(t) >= *c)
                })
                .collect();
            sort_oldest_first(&mut turns);
            let over = turns.len().saturating_sub(limit.max(1));
            turns.drain(..over);
            detail.has_more = (covered_from.is_some() || over > 0) && !turns.is_empty();
            detail.next_cursor = detail
                .has_more
                .then(|| TurnCursor::of(&turns[0]).to_string());
            detail.turns = turns;
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
            reward: None,
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

    fn turn(n: i64) -> TurnRecord {
        let at = DateTime::<Utc>::from_timestamp(1_700_000_000 + n, 0).unwrap();
        TurnRecord {
            turn_id: format!("t{n}"),
            conversation_id: "c".into(),
            user_id: "u".into(),
            request_id: format!("r{n}"),
            model: "m".into(),
            user_text: "q".into(),
            assistant_text: "a".into(),
            finish_reason: crate::wire::FinishReason::Stop,
            usage: crate::wire::Usage::default(),
            sources: Vec::new(),
            error: None,
            created_at: at,
            first_token_at: None,
            completed_at: at,
        }
    }

    fn page(turns: &[i64], has_more: bool) -> HistoryReply<ConversationDetail> {
        HistoryReply::Ok(ConversationDetail {
            conversation_id: "c".into(),
            turns: turns.iter().map(|&n| turn(n)).collect(),
            has_more,
            next_cursor: None,
        })
    }

    fn ids(reply: Option<HistoryReply<ConversationDetail>>) -> (Vec<String>, Option<String>) {
        let Some(HistoryReply::Ok(detail)) = reply else {
            panic!("no page: {reply:?}");
        };
        assert_eq!(detail.has_more, detail.next_cursor.is_some());
        let ids = detail.turns.iter().map(|t| t.turn_id.clone()).collect();
        (ids, detail.next_cursor)
    }

    #[test]
    fn cursors_order_by_microsecond_then_id_and_read_back_what_they_wrote() {
        let a = TurnCursor::of(&turn(1));
        let mut same_micros = turn(1);
        same_micros.created_at += chrono::Duration::nanoseconds(999);
        assert_eq!(TurnCursor::of(&same_micros), a, "Postgres keeps no finer");
        same_micros.turn_id = "t1b".into();
        assert!(TurnCursor::of(&same_micros) > a);
        assert!(TurnCursor::of(&turn(2)) > TurnCursor::of(&same_micros));
        assert_eq!(TurnCursor::parse(&a.to_string()), Some(a.clone()));
        assert_eq!(a.created_at(), turn(1).created_at);
        for bad in ["", "t1", "x_t1", "1_", "1_a.b", "1_a b"] {
            assert_eq!(TurnCursor::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pages_merge_only_as_far_back_as_every_cut_short_page_reaches() {
        // One persister stopped at t5 (more before it); another has unsynced
        // t4 and t2: they belong to the next page, not this one.
        let merged = merge_get(vec![page(&[5, 6, 7], true), page(&[2, 4, 6], false)], 50);
        let (turns, cursor) = ids(merged);
        assert_eq!(turns, ["t5", "t6", "t7"]);
        assert_eq!(cursor, Some(TurnCursor::of(&turn(5)).to_string()));
        // The limit keeps the newest.
        let (turns, cursor) = ids(merge_get(
            vec![page(&[1, 2, 3], false), page(&[3, 4], false)],
            2,
        ));
        assert_eq!(turns, ["t3", "t4"]);
        assert_eq!(cursor, Some(TurnCursor::of(&turn(3)).to_string()));
        // Complete pages: everything, no cursor.
        let (turns, cursor) = ids(merge_get(vec![page(&[1, 3], false), page(&[2], false)], 50));
        assert_eq!(
            (turns, cursor),
            (vec!["t1".into(), "t2".into(), "t3".into()], None)
        );
        let (turns, cursor) = ids(merge_get(vec![page(&[], false)], 50));
        assert_eq!((turns.len(), cursor), (0, None));
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
