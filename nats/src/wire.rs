//! Wire types: WebSocket frames and the chat's bus payloads here, the scan's
//! (SSE events, jobs, records) in `wire/scan.rs`, re-exported here.
//!
//! The token frames on `chat.tok.<conv>.<turn>` are byte-for-byte the frames
//! the WebSocket carries, several to a message ([`crate::batch`]), so the
//! gateway relays them without re-encoding.

mod erase;
mod reward;
mod scan;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use erase::*;
pub use reward::*;
pub use scan::*;

/// Largest `content` of a `send` frame the gateway accepts (64 KiB).
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;

/// A frame the client sends over `GET /v1/chat/ws`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Starts a turn; `conversation_id: null` opens a new conversation.
    Send {
        /// The conversation to continue, or `None` for a new one.
        #[serde(default)]
        conversation_id: Option<String>,
        /// The user's message.
        content: String,
        /// The client's idempotency key: a repeat is not a second turn.
        request_id: String,
        /// One of the models `GET /v1/models` lists; `None` uses the default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// An upper bound on the answer's tokens, at most the operator's cap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_tokens: Option<u32>,
    },
    /// Replays a turn's frames after `after_seq`, then follows it live.
    Resume {
        /// The turn to resume.
        turn_id: String,
        /// The last `seq` the client has seen (0 for none).
        #[serde(default)]
        after_seq: u64,
    },
    /// Stops a generation and keeps the partial answer.
    Cancel {
        /// The turn to stop.
        turn_id: String,
    },
    /// Keepalive; answered with `pong`.
    Ping,
}

/// Why a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model finished its answer.
    Stop,
    /// The model hit its token limit.
    Length,
    /// The user cancelled.
    Cancelled,
    /// The upstream failed; the partial answer is kept.
    Error,
}

impl FinishReason {
    /// The contract's spelling, as stored in the `finish_reason` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

/// Token usage as the provider reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens in the answer.
    pub completion_tokens: u32,
}

/// A frame the server sends over the WebSocket (and publishes on `chat.tok.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The turn was accepted and has an id.
    Accepted {
        /// Echo of the client's `request_id`.
        request_id: String,
        /// The conversation the turn belongs to.
        conversation_id: String,
        /// The new (or, for a repeated `request_id`, the existing) turn.
        turn_id: String,
    },
    /// One piece of the answer.
    Token {
        /// The turn.
        turn_id: String,
        /// 1, 2, 3, ... contiguous per turn.
        seq: u64,
        /// The text to append.
        delta: String,
    },
    /// The last frame of a turn.
    Done {
        /// The turn.
        turn_id: String,
        /// Continues the turn's `seq` space.
        seq: u64,
        /// Why it ended.
        finish_reason: FinishReason,
        /// The provider's usage figure when it reported one.
        usage: Usage,
        /// The disposal-rule categories the answer was grounded in, most
        /// relevant first (contract v1.1); absent when none applied, so a
        /// reader that predates it sees the v1 frame.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sources: Vec<String>,
    },
    /// Something the client asked for failed.
    Error {
        /// The turn concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        turn_id: Option<String>,
        /// A stable machine-readable code.
        code: String,
        /// A human-readable explanation.
        message: String,
    },
    /// Answer to `ping`.
    Pong,
    /// The answer starts over: the client drops the text it has for the turn.
    Reset {
        /// The turn.
        turn_id: String,
        /// Continues the turn's `seq` space.
        seq: u64,
        /// Why it restarted.
        reason: String,
    },
}

impl ServerFrame {
    /// An `error` frame.
    pub fn error(turn_id: Option<String>, code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            turn_id,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The frame's `seq` when it belongs to a turn's ordered stream.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Self::Token { seq, .. } | Self::Done { seq, .. } | Self::Reset { seq, .. } => {
                Some(*seq)
            }
            _ => None,
        }
    }
}

/// What a client following a turn holds after `frames` (in order): the
/// token deltas since the last `reset`, and how many token frames carried
/// them.
pub fn shown_text(frames: &[ServerFrame]) -> (String, u32) {
    let start = frames
        .iter()
        .rposition(|f| matches!(f, ServerFrame::Reset { .. }))
        .map_or(0, |i| i + 1);
    let mut text = String::new();
    let mut tokens = 0;
    for frame in &frames[start..] {
        if let ServerFrame::Token { delta, .. } = frame {
            text.push_str(delta);
            tokens += 1;
        }
    }
    (text, tokens)
}

