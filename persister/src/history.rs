//! Answering history requests: `history.list` and `history.get` (turns),
//! `history.scans` and `history.scan` ([`scans`]) over core NATS
//! request-reply. Every persister answers every request (no queue
//! group): with several persisters each SQLite file holds different unsynced
//! turns, and the asker ([`bus::history::HistoryClient`]) merges the answers
//! of all live persisters, which announce themselves with [`heartbeat`].
//!
//! It owns reading turns back. An answer is Postgres plus what only SQLite
//! holds yet (rows not synced), so a turn is readable as soon as it was acked.
//! While Postgres is unreachable it answers from SQLite alone, which keeps
//! every turn of the retention period. The gateway checks ownership before it
//! asks; this checks again, because the streamer asks too.

use anyhow::Context as _;
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use bus::{
    history::TurnCursor,
    wire::{
        ConversationDetail, ConversationList, ConversationSummary, HistoryGetRequest,
        HistoryListRequest, HistoryReply, TurnRecord, Usage,
    },
};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use sqlx::{PgPool, Row as _, postgres::PgRow};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    error::WalError,
    sync::SyncStatus,
    wal::{Wal, parse_finish_reason},
};

/// Longest a title is, in characters.
pub const TITLE_CHARS: usize = 60;
/// How long a history read waits for Postgres before answering from SQLite.
const POSTGRES_TIMEOUT: Duration = Duration::from_secs(1);
/// Requests answered at once by this process.
const CONCURRENCY: usize = 32;

const TURN_COLUMNS: &str = "turn_id, conversation_id, user_id, request_id, model, \
    finish_reason, user_text, assistant_text, prompt_tokens, completion_tokens, error, \
    created_at, first_token_at, completed_at, sources";

/// Announces this persister in the `persisters` KV bucket until `shutdown`,
/// then withdraws, so history askers know how many answers to wait for. A
/// bucket made again gets `replicas` replicas.
///
/// # Errors
/// When the bucket is missing.
pub async fn heartbeat(
    js: async_nats::jetstream::Context,
    replicas: u8,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config =
        bus::streams::bucket(bus::streams::KV_PERSISTERS).context("no persisters bucket")?;
    let mut kv = js.get_key_value(bus::streams::KV_PERSISTERS).await?;
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let mut tick = tokio::time::interval(bus::history::HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                if let Err(error) = kv.put(&instance, bytes::Bytes::new()).await {
                    tracing::warn!(%error, "Persister heartbeat failed.");
                    // The bucket may be gone (a deployment whose bucket was
                    // in memory, across a nats-server restart): make it again.
                    if let Ok(store) = bus::streams::ensure_bucket(&js, config.clone(), replicas).await {
                        kv = store;
                    }
                }
            }
        }
    }
    let _ = kv.delete(&instance).await;
    Ok(())
}

/// The history responder and what it reads from.
#[derive(Debug, Clone)]
pub struct History {
    /// Where requests arrive and replies go.
    pub client: async_nats::Client,
    /// Turns not yet in Postgres (and recent ones that are).
    pub wal: Wal,
    /// The system of record.
    pub pool: PgPool,
    /// Whether Postgres is worth asking right now.
    pub status: Arc<SyncStatus>,
}

mod scans;

#[derive(Debug, Clone, Copy)]
enum Kind {
    List,
    Get,
    Scans,
    Scan,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
enum HistoryError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such conversation")]
    NotFound,
    /// Also the answer for another user's scan, so scan ids cannot be probed.
    #[error("no such scan")]
    NoScan,
    #[error("this conversation belongs to another user")]
    Forbidden,
    #[error("history is unavailable; try again")]
    Unavailable(#[from] WalError),
}

impl HistoryError {
    fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request",
            Self::NotFound | Self::NoScan => "not_found",
            Self::Forbidden => "forbidden",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

impl History {
    /// Answers requests until `shutdown` fires, then lets the answers in
    /// flight finish.
    ///
    /// # Errors
    /// When the subscriptions cannot be made.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut list = self.client.subscribe(bus::subject::HISTORY_LIST).await?;
        let mut get = self.client.subscribe(bus::subject::HISTORY_GET).await?;
        let mut scans = self.client.subscribe(bus::subject::HISTORY_SCANS).await?;
        let mut scan = self.client.subscribe(bus::subject::HISTORY_SCAN).await?;
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        let tracker = TaskTracker::new();
        loop {
            let (message, kind) = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(message) = list.next() => (message, Kind::List),
                Some(message) = get.next() => (message, Kind::Get),
                Some(message) = scans.next() => (message, Kind::Scans),
                Some(message) = scan.next() => (message, Kind::Scan),
                else => break,
            };
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit.expect("semaphore never closes"),
            };
            let this = self.clone();
            tracker.spawn(async move {
                this.answer(message, kind).await;
                drop(permit);
            });
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    async fn answer(&self, message: async_nats::Message, kind: Kind) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let body = match kind {
            Kind::List => encode(self.list(&message.payload).await),
            Kind::Get => encode(self.get(&message.payload).await),
            Kind::Scans => {
                let budget = scans::reply_budget(&self.client);
                encode(
                    self.scans(&message.payload)
                        .await
                        .map(|list| scans::fit_list(list, budget)),
                )
            }
            Kind::Scan => {
                let budget = scans::reply_budget(&self.client);
                encode(
                    self.scan(&message.payload)
                        .await
                        .map(|scan| scans::fit_one(scan, budget)),
                )
            }
        };
        if let Err(error) = self.client.publish(reply, body.into()).await {
            tracing::debug!(%error, "History reply not sent.");
        }
    }

