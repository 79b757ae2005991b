//! Accepting, following, and cancelling chat turns: the logic the WebSocket
//! and the OpenAI-compatible endpoint share.
//!
//! Accepting a turn derives its ids from the user and `request_id` (so a
//! repeat maps to the same turn), then in one round trip to the bus, its
//! writes sent together: claims or checks the conversation's owner
//! ([`crate::owners`], no write at all for a conversation this node knows),
//! records the turn's owner, and counts it against the user's turns in
//! flight on every node ([`crate::inflight`]). Whichever of them refuses,
//! the others are undone. It then subscribes to the turn's frames *before*
//! publishing the request (the second round trip), with `Nats-Msg-Id` =
//! turn id. The writes must land before the request: a request cannot be
//! taken back once a streamer may have it.
//! Following a turn is [`crate::relay`].

use async_nats::jetstream::kv;
use bus::{
    subject,
    wire::{ChatMessage, ChatRequest, MAX_CONTENT_BYTES, ServerFrame, TurnIndex},
};
use chrono::Utc;
use uuid::Uuid;

use crate::{AppState, owners::Claim, relay::Follow};

/// Namespace for turn and conversation ids derived from request ids, so a
/// repeated `request_id` maps to the same ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c2e_9b4d_4e8a_a7c5_1d2e_3f40_5b6c);

/// A turn to start.
#[derive(Debug, Clone)]
pub struct NewTurn {
    /// The conversation to continue; `None` opens one (derived from the request id).
    pub conversation_id: Option<String>,
    /// The user's message.
    pub content: String,
    /// The client's idempotency key.
    pub request_id: String,
    /// Earlier messages the caller supplies (OpenAI-compatible endpoint).
    pub history: Vec<ChatMessage>,
    /// Model override.
    pub model: Option<String>,
    /// Token cap.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
}

/// An accepted (or, for a repeated request id, found) turn, ready to follow.
pub struct Accepted {
    /// The conversation.
    pub conversation_id: String,
    /// The turn.
    pub turn_id: String,
    /// Its frames.
    pub follow: Follow,
}

/// What became of the first accept of a repeated request id.
enum FirstAccept {
    /// Its turn has frames: it was published.
    Ran,
    /// Its index is gone: it was refused.
    Refused,
    /// Nothing to show after [`ACCEPT_SETTLED`]: its request may never have
    /// been published. The index as it is now.
    Silent(TurnIndex),
}

/// How long an accept takes at the most before its outcome is settled
/// (published, or refused and its index removed).
const ACCEPT_SETTLED: std::time::Duration = std::time::Duration::from_secs(10);

/// Refuses a turn whose request id or content is out of bounds.
fn check(turn: &NewTurn) -> Result<(), ServerFrame> {
    if turn.request_id.is_empty() || turn.request_id.len() > 128 {
        return Err(error(
            None,
            "invalid_request_id",
            "request_id must be 1-128 bytes",
        ));
    }
    if turn.content.len() > MAX_CONTENT_BYTES {
        return Err(error(
            None,
            "too_large",
            format!(
                "content is {} bytes; the limit is {MAX_CONTENT_BYTES}",
                turn.content.len()
            ),
        ));
    }
    if turn.content.trim().is_empty() {
        return Err(error(None, "empty_content", "content is empty"));
    }
    Ok(())
}

/// The ids `user`'s request `request_id` gets: its turn's, and its
/// conversation's (`conversation_id` when it continues one).
pub fn derive_ids(user: &str, request_id: &str, conversation_id: Option<&str>) -> (String, String) {
    let key = format!("{}\n{}", subject::user_key(user), request_id);
    let turn_id = Uuid::new_v5(&ID_NAMESPACE, format!("turn\n{key}").as_bytes()).to_string();
    let conversation_id = match conversation_id {
        Some(id) => id.to_owned(),
        None => Uuid::new_v5(&ID_NAMESPACE, format!("conversation\n{key}").as_bytes()).to_string(),
    };
    (turn_id, conversation_id)
}

