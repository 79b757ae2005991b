//! The context a prompt carries: a conversation's newest turns, kept in the
//! `chat_context` KV bucket ([`bus::streams::KV_CONTEXT`]) so that building a
//! prompt is one read, whatever the length of the conversation.
//!
//! The streamer that concludes a turn adds it to its conversation's entry
//! with compare-and-set on the entry's revision ([`Contexts::add`]): two
//! streamers concluding turns of one conversation at once both land, in turn
//! order (`created_at`, then `turn_id`), each turn once however often it is
//! concluded. The entry is cut to the prompt budget on every write
//! ([`fit`]), so its size is bounded by the budget, not by the conversation.
//!
//! It is a cache of what the persisters hold: a conversation without an
//! entry (older than this bucket, idle past its retention, or unreadable) is
//! read from the persisters ([`bus::history::HistoryClient`]) by the caller,
//! and an entry is only started from a complete view of the conversation's
//! newest turns (the `seed`), never from one turn alone, so it never hides
//! turns the persisters would have given.
//!
//! A turn of a user erased (`DELETE /v1/me`) after the turn began is not
//! added: the erasure register (KV bucket `erasures`) is read before the
//! write, and again after it, purging the entry when the erasure landed in
//! between (the erasure's own purge may have run before our write).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{
    self,
    kv::{Operation, UpdateErrorKind},
};
use bus::{
    history::TurnCursor,
    wire::{ContextTurn, ConversationContext, TurnRecord},
};

/// Most earlier turns put into a prompt (and kept in an entry).
pub const HISTORY_TURNS: usize = 50;
/// Most bytes of earlier user and assistant text a prompt carries: the
/// newest whole turns that fit, about 8k tokens of English (4 bytes a
/// token) or 11k characters of Korean (3 bytes a character). A newest turn
/// larger than this alone comes shortened, so context is never dropped
/// just because the last message was long.
pub const HISTORY_BUDGET_BYTES: usize = 32 * 1024;
/// How long one KV read or compare-and-set may take before the caller goes
/// on without it (reading: to the persisters).
pub const KV_TIMEOUT: Duration = Duration::from_secs(1);
/// Compare-and-set attempts before a conclusion gives up on the entry. Each
/// loss means another turn of the same conversation landed in between, so
/// this many in a row takes that many streamers concluding at once.
const CAS_ATTEMPTS: usize = 16;

/// The `chat_context` bucket; cheap to clone.
#[derive(Debug, Clone)]
pub struct Contexts {
    kv: jetstream::kv::Store,
    /// The erasure register, read (never written) before and after a write.
    erasures: jetstream::kv::Store,
}

/// What [`Contexts::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The entry now holds the turn (or the turn was older than everything
    /// the budget keeps).
    Stored,
    /// The entry already held the turn: it was concluded before.
    AlreadyThere,
    /// There is no entry and no seed to start one from; the next turn reads
    /// the persisters.
    NoEntry,
    /// The user was erased after the turn began: nothing is kept.
    Erased,
}

impl Contexts {
    /// Opens the bucket (created at startup by [`bus::streams::ensure_all`]).
    ///
    /// # Errors
    /// When the bucket is missing.
    pub async fn open(js: &jetstream::Context) -> anyhow::Result<Self> {
        let kv = js
            .get_key_value(bus::streams::KV_CONTEXT)
            .await
            .with_context(|| format!("KV bucket {} is missing", bus::streams::KV_CONTEXT))?;
        let erasures = bus::register::open(js).await?;
        Ok(Self { kv, erasures })
    }

    /// The turns of `user_id`'s conversation older than `before`, oldest
    /// first, within the budget: one KV read. `None` when the entry cannot
    /// speak for that: there is none, it is not this user's or not readable,
    /// or it holds turns not older than `before` (a redelivered or late
    /// request: the turns the budget left out for those may be the ones it
    /// needs).
    ///
    /// # Errors
    /// When the bucket cannot be read.
    pub async fn read(
        &self,
        conversation_id: &str,
        user_id: &str,
        before: &TurnCursor,
    ) -> anyhow::Result<Option<Vec<ContextTurn>>> {
        let Some((held, _)) = self.entry(conversation_id).await? else {
            return Ok(None);
        };
        let Some(held) = held.filter(|c| c.user_id == user_id) else {
            return Ok(None);
        };
        if held.turns.iter().any(|t| cursor(t) >= *before) {
            return Ok(None);
        }
        Ok(Some(fit(held.turns)))
    }

