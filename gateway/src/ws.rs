//! `GET /v1/chat/ws`: one WebSocket chat session.
//!
//! The socket has one writer task fed by a bounded outbox. Each turn the
//! client follows gets a relay task: it subscribes to the turn's subject on
//! core NATS *first*, then replays what the `CHAT_TOK` stream already holds
//! after the client's `seq`, then forwards live frames, skipping any `seq` it
//! already sent and refilling from the stream if it sees a gap. So a resume
//! has no gap and no duplicate, and no JetStream consumer is created per
//! socket on the live path. A client that cannot keep up fills the outbox and
//! is closed with code 4008; it reconnects and resumes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::kv;
use axum::{
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code},
    },
    response::Response,
};
use bus::{
    streams, subject,
    wire::{ChatRequest, ClientFrame, MAX_CONTENT_BYTES, ServerFrame, TurnIndex},
};
use chrono::Utc;
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{AppState, auth::StreamUser};

/// Frames a socket may have queued before it counts as too slow.
const OUTBOX: usize = 1024;
/// Largest WebSocket message read at all; bigger ones close the socket
/// (1009). Up to this size, oversized `content` gets a `too_large` frame.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Server pings this often; a client that answers nothing for
/// [`IDLE_TIMEOUT`] is closed.
const PING_EVERY: Duration = Duration::from_secs(25);
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Close code: the client fell behind; reconnect and `resume`.
const CLOSE_SLOW: u16 = 4008;
/// Namespace for turn and conversation ids derived from request ids, so a
/// repeated `request_id` maps to the same ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c2e_9b4d_4e8a_a7c5_1d2e_3f40_5b6c);

/// Per-node limits shared by all sockets.
#[derive(Debug)]
pub struct Limits {
    /// Turns a user may have streaming at once on this node.
    pub max_turns_per_user: usize,
    active: Mutex<HashMap<String, usize>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_turns_per_user: 8,
            active: Mutex::new(HashMap::new()),
        }
    }
}

/// Holds one of a user's concurrent-turn slots until dropped.
struct TurnSlot {
    limits: Arc<Limits>,
    user: String,
}

impl Limits {
    fn acquire(self: &Arc<Self>, user: &str) -> Option<TurnSlot> {
        let mut active = self.active.lock().expect("limits lock");
        let count = active.entry(user.to_owned()).or_default();
        if *count >= self.max_turns_per_user {
            return None;
        }
        *count += 1;
        Some(TurnSlot {
            limits: self.clone(),
            user: user.to_owned(),
        })
    }
}

impl Drop for TurnSlot {
    fn drop(&mut self) {
        let mut active = self.limits.active.lock().expect("limits lock");
        if let Some(count) = active.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                active.remove(&self.user);
            }
        }
    }
}

/// Authenticates (header or `?access_token=`) before upgrading: a bad token
/// gets `401` JSON and no socket.
pub async fn upgrade(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    ws: WebSocketUpgrade,
) -> Response {
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| Session::new(state, user).run(socket))
}

/// Sends frames to the socket's writer; knows when the client is too slow.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Message>,
    slow: CancellationToken,
}

impl Outbox {
    fn send(&self, frame: &ServerFrame) -> bool {
        let text = serde_json::to_string(frame).expect("frames serialize");
        self.send_text(text)
    }

