//! Wire types: WebSocket frames, SSE scan events and bus payloads.
//!
//! The token frames on `chat.tok.<conv>.<turn>` are byte-for-byte the frames
//! the WebSocket carries, several to a message ([`crate::batch`]), so the
//! gateway relays them without re-encoding.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Largest `content` of a `send` frame the gateway accepts (64 KiB).
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;

/// A frame the client sends over `GET /v1/chat/ws`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens in the answer.
    pub completion_tokens: u32,
}

/// A frame the server sends over the WebSocket (and publishes on `chat.tok.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// The `history.list` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationList {
    /// Newest first.
    pub conversations: Vec<ConversationSummary>,
}

/// The `history.get` answer (and `GET /v1/conversations/{id}`'s body): one page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Largest upload `POST /v1/scans` accepts (20 MB).
pub const MAX_UPLOAD_BYTES: usize = 20 * 1024 * 1024;
/// Largest decoded image (width x height) accepted: refuses decompression
/// bombs from their header, before any pixel is decoded.
pub const MAX_IMAGE_PIXELS: u64 = 50_000_000;

/// `scan.req.<scan>`: a scan job, published by the gateway after the image
/// is in the object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    /// The scan.
    pub scan_id: String,
    /// The owner (JWT `sub`).
    pub user_id: String,
    /// The object's name in the `scan_images` object store.
    pub object: String,
    /// `image/jpeg`, `image/png` or `image/webp`, from the magic bytes.
    pub content_type: String,
    /// Size of the upload in bytes.
    pub bytes: u64,
    /// Width and height read from the header.
    pub width: u32,
    /// See `width`.
    pub height: u32,
    /// When the gateway accepted it.
    pub created_at: DateTime<Utc>,
    /// How many times an operator sent it back from the DLQ (0 at first).
    #[serde(default)]
    pub reprocessed: u32,
    /// Language of the explanation: `en` or `ko`.
    #[serde(default = "default_lang")]
    pub lang: String,
}

fn default_lang() -> String {
    "en".into()
}

/// The owner record of a scan, in the `scans` KV bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanOwner {
    /// The owner (JWT `sub`).
    pub user_id: String,
    /// When the gateway accepted it.
    pub created_at: DateTime<Utc>,
}

/// The stages of a scan's `progress` events, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanStage {
    /// The pipeline has the uploaded image (10 %).
    Stored,
    /// Content and perceptual hashes computed (20 %).
    Hashed,
    /// The perceptual hash matched a cached result (100 %).
    CacheHit,
    /// Decoded, EXIF-oriented, resized (30 %).
    Preprocessed,
    /// The image model ran (50-60 %).
    Vision,
    /// The disposal rule was chosen (70 %).
    Rules,
    /// The explanation is being written (80-90 %).
    Answer,
    /// Finished (100 %).
    Done,
}

impl ScanStage {
    /// The stage's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Hashed => "hashed",
            Self::CacheHit => "cache_hit",
            Self::Preprocessed => "preprocessed",
            Self::Vision => "vision",
            Self::Rules => "rules",
            Self::Answer => "answer",
            Self::Done => "done",
        }
    }
}

/// A scan's status, as `GET /v1/scans/{id}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanStatus {
    /// Stored, no stage started yet.
    Queued,
    /// A stage has started.
    Running,
    /// Finished with a result.
    Done,
    /// Gave up after its retries.
    Failed,
}

impl ScanStatus {
    /// The status's name on the wire and in the `scans` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// A `progress` event's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanProgress {
    /// The stage.
    pub stage: ScanStage,
    /// Overall progress, 0-100.
    pub percent: u8,
    /// A human-readable line about the stage.
    pub message: String,
    /// True when the explanation starts over (a worker died mid-answer and
    /// another one took the job): drop the `token` text received so far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
}

/// One of the model's top classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanLabel {
    /// The model's class name (an ImageNet class for the local model).
    pub label: String,
    /// Its probability, 0-1.
    pub score: f64,
}

/// The disposal rule a scan matched, as in the rules file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisposalRule {
    /// The waste category (`plastic`, `glass`, ..., `unknown`).
    pub category: String,
    /// The category's name in Korean and English.
    pub name: Localized,
    /// Which bin or collection it goes to.
    pub bin: Localized,
    /// How to prepare it, step by step.
    pub steps: Vec<Localized>,
    /// Why it is separated this way.
    pub why: Localized,
}

/// A text in Korean and English.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Localized {
    /// Korean.
    pub ko: String,
    /// English.
    pub en: String,
}