/// The turn's id and its conversation's, derived from the user and the
/// request id, so a repeat maps to the same ones. The user's key, not the
/// raw id, goes in, so that no (user, request id) pair can spell another's:
/// a `sub` may contain any character.
fn ids(user: &str, turn: &NewTurn) -> Result<(String, String), ServerFrame> {
    let (turn_id, conversation_id) =
        derive_ids(user, &turn.request_id, turn.conversation_id.as_deref());
    if subject::token(&conversation_id).is_err() {
        return Err(error(
            None,
            "invalid_conversation_id",
            "conversation_id is not a valid id",
        ));
    }
    Ok((turn_id, conversation_id))
}

/// An `error` frame for a turn operation.
pub fn error(turn_id: Option<&str>, code: &str, message: impl Into<String>) -> ServerFrame {
    ServerFrame::error(turn_id.map(str::to_owned), code, message)
}

fn forbidden(turn_id: &str) -> ServerFrame {
    error(
        Some(turn_id),
        "forbidden",
        "this turn belongs to another user",
    )
}

pub(crate) fn unavailable(e: &dyn std::fmt::Display) -> ServerFrame {
    tracing::warn!(error = %e, "NATS request failed.");
    error(
        None,
        "unavailable",
        "the message bus is unavailable; try again",
    )
}

impl AppState {
    /// Accepts a turn for `user`, or finds the one a repeated `request_id` made.
    ///
    /// # Errors
    /// An `error` frame with a specific code; nothing is published then.
    pub async fn accept_turn(&self, user: &str, turn: NewTurn) -> Result<Accepted, ServerFrame> {
        check(&turn)?;
        let started = std::time::Instant::now();
        let (turn_id, conversation_id) = ids(user, &turn)?;
        let mut request = ChatRequest {
            turn_id: turn_id.clone(),
            conversation_id: conversation_id.clone(),
            user_id: user.to_owned(),
            request_id: turn.request_id,
            content: turn.content,
            history: turn.history,
            new_conversation: false,
            model: turn.model,
            max_tokens: turn.max_tokens,
            temperature: turn.temperature,
            created_at: Utc::now(),
        };
        let index = TurnIndex {
            user_id: user.to_owned(),
            conversation_id: conversation_id.clone(),
            request_id: request.request_id.clone(),
            created_at: request.created_at,
        };
        let index_bytes = serde_json::to_vec(&index).expect("serializes");
        let (owner, created, claimed) = tokio::join!(
            self.owners.claim(user, &conversation_id),
            self.turns.create(&turn_id, index_bytes.into()),
            self.in_flight.claim(user, &turn_id, &conversation_id),
        );
        // Creating the index is also the repeat check; a repeat finds the
        // turn it made, whatever the user's count (it is no new turn).
        match created {
            Ok(_) => {}
            Err(e) => {
                if claimed.is_ok() {
                    self.in_flight.release(user, &turn_id).await;
                }
                if e.kind() != kv::CreateErrorKind::AlreadyExists {
                    return Err(unavailable(&e));
                }
                return self
                    .repeated(user, &turn_id, Some(request))
                    .await?
                    .ok_or_else(|| error(None, "unavailable", "the turn is being created; retry"));
            }
        }
        let refused = match (&owner, claimed) {
            (Err(e), claimed) => Some((unavailable(&format!("{e:#}")), claimed.is_ok())),
            (Ok(Claim::Others), claimed) => Some((
                error(
                    None,
                    "forbidden",
                    "this conversation belongs to another user",
                ),
                claimed.is_ok(),
            )),
            (Ok(_), Err(frame)) => Some((frame, false)),
            (Ok(_), Ok(())) => None,
        };
        if let Some((frame, counted)) = refused {
            let _ = self.turns.delete(&turn_id).await;
            if counted {
                self.in_flight.release(user, &turn_id).await;
            }
            return Err(frame);
        }
        request.new_conversation = matches!(owner, Ok(Claim::New));
        // Subscribe before publishing so no live frame can slip past.
        let mut follow = match self.follow(&conversation_id, &turn_id).await {
            Ok(follow) => follow,
            Err(frame) => {
                self.abandon(user, &turn_id).await;
                return Err(frame);
            }
        };
        // Nothing can have been published for this turn before the
        // subscription, so its relay skips the initial replay.
        follow.fresh = true;
        if let Err(frame) = self.publish_request(&request).await {
            self.abandon(user, &turn_id).await;
            return Err(frame);
        }
        metrics::counter!("gateway_turns_accepted_total").increment(1);
        metrics::histogram!("gateway_accept_seconds").record(started.elapsed().as_secs_f64());
        Ok(Accepted {
            conversation_id,
            turn_id,
            follow,
        })
    }

