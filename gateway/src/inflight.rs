//! Turns in flight per user, counted across every gateway node.
//!
//! A per-socket or per-node count is bypassed by disconnecting, or by
//! reaching another node, while the generations keep running. The count
//! lives in the `user_turns` KV bucket instead: one entry per user (its key
//! is [`bus::subject::user_key`]) listing the turns accepted for them,
//! updated with compare-and-set so two nodes cannot both take the last
//! place. A turn leaves the list lazily, when the list is full: once its
//! `done` is stored, once its request was given up (its index is gone), or
//! after `lifetime`, however it ended.
//!
//! Each node remembers the entries it last wrote with their revision: while
//! no other node touched a user's entry, a claim is one compare-and-set with
//! no read before it (a stale memory only costs a failed write and a read).

use std::{collections::HashMap, sync::Mutex};

use async_nats::jetstream::{self, kv};
use bus::{streams, subject, wire::ServerFrame};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::turns::unavailable;

/// Compare-and-set attempts before the bus counts as too contended.
const CAS_ATTEMPTS: usize = 8;

/// Most users' entries remembered; past it the memory starts over.
const REMEMBERED: usize = 100_000;

/// The per-user count and its limit.
pub struct InFlight {
    kv: kv::Store,
    turns: kv::Store,
    js: jetstream::Context,
    max: usize,
    lifetime: std::time::Duration,
    /// User key -> the entry as this node last wrote or read it, and its
    /// revision (`None`: no entry existed).
    known: Mutex<HashMap<String, (Entry, Option<u64>)>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    turns: Vec<Running>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Running {
    turn_id: String,
    conversation_id: String,
    at: DateTime<Utc>,
}

impl InFlight {
    /// A count allowing `max` turns per user, each counted at most `lifetime`.
    pub fn new(
        js: &jetstream::Context,
        kv: kv::Store,
        turns: kv::Store,
        max: usize,
        lifetime: std::time::Duration,
    ) -> Self {
        Self {
            kv,
            turns,
            js: js.clone(),
            max: max.max(1),
            lifetime,
            known: Mutex::default(),
        }
    }

    /// Counts `turn_id` against `user`'s limit.
    ///
    /// # Errors
    /// `too_many_turns` at the limit; `unavailable` when the bus fails.
    pub async fn claim(
        &self,
        user: &str,
        turn_id: &str,
        conversation_id: &str,
    ) -> Result<(), ServerFrame> {
        let key = subject::user_key(user);
        // Unknown to this node: a user nobody has counted yet is the common
        // case, and a failed create is followed by a read.
        let (mut entry, mut revision) = self.remembered(&key).unwrap_or_default();
        let mut fresh = false;
        for _ in 0..CAS_ATTEMPTS {
            let now = Utc::now();
            entry
                .turns
                .retain(|r| (now - r.at).to_std().unwrap_or_default() < self.lifetime);
            if entry.turns.len() >= self.max && !fresh {
                // Refuse only on what the bus holds now, not on a memory.
                (entry, revision) = self.read(&key).await?;
                fresh = true;
                continue;
            }
            if entry.turns.len() >= self.max {
                self.drop_finished(&mut entry).await?;
            }
            if entry.turns.len() >= self.max {
                metrics::counter!("gateway_turns_refused_total").increment(1);
                return Err(ServerFrame::error(
                    None,
                    "too_many_turns",
                    format!(
                        "at most {} answers may be in progress at once; wait for one to finish",
                        self.max
                    ),
                ));
            }
            entry.turns.push(Running {
                turn_id: turn_id.to_owned(),
                conversation_id: conversation_id.to_owned(),
                at: now,
            });
            if let Some(written) = self.write(&key, &entry, revision).await? {
                self.remember(key, entry, written);
                return Ok(());
            }
            (entry, revision) = self.read(&key).await?;
            fresh = true;
        }
        Err(unavailable(&"the per-user turn count is too contended"))
    }

    /// Gives back a claim whose request was never published. Best effort:
    /// a claim left behind is dropped when its index is found gone.
    pub async fn release(&self, user: &str, turn_id: &str) {
        let key = subject::user_key(user);
        for _ in 0..CAS_ATTEMPTS {
            let Ok((mut entry, revision)) = self.read(&key).await else {
                return;
            };
            entry.turns.retain(|r| r.turn_id != turn_id);
            match self.write(&key, &entry, revision).await {
                Ok(Some(written)) => {
                    self.remember(key, entry, written);
                    return;
                }
                Err(_) => return,
                Ok(None) => {}
            }
        }
    }

    fn remembered(&self, key: &str) -> Option<(Entry, Option<u64>)> {
        self.known.lock().expect("in-flight lock").get(key).cloned()
    }

    fn remember(&self, key: String, entry: Entry, revision: u64) {
        let mut known = self.known.lock().expect("in-flight lock");
        if known.len() >= REMEMBERED {
            known.clear();
        }
        known.insert(key, (entry, Some(revision)));
    }

    async fn read(&self, key: &str) -> Result<(Entry, Option<u64>), ServerFrame> {
        match self.kv.entry(key).await {
            Ok(Some(found)) => {
                let entry = match found.operation {
                    kv::Operation::Put => serde_json::from_slice(&found.value).unwrap_or_default(),
                    _ => Entry::default(),
                };
                Ok((entry, Some(found.revision)))
            }
            Ok(None) => Ok((Entry::default(), None)),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Stores `entry` if nobody changed it since `revision`, returning its
    /// new revision; `None` when somebody did (read again).
    async fn write(
        &self,
        key: &str,
        entry: &Entry,
        revision: Option<u64>,
    ) -> Result<Option<u64>, ServerFrame> {
        let value = serde_json::to_vec(entry).expect("serializes");
        match revision {
            Some(revision) => match self.kv.update(key, value.into(), revision).await {
                Ok(written) => Ok(Some(written)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(unavailable(&e)),
            },
            None => match self.kv.create(key, value.into()).await {
                Ok(written) => Ok(Some(written)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(unavailable(&e)),
            },
        }
    }

    /// Drops the turns that are over: `done` stored, or never published.
    /// A lookup that fails is `unavailable`, never taken for a running turn:
    /// an outage must not read as the user's limit.
    async fn drop_finished(&self, entry: &mut Entry) -> Result<(), ServerFrame> {
        let stream = self
            .js
            .get_stream(streams::CHAT_TOK)
            .await
            .map_err(|e| unavailable(&e))?;
        let mut keep = Vec::with_capacity(entry.turns.len());
        for running in entry.turns.drain(..) {
            let Ok(tok) = subject::chat_tok(&running.conversation_id, &running.turn_id) else {
                continue;
            };
            let done = match stream.get_last_raw_message_by_subject(&tok).await {
                Ok(last) => bus::batch::last(&last.payload).is_some_and(|f| f.is_done()),
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    false
                }
                Err(e) => return Err(unavailable(&e)),
            };
            let abandoned = match self.turns.get(&running.turn_id).await {
                Ok(index) => index.is_none(),
                Err(e) => return Err(unavailable(&e)),
            };
            if !done && !abandoned {
                keep.push(running);
            }
        }
        entry.turns = keep;
        Ok(())
    }
}
