//! The scan pipeline: one `scan.req.<scan>` job in, the events of
//! `scan.evt.<scan>` and one record on `scan.done.<scan>` out.
//!
//! Stages and their progress: stored 10 %, hashed 20 % (SHA-256 and a
//! perceptual hash; a hit in the `scan_cache` KV bucket ends the scan with
//! the cached result at 100 %), preprocessed 30 % (EXIF orientation, at
//! most 1024 px), vision 50-60 %, rules 70 %, answer 80-90 % (the LLM's
//! explanation as `token` events), done 100 % and the `result`.
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

mod events;
mod picture;
mod reprocess;

use events::{Events, Opened};
use picture::{blocking, hash, prepare};
pub use reprocess::{ReprocessReport, reprocess_dead_letters};

use crate::{
    phash::phash,
    rules::Rules,
    upstream::{self, Upstream},
    vision::{Classification, PreparedImage, Vision},
};

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
    /// Disposal rules by category.
    pub rules: Arc<Rules>,
    /// Timeouts and retries.
    pub settings: Arc<Settings>,
}

/// Why a stage stopped the pipeline.
#[derive(Debug)]
enum Stop {
    /// The bus failed: hand the job back, it is redone from the stored events.
    Bus(anyhow::Error),
    /// Another worker is writing this scan's events.
    Superseded,
    /// The scan failed for good.
    Failed(Failure),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Self::Bus(e)
    }
}

/// A terminal failure of one scan.
#[derive(Debug, Clone)]
struct Failure {
    code: &'static str,
    message: String,
    stage: ScanStage,
    /// Worth a dead letter: retrying later might succeed (a provider was
    /// down), unlike a corrupt image.
    dead_letter: bool,
}

impl Failure {
    fn input(code: &'static str, message: String, stage: ScanStage) -> Self {
        Self {
            code,
            message,
            stage,
            dead_letter: false,
        }
    }
}

impl Failure {
    /// The failure an `error` event recorded, for finishing a run whose
    /// error event is stored but whose record or dead letter may not be.
    fn from_event(error: ScanError) -> Self {
        let (code, dead_letter) = match error.code.as_str() {
            "corrupt_image" => ("corrupt_image", false),
            "image_missing" => ("image_missing", false),
            "vision_failed" => ("vision_failed", true),
            "answer_failed" => ("answer_failed", true),
            crate::chat::EXHAUSTED_CODE => (crate::chat::EXHAUSTED_CODE, true),
            _ => ("internal", true),
        };
        Self {
            code,
            message: error.message,
            stage: error.stage.unwrap_or(ScanStage::Done),
            dead_letter,
        }
    }
}