/// The final scan record: the SSE `result` event's data, the payload of
/// `scan.done.<scan>` and the row of the `scans` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanRecord {
    /// The scan.
    pub scan_id: String,
    /// The owner.
    pub user_id: String,
    /// `done` or `failed`.
    pub status: ScanStatus,
    /// The waste category, `unknown` below the confidence threshold.
    pub category: Option<String>,
    /// The model's confidence in the category, 0-1.
    pub confidence: Option<f64>,
    /// The model's top classes, best first.
    #[serde(default)]
    pub labels: Vec<ScanLabel>,
    /// Which vision provider and model classified it.
    #[serde(default)]
    pub vision_model: Option<String>,
    /// The perceptual hash (64-bit DCT hash, 16 hex digits).
    pub phash: Option<String>,
    /// SHA-256 of the uploaded bytes, hex.
    pub sha256: Option<String>,
    /// The disposal rule that matched.
    pub rule: Option<DisposalRule>,
    /// The LLM's explanation.
    pub answer: Option<String>,
    /// True when the result came from the perceptual-hash cache.
    pub cached: bool,
    /// Why it failed, for `failed`.
    pub error: Option<String>,
    /// When the gateway accepted it.
    pub created_at: DateTime<Utc>,
    /// When it finished or failed.
    pub completed_at: Option<DateTime<Utc>>,
}

impl ScanRecord {
    /// True when `self` replaces `other` as the record of the same scan.
    ///
    /// A scan can be published more than once: a redelivered job, or a
    /// `failed` scan an operator sent back from the DLQ that later completes.
    /// The later record wins, by `completed_at` (none is earliest) and, at
    /// the same instant, `done` over `failed` over anything else. Instants
    /// are compared to the microsecond, the precision Postgres keeps, so the
    /// persister's SQLite buffer, Postgres and the merge of several
    /// persisters' answers all pick the same record. A record equal by this
    /// order does not replace: the same record twice is a no-op.
    pub fn supersedes(&self, other: &ScanRecord) -> bool {
        scan_order(self.status, self.completed_at) > scan_order(other.status, other.completed_at)
    }
}

/// The order of [`ScanRecord::supersedes`] on the two fields it reads, for
/// callers that hold only those (the persister's SQL mirrors it).
pub fn scan_order(status: ScanStatus, completed_at: Option<DateTime<Utc>>) -> impl Ord {
    let rank: u8 = match status {
        ScanStatus::Done => 2,
        ScanStatus::Failed => 1,
        ScanStatus::Queued | ScanStatus::Running => 0,
    };
    (completed_at.map(|t| t.timestamp_micros()), rank)
}

/// An `error` event's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanError {
    /// A stable machine-readable code.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
    /// The stage that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<ScanStage>,
}

/// The data of one scan event, tagged with its SSE `event:` name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum ScanEventData {
    /// A stage started or finished.
    Progress(ScanProgress),
    /// A piece of the explanation.
    Token {
        /// The text.
        delta: String,
    },
    /// The final record; terminal.
    Result(Box<ScanRecord>),
    /// The scan failed; terminal.
    Error(ScanError),
}

impl ScanEventData {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Progress(_) => "progress",
            Self::Token { .. } => "token",
            Self::Result(_) => "result",
            Self::Error(_) => "error",
        }
    }

    /// True for `result` and `error`, after which the SSE stream closes.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Result(_) | Self::Error(_))
    }
}

/// One event on `scan.evt.<scan>`: `{"id":N,"event":"...","data":{...}}`.
/// The SSE stream carries the same `id`, `event` and `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanEvent {
    /// Contiguous per scan from 1.
    pub id: u64,
    /// The event.
    #[serde(flatten)]
    pub data: ScanEventData,
}

/// `history.scans` request: a user's scans, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryScansRequest {
    /// Whose scans.
    pub user_id: String,
    /// At most this many (the persister caps it).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// The `history.scans` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanList {
    /// Newest first.
    pub scans: Vec<ScanRecord>,
    /// True when the oldest of the requested scans were left out so that the
    /// reply fits in one NATS message (the server's `max_payload`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// `history.scan` request: one scan by id. Another user's scan is answered
/// exactly like a scan that does not exist (`not_found`), so scan ids cannot
/// be probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryScanRequest {
    /// Who asks (only the owner may read it).
    pub user_id: String,
    /// The scan.
    pub scan_id: String,
}

/// An HTTP error body: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        };
        assert_eq!(
            serde_json::to_value(&done).unwrap(),
            json!({"type":"done","turn_id":"t","seq":4,"finish_reason":"cancelled",
                   "usage":{"prompt_tokens":5,"completion_tokens":3}})
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