/// One message of a conversation, as sent to an OpenAI-compatible API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// `chat.req.<conv>`: a turn for the streamer to answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The turn's id (also its `Nats-Msg-Id`).
    pub turn_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// The JWT `sub` of the user who sent it.
    pub user_id: String,
    /// The client's idempotency key.
    pub request_id: String,
    /// The user's message.
    pub content: String,
    /// Earlier messages supplied by the caller (the OpenAI-compatible endpoint
    /// sends the whole conversation this way); empty for WebSocket turns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ChatMessage>,
    /// The gateway created the conversation for this turn: it has no earlier
    /// turns, so the streamer need not ask for history.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_conversation: bool,
    /// A model override; `None` uses the streamer's configured model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// An upper bound on the answer's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// When the gateway accepted it.
    pub created_at: DateTime<Utc>,
}

/// `chat.done.<conv>`: a completed turn, stored by the persister.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TurnRecord {
    /// The turn (primary key; also the `Nats-Msg-Id`).
    pub turn_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// The JWT `sub`.
    pub user_id: String,
    /// The client's idempotency key.
    pub request_id: String,
    /// The model that answered, as the provider named it.
    pub model: String,
    /// The user's message, verbatim.
    pub user_text: String,
    /// The answer as the client saw it, verbatim (partial if cancelled or failed).
    pub assistant_text: String,
    /// Why the turn ended.
    pub finish_reason: FinishReason,
    /// Token usage.
    pub usage: Usage,
    /// The disposal-rule categories the answer was grounded in, in order
    /// (the `done` frame's `sources`); empty when none applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// The last error, when `finish_reason` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the gateway accepted the turn.
    pub created_at: DateTime<Utc>,
    /// When the first token was published, if any was.
    pub first_token_at: Option<DateTime<Utc>>,
    /// When the turn ended.
    pub completed_at: DateTime<Utc>,
}

/// The `chat_turns` KV entry of a turn: who may resume or cancel it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnIndex {
    /// The owner (JWT `sub`).
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// The client's idempotency key.
    pub request_id: String,
    /// When the gateway accepted it.
    pub created_at: DateTime<Utc>,
}

/// The `chat_context` KV entry of a conversation: the text of its newest
/// turns, oldest first, already cut to the streamer's prompt budget, so the
/// next prompt is one read and the entry's size does not grow with the
/// conversation. The persisters keep every turn; this keeps what a prompt uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationContext {
    /// The owner (JWT `sub`); a reader asking for someone else's gets nothing.
    pub user_id: String,
    /// The newest turns, in turn order (`created_at`, then `turn_id`).
    pub turns: Vec<ContextTurn>,
}

/// One turn of a [`ConversationContext`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextTurn {
    /// The turn.
    pub turn_id: String,
    /// When the gateway accepted it (the turn's place in the conversation).
    pub created_at: DateTime<Utc>,
    /// The user's message (shortened, ending in "…", only when it alone
    /// exceeded the budget).
    pub user_text: String,
    /// The answer as the client was shown it, also of a cancelled or failed
    /// turn (shortened like `user_text`).
    pub assistant_text: String,
}

/// `dlq.<kind>`: work that failed all its retries or could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The subject the original message arrived on.
    pub subject: String,
    /// Why it was given up on.
    pub error: String,
    /// How many times it was delivered.
    pub deliveries: u64,
    /// The original payload (lossy UTF-8).
    pub payload: String,
    /// When it was given up on.
    pub failed_at: DateTime<Utc>,
}

/// JetStream's `io.nats.jetstream.advisory.v1.max_deliver`: a message of
/// `stream` used up the `max_deliver` of `consumer` and will not be
/// delivered again. Captured by the `MAX_DELIVERIES` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxDeliveriesAdvisory {
    /// The work stream (`CHAT_REQ`, `SCAN_REQ`).
    pub stream: String,
    /// The durable consumer whose deliveries ran out.
    pub consumer: String,
    /// The message's sequence in `stream`.
    pub stream_seq: u64,
    /// How many times it was delivered.
    pub deliveries: u64,
}

/// `history.list` request: a user's conversations, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryListRequest {
    /// Whose conversations.
    pub user_id: String,
    /// At most this many (the persister caps it).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One conversation in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConversationSummary {
    /// The conversation.
    pub conversation_id: String,
    /// The first user message, shortened: a title for lists.
    pub title: String,
    /// How many turns it has.
    pub turns: u32,
    /// When its first turn was accepted.
    pub created_at: DateTime<Utc>,
    /// When its last turn completed.
    pub updated_at: DateTime<Utc>,
}

