//! The scan pipeline: one `scan.req.<scan>` job in, the events of
//! `scan.evt.<scan>` and one record on `scan.done.<scan>` out.
//!
//! Stages and their progress: stored 10 %, hashed 20 % (SHA-256 and a
//! perceptual hash; a hit in the `scan_cache` KV bucket skips to
//! `cache_hit` 90 % with the cached result), preprocessed 30 % (EXIF
//! orientation, at most 1024 px), vision 50-60 %, rules 70 %, answer 80-90 %
//! (the LLM's explanation as `token` events), reward 95 % (the character
//! the scan earned, [`reward`]), done 100 % and the `result`.
//!
//! Event ids are contiguous per scan across every worker that ever touched
//! it: a worker starts from the last stored event, and publishes with
//! `Nats-Expected-Last-Subject-Sequence`, so two workers that somehow run
//! the same scan cannot interleave (the loser stops). A worker taking over
//! from a dead one skips the progress already reported, and restarts the
//! explanation with a `progress` event marked `reset`.
//!
//! Vision and answer attempts are bounded by a soft timeout (a "taking
//! longer" progress) and a hard one (the attempt is abandoned), retried
//! with backoff; when the attempts are spent the scan ends with an `error`
//! event, a `failed` record and a dead letter on `dlq.scan`, which
//! [`reprocess_dead_letters`] sends back to the pipeline.

use std::{io::Cursor, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use anyhow::Context as _;
use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, kv, object_store::ObjectStore},
};
use bus::{
    subject,
    wire::{
        ChatMessage, DeadLetter, DisposalRule, ScanError, ScanEvent, ScanEventData, ScanProgress,
        ScanRecord, ScanRequest, ScanStage, ScanStatus,
    },
};
use chrono::Utc;
use futures::{FutureExt as _, StreamExt as _};
use image::{DynamicImage, ImageDecoder as _};
use sha2::Digest as _;
use tokio::io::AsyncReadExt as _;

mod answer;
mod cache;
mod consumer;
mod events;
mod failure;
mod picture;
mod pipeline;
mod reprocess;
mod reward;
mod vision;

use crate::{
    phash::phash,
    upstream::{self, Upstream},
    vision::{Classification, PreparedImage, Vision},
};
use events::{Events, Opened};
use failure::{Failure, Stop, failed_record};
use picture::{blocking, hash, prepare};
pub use reprocess::{ReprocessReport, reprocess_dead_letters};

/// Reprocess passes after which a dead letter is archived instead.
pub const MAX_REPROCESS: u32 = 3;
/// The dead-letter kind of failed scans.
pub const DLQ_KIND: &str = "scan";
/// Where dead letters go once they were reprocessed [`MAX_REPROCESS`] times.
pub const DLQ_ARCHIVE_KIND: &str = "scan_archive";

/// Timeouts and retries of the pipeline.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Vision: when to say it takes longer.
    pub vision_soft: Duration,
    /// Vision: when to abandon an attempt.
    pub vision_hard: Duration,
    /// Answer: when to say it takes longer.
    pub answer_soft: Duration,
    /// Answer: when to abandon an attempt.
    pub answer_hard: Duration,
    /// Attempts per stage.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base: Duration,
    /// Token cap of the explanation.
    pub max_tokens: u32,
    /// Reward: when to say it takes longer.
    pub reward_soft: Duration,
    /// Reward: when to give up (the scan completes without one and a dead
    /// letter grants it on reprocessing).
    pub reward_hard: Duration,
    /// How often a running job tells JetStream it is alive.
    pub progress_every: Duration,
}

/// What a scan worker needs; cloned cheaply into each task.
#[derive(Clone)]
pub struct ScanWorker {
    /// Core NATS, for keep-alive acks.
    pub client: async_nats::Client,
    /// JetStream, for events, records and dead letters.
    pub js: jetstream::Context,
    /// The uploaded images.
    pub images: ObjectStore,
    /// Perceptual hash -> earlier result.
    pub cache: kv::Store,
    /// The image model.
    pub vision: Arc<dyn Vision>,
    /// The LLM for the explanation.
    pub upstream: Upstream,
    /// The character catalogue, kept current from the `characters` bucket.
    pub characters: crate::catalogue::MatchCache,
    /// `character_owners`: who first earned which character (create-only).
    pub owners: kv::Store,
    /// Disposal rules by category, and their index for the rules an
    /// item's labels bring (its material's).
    pub grounding: Arc<crate::grounding::Grounding>,
    /// Timeouts and retries.
    pub settings: Arc<Settings>,
}

fn localized<'a>(text: &'a bus::wire::Localized, lang: &str) -> &'a str {
    if lang == "ko" { &text.ko } else { &text.en }
}

fn retry_delay(base: Duration, attempt: u32) -> Duration {
    bus::backoff::delay(base, attempt, base.saturating_mul(1 << 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow() {
        let base = Duration::from_millis(100);
        assert!(retry_delay(base, 1) <= Duration::from_millis(200));
        assert!(retry_delay(base, 3) >= Duration::from_millis(400));
    }
}
