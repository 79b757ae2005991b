//! Answering one chat turn: prompt -> provider stream -> token frames on
//! `chat.tok.<conv>.<turn>` -> `done` -> the turn record on `chat.done.<conv>`
//! -> ack. The request is acked only after the record is stored in JetStream,
//! so a worker that dies at any point leaves the request to be redelivered.
//!
//! A redelivered request first looks at what an earlier attempt published: if
//! it got as far as `done`, the record is rebuilt from those frames (no second
//! generation); if it got part-way, a `reset` frame continues the `seq` space
//! and the answer starts over, so the client never sees silent duplication.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, context::PublishAckFuture};
use bus::{
    streams, subject,
    wire::{
        ChatMessage, ChatRequest, ConversationDetail, DeadLetter, FinishReason, HistoryGetRequest,
        HistoryReply, ServerFrame, TurnRecord, Usage,
    },
};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;

use crate::upstream::{self, Event, Upstream};

/// Un-awaited publishes a JetStream context allows in all (async-nats's
/// `max_ack_inflight`), less headroom for records and dead letters.
pub const ACK_BUDGET: usize = 4_000;

/// Most earlier turns put into a prompt: one `history.get` page.
const HISTORY_TURNS: u32 = 50;
/// Most bytes of earlier user and assistant text a prompt carries: the
/// newest whole turns that fit, about 8k tokens of English (4 bytes a
/// token) or 11k characters of Korean (3 bytes a character). A newest turn
/// larger than this alone comes shortened, so context is never dropped
/// just because the last message was long.
pub const HISTORY_BUDGET_BYTES: usize = 32 * 1024;
/// How long the persister may take to answer a history request.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(2);

/// What a worker needs; cloned cheaply into each task.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Core NATS, for cancel subscriptions and dead letters.
    pub client: async_nats::Client,
    /// JetStream, for frames and records.
    pub js: jetstream::Context,
    /// The provider.
    pub upstream: Upstream,
    /// The system prompt.
    pub system_prompt: String,
    /// Default token cap.
    pub max_tokens: u32,
    /// How often a long generation tells JetStream it is still working
    /// (well inside the consumer's ack wait).
    pub progress_every: Duration,
    /// Asks the persisters for a conversation's earlier turns.
    pub history: bus::history::HistoryClient,
    /// Frame publishes one turn keeps un-awaited: [`ACK_BUDGET`] shared by
    /// the turns this process runs at once.
    pub ack_window: usize,
}

impl Worker {
    /// Handles one delivery of a `chat.req.*` message, acking, nacking or
    /// terminating it.
    pub async fn handle(&self, message: jetstream::Message) {
        let deliveries = message.info().map(|i| i.delivered).unwrap_or(1) as u64;
        let request: ChatRequest = match serde_json::from_slice(&message.payload) {
            Ok(request) => request,
            Err(error) => {
                bus::dlq::terminate(
                    &self.js,
                    "chat",
                    &message,
                    &format!("undecodable chat request: {error}"),
                )
                .await;
                return;
            }
        };
        let span = tracing::info_span!("turn", turn = %request.turn_id, conversation = %request.conversation_id);
        let _enter = span.enter();
        match self.answer(&message, &request, deliveries).await {
            Ok(()) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(%error, "Ack of a finished turn failed; it will be redelivered and rebuilt.");
                }
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "Turn failed on the bus; handing it back."
                );
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn answer(
        &self,
        message: &jetstream::Message,
        request: &ChatRequest,
        deliveries: u64,
    ) -> anyhow::Result<()> {
        let tok_subject = subject::chat_tok(&request.conversation_id, &request.turn_id)?;
        let mut turn = Turn::new(request, self.upstream.model());
        turn.window = self.ack_window;
        if deliveries > 1 {
            let earlier = earlier_frames(&self.js, &tok_subject).await?;
            if turn.rebuild(&earlier) {
                tracing::info!("Turn was already complete; publishing its record again.");
                return self.publish_record(request, turn.record(request)).await;
            }
            if turn.seq > 0 {
                turn.seq += 1;
                let reset = ServerFrame::Reset {
                    turn_id: request.turn_id.clone(),
                    seq: turn.seq,
                    reason: "worker_restarted".into(),
                };
                turn.track(self.publish_frame(&tok_subject, &reset).await?)
                    .await?;
                metrics::counter!("streamer_turn_resets_total").increment(1);
            }
        }

        let mut cancel = self
            .client
            .subscribe(subject::chat_cancel(&request.turn_id)?)
            .await?;
        let mut messages = vec![ChatMessage {
            role: "system".into(),
            content: self.system_prompt.clone(),
        }];
        if request.history.is_empty() && !request.new_conversation {
            messages.extend(self.earlier_turns(request).await);
        } else {
            messages.extend(request.history.iter().cloned());
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: request.content.clone(),
        });
        let upstream_request = upstream::Request {
            messages,
            model: request.model.clone(),
            max_tokens: request.max_tokens.unwrap_or(self.max_tokens),
            temperature: request.temperature,
        };