/// `history.get` request: one page of a conversation's turns.
///
/// Pages go back in time: the first holds the newest turns, each next one
/// (`before` = the previous page's `next_cursor`) older ones; inside a page
/// turns are oldest first. A reply never exceeds the bus's max payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryGetRequest {
    /// Who asks (only the owner may read it).
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// At most this many turns; default and cap in [`crate::history`]
    /// (`DEFAULT_TURNS`, `MAX_TURNS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only turns older than this cursor (an earlier page's `next_cursor`);
    /// `None` starts from the newest turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// Stop adding older turns once their JSON passes this many bytes (the
    /// newest turn of the page always comes); the max payload caps it anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u32>,
}

/// A reply on the history subjects: the value, or an error with a code
/// (`not_found`, `forbidden`, `unavailable`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HistoryReply<T> {
    /// The answer.
    Ok(T),
    /// Why there is none.
    Err(ErrorBody),
}

impl<T> HistoryReply<T> {
    /// An error reply with `code` and `message`.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Err(ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        })
    }
}

/// The `history.list` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConversationList {
    /// Newest first.
    pub conversations: Vec<ConversationSummary>,
}

/// The `history.get` answer (and `GET /v1/conversations/{id}`'s body): one page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConversationDetail {
    /// The conversation.
    pub conversation_id: String,
    /// The page's turns, oldest first (Postgres plus what only SQLite has yet).
    pub turns: Vec<TurnRecord>,
    /// True when older turns exist than this page holds (a short page can
    /// have more: it was cut to fit a NATS message).
    #[serde(default)]
    pub has_more: bool,
    /// Where the next (older) page starts, when `has_more`; opaque.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// An HTTP error body: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_frames_parse_as_the_contract_spells_them() {
        let send: ClientFrame = serde_json::from_value(json!({
            "type": "send", "conversation_id": null, "content": "hi", "request_id": "r1"
        }))
        .unwrap();
        assert_eq!(
            send,
            ClientFrame::Send {
                conversation_id: None,
                content: "hi".into(),
                request_id: "r1".into(),
                model: None,
                max_tokens: None,
            }
        );
        let chosen: ClientFrame = serde_json::from_value(json!({
            "type": "send", "content": "hi", "request_id": "r1",
            "model": "m", "max_tokens": 100
        }))
        .unwrap();
        assert!(matches!(
            chosen,
            ClientFrame::Send { model: Some(m), max_tokens: Some(100), .. } if m == "m"
        ));
        let resume: ClientFrame =
            serde_json::from_str(r#"{"type":"resume","turn_id":"t","after_seq":3}"#).unwrap();
        assert_eq!(
            resume,
            ClientFrame::Resume {
                turn_id: "t".into(),
                after_seq: 3
            }
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"send"}"#).is_err());
    }

    #[test]
    fn server_frames_serialize_as_the_contract_spells_them() {
        let token = ServerFrame::Token {
            turn_id: "t".into(),
            seq: 3,
            delta: "hi".into(),
        };
        assert_eq!(
            serde_json::to_value(&token).unwrap(),
            json!({"type":"token","turn_id":"t","seq":3,"delta":"hi"})
        );
        let done = ServerFrame::Done {
            turn_id: "t".into(),
            seq: 4,
            finish_reason: FinishReason::Cancelled,
            usage: Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
            },
            sources: vec![],
        };
        assert_eq!(
            serde_json::to_value(&done).unwrap(),
            json!({"type":"done","turn_id":"t","seq":4,"finish_reason":"cancelled",
                   "usage":{"prompt_tokens":5,"completion_tokens":3}})
        );
        let grounded = ServerFrame::Done {
            turn_id: "t".into(),
            seq: 5,
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
            sources: vec!["glass".into(), "general".into()],
        };
        let value = serde_json::to_value(&grounded).unwrap();
        assert_eq!(value["sources"], json!(["glass", "general"]));
        assert_eq!(
            serde_json::from_value::<ServerFrame>(value).unwrap(),
            grounded
        );
        assert_eq!(
            serde_json::to_value(ServerFrame::error(None, "too_large", "x")).unwrap(),
            json!({"type":"error","code":"too_large","message":"x"})
        );
        assert_eq!(
            serde_json::to_string(&ServerFrame::Pong).unwrap(),
            r#"{"type":"pong"}"#
        );
    }
}
