//! The scan's wire types: the job on `scan.req.<scan>`, the events on
//! `scan.evt.<scan>` (the same the SSE stream carries), the record on
//! `scan.done.<scan>`, and the scan history requests.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The character the scan earned was looked up and granted (95 %).
    Reward,
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
            Self::Reward => "reward",
            Self::Done => "done",
        }
    }
}

/// A scan's status, as `GET /v1/scans/{id}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScanLabel {
    /// The model's class name (an ImageNet class for the local model).
    pub label: String,
    /// Its probability, 0-1.
    pub score: f64,
}

/// The disposal rule a scan matched, as in the rules file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DisposalRule {
    /// The waste category (`plastic`, `glass`, ..., `unknown`).
    pub category: String,
    /// The category's name in Korean and English.
    pub name: Localized,
    /// Everyday names of the things it covers ("soju bottle", "소주병"):
    /// what chat retrieval and the guide's search match. Absent in records
    /// stored before it existed.
    #[serde(default, skip_serializing_if = "Items::is_empty")]
    pub items: Items,
    /// Which bin or collection it goes to.
    pub bin: Localized,
    /// How to prepare it, step by step.
    pub steps: Vec<Localized>,
    /// Why it is separated this way.
    pub why: Localized,
}

/// Lists of names in Korean and English (each language has its own count).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Items {
    /// Korean names.
    #[serde(default)]
    pub ko: Vec<String>,
    /// English names.
    #[serde(default)]
    pub en: Vec<String>,
}

impl Items {
    /// True when neither language has a name.
    pub fn is_empty(&self) -> bool {
        self.ko.is_empty() && self.en.is_empty()
    }
}

/// A text in Korean and English.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Localized {
    /// Korean.
    pub ko: String,
    /// English.
    pub en: String,
}

/// The final scan record: the SSE `result` event's data, the payload of
/// `scan.done.<scan>` and the row of the `scans` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The character this scan earned: `null` when none matches its
    /// category (`unknown`), when the scan failed, or when the reward stage
    /// timed out (the scan's dead letter then grants it on reprocessing).
    #[serde(default)]
    pub reward: Option<super::Reward>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