        let started = tokio::time::Instant::now();
        let mut last_token: Option<tokio::time::Instant> = None;
        let mut progress =
            tokio::time::interval_at(started + self.progress_every, self.progress_every);
        let opened = tokio::select! {
            opened = self.upstream.stream(&upstream_request) => Some(opened),
            _ = cancel.next() => None,
        };
        match opened {
            None => turn.finish = FinishReason::Cancelled,
            Some(Err(error)) => turn.fail(error),
            Some(Ok(mut stream)) => loop {
                tokio::select! {
                    biased;
                    _ = cancel.next() => {
                        // Dropping the stream below closes the HTTP request.
                        turn.finish = FinishReason::Cancelled;
                        break;
                    }
                    _ = progress.tick() => {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    event = stream.next() => match event {
                        None => break,
                        Some(Ok(Event::Delta(delta))) => {
                            let now = tokio::time::Instant::now();
                            match last_token {
                                None => {
                                    let at = Utc::now();
                                    turn.first_token_at = Some(at);
                                    // Upstream hop: our request to its first token.
                                    metrics::histogram!("streamer_upstream_ttft_seconds").record(started.elapsed().as_secs_f64());
                                    // Accept to first token: queueing plus the upstream hop.
                                    let queued = (at - request.created_at).to_std().unwrap_or_default();
                                    metrics::histogram!("streamer_accept_to_first_token_seconds").record(queued.as_secs_f64());
                                }
                                Some(previous) => {
                                    metrics::histogram!("streamer_inter_token_seconds").record((now - previous).as_secs_f64());
                                }
                            }
                            last_token = Some(now);
                            turn.seq += 1;
                            turn.tokens += 1;
                            turn.text.push_str(&delta);
                            let frame = ServerFrame::Token { turn_id: request.turn_id.clone(), seq: turn.seq, delta };
                            turn.track(self.publish_frame(&tok_subject, &frame).await?).await?;
                            metrics::counter!("streamer_tokens_total").increment(1);
                        }
                        Some(Ok(Event::Finish(reason))) => { turn.finish = reason; turn.finish_seen = true; }
                        Some(Ok(Event::Usage(usage))) => turn.usage = Some(usage),
                        Some(Ok(Event::Model(model))) => turn.model = model,
                        Some(Err(upstream::UpstreamError::Truncated)) if turn.saw_finish() => break,
                        Some(Err(error)) => { turn.fail(error); break; }
                    }
                }
            },
        }
        drop(cancel);

        if let Some(error) = turn.error.clone() {
            let frame = ServerFrame::error(
                Some(request.turn_id.clone()),
                "upstream_error",
                error.clone(),
            );
            turn.track(self.publish_frame(&tok_subject, &frame).await?)
                .await?;
            self.dead_letter_failed_turn(message, request, &error, deliveries)
                .await;
        }
        turn.seq += 1;
        let usage = turn.usage();
        let done = ServerFrame::Done {
            turn_id: request.turn_id.clone(),
            seq: turn.seq,
            finish_reason: turn.finish,
            usage,
        };
        turn.track(self.publish_frame(&tok_subject, &done).await?)
            .await?;
        for ack in std::mem::take(&mut turn.acks) {
            ack.await.context("a frame was not stored")?;
        }
        metrics::counter!("streamer_turns_total", "finish_reason" => turn.finish.as_str())
            .increment(1);
        let record = turn.record(request);
        self.publish_record(request, record).await
    }

