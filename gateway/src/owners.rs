//! Who owns each conversation: the `conversations` KV bucket, with the
//! owners this node has already read or written kept in memory. An owner
//! never changes once claimed, so a remembered answer is never stale, and
//! a conversation this node has seen costs no bus round trip to check.
//! The one exception is an erasure (`DELETE /v1/me`): every node forgets
//! the erased user's conversations when the `erase.notice` arrives.

use std::{collections::HashMap, sync::Mutex};

use async_nats::jetstream::kv;

/// Most owners remembered; past it the memory starts over (each entry is
/// refilled by one KV read).
const REMEMBERED: usize = 100_000;

/// Conversation owners, claimed once and remembered.
pub struct Owners {
    kv: kv::Store,
    known: Mutex<HashMap<String, String>>,
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The conversation is new; the user now owns it.
    New,
    /// The user already owned it.
    Theirs,
    /// Another user owns it.
    Others,
}

impl Owners {
    /// Owners kept in `kv`.
    pub fn new(kv: kv::Store) -> Self {
        Self {
            kv,
            known: Mutex::default(),
        }
    }

    /// Makes `user` the owner of a new conversation, or says whose it is.
    ///
    /// # Errors
    /// When the bucket cannot be read or written.
    pub async fn claim(&self, user: &str, conversation_id: &str) -> anyhow::Result<Claim> {
        if let Some(owner) = self.remembered(conversation_id) {
            return Ok(Self::whose(&owner, user));
        }
        match self
            .kv
            .create(conversation_id, user.to_owned().into())
            .await
        {
            Ok(_) => {
                self.remember(conversation_id, user);
                Ok(Claim::New)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let owner = self.owner(conversation_id).await?;
                Ok(owner.map_or(Claim::Others, |owner| Self::whose(&owner, user)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The conversation's owner, if it has one.
    ///
    /// # Errors
    /// When the bucket cannot be read.
    pub async fn owner(&self, conversation_id: &str) -> anyhow::Result<Option<String>> {
        if let Some(owner) = self.remembered(conversation_id) {
            return Ok(Some(owner));
        }
        let Some(owner) = self.kv.get(conversation_id).await? else {
            return Ok(None);
        };
        let owner = String::from_utf8_lossy(&owner).into_owned();
        self.remember(conversation_id, &owner);
        Ok(Some(owner))
    }

    /// Forgets every remembered conversation of `user` (erased: the
    /// bucket no longer has them, and a new claim must reach it).
    pub fn forget_user(&self, user: &str) -> usize {
        let mut known = self.known.lock().expect("owners lock");
        let before = known.len();
        known.retain(|_, owner| owner != user);
        before - known.len()
    }

    fn whose(owner: &str, user: &str) -> Claim {
        if owner == user {
            Claim::Theirs
        } else {
            Claim::Others
        }
    }

    fn remembered(&self, conversation_id: &str) -> Option<String> {
        self.known
            .lock()
            .expect("owners lock")
            .get(conversation_id)
            .cloned()
    }

    fn remember(&self, conversation_id: &str, owner: &str) {
        let mut known = self.known.lock().expect("owners lock");
        if known.len() >= REMEMBERED {
            known.clear();
        }
        known.insert(conversation_id.to_owned(), owner.to_owned());
    }
}
