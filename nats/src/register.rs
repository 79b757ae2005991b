//! The erasure register: KV bucket `erasures` ([`streams::KV_ERASURES`]),
//! user key -> [`ErasureMark`] (when the user was erased).
//!
//! `DELETE /v1/me` writes it first ([`record`]), before anything is erased.
//! It is what makes an erasure hold for what was not reachable while it
//! ran: a persister that was down checks its SQLite file against the
//! register before it syncs anything, a grant still queued in `REWARDS` is
//! checked before it is written, and a turn still being generated checks it
//! before and after writing its conversation's context. Each compares the
//! time of what it holds with the mark: what the user made up to their
//! erasure stays erased, what they make afterwards is theirs as usual.
//!
//! Keys are user keys ([`user_key`]), so the bucket never holds a user id.
//! The gateway writes it; persisters and streamers only read and watch it.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    kv::{Operation, Store, Watch},
};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;

use crate::{streams, subject::user_key, wire::ErasureMark};

/// How long [`Register::load`] waits for the bucket's current entries.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the register (created at startup by [`streams::ensure_all`]).
///
/// # Errors
/// When the bucket is missing.
pub async fn open(js: &jetstream::Context) -> anyhow::Result<Store> {
    js.get_key_value(streams::KV_ERASURES)
        .await
        .with_context(|| format!("KV bucket {} is missing", streams::KV_ERASURES))
}

/// Records that `user_id` was erased at `at`.
///
/// # Errors
/// When the bucket cannot be written; nothing was erased yet.
pub async fn record(
    js: &jetstream::Context,
    user_id: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let kv = open(js).await?;
    let value = serde_json::to_vec(&ErasureMark { erased_at: at })?;
    kv.put(user_key(user_id), value.into())
        .await
        .context("cannot write the erasure register")?;
    Ok(())
}

/// When `user_id` was last erased, read from the bucket now (from its
/// stream's leader: it sees every acknowledged [`record`]).
///
/// # Errors
/// When the bucket cannot be read.
pub async fn erased_at(kv: &Store, user_id: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let entry = kv
        .get(user_key(user_id))
        .await
        .context("cannot read the erasure register")?;
    Ok(entry.and_then(|value| mark(&value)))
}

fn mark(value: &[u8]) -> Option<DateTime<Utc>> {
    serde_json::from_slice::<ErasureMark>(value)
        .ok()
        .map(|m| m.erased_at)
}

/// An in-memory copy of the register, kept current by its owner from the
/// [`Watch`] that [`Register::load`] returns; cheap to clone (one shared map).
#[derive(Debug, Clone, Default)]
pub struct Register {
    /// User key -> erased at. Written by the owner of the watch only.
    marks: Arc<RwLock<HashMap<String, DateTime<Utc>>>>,
}

impl Register {
    /// Reads every mark the bucket holds now, and returns them with a
    /// watch that goes on with later marks.
    ///
    /// # Errors
    /// When the bucket cannot be read within 30 s.
    pub async fn load(kv: &Store) -> anyhow::Result<(Self, Watch)> {
        let held = kv
            .stream
            .clone()
            .info()
            .await
            .context("cannot read the erasure register")?
            .state
            .messages;
        let mut watch = kv
            .watch_with_history(">")
            .await
            .context("cannot watch the erasure register")?;
        let register = Self::default();
        // An empty bucket delivers nothing until its first mark.
        if held > 0 {
            tokio::time::timeout(LOAD_TIMEOUT, async {
                while let Some(entry) = watch.next().await {
                    let entry = entry.context("cannot read the erasure register")?;
                    let last = entry.delta == 0;
                    register.apply(&entry);
                    if last {
                        break;
                    }
                }
                anyhow::Ok(())
            })
            .await
            .context("the erasure register did not answer in time")??;
        }
        Ok((register, watch))
    }

    /// Takes in one entry of the watch; the mark (user key, erased at)
    /// when it is new or later than the one known, `None` when it changes
    /// nothing.
    pub fn apply(&self, entry: &jetstream::kv::Entry) -> Option<(String, DateTime<Utc>)> {
        if entry.operation != Operation::Put {
            return None;
        }
        let at = mark(&entry.value)?;
        let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
        match marks.get(&entry.key) {
            Some(known) if *known >= at => None,
            _ => {
                marks.insert(entry.key.clone(), at);
                Some((entry.key.clone(), at))
            }
        }
    }

    /// When `user_id` was erased, as far as this copy knows.
    pub fn erased_at(&self, user_id: &str) -> Option<DateTime<Utc>> {
        let marks = self.marks.read().unwrap_or_else(|e| e.into_inner());
        if marks.is_empty() {
            // No hashing on the hot path of a deployment without erasures.
            return None;
        }
        marks.get(&user_key(user_id)).copied()
    }

    /// True when `user_id` was erased at or after `at`: what they made at
    /// `at` is erased.
    pub fn erased_since(&self, user_id: &str, at: DateTime<Utc>) -> bool {
        self.erased_at(user_id).is_some_and(|erased| at <= erased)
    }

    /// Every mark (user key -> erased at).
    pub fn marks(&self) -> HashMap<String, DateTime<Utc>> {
        self.marks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