    async fn list(&self, payload: &[u8]) -> Result<ConversationList, HistoryError> {
        let request: HistoryListRequest = serde_json::from_slice(payload)
            .map_err(|e| HistoryError::Invalid(format!("not a history.list request: {e}")))?;
        if request.user_id.is_empty() {
            return Err(HistoryError::Invalid("user_id is empty".into()));
        }
        let limit = request
            .limit
            .unwrap_or(bus::history::DEFAULT_CONVERSATIONS)
            .clamp(1, bus::history::MAX_CONVERSATIONS) as usize;
        let user = request.user_id.as_str();
        let mut summaries: HashMap<String, Summary> = HashMap::new();
        let from_postgres = self
            .postgres(|pool| async move { pg_list(&pool, user, limit).await })
            .await;
        match from_postgres {
            Some(rows) => {
                for summary in rows {
                    summaries.insert(summary.conversation_id.clone(), summary);
                }
                // Add what only SQLite has. A row synced but not yet marked
                // would count twice, so ask Postgres which it already has.
                let local = self.wal.user_turns(user, true).await?;
                let ids: Vec<String> = local.iter().map(|t| t.turn_id.clone()).collect();
                let known: HashSet<String> = if ids.is_empty() {
                    HashSet::new()
                } else {
                    self.postgres(|pool| async move { pg_existing(&pool, &ids).await })
                        .await
                        .unwrap_or_default()
                };
                let local: Vec<_> = local
                    .into_iter()
                    .filter(|t| !known.contains(&t.turn_id))
                    .collect();
                // A conversation outside Postgres's top `limit` that has a new
                // local turn needs its Postgres part too.
                let missing: Vec<String> = local
                    .iter()
                    .map(|t| t.conversation_id.clone())
                    .filter(|c| !summaries.contains_key(c))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                if !missing.is_empty() {
                    let extra = self
                        .postgres(|pool| async move { pg_summaries(&pool, user, &missing).await })
                        .await
                        .unwrap_or_default();
                    for summary in extra {
                        summaries.insert(summary.conversation_id.clone(), summary);
                    }
                }
                for turn in &local {
                    add_turn(&mut summaries, turn);
                }
            }
            None => {
                for turn in &self.wal.user_turns(user, false).await? {
                    add_turn(&mut summaries, turn);
                }
            }
        }
        let mut conversations: Vec<ConversationSummary> =
            summaries.into_values().map(Summary::finish).collect();
        conversations.sort_by(|a, b| {
            b.updated_at
                .cmp(&a.updated_at)
                .then_with(|| a.conversation_id.cmp(&b.conversation_id))
        });
        conversations.truncate(limit);
        Ok(ConversationList { conversations })
    }

