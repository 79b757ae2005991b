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
        ConversationDetail, ConversationList, ConversationSummary, HistoryGetRequest,
        HistoryListRequest, HistoryReply,
    },
};

/// How often a persister renews its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A persister not heard from for this long is no longer waited for.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(15);

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