    fn send_text(&self, text: String) -> bool {
        match self.tx.try_send(Message::Text(Utf8Bytes::from(text))) {
            Ok(()) => {
                metrics::counter!("gateway_ws_frames_sent_total").increment(1);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.slow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

struct Session {
    state: AppState,
    user: String,
    /// Relays of this socket; cancelled when it closes (the turns go on).
    relays: CancellationToken,
}

impl Session {
    fn new(state: AppState, user: String) -> Self {
        let relays = state.shutdown.child_token();
        Self {
            state,
            user,
            relays,
        }
    }

    async fn run(self, socket: WebSocket) {
        metrics::gauge!("gateway_ws_open").increment(1.0);
        let (mut sink, mut stream) = socket.split();
        let (tx, mut rx) = mpsc::channel::<Message>(OUTBOX);
        let outbox = Outbox {
            tx,
            slow: CancellationToken::new(),
        };
        let writer = tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                let closing = matches!(message, Message::Close(_));
                if sink.send(message).await.is_err() || closing {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = tokio::time::Instant::now();
        let close = loop {
            tokio::select! {
                _ = self.state.shutdown.cancelled() => break Some((close_code::AWAY, "server shutting down; reconnect and resume")),
                _ = outbox.slow.cancelled() => {
                    metrics::counter!("gateway_ws_slow_closes_total").increment(1);
                    break Some((CLOSE_SLOW, "client too slow; reconnect and resume"));
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > IDLE_TIMEOUT {
                        break Some((close_code::POLICY, "idle timeout"));
                    }
                    let _ = outbox.tx.try_send(Message::Ping(Default::default()));
                }
                message = stream.next() => {
                    last_heard = tokio::time::Instant::now();
                    match message {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                        Some(Ok(Message::Text(text))) => self.on_text(&text, &outbox).await,
                        Some(Ok(Message::Binary(_))) => {
                            outbox.send(&ServerFrame::error(None, "binary_not_supported", "send JSON text frames"));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
            }
        };
        // Relays stop; the turns themselves go on (a disconnect never cancels).
        self.relays.cancel();
        if let Some((code, reason)) = close {
            // The outbox may be full (slow client): the close frame jumps it
            // by waiting briefly rather than being dropped.
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(1), outbox.tx.send(frame)).await;
        }
        drop(outbox);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        metrics::gauge!("gateway_ws_open").decrement(1.0);
    }

    async fn on_text(&self, text: &str, outbox: &Outbox) {
        let frame = match parse_frame(text) {
            Ok(frame) => frame,
            Err((code, message)) => {
                outbox.send(&ServerFrame::error(None, code, message));
                return;
            }
        };
        let reply = match frame {
            ClientFrame::Ping => Ok(Some(ServerFrame::Pong)),
            ClientFrame::Send {
                conversation_id,
                content,
                request_id,
            } => {
                self.send(conversation_id, content, request_id, outbox)
                    .await
            }
            ClientFrame::Resume { turn_id, after_seq } => {
                self.resume(turn_id, after_seq, outbox).await
            }
            ClientFrame::Cancel { turn_id } => self.cancel(turn_id).await,
        };
        match reply {
            Ok(Some(frame)) | Err(frame) => {
                outbox.send(&frame);
            }
            Ok(None) => {}
        }
    }

    async fn send(
        &self,
        conversation_id: Option<String>,
        content: String,
        request_id: String,
        outbox: &Outbox,
    ) -> Result<Option<ServerFrame>, ServerFrame> {
        if request_id.is_empty() || request_id.len() > 128 {
            return Err(ServerFrame::error(
                None,
                "invalid_request_id",
                "request_id must be 1-128 bytes",
            ));
        }
        if content.len() > MAX_CONTENT_BYTES {
            return Err(ServerFrame::error(
                None,
                "too_large",
                format!(
                    "content is {} bytes; the limit is {MAX_CONTENT_BYTES}",
                    content.len()
                ),
            ));
        }
        if content.trim().is_empty() {
            return Err(ServerFrame::error(
                None,
                "empty_content",
                "content is empty",
            ));
        }
        let key = format!("{}\n{}", self.user, request_id);
        let turn_id = Uuid::new_v5(&ID_NAMESPACE, format!("turn\n{key}").as_bytes()).to_string();

        // A repeated request_id: the turn exists; follow it instead of starting another.
        if let Some(index) = self.turn_index(&turn_id).await? {
            if index.user_id != self.user {
                return Err(forbidden(&turn_id));
            }
            outbox.send(&ServerFrame::Accepted {
                request_id,
                conversation_id: index.conversation_id.clone(),
                turn_id: turn_id.clone(),
            });
            self.spawn_relay(turn_id, index.conversation_id, 0, outbox, None)
                .await?;
            return Ok(None);
        }

        let conversation_id = match conversation_id {
            Some(id) => id,
            None => {
                Uuid::new_v5(&ID_NAMESPACE, format!("conversation\n{key}").as_bytes()).to_string()
            }
        };
        if subject::token(&conversation_id).is_err() {
            return Err(ServerFrame::error(
                None,
                "invalid_conversation_id",
                "conversation_id is not a valid id",
            ));
        }
        self.claim_conversation(&conversation_id).await?;
        let Some(slot) = self.state.limits.acquire(&self.user) else {
            return Err(ServerFrame::error(
                None,
                "too_many_turns",
                format!(
                    "at most {} turns may stream at once",
                    self.state.limits.max_turns_per_user
                ),
            ));
        };

        let created_at = Utc::now();
        let index = TurnIndex {
            user_id: self.user.clone(),
            conversation_id: conversation_id.clone(),
            request_id: request_id.clone(),
            created_at,
        };
        let index_bytes = serde_json::to_vec(&index).expect("serializes");
        match self.state.turns.create(&turn_id, index_bytes.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(&e)),
        }
        // Subscribe before publishing so no live frame can slip past.
        let live = self.subscribe(&conversation_id, &turn_id).await?;
        let request = ChatRequest {
            turn_id: turn_id.clone(),
            conversation_id: conversation_id.clone(),
            user_id: self.user.clone(),
            request_id: request_id.clone(),
            content,
            history: Vec::new(),
            model: None,
            max_tokens: None,
            temperature: None,
            created_at,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, turn_id.as_str());
        let subject = subject::chat_req(&conversation_id).expect("checked above");
        let publish = self
            .state
            .js
            .publish_with_headers(
                subject,
                headers,
                serde_json::to_vec(&request).expect("serializes").into(),
            )
            .await;
        match publish {
            Ok(ack) => ack.await.map_err(|e| unavailable(&e))?,
            Err(e) => return Err(unavailable(&e)),
        };
        metrics::counter!("gateway_turns_accepted_total").increment(1);
        outbox.send(&ServerFrame::Accepted {
            request_id,
            conversation_id: conversation_id.clone(),
            turn_id: turn_id.clone(),
        });
        self.spawn_relay(turn_id, conversation_id, 0, outbox, Some((live, slot)))
            .await?;
        Ok(None)
    }

    async fn resume(
        &self,
        turn_id: String,
        after_seq: u64,
        outbox: &Outbox,
    ) -> Result<Option<ServerFrame>, ServerFrame> {
        metrics::counter!("gateway_resumes_total").increment(1);
        let Some(index) = self.turn_index(&turn_id).await? else {
            return Err(ServerFrame::error(
                Some(turn_id),
                "resume_expired",
                "this turn is unknown or older than the replay window; load it from history",
            ));
        };
        if index.user_id != self.user {
            return Err(forbidden(&turn_id));
        }
        self.spawn_relay(turn_id, index.conversation_id, after_seq, outbox, None)
            .await?;
        Ok(None)
    }

    async fn cancel(&self, turn_id: String) -> Result<Option<ServerFrame>, ServerFrame> {
        match self.turn_index(&turn_id).await? {
            Some(index) if index.user_id == self.user => {}
            Some(_) => return Err(forbidden(&turn_id)),
            None => {
                return Err(ServerFrame::error(
                    Some(turn_id),
                    "not_found",
                    "no such turn",
                ));
            }
        }
        let subject = subject::chat_cancel(&turn_id).map_err(|_| forbidden(&turn_id))?;
        self.state
            .client
            .publish(subject, bytes::Bytes::new())
            .await
            .map_err(|e| unavailable(&e))?;
        metrics::counter!("gateway_cancels_total").increment(1);
        Ok(None)
    }

    async fn turn_index(&self, turn_id: &str) -> Result<Option<TurnIndex>, ServerFrame> {
        if subject::token(turn_id).is_err() {
            return Err(ServerFrame::error(
                None,
                "invalid_turn_id",
                "turn_id is not a valid id",
            ));
        }
        match self.state.turns.get(turn_id).await {
            Ok(Some(bytes)) => Ok(serde_json::from_slice(&bytes).ok()),
            Ok(None) => Ok(None),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Records the user as the conversation's owner, or checks that they are.
    async fn claim_conversation(&self, conversation_id: &str) -> Result<(), ServerFrame> {
        let kv = &self.state.conversations;
        match kv.create(conversation_id, self.user.clone().into()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match kv.get(conversation_id).await {
                    Ok(Some(owner)) if owner == self.user.as_bytes() => Ok(()),
                    Ok(_) => Err(ServerFrame::error(
                        None,
                        "forbidden",
                        "this conversation belongs to another user",
                    )),
                    Err(e) => Err(unavailable(&e)),
                }
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    async fn subscribe(
        &self,
        conversation_id: &str,
        turn_id: &str,
    ) -> Result<async_nats::Subscriber, ServerFrame> {
        let subject =
            subject::chat_tok(conversation_id, turn_id).map_err(|_| forbidden(turn_id))?;
        self.state
            .client
            .subscribe(subject)
            .await
            .map_err(|e| unavailable(&e))
    }

    async fn spawn_relay(
        &self,
        turn_id: String,
        conversation_id: String,
        after_seq: u64,
        outbox: &Outbox,
        subscribed: Option<(async_nats::Subscriber, TurnSlot)>,
    ) -> Result<(), ServerFrame> {
        let (live, slot) = match subscribed {
            Some((live, slot)) => (live, Some(slot)),
            None => (self.subscribe(&conversation_id, &turn_id).await?, None),
        };
        let relay = Relay {
            js: self.state.js.clone(),
            subject: subject::chat_tok(&conversation_id, &turn_id).expect("checked"),
            outbox: outbox.clone(),
            last_seq: after_seq,
        };
        let stop = self.relays.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = relay.run(live) => {}
            }
            drop(slot);
        });
        Ok(())
    }
}

/// Follows one turn for one socket.
struct Relay {
    js: async_nats::jetstream::Context,
    subject: String,
    outbox: Outbox,
    /// The last `seq` the client has.
    last_seq: u64,
}

impl Relay {
    async fn run(mut self, mut live: async_nats::Subscriber) {
        if self.replay().await {
            return;
        }
        while let Some(message) = live.next().await {
            let Ok(frame) = serde_json::from_slice::<ServerFrame>(&message.payload) else {
                continue;
            };
            match frame.seq() {
                // Advisory frames (error) have no seq.
                None => {
                    if !self.outbox.send(&frame) {
                        return;
                    }
                }
                Some(seq) if seq <= self.last_seq => continue,
                Some(seq) if seq > self.last_seq + 1 => {
                    // A gap on the live path: the stream has what we missed.
                    if self.replay().await {
                        return;
                    }
                }
                Some(_) => {
                    if self.forward(frame) {
                        return;
                    }
                }
            }
        }
    }

    /// Sends the stored frames after `last_seq`; true when the turn is over
    /// (or the client is gone).
    async fn replay(&mut self) -> bool {
        let stored = match bus::replay::payloads(&self.js, streams::CHAT_TOK, &self.subject).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "Replay from CHAT_TOK failed.");
                return false;
            }
        };
        for payload in stored {
            let Ok(frame) = serde_json::from_slice::<ServerFrame>(&payload) else {
                continue;
            };
            match frame.seq() {
                Some(seq) if seq == self.last_seq + 1 => {
                    metrics::counter!("gateway_replayed_frames_total").increment(1);
                    if self.forward(frame) {
                        return true;
                    }
                }
                _ => {}
            }
        }
        false
    }

    /// Sends one in-order frame; true when it ended the turn or the socket.
    fn forward(&mut self, frame: ServerFrame) -> bool {
        self.last_seq = frame.seq().unwrap_or(self.last_seq);
        let done = matches!(frame, ServerFrame::Done { .. });
        !self.outbox.send(&frame) || done
    }
}

fn parse_frame(text: &str) -> Result<ClientFrame, (&'static str, String)> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ("invalid_json", format!("the frame is not JSON: {e}")))?;
    let Some(kind) = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return Err(("invalid_frame", "the frame has no string `type`".into()));
    };
    if !matches!(kind.as_str(), "send" | "resume" | "cancel" | "ping") {
        return Err((
            "unknown_type",
            format!("unknown frame type {kind:?}; expected send, resume, cancel or ping"),
        ));
    }
    serde_json::from_value(value).map_err(|e| ("invalid_frame", format!("bad {kind} frame: {e}")))
}

fn forbidden(turn_id: &str) -> ServerFrame {
    ServerFrame::error(
        Some(turn_id.to_owned()),
        "forbidden",
        "this turn belongs to another user",
    )
}

fn unavailable(error: &dyn std::fmt::Display) -> ServerFrame {
    tracing::warn!(%error, "NATS request failed.");
    ServerFrame::error(
        None,
        "unavailable",
        "the message bus is unavailable; try again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_frames_get_specific_codes() {
        assert_eq!(parse_frame("nope").unwrap_err().0, "invalid_json");
        assert_eq!(parse_frame("[1]").unwrap_err().0, "invalid_frame");
        assert_eq!(
            parse_frame(r#"{"type":"dance"}"#).unwrap_err().0,
            "unknown_type"
        );
        assert_eq!(
            parse_frame(r#"{"type":"send","content":"x"}"#)
                .unwrap_err()
                .0,
            "invalid_frame"
        );
        assert_eq!(
            parse_frame(r#"{"type":"resume","turn_id":5}"#)
                .unwrap_err()
                .0,
            "invalid_frame"
        );
        assert_eq!(
            parse_frame(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
    }

    #[test]
    fn turn_slots_are_bounded_per_user_and_released_on_drop() {
        let limits = Arc::new(Limits {
            max_turns_per_user: 2,
            ..Limits::default()
        });
        let a = limits.acquire("u").unwrap();
        let _b = limits.acquire("u").unwrap();
        assert!(limits.acquire("u").is_none());
        assert!(limits.acquire("v").is_some());
        drop(a);
        assert!(limits.acquire("u").is_some());
    }
}