    async fn get(&self, payload: &[u8]) -> Result<ConversationDetail, HistoryError> {
        let request: HistoryGetRequest = serde_json::from_slice(payload)
            .map_err(|e| HistoryError::Invalid(format!("not a history.get request: {e}")))?;
        if request.user_id.is_empty() || request.conversation_id.is_empty() {
            return Err(HistoryError::Invalid(
                "user_id and conversation_id are required".into(),
            ));
        }
        let limit = bus::history::page_limit(request.limit) as usize;
        let before = match request.before.as_deref() {
            Some(text) => Some(TurnCursor::parse(text).ok_or_else(|| {
                HistoryError::Invalid(format!("{text:?} is not a history cursor"))
            })?),
            None => None,
        };
        let conversation = request.conversation_id.as_str();
        // SQLite before Postgres: a row the sync marks synced after this read
        // was in Postgres before the read below, so no turn falls between.
        let unsynced = self.wal.conversation_turns(conversation, true).await?;
        let from = before.as_ref();
        let from_postgres = self
            .postgres(|pool| async move { pg_get(&pool, conversation, from, limit + 1).await })
            .await;
        let (owner, remote, local) = match from_postgres {
            Some((owner, remote)) => (owner, remote, unsynced),
            None => (
                None,
                Vec::new(),
                self.wal.conversation_turns(conversation, false).await?,
            ),
        };
        // Every turn of a conversation has its owner's user_id.
        let owner = owner.or_else(|| {
            remote
                .iter()
                .chain(&local)
                .next()
                .map(|t| t.user_id.clone())
        });
        match owner {
            None => return Err(HistoryError::NotFound),
            Some(owner) if owner != request.user_id => return Err(HistoryError::Forbidden),
            Some(_) => {}
        }
        // Keyed by turn id: a turn in both places appears once.
        let mut turns: HashMap<String, TurnRecord> =
            remote.into_iter().map(|t| (t.turn_id.clone(), t)).collect();
        for turn in local {
            turns.entry(turn.turn_id.clone()).or_insert(turn);
        }
        let mut turns: Vec<TurnRecord> = turns
            .into_values()
            .filter(|t| from.is_none_or(|b| TurnCursor::of(t) < *b))
            .collect();
        bus::history::sort_oldest_first(&mut turns);
        turns.reverse();
        let mut has_more = turns.len() > limit;
        turns.truncate(limit);
        let wanted = request.max_bytes.map_or(usize::MAX, |b| b as usize);
        let (mut turns, cut) = fit_page(turns, scans::reply_budget(&self.client), wanted);
        has_more |= cut;
        turns.reverse();
        Ok(ConversationDetail {
            next_cursor: has_more
                .then(|| turns.first().map(|t| TurnCursor::of(t).to_string()))
                .flatten(),
            has_more,
            conversation_id: request.conversation_id,
            turns,
        })
    }

    /// Runs a Postgres read when Postgres is reachable, within
    /// [`POSTGRES_TIMEOUT`]; `None` means "answer from SQLite".
    async fn postgres<'a, T, F, Fut>(&self, read: F) -> Option<T>
    where
        F: FnOnce(PgPool) -> Fut + 'a,
        Fut: Future<Output = Result<T, sqlx::Error>> + 'a,
    {
        if !self.status.reachable() {
            return None;
        }
        match tokio::time::timeout(POSTGRES_TIMEOUT, read(self.pool.clone())).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                tracing::warn!(%error, "History read from Postgres failed; answering from SQLite.");
                None
            }
            Err(_) => {
                tracing::warn!("History read from Postgres timed out; answering from SQLite.");
                None
            }
        }
    }
}

fn encode<T: serde::Serialize>(result: Result<T, HistoryError>) -> Vec<u8> {
    let reply = match result {
        Ok(value) => HistoryReply::Ok(value),
        Err(error) => {
            if let HistoryError::Unavailable(cause) = &error {
                tracing::warn!(error = %cause, "History read from SQLite failed.");
            }
            HistoryReply::error(error.code(), error.to_string())
        }
    };
    serde_json::to_vec(&reply).expect("history replies serialize")
}