    /// Publishes a turn's request; its message id (the turn id) makes a
    /// second publish within the stream's duplicate window a no-op.
    async fn publish_request(&self, request: &ChatRequest) -> Result<(), ServerFrame> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            request.turn_id.as_str(),
        );
        let subject = subject::chat_req(&request.conversation_id).expect("checked id");
        let body = serde_json::to_vec(request).expect("serializes");
        match self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| unavailable(&e)),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Undoes an accept whose request was not published: without the
    /// request the index would make a retry of this request id follow a
    /// turn that never runs, and the claim would count it.
    async fn abandon(&self, user: &str, turn_id: &str) {
        let _ = self.turns.delete(turn_id).await;
        self.in_flight.release(user, turn_id).await;
    }

    /// The turn a repeated request id made, followed from its start.
    /// With the repeat's `request`, that request is published again while
    /// the stream would still drop it as a duplicate: a request lost with
    /// the bus (its index written, its publish failed) is then sent after
    /// all, and one that was sent changes nothing.
    async fn repeated(
        &self,
        user: &str,
        turn_id: &str,
        request: Option<ChatRequest>,
    ) -> Result<Option<Accepted>, ServerFrame> {
        let Some(index) = self.turn_index(turn_id).await? else {
            return Ok(None);
        };
        if index.user_id != user {
            return Err(forbidden(turn_id));
        }
        // Past the replay window the frames are gone: following would
        // answer `accepted` and then nothing.
        self.within_replay_window(turn_id, &index)?;
        let follow = self.follow(&index.conversation_id, turn_id).await?;
        let age = |index: &TurnIndex| (Utc::now() - index.created_at).to_std().unwrap_or_default();
        let mut index = index;
        let mut publish = request.is_some();
        if publish && age(&index) < ACCEPT_SETTLED {
            // The first accept may still be under way (it may yet be
            // refused and remove the index), or its gateway died between
            // writing the index and publishing: wait until it settles.
            match self.first_accept(turn_id, &index).await? {
                FirstAccept::Ran => publish = false,
                FirstAccept::Refused => return Ok(None),
                FirstAccept::Silent(settled) => index = settled,
            }
        }
        // Only while a second copy is still dropped as a duplicate.
        if publish
            && let Some(mut request) = request
            && age(&index) >= ACCEPT_SETTLED
            && age(&index) < self.request_dedupe_window
        {
            request.conversation_id = index.conversation_id.clone();
            request.created_at = index.created_at;
            self.publish_request(&request).await?;
        }
        Ok(Some(Accepted {
            conversation_id: index.conversation_id,
            turn_id: turn_id.to_owned(),
            follow,
        }))
    }

    /// Waits, until [`ACCEPT_SETTLED`] after `index` was written, for the
    /// first accept of a repeated request id to show its outcome: frames
    /// of the turn (it was published and runs), or the index gone (it was
    /// refused). Neither means its gateway may have died before publishing.
    async fn first_accept(
        &self,
        turn_id: &str,
        index: &TurnIndex,
    ) -> Result<FirstAccept, ServerFrame> {
        let subject = subject::chat_tok(&index.conversation_id, turn_id).expect("checked ids");
        let settled_at = index.created_at
            + chrono::Duration::from_std(ACCEPT_SETTLED).expect("a small duration");
        // Looked up once: only the last frame is read again each round.
        let mut stream = None;
        loop {
            if stream.is_none() {
                stream = self.js.get_stream(bus::streams::CHAT_TOK).await.ok();
            }
            if let Some(stream) = &stream
                && stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .is_ok()
            {
                return Ok(FirstAccept::Ran);
            }
            let Some(now) = self.turn_index(turn_id).await? else {
                return Ok(FirstAccept::Refused);
            };
            if Utc::now() >= settled_at {
                return Ok(FirstAccept::Silent(now));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Checks that `user` owns the turn and subscribes to its frames (resume).
    ///
    /// # Errors
    /// `resume_expired` for an unknown or expired turn, `forbidden` for another user's.
    pub async fn follow_turn(&self, user: &str, turn_id: &str) -> Result<Follow, ServerFrame> {
        let Some(index) = self.turn_index(turn_id).await? else {
            return Err(error(
                Some(turn_id),
                "resume_expired",
                "this turn is unknown or older than the replay window; load it from history",
            ));
        };
        if index.user_id != user {
            return Err(forbidden(turn_id));
        }
        self.within_replay_window(turn_id, &index)?;
        self.follow(&index.conversation_id, turn_id).await
    }

    /// The index outlives the frames (7 days against CHAT_TOK's max_age):
    /// past the replay window there is nothing left to follow.
    fn within_replay_window(&self, turn_id: &str, index: &TurnIndex) -> Result<(), ServerFrame> {
        let age = (Utc::now() - index.created_at).to_std().unwrap_or_default();
        if age > self.replay_window {
            return Err(error(
                Some(turn_id),
                "resume_expired",
                "this turn is older than the replay window; load it from history",
            ));
        }
        Ok(())
    }

    /// Asks the worker generating `turn_id` to stop (core NATS).
    ///
    /// # Errors
    /// `not_found`, `forbidden` or `unavailable`.
    pub async fn cancel_turn(&self, user: &str, turn_id: &str) -> Result<(), ServerFrame> {
        match self.turn_index(turn_id).await? {
            Some(index) if index.user_id == user => {}
            Some(_) => return Err(forbidden(turn_id)),
            None => return Err(error(Some(turn_id), "not_found", "no such turn")),
        }
        let subject = subject::chat_cancel(turn_id).map_err(|_| forbidden(turn_id))?;
        self.client
            .publish(subject, bytes::Bytes::new())
            .await
            .map_err(|e| unavailable(&e))?;
        metrics::counter!("gateway_cancels_total").increment(1);
        Ok(())
    }

    async fn turn_index(&self, turn_id: &str) -> Result<Option<TurnIndex>, ServerFrame> {
        if subject::token(turn_id).is_err() {
            return Err(error(None, "invalid_turn_id", "turn_id is not a valid id"));
        }
        match self.turns.get(turn_id).await {
            Ok(Some(bytes)) => Ok(serde_json::from_slice(&bytes).ok()),
            Ok(None) => Ok(None),
            Err(e) => Err(unavailable(&e)),
        }
    }

    async fn follow(&self, conversation_id: &str, turn_id: &str) -> Result<Follow, ServerFrame> {
        let subject =
            subject::chat_tok(conversation_id, turn_id).map_err(|_| forbidden(turn_id))?;
        let live = self
            .client
            .subscribe(subject::live(&subject))
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Follow {
            live,
            fresh: false,
            subject,
            turn_id: turn_id.to_owned(),
            js: self.js.clone(),
            timing: self.relay_timing,
            error_at: None,
        })
    }
}