    /// The conversation's earlier turns from the persister's history, as
    /// prompt messages: the newest that fit [`HISTORY_BUDGET_BYTES`], at most
    /// [`HISTORY_TURNS`]. Without an answer in time the turn goes on with the
    /// new message alone: an answer without context beats no answer.
    async fn earlier_turns(&self, request: &ChatRequest) -> Vec<ChatMessage> {
        let query = HistoryGetRequest {
            user_id: request.user_id.clone(),
            conversation_id: request.conversation_id.clone(),
            limit: Some(HISTORY_TURNS),
            // Older than this turn: a redelivered request must not see
            // itself, nor turns sent after it.
            before: Some(
                bus::history::TurnCursor::at(request.created_at, &request.turn_id).to_string(),
            ),
            // The budget counts text, the persister counts JSON (field names,
            // escapes): twice the budget still holds every turn that fits.
            max_bytes: Some(2 * HISTORY_BUDGET_BYTES as u32),
        };
        let turns = match self.history.get(&query, HISTORY_TIMEOUT).await {
            Ok(Some(HistoryReply::Ok(ConversationDetail { turns, .. }))) => turns,
            Ok(Some(HistoryReply::Err(_))) => return Vec::new(),
            _ => {
                metrics::counter!("streamer_history_unavailable_total").increment(1);
                tracing::warn!("History unavailable; answering without context.");
                return Vec::new();
            }
        };
        // Keeps the start of a text (the question as asked, the answer's
        // opening), marking the cut.
        let clip = |text: &mut String, max: usize| {
            if text.len() > max {
                let keep = max.saturating_sub('…'.len_utf8());
                let cut = (0..=keep)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text.truncate(cut);
                text.push('…');
            }
        };
        let mut left = HISTORY_BUDGET_BYTES;
        let mut picked = Vec::new();
        for mut turn in turns.into_iter().rev() {
            let size = turn.user_text.len() + turn.assistant_text.len();
            if size > left {
                if picked.is_empty() {
                    // The question gets up to half, the answer the rest.
                    clip(&mut turn.user_text, left / 2);
                    clip(&mut turn.assistant_text, left - turn.user_text.len());
                    picked.push(turn);
                }
                break;
            }
            left -= size;
            picked.push(turn);
        }
        picked
            .into_iter()
            .rev()
            .flat_map(|t| {
                let answer = (!t.assistant_text.is_empty()).then(|| ChatMessage {
                    role: "assistant".into(),
                    content: t.assistant_text,
                });
                std::iter::once(ChatMessage {
                    role: "user".into(),
                    content: t.user_text,
                })
                .chain(answer)
            })
            .collect()
    }

    async fn dead_letter_failed_turn(
        &self,
        message: &jetstream::Message,
        request: &ChatRequest,
        error: &str,
        deliveries: u64,
    ) {
        let letter = DeadLetter {
            subject: message.subject.to_string(),
            error: error.to_owned(),
            deliveries,
            payload: serde_json::to_string(request).unwrap_or_default(),
            failed_at: Utc::now(),
        };
        if let Ok(body) = serde_json::to_vec(&letter)
            && let Ok(ack) = self
                .js
                .publish(subject::dlq("chat").expect("static kind"), body.into())
                .await
        {
            let _ = ack.await;
        }
    }

    async fn publish_frame(
        &self,
        subject: &str,
        frame: &ServerFrame,
    ) -> anyhow::Result<PublishAckFuture> {
        // No Nats-Msg-Id: a redelivered turn continues the seq space, so no
        // two frames repeat, and the server's dedupe window costs per message.
        let body = serde_json::to_vec(frame)?;
        Ok(self.js.publish(subject.to_owned(), body.into()).await?)
    }

    async fn publish_record(
        &self,
        request: &ChatRequest,
        mut record: TurnRecord,
    ) -> anyhow::Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            request.turn_id.as_str(),
        );
        let mut body = serde_json::to_vec(&record)?;
        // A record the server would refuse would be redelivered forever: keep
        // what fits (the frames on CHAT_TOK still hold every token) and say so.
        let limit = self.client.server_info().max_payload;
        if body.len() + 1024 > limit {
            let excess = body.len() + 1024 - limit;
            let keep = record.assistant_text.len().saturating_sub(excess + 64);
            let cut = (0..=keep)
                .rev()
                .find(|i| record.assistant_text.is_char_boundary(*i))
                .unwrap_or(0);
            tracing::error!(
                bytes = body.len(),
                limit,
                "Turn record exceeds the bus's max payload; storing it truncated."
            );
            metrics::counter!("streamer_records_truncated_total").increment(1);
            record.error = Some(format!(
                "assistant text truncated from {} to {cut} bytes to fit the bus's {limit}-byte message limit",
                record.assistant_text.len()
            ));
            record.assistant_text.truncate(cut);
            body = serde_json::to_vec(&record)?;
        }
        self.js
            .publish_with_headers(
                subject::chat_done(&request.conversation_id)?,
                headers,
                body.into(),
            )
            .await?
            .await
            .context("the turn record was not stored")?;
        Ok(())
    }
}