    /// Adds a concluded turn to its conversation's entry, keeping turn
    /// order and the budget; a turn already there is not added again. With
    /// no entry, one is started from `seed` (the conversation's newest turns
    /// as read for this turn's prompt: `Some(empty)` for a new
    /// conversation) and the turn; with no seed, nothing is written.
    ///
    /// # Errors
    /// When the bucket cannot be read or written, or other writers kept
    /// winning the compare-and-set.
    pub async fn add(
        &self,
        record: &TurnRecord,
        seed: Option<&[ContextTurn]>,
    ) -> anyhow::Result<Added> {
        let turn = ContextTurn {
            turn_id: record.turn_id.clone(),
            created_at: record.created_at,
            user_text: record.user_text.clone(),
            assistant_text: record.assistant_text.clone(),
        };
        let key = record.conversation_id.as_str();
        if self.erased(record).await? {
            return Ok(Added::Erased);
        }
        for _ in 0..CAS_ATTEMPTS {
            let (held, revision) = match self.entry(key).await? {
                Some((held, revision)) => (held, revision),
                // Revision 0: only if the key has never been written (or has
                // aged out) since we looked.
                None => (None, 0),
            };
            let turns = match held {
                Some(held) if held.user_id != record.user_id => {
                    tracing::warn!("Conversation context belongs to another user; left alone.");
                    return Ok(Added::NoEntry);
                }
                Some(held) => {
                    if held.turns.iter().any(|t| t.turn_id == turn.turn_id) {
                        return Ok(Added::AlreadyThere);
                    }
                    let turns = fit(with(held.turns.clone(), turn.clone()));
                    if turns == held.turns {
                        // Older than everything the budget keeps.
                        return Ok(Added::Stored);
                    }
                    turns
                }
                None => match seed {
                    Some(seed) => fit(with(seed.to_vec(), turn.clone())),
                    None => return Ok(Added::NoEntry),
                },
            };
            let value = serde_json::to_vec(&ConversationContext {
                user_id: record.user_id.clone(),
                turns,
            })?;
            match self.kv.update(key, value.into(), revision).await {
                Ok(_) => return self.unless_erased(record).await,
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    tracing::debug!("Conversation context changed under us; merging again.");
                }
                Err(e) => return Err(e).context("cannot write the conversation context"),
            }
        }
        anyhow::bail!("other turns of the conversation kept landing first ({CAS_ATTEMPTS} tries)")
    }

    /// True when `record`'s user was erased at or after the turn began.
    async fn erased(&self, record: &TurnRecord) -> anyhow::Result<bool> {
        let erased = bus::register::erased_at(&self.erasures, &record.user_id).await?;
        Ok(erased.is_some_and(|at| record.created_at <= at))
    }

    /// After a write: `Stored`, or, when the user was erased meanwhile (or
    /// that cannot be told), the entry purged again.
    async fn unless_erased(&self, record: &TurnRecord) -> anyhow::Result<Added> {
        let erased = self.erased(record).await;
        if matches!(erased, Ok(false)) {
            return Ok(Added::Stored);
        }
        self.kv
            .purge(&record.conversation_id)
            .await
            .context("cannot purge the context of an erased user")?;
        erased.map(|_| Added::Erased)
    }

    /// The entry and its revision (that of a delete marker too, which a
    /// compare-and-set must name); the entry is `None` when it is deleted or
    /// not readable, and the whole answer `None` when the key has no message.
    async fn entry(&self, key: &str) -> anyhow::Result<Option<(Option<ConversationContext>, u64)>> {
        let Some(entry) = self
            .kv
            .entry(key)
            .await
            .context("cannot read the conversation context")?
        else {
            return Ok(None);
        };
        let held = match entry.operation {
            Operation::Put => match serde_json::from_slice(&entry.value) {
                Ok(held) => Some(held),
                Err(error) => {
                    tracing::warn!(%error, "Conversation context is not readable; it will be started again.");
                    None
                }
            },
            Operation::Delete | Operation::Purge => None,
        };
        Ok(Some((held, entry.revision)))
    }
}

/// A persister's turns (oldest first) as context turns.
pub fn from_records(records: Vec<TurnRecord>) -> Vec<ContextTurn> {
    records
        .into_iter()
        .map(|r| ContextTurn {
            turn_id: r.turn_id,
            created_at: r.created_at,
            user_text: r.user_text,
            assistant_text: r.assistant_text,
        })
        .collect()
}