impl ScanWorker {
    /// Handles one delivery of a `scan.req.*` message, acking it once the
    /// scan's outcome is stored, or handing it back when the bus failed.
    pub async fn handle(&self, message: jetstream::Message) {
        let lease = bus::lease::Lease::keep(&self.client, &message, self.settings.progress_every);
        let deliveries = bus::dlq::deliveries(&message);
        let request: ScanRequest = match serde_json::from_slice(&message.payload) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("undecodable scan request: {e}");
                bus::dlq::terminate(&self.js, DLQ_KIND, &message, &reason).await;
                return;
            }
        };
        // The scan id names subjects; the user id is a JWT `sub` (any
        // non-empty string) that is only stored and compared.
        if subject::token(&request.scan_id).is_err() || request.user_id.is_empty() {
            let reason = "scan request with an invalid id";
            bus::dlq::terminate(&self.js, DLQ_KIND, &message, reason).await;
            return;
        }
        let span = tracing::info_span!("scan", scan = %request.scan_id, run = request.reprocessed);
        let _enter = span.enter();
        let outcome = AssertUnwindSafe(self.run(&request)).catch_unwind().await;
        drop(lease);
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => {
                // A panic in a stage (a decoder bug on a hostile file, say)
                // must not be redelivered until max_deliver: fail it once.
                metrics::counter!("streamer_scan_panics_total").increment(1);
                tracing::error!("The scan pipeline panicked; failing the scan.");
                self.finish_failed(
                    &request,
                    None,
                    Failure {
                        code: "internal",
                        message: "the pipeline failed unexpectedly".into(),
                        stage: ScanStage::Done,
                        dead_letter: true,
                    },
                    deliveries,
                )
                .await
            }
        };
        match outcome {
            Ok(()) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(%error, "Ack of a finished scan failed; it will be redelivered and found finished.");
                }
            }
            Err(Stop::Superseded) => {
                tracing::warn!("Another worker is writing this scan; leaving it to them.");
            }
            Err(Stop::Bus(error)) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "Scan failed on the bus; handing it back."
                );
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
            Err(Stop::Failed(_)) => unreachable!("failures are finished inside run"),
        }
    }

    /// Closes a scan whose job used up its deliveries (the advisory of its
    /// stream sequence `stream_seq`): its `error` event, the failed record
    /// and a dead letter on `dlq.scan` (reprocessable). A scan whose run
    /// already ended is only finished again.
    ///
    /// # Errors
    /// When the bus fails; the advisory is then handed back and retried.
    pub async fn close_exhausted(&self, stream_seq: u64, deliveries: u64) -> anyhow::Result<()> {
        let Some(request) =
            crate::chat::original::<ScanRequest>(&self.js, bus::streams::SCAN_REQ, stream_seq)
                .await?
        else {
            return Ok(());
        };
        let span = tracing::info_span!("scan", scan = %request.scan_id, run = request.reprocessed);
        let _enter = span.enter();
        let failure = Failure {
            code: crate::chat::EXHAUSTED_CODE,
            message: "the scan could not be completed after several attempts; please try again"
                .into(),
            stage: ScanStage::Done,
            dead_letter: true,
        };
        // A worker still writing (slow, not dead) is fenced by our event; if
        // it wrote between our read and our write, read again.
        for _ in 0..5 {
            let closed = match Events::open(&self.js, &request).await? {
                Opened::Finished(last) => self.refinish(&request, last).await,
                Opened::Fresh(mut events) => {
                    self.finish_failed(&request, Some(&mut events), failure.clone(), deliveries)
                        .await
                }
            };
            match closed {
                Ok(()) => {
                    metrics::counter!("streamer_exhausted_total", "kind" => "scan").increment(1);
                    return Ok(());
                }
                Err(Stop::Superseded) => continue,
                Err(Stop::Bus(e)) => return Err(e),
                Err(Stop::Failed(_)) => unreachable!("finish_failed does not fail a scan"),
            }
        }
        anyhow::bail!("another worker kept writing the scan")
    }

    async fn run(&self, request: &ScanRequest) -> Result<(), Stop> {
        let mut events = match Events::open(&self.js, request).await? {
            Opened::Finished(last) => return self.refinish(request, last).await,
            Opened::Fresh(events) => events,
        };
        match self.pipeline(request, &mut events).await {
            Ok(record) => {
                self.publish_done(&record, request.reprocessed).await?;
                if !record.cached {
                    self.remember(&record, &request.lang).await;
                }
                metrics::counter!("streamer_scans_total", "status" => "done", "cached" => record.cached.to_string())
                    .increment(1);
                Ok(())
            }
            Err(Stop::Failed(failure)) => {
                let attempts = u64::from(self.settings.max_attempts);
                self.finish_failed(request, Some(&mut events), failure, attempts)
                    .await
            }
            Err(other) => Err(other),
        }
    }

    /// The run already ended (its terminal event is stored) but the job was
    /// not acked: make sure the record and dead letter are out, then ack.
    async fn refinish(&self, request: &ScanRequest, last: ScanEvent) -> Result<(), Stop> {
        match last.data {
            ScanEventData::Result(record) => self.publish_done(&record, request.reprocessed).await,
            ScanEventData::Error(error) => {
                let failure = Failure::from_event(error);
                let record = failed_record(request, &failure);
                self.publish_done(&record, request.reprocessed).await?;
                if failure.dead_letter {
                    self.dead_letter(request, &failure, u64::from(self.settings.max_attempts))
                        .await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn finish_failed(
        &self,
        request: &ScanRequest,
        events: Option<&mut Events>,
        failure: Failure,
        attempts: u64,
    ) -> Result<(), Stop> {
        tracing::warn!(code = failure.code, error = %failure.message, "Scan failed.");
        metrics::counter!("streamer_scans_total", "status" => "failed", "cached" => "false")
            .increment(1);
        let error = ScanEventData::Error(ScanError {
            code: failure.code.into(),
            message: failure.message.clone(),
            stage: Some(failure.stage),
        });
        match events {
            Some(events) => events.emit(error).await?,
            None => {
                let mut events = match Events::open(&self.js, request).await? {
                    Opened::Finished(_) => return Ok(()),
                    Opened::Fresh(events) => events,
                };
                events.emit(error).await?;
            }
        }
        let record = failed_record(request, &failure);
        self.publish_done(&record, request.reprocessed).await?;
        if failure.dead_letter {
            self.dead_letter(request, &failure, attempts).await?;
        }
        Ok(())
    }

    async fn publish_done(&self, record: &ScanRecord, run: u32) -> Result<(), Stop> {
        let subject = subject::scan_done(&record.scan_id).context("scan id")?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(
                serde_json::to_vec(record)
                    .expect("record serialises")
                    .into(),
            )
            .message_id(format!("{}:{run}", record.scan_id));
        self.js
            .send_publish(subject, publish)
            .await
            .context("publishing the scan record")?
            .await
            .context("publishing the scan record")?;
        Ok(())
    }

    async fn dead_letter(
        &self,
        request: &ScanRequest,
        failure: &Failure,
        attempts: u64,
    ) -> Result<(), Stop> {
        let letter = DeadLetter {
            subject: subject::scan_req(&request.scan_id).context("scan id")?,
            error: format!("{}: {}", failure.code, failure.message),
            deliveries: attempts,
            payload: serde_json::to_string(request).expect("request serialises"),
            failed_at: Utc::now(),
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(
                serde_json::to_vec(&letter)
                    .expect("letter serialises")
                    .into(),
            )
            .message_id(format!("dlq:{}:{}", request.scan_id, request.reprocessed));
        self.js
            .send_publish(subject::dlq(DLQ_KIND).expect("static kind"), publish)
            .await
            .context("publishing the dead letter")?
            .await
            .context("publishing the dead letter")?;
        metrics::counter!("streamer_scan_dead_letters_total").increment(1);
        Ok(())
    }

    /// Stores a fresh result under its perceptual hash. A failure only costs
    /// a future cache miss.
    async fn remember(&self, record: &ScanRecord, lang: &str) {
        let Some(phash) = &record.phash else { return };
        let key = cache_key(phash, lang);
        match serde_json::to_vec(record) {
            Ok(value) => {
                if let Err(error) = self.cache.put(&key, value.into()).await {
                    tracing::warn!(%error, "Caching the scan result failed.");
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot encode the scan result for the cache."),
        }
    }

    async fn cached(&self, phash: &str, lang: &str) -> Option<ScanRecord> {
        match self.cache.get(cache_key(phash, lang)).await {
            Ok(Some(value)) => serde_json::from_slice(&value).ok(),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "Scan cache lookup failed; computing afresh.");
                None
            }
        }
    }

    async fn pipeline(
        &self,
        request: &ScanRequest,
        events: &mut Events,
    ) -> Result<ScanRecord, Stop> {
        let bytes = self.fetch(request).await?;
        events
            .progress(
                ScanStage::Stored,
                10,
                format!(
                    "Image received ({} KB, {} x {}).",
                    bytes.len().div_ceil(1024),
                    request.width,
                    request.height
                ),
            )
            .await?;

        let hashed = blocking(move || hash(&bytes)).await?;
        events
            .progress(
                ScanStage::Hashed,
                20,
                format!("Fingerprint {}.", hashed.phash),
            )
            .await?;
        if let Some(earlier) = self.cached(&hashed.phash, &request.lang).await {
            let record = ScanRecord {
                scan_id: request.scan_id.clone(),
                user_id: request.user_id.clone(),
                sha256: Some(hashed.sha256),
                cached: true,
                created_at: request.created_at,
                completed_at: Some(Utc::now()),
                ..earlier
            };
            events
                .progress(
                    ScanStage::CacheHit,
                    100,
                    "The same item was scanned before; using that result.".into(),
                )
                .await?;
            return self.finish(events, record).await;
        }

        let image = hashed.image;
        let jpeg_wanted = self.vision.wants_jpeg();
        let prepared = blocking(move || prepare(image, jpeg_wanted)).await?;
        events
            .progress(
                ScanStage::Preprocessed,
                30,
                format!(
                    "Prepared a {} x {} image.",
                    prepared.rgb.width(),
                    prepared.rgb.height()
                ),
            )
            .await?;

        events
            .progress(ScanStage::Vision, 50, "Looking at the item.".into())
            .await?;
        let seen = self.classify(&prepared, events).await?;
        let rule = self.rules.for_category(&seen.category).clone();
        events
            .progress(
                ScanStage::Vision,
                60,
                format!(
                    "Looks like {} ({:.0} %).",
                    rule.name.en,
                    seen.confidence * 100.0
                ),
            )
            .await?;
        events
            .progress(
                ScanStage::Rules,
                70,
                format!("Goes to: {}.", localized(&rule.bin, &request.lang)),
            )
            .await?;

        let answer = self.explain(request, &seen, &rule, events).await?;
        events
            .progress(ScanStage::Answer, 90, "Explanation written.".into())
            .await?;
        let record = ScanRecord {
            scan_id: request.scan_id.clone(),
            user_id: request.user_id.clone(),
            status: ScanStatus::Done,
            category: Some(seen.category),
            confidence: Some(seen.confidence),
            labels: seen.labels,
            vision_model: Some(seen.model),
            phash: Some(hashed.phash),
            sha256: Some(hashed.sha256),
            rule: Some(rule),
            answer: Some(answer),
            cached: false,
            error: None,
            created_at: request.created_at,
            completed_at: Some(Utc::now()),
        };
        self.finish(events, record).await
    }

    async fn finish(&self, events: &mut Events, record: ScanRecord) -> Result<ScanRecord, Stop> {
        events
            .progress(ScanStage::Done, 100, "Done.".into())
            .await?;
        events
            .emit(ScanEventData::Result(Box::new(record.clone())))
            .await?;
        Ok(record)
    }

    async fn fetch(&self, request: &ScanRequest) -> Result<Vec<u8>, Stop> {
        let mut object = match self.images.get(&request.object).await {
            Ok(o) => o,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Err(Stop::Failed(Failure::input(
                    "image_missing",
                    "the uploaded image is no longer stored".into(),
                    ScanStage::Stored,
                )));
            }
            Err(e) => {
                return Err(Stop::Bus(
                    anyhow::Error::new(e).context("reading the image"),
                ));
            }
        };
        let mut bytes = Vec::with_capacity(request.bytes as usize);
        object
            .read_to_end(&mut bytes)
            .await
            .context("reading the image")?;
        Ok(bytes)
    }

    async fn classify(
        &self,
        image: &PreparedImage,
        events: &mut Events,
    ) -> Result<Classification, Stop> {
        let s = &self.settings;
        let mut last_error = String::new();
        for attempt in 0..s.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(retry_delay(s.retry_base, attempt)).await;
            }
            let started = tokio::time::Instant::now();
            let mut call = self.vision.classify(image);
            let outcome = tokio::select! {
                outcome = &mut call => Some(outcome),
                _ = tokio::time::sleep(s.vision_soft) => None,
            };
            let outcome = match outcome {
                Some(outcome) => Some(outcome),
                None => {
                    events
                        .notice(
                            ScanStage::Vision,
                            50,
                            "Still looking; this takes longer than usual.".into(),
                        )
                        .await?;
                    let left = s.vision_hard.saturating_sub(started.elapsed());
                    tokio::time::timeout(left, call).await.ok()
                }
            };
            metrics::histogram!("streamer_scan_vision_seconds")
                .record(started.elapsed().as_secs_f64());
            // The provider's own words (its URL, its body) go to the log;
            // the event, the record and the dead letter get a plain cause.
            let (code, detail, public, retryable) = match outcome {
                Some(Ok(seen)) => return Ok(seen),
                Some(Err(e)) => (
                    e.code,
                    e.message.clone(),
                    e.public_message().to_owned(),
                    e.retryable,
                ),
                None => {
                    let timeout = format!("no answer within {:?}", s.vision_hard);
                    ("upstream_timeout", timeout.clone(), timeout, true)
                }
            };
            metrics::counter!("streamer_scan_vision_errors_total", "code" => code).increment(1);
            tracing::warn!(attempt, code, error = %detail, "Vision attempt failed.");
            if !retryable {
                return Err(Stop::Failed(Failure {
                    code: "vision_failed",
                    message: public,
                    stage: ScanStage::Vision,
                    dead_letter: true,
                }));
            }
            last_error = public;
            metrics::counter!("streamer_scan_retries_total", "stage" => "vision").increment(1);
        }
        Err(Stop::Failed(Failure {
            code: "vision_failed",
            message: format!(
                "the image model failed {} times; last: {last_error}",
                s.max_attempts
            ),
            stage: ScanStage::Vision,
            dead_letter: true,
        }))
    }

    async fn explain(
        &self,
        request: &ScanRequest,
        seen: &Classification,
        rule: &DisposalRule,
        events: &mut Events,
    ) -> Result<String, Stop> {
        let s = &self.settings;
        let prompt = upstream::Request {
            messages: answer_prompt(seen, rule, &request.lang),
            model: None,
            max_tokens: s.max_tokens,
            temperature: Some(0.3),
        };
        let mut last_error = String::new();
        for attempt in 0..s.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(retry_delay(s.retry_base, attempt)).await;
            }
            // Earlier events may hold explanation text (a dead worker, an
            // earlier attempt, an earlier run): clients drop it on reset.
            let reset = events.has_history || attempt > 0;
            events
                .emit(ScanEventData::Progress(ScanProgress {
                    stage: ScanStage::Answer,
                    percent: 80,
                    message: if reset {
                        "Writing the explanation again.".into()
                    } else {
                        "Writing the explanation.".into()
                    },
                    reset,
                }))
                .await?;
            events.has_history = true;
            match self.stream_answer(&prompt, events).await {
                Ok(text) if !text.trim().is_empty() => return Ok(text),
                Ok(_) => last_error = "the model wrote nothing".into(),
                Err(Stop::Failed(f)) => last_error = f.message,
                Err(other) => return Err(other),
            }
            metrics::counter!("streamer_scan_retries_total", "stage" => "answer").increment(1);
            tracing::warn!(attempt, error = %last_error, "Answer attempt failed.");
        }
        Err(Stop::Failed(Failure {
            code: "answer_failed",
            message: format!(
                "the language model failed {} times; last: {last_error}",
                s.max_attempts
            ),
            stage: ScanStage::Answer,
            dead_letter: true,
        }))
    }

    /// One attempt at the explanation; `Failed` means retry.
    async fn stream_answer(
        &self,
        prompt: &upstream::Request,
        events: &mut Events,
    ) -> Result<String, Stop> {
        let s = &self.settings;
        let failed = |message: String| {
            Stop::Failed(Failure {
                code: "answer_failed",
                message,
                stage: ScanStage::Answer,
                dead_letter: true,
            })
        };
        let hard = tokio::time::sleep(s.answer_hard);
        let soft = tokio::time::sleep(s.answer_soft);
        tokio::pin!(hard, soft);
        let mut soft_sent = false;
        // The provider's own words (its URL, its body) go to the log; the
        // event, the record and the dead letter get a plain cause.
        let upstream_failed = |e: upstream::UpstreamError| {
            tracing::warn!(code = e.code(), error = %e, "The explanation's LLM call failed.");
            failed(e.public_message().to_owned())
        };
        let open = self.upstream.stream(prompt);
        let mut stream = tokio::select! {
            opened = open => opened.map_err(upstream_failed)?,
            _ = &mut hard => return Err(failed(format!("no answer within {:?}", s.answer_hard))),
        };
        let mut text = String::new();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = &mut hard => return Err(failed(format!("the answer took longer than {:?}", s.answer_hard))),
                _ = &mut soft, if !soft_sent => {
                    soft_sent = true;
                    events.notice(ScanStage::Answer, 80, "Still writing; this takes longer than usual.".into()).await?;
                    continue;
                }
            };
            match next {
                None => return Ok(text),
                Some(Ok(upstream::Event::Delta(delta))) => {
                    text.push_str(&delta);
                    events.emit(ScanEventData::Token { delta }).await?;
                }
                Some(Ok(upstream::Event::Finish(_))) => {}
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(upstream_failed(e)),
            }
        }
    }
}