async fn earlier_frames(
    js: &jetstream::Context,
    subject: &str,
) -> anyhow::Result<Vec<ServerFrame>> {
    Ok(bus::replay::payloads(js, streams::CHAT_TOK, subject)
        .await?
        .iter()
        .filter_map(|p| serde_json::from_slice(p).ok())
        .collect())
}

/// The state of one turn being generated.
struct Turn {
    seq: u64,
    /// Token frames sent, for usage when the provider reports none.
    tokens: u32,
    text: String,
    model: String,
    finish: FinishReason,
    finish_seen: bool,
    usage: Option<Usage>,
    error: Option<String>,
    first_token_at: Option<DateTime<Utc>>,
    /// Publish acks not yet awaited, oldest first; at most `window`.
    acks: std::collections::VecDeque<PublishAckFuture>,
    window: usize,
    created_at: DateTime<Utc>,
}

impl Turn {
    fn new(request: &ChatRequest, model: &str) -> Self {
        Self {
            seq: 0,
            tokens: 0,
            text: String::new(),
            model: request.model.clone().unwrap_or_else(|| model.to_owned()),
            finish: FinishReason::Stop,
            finish_seen: false,
            usage: None,
            error: None,
            first_token_at: None,
            acks: std::collections::VecDeque::new(),
            window: 1,
            created_at: request.created_at,
        }
    }

    /// Keeps a frame's publish ack, awaiting the oldest beyond the window.
    /// The JetStream context allows 5,000 un-awaited publishes in all, and a
    /// publish waits for a free one: if the turns in flight together held
    /// that many, each would wait for a permit only another could free. The
    /// window keeps their sum under [`ACK_BUDGET`].
    async fn track(&mut self, ack: PublishAckFuture) -> anyhow::Result<()> {
        self.acks.push_back(ack);
        while self.acks.len() > self.window {
            if let Some(oldest) = self.acks.pop_front() {
                oldest.await.context("a frame was not stored")?;
            }
        }
        Ok(())
    }

    fn saw_finish(&self) -> bool {
        self.finish_seen || self.finish != FinishReason::Stop
    }

    fn fail(&mut self, error: upstream::UpstreamError) {
        tracing::warn!(%error, kind = error.kind(), "LLM stream failed.");
        self.finish = FinishReason::Error;
        self.error = Some(error.to_string());
    }

    fn usage(&self) -> Usage {
        // The provider's figure when it gave one; otherwise what we counted.
        self.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: self.text_tokens(),
        })
    }

    fn text_tokens(&self) -> u32 {
        self.tokens
    }

    /// Looks at an earlier attempt's frames: returns the finished record when
    /// that attempt reached `done` (true), else remembers the last `seq` it used.
    fn rebuild(&mut self, frames: &[ServerFrame]) -> bool {
        let mut text = String::new();
        for frame in frames {
            if let Some(seq) = frame.seq() {
                self.seq = self.seq.max(seq);
            }
            match frame {
                ServerFrame::Token { delta, .. } => {
                    self.tokens += 1;
                    if self.first_token_at.is_none() {
                        self.first_token_at = Some(Utc::now());
                    }
                    text.push_str(delta);
                }
                ServerFrame::Reset { .. } => {
                    text.clear();
                    self.tokens = 0;
                }
                ServerFrame::Error { message, .. } => self.error = Some(message.clone()),
                ServerFrame::Done {
                    finish_reason,
                    usage,
                    ..
                } => {
                    self.text = std::mem::take(&mut text);
                    self.finish = *finish_reason;
                    self.usage = Some(*usage);
                    return true;
                }
                _ => {}
            }
        }
        // Not finished: the answer starts over; only the seq space carries on.
        self.error = None;
        self.tokens = 0;
        self.first_token_at = None;
        false
    }

    fn record_fields(&self) -> TurnRecord {
        TurnRecord {
            turn_id: String::new(),
            conversation_id: String::new(),
            user_id: String::new(),
            request_id: String::new(),
            model: self.model.clone(),
            user_text: String::new(),
            assistant_text: self.text.clone(),
            finish_reason: self.finish,
            usage: self.usage(),
            error: self.error.clone(),
            created_at: self.created_at,
            first_token_at: self.first_token_at,
            completed_at: Utc::now(),
        }
    }

    fn record(&self, request: &ChatRequest) -> TurnRecord {
        TurnRecord {
            turn_id: request.turn_id.clone(),
            conversation_id: request.conversation_id.clone(),
            user_id: request.user_id.clone(),
            request_id: request.request_id.clone(),
            user_text: request.content.clone(),
            ..self.record_fields()
        }
    }
}