fn cursor(turn: &ContextTurn) -> TurnCursor {
    TurnCursor::at(turn.created_at, &turn.turn_id)
}

/// `turns` with `turn` in turn order, unless a turn with its id is there.
fn with(mut turns: Vec<ContextTurn>, turn: ContextTurn) -> Vec<ContextTurn> {
    if !turns.iter().any(|t| t.turn_id == turn.turn_id) {
        turns.push(turn);
    }
    turns.sort_by_cached_key(cursor);
    turns
}

/// The newest of `turns` (oldest first) whose user and assistant text fit
/// [`HISTORY_BUDGET_BYTES`], at most [`HISTORY_TURNS`], oldest first. A
/// newest turn larger than the budget alone is kept shortened: the question
/// gets up to half, the answer the rest, each marked with "…".
pub fn fit(turns: Vec<ContextTurn>) -> Vec<ContextTurn> {
    let mut left = HISTORY_BUDGET_BYTES;
    let mut picked = Vec::new();
    for mut turn in turns.into_iter().rev() {
        if picked.len() == HISTORY_TURNS {
            break;
        }
        let size = turn.user_text.len() + turn.assistant_text.len();
        if size > left {
            if picked.is_empty() {
                clip(&mut turn.user_text, left / 2);
                clip(&mut turn.assistant_text, left - turn.user_text.len());
                picked.push(turn);
            }
            break;
        }
        left -= size;
        picked.push(turn);
    }
    picked.reverse();
    picked
}

/// Keeps the start of a text (the question as asked, the answer's
/// opening), marking the cut; `text` ends up at most `max` bytes.
fn clip(text: &mut String, max: usize) {
    if text.len() > max {
        let keep = max.saturating_sub('…'.len_utf8());
        let cut = (0..=keep)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn turn(n: i64, text: &str) -> ContextTurn {
        ContextTurn {
            turn_id: format!("t{n:03}"),
            created_at: DateTime::<Utc>::from_timestamp(1_700_000_000 + n, 0).unwrap(),
            user_text: text.into(),
            assistant_text: text.into(),
        }
    }

    fn ids(turns: &[ContextTurn]) -> Vec<&str> {
        turns.iter().map(|t| t.turn_id.as_str()).collect()
    }

    #[test]
    fn turns_keep_their_order_and_come_once_whatever_order_they_conclude_in() {
        let mut turns = Vec::new();
        for n in [3, 1, 2, 3, 1] {
            turns = fit(with(turns, turn(n, "x")));
        }
        assert_eq!(ids(&turns), ["t001", "t002", "t003"]);
        // Same microsecond: the turn id decides, as in the persisters' order.
        let mut twin = turn(2, "x");
        twin.turn_id = "t002b".into();
        assert_eq!(
            ids(&fit(with(turns, twin))),
            ["t001", "t002", "t002b", "t003"]
        );
    }

    #[test]
    fn the_newest_turns_that_fit_are_kept_at_most_fifty() {
        let long = "y".repeat(6_000); // 12 KB a turn: two fit in 32 KiB.
        let turns: Vec<_> = (0..10).map(|n| turn(n, &long)).collect();
        assert_eq!(ids(&fit(turns)), ["t008", "t009"]);
        let short: Vec<_> = (0..80).map(|n| turn(n, "ok")).collect();
        let kept = fit(short);
        assert_eq!(kept.len(), HISTORY_TURNS);
        assert_eq!(kept.last().unwrap().turn_id, "t079");
    }

    #[test]
    fn a_newest_turn_over_the_budget_alone_is_shortened_not_dropped() {
        let huge = "가".repeat(20_000); // 60 KB each side
        let kept = fit(vec![turn(1, "older"), turn(2, &huge)]);
        assert_eq!(ids(&kept), ["t002"]);
        let t = &kept[0];
        assert!(t.user_text.ends_with('…') && t.assistant_text.ends_with('…'));
        assert!(t.user_text.len() + t.assistant_text.len() <= HISTORY_BUDGET_BYTES);
        // The encoded entry stays far below the bucket's value limit, even
        // for text that JSON escapes six-fold.
        let worst = "\u{1}".repeat(HISTORY_BUDGET_BYTES);
        let entry = ConversationContext {
            user_id: "u".repeat(256),
            turns: fit(vec![turn(1, &worst)]),
        };
        let bytes = serde_json::to_vec(&entry).unwrap().len();
        assert!(bytes < bus::streams::CONTEXT_MAX_VALUE as usize, "{bytes}");
    }
}