fn cache_key(phash: &str, lang: &str) -> String {
    format!("{phash}_{lang}")
}

fn localized<'a>(text: &'a bus::wire::Localized, lang: &str) -> &'a str {
    if lang == "ko" { &text.ko } else { &text.en }
}

fn failed_record(request: &ScanRequest, failure: &Failure) -> ScanRecord {
    ScanRecord {
        scan_id: request.scan_id.clone(),
        user_id: request.user_id.clone(),
        status: ScanStatus::Failed,
        category: None,
        confidence: None,
        labels: Vec::new(),
        vision_model: None,
        phash: None,
        sha256: None,
        rule: None,
        answer: None,
        cached: false,
        error: Some(format!("{}: {}", failure.code, failure.message)),
        created_at: request.created_at,
        completed_at: Some(Utc::now()),
    }
}

fn retry_delay(base: Duration, attempt: u32) -> Duration {
    bus::backoff::delay(base, attempt, base.saturating_mul(1 << 10))
}

fn answer_prompt(seen: &Classification, rule: &DisposalRule, lang: &str) -> Vec<ChatMessage> {
    let language = if lang == "ko" { "Korean" } else { "English" };
    let steps: Vec<String> = rule
        .steps
        .iter()
        .map(|s| format!("- {}", localized(s, lang)))
        .collect();
    let seen_as: Vec<String> = seen
        .labels
        .iter()
        .map(|l| format!("{} ({:.0} %)", l.label, l.score * 100.0))
        .collect();
    let system = format!(
        "You are a recycling assistant in Korea. In {language}, in at most five short sentences, \
         tell the user how to dispose of the item and why, following the rule given. \
         If the category is unknown, say that the item was not recognised and what to check."
    );
    let user = format!(
        "Category: {} ({:.0} % confidence). The image model saw: {}.\nBin: {}\nSteps:\n{}\nWhy: {}",
        localized(&rule.name, lang),
        seen.confidence * 100.0,
        if seen_as.is_empty() {
            "-".into()
        } else {
            seen_as.join(", ")
        },
        localized(&rule.bin, lang),
        steps.join("\n"),
        localized(&rule.why, lang),
    );
    vec![
        ChatMessage {
            role: "system".into(),
            content: system,
        },
        ChatMessage {
            role: "user".into(),
            content: user,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG with an EXIF APP1 segment saying "rotate 90 degrees clockwise".
    fn jpeg_with_orientation(width: u32, height: u32, orientation: u8) -> Vec<u8> {
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(image::RgbImage::new(width, height))
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        let mut exif = b"Exif\0\0II\x2a\x00\x08\x00\x00\x00\x01\x00".to_vec();
        exif.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, orientation, 0, 0, 0]);
        exif.extend_from_slice(&[0, 0, 0, 0]);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&exif);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_before_hashing() {
        let upright = hash(&jpeg_with_orientation(40, 16, 1)).unwrap();
        assert_eq!((upright.image.width(), upright.image.height()), (40, 16));
        let rotated = hash(&jpeg_with_orientation(40, 16, 6)).unwrap();
        assert_eq!((rotated.image.width(), rotated.image.height()), (16, 40));
        assert_eq!(rotated.sha256.len(), 64);
    }

    #[test]
    fn large_images_shrink_to_the_vision_size_keeping_their_shape() {
        let big = DynamicImage::ImageRgb8(image::RgbImage::new(3000, 1500));
        let prepared = prepare(big, true).unwrap();
        assert_eq!((prepared.rgb.width(), prepared.rgb.height()), (1024, 512));
        assert!(image::load_from_memory(&prepared.jpeg).is_ok());
    }

    #[test]
    fn corrupt_bytes_fail_as_input_errors_without_a_dead_letter() {
        let failure = hash(b"\xFF\xD8\xFF\xE0garbage").err().unwrap();
        assert_eq!(failure.code, "corrupt_image");
        assert!(!failure.dead_letter);
    }

    #[test]
    fn a_stored_error_event_finishes_with_its_own_code() {
        let event = |code: &str| ScanError {
            code: code.into(),
            message: "m".into(),
            stage: Some(ScanStage::Vision),
        };
        let vision = Failure::from_event(event("vision_failed"));
        assert_eq!((vision.code, vision.dead_letter), ("vision_failed", true));
        let corrupt = Failure::from_event(event("corrupt_image"));
        assert_eq!(
            (corrupt.code, corrupt.dead_letter),
            ("corrupt_image", false)
        );
        assert_eq!(Failure::from_event(event("???")).code, "internal");
    }

    #[test]
    fn retry_delays_grow() {
        let base = Duration::from_millis(100);
        assert!(retry_delay(base, 1) <= Duration::from_millis(200));
        assert!(retry_delay(base, 3) >= Duration::from_millis(400));
    }
}