/// A conversation being summarised.
#[derive(Debug, Clone)]
struct Summary {
    conversation_id: String,
    /// The earliest turn's user text, and when that turn was created.
    first: Option<(DateTime<Utc>, String)>,
    turns: u32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl Summary {
    fn finish(self) -> ConversationSummary {
        ConversationSummary {
            title: title(self.first.as_ref().map_or("", |(_, text)| text)),
            conversation_id: self.conversation_id,
            turns: self.turns,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

fn add_turn(summaries: &mut HashMap<String, Summary>, turn: &TurnRecord) {
    let summary = summaries
        .entry(turn.conversation_id.clone())
        .or_insert_with(|| Summary {
            conversation_id: turn.conversation_id.clone(),
            first: None,
            turns: 0,
            created_at: turn.created_at,
            updated_at: turn.completed_at,
        });
    summary.turns += 1;
    summary.created_at = summary.created_at.min(turn.created_at);
    summary.updated_at = summary.updated_at.max(turn.completed_at);
    if summary
        .first
        .as_ref()
        .is_none_or(|(at, _)| turn.created_at < *at)
    {
        summary.first = Some((turn.created_at, turn.user_text.clone()));
    }
}

/// The first user message on one line, at most [`TITLE_CHARS`] characters.
pub fn title(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= TITLE_CHARS {
        line
    } else {
        let cut: String = line.chars().take(TITLE_CHARS - 1).collect();
        format!("{}…", cut.trim_end())
    }
}

async fn pg_list(pool: &PgPool, user_id: &str, limit: usize) -> Result<Vec<Summary>, sqlx::Error> {
    sqlx::query(
        "SELECT c.conversation_id, c.created_at, c.updated_at,
                (SELECT count(*) FROM turns t WHERE t.conversation_id = c.conversation_id) AS turns,
                (SELECT t.user_text FROM turns t WHERE t.conversation_id = c.conversation_id
                 ORDER BY t.created_at, t.turn_id LIMIT 1) AS first_text
         FROM conversations c
         WHERE c.user_id = $1
         ORDER BY c.updated_at DESC, c.conversation_id
         LIMIT $2",
    )
    .bind(user_id)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?
    .iter()
    .map(summary_row)
    .collect()
}

async fn pg_summaries(
    pool: &PgPool,
    user_id: &str,
    conversation_ids: &[String],
) -> Result<Vec<Summary>, sqlx::Error> {
    sqlx::query(
        "SELECT c.conversation_id, c.created_at, c.updated_at,
                (SELECT count(*) FROM turns t WHERE t.conversation_id = c.conversation_id) AS turns,
                (SELECT t.user_text FROM turns t WHERE t.conversation_id = c.conversation_id
                 ORDER BY t.created_at, t.turn_id LIMIT 1) AS first_text
         FROM conversations c
         WHERE c.user_id = $1 AND c.conversation_id = ANY($2)",
    )
    .bind(user_id)
    .bind(conversation_ids)
    .fetch_all(pool)
    .await?
    .iter()
    .map(summary_row)
    .collect()
}

fn summary_row(row: &PgRow) -> Result<Summary, sqlx::Error> {
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    let turns: i64 = row.try_get("turns")?;
    let first_text: Option<String> = row.try_get("first_text")?;
    Ok(Summary {
        conversation_id: row.try_get("conversation_id")?,
        first: first_text.map(|text| (created_at, text)),
        turns: u32::try_from(turns).unwrap_or(u32::MAX),
        created_at,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn pg_existing(pool: &PgPool, turn_ids: &[String]) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<String> = sqlx::query_scalar("SELECT turn_id FROM turns WHERE turn_id = ANY($1)")
        .bind(turn_ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The conversation's owner (if Postgres knows it) and its newest `limit`
/// turns there older than `before`, newest first.
async fn pg_get(
    pool: &PgPool,
    conversation_id: &str,
    before: Option<&TurnCursor>,
    limit: usize,
) -> Result<(Option<String>, Vec<TurnRecord>), sqlx::Error> {
    let owner: Option<String> =
        sqlx::query_scalar("SELECT user_id FROM conversations WHERE conversation_id = $1")
            .bind(conversation_id)
            .fetch_optional(pool)
            .await?;
    // COLLATE "C": turn ids compare bytewise, as TurnCursor orders them.
    let turns = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TURN_COLUMNS} FROM turns WHERE conversation_id = $1 \
         AND ($2::timestamptz IS NULL OR created_at < $2 \
              OR (created_at = $2 AND turn_id COLLATE \"C\" < $3)) \
         ORDER BY created_at DESC, turn_id COLLATE \"C\" DESC LIMIT $4"
    )))
    .bind(conversation_id)
    .bind(before.map(TurnCursor::created_at))
    .bind(before.map_or("", TurnCursor::turn_id))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?
    .iter()
    .map(turn_row)
    .collect::<Result<_, _>>()?;
    Ok((owner, turns))
}

/// Keeps the newest turns (`newest_first`) whose JSON fits in `wanted` bytes
/// and always in `budget` (the max payload less a margin); true when turns
/// were left out. The newest turn always stays, so paging moves on: when it
/// alone is over `budget` its texts are shortened, marked with "…", as the
/// reply could not be sent at all otherwise (Postgres keeps the whole text).
fn fit_page(
    newest_first: Vec<TurnRecord>,
    budget: usize,
    wanted: usize,
) -> (Vec<TurnRecord>, bool) {
    let total = newest_first.len();
    let limit = budget.min(wanted);
    let mut used = 0;
    let mut kept = Vec::with_capacity(total);
    for turn in newest_first {
        let size = serde_json::to_vec(&turn).map_or(usize::MAX, |v| v.len()) + 1;
        if kept.is_empty() {
            used = size;
            kept.push(if size > budget {
                shorten(turn, budget)
            } else {
                turn
            });
            continue;
        }
        if used + size > limit {
            break;
        }
        used += size;
        kept.push(turn);
    }
    let cut = kept.len() < total;
    if cut {
        tracing::debug!(
            kept = kept.len(),
            left = total - kept.len(),
            "history.get page shortened to fit its byte budget."
        );
    }
    (kept, cut)
}

/// Cuts a turn's answer, then its question, until its JSON fits in `budget`.
fn shorten(mut turn: TurnRecord, budget: usize) -> TurnRecord {
    tracing::warn!(turn = %turn.turn_id, budget, "A turn is larger than a history reply may be; its text is shortened in the reply.");
    let size = |t: &TurnRecord| serde_json::to_vec(t).map_or(usize::MAX, |v| v.len()) + 1;
    for answer in [true, false] {
        let over = size(&turn).saturating_sub(budget);
        if over == 0 {
            break;
        }
        let text = if answer {
            &mut turn.assistant_text
        } else {
            &mut turn.user_text
        };
        // Every byte of text costs at least one on the wire (escapes cost
        // more), so cutting `over` bytes and room for the "…" is enough.
        let keep = text.len().saturating_sub(over + '…'.len_utf8());
        let cut = (0..=keep)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    turn
}

fn turn_row(row: &PgRow) -> Result<TurnRecord, sqlx::Error> {
    let finish_reason: String = row.try_get("finish_reason")?;
    let tokens = |column: &str| -> Result<u32, sqlx::Error> {
        let n: i64 = row.try_get(column)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    };
    Ok(TurnRecord {
        turn_id: row.try_get("turn_id")?,
        conversation_id: row.try_get("conversation_id")?,
        user_id: row.try_get("user_id")?,
        request_id: row.try_get("request_id")?,
        model: row.try_get("model")?,
        finish_reason: parse_finish_reason(&finish_reason).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown finish_reason {finish_reason:?}").into())
        })?,
        user_text: row.try_get("user_text")?,
        assistant_text: row.try_get("assistant_text")?,
        usage: Usage {
            prompt_tokens: tokens("prompt_tokens")?,
            completion_tokens: tokens("completion_tokens")?,
        },
        sources: row.try_get("sources")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        first_token_at: row.try_get("first_token_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(n: usize, text: &str) -> TurnRecord {
        TurnRecord {
            turn_id: format!("t{n}"),
            conversation_id: "c".into(),
            user_id: "u".into(),
            request_id: format!("r{n}"),
            model: "m".into(),
            user_text: text.into(),
            assistant_text: text.into(),
            finish_reason: bus::wire::FinishReason::Stop,
            usage: Usage::default(),
            sources: Vec::new(),
            error: None,
            created_at: Utc::now(),
            first_token_at: None,
            completed_at: Utc::now(),
        }
    }

    #[test]
    fn a_page_keeps_the_newest_turns_that_fit_and_always_one() {
        let newest_first: Vec<_> = (0..10).map(|n| turn(n, &"x".repeat(1000))).collect();
        let (kept, cut) = fit_page(newest_first.clone(), 1 << 20, usize::MAX);
        assert_eq!((kept.len(), cut), (10, false));
        let (kept, cut) = fit_page(newest_first.clone(), 5000, usize::MAX);
        assert!(cut && kept.len() == 2, "{}", kept.len());
        assert_eq!(kept[..], newest_first[..2]);
        // What the asker wants is honoured too, but the newest always comes.
        let (kept, cut) = fit_page(newest_first.clone(), 1 << 20, 10);
        assert_eq!((kept.len(), cut), (1, true));
        assert_eq!(kept[0], newest_first[0]);

        // A turn too large for any reply is shortened, marked, and fits.
        let huge = turn(0, &"가\"\n".repeat(3000));
        let (kept, cut) = fit_page(vec![huge, turn(1, "x")], 4000, usize::MAX);
        assert!(cut);
        assert_eq!(kept.len(), 1);
        assert!(serde_json::to_vec(&kept[0]).unwrap().len() < 4000);
        assert!(kept[0].assistant_text.ends_with('…'));
    }

    #[test]
    fn titles_are_one_short_line() {
        assert_eq!(
            title("  Where does\na bottle\tgo?  "),
            "Where does a bottle go?"
        );
        let long = "가".repeat(100);
        let t = title(&long);
        assert_eq!(t.chars().count(), TITLE_CHARS);
        assert!(t.ends_with('…'));
        assert_eq!(title(""), "");
    }
}
