//! Answering one chat turn: prompt -> provider stream -> token frames on
//! `chat.tok.<conv>.<turn>` -> `done` -> the turn record on `chat.done.<conv>`
//! -> ack. The request is acked only after the record is stored in JetStream,
//! so a worker that dies at any point leaves the request to be redelivered.
//!
//! A turn has one writer at a time ([`crate::frames`]): frames are fenced on
//! the subject's last sequence, so a worker that was slow or frozen past its
//! lease and comes back finds its replacement's frames, stops, and closes its
//! upstream call. The lease is renewed from the moment of receipt
//! ([`bus::lease`]), through connecting and retrying the upstream.
//!
//! A redelivered request first looks at what an earlier attempt published: if
//! it got as far as `done`, the record is rebuilt from those frames (no second
//! generation); if it got part-way, a `reset` frame continues the `seq` space
//! and the answer starts over, so the client never sees silent duplication.
//! A request whose deliveries run out is closed by [`Worker::close_exhausted`].
//!
//! A prompt's earlier turns are one read of the conversation's context entry
//! ([`crate::context`]); the persisters' history is asked only when that
//! cannot answer. Every way a turn is concluded adds it to that entry, after
//! its `done` and before its record.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind};
use bus::{
    streams, subject,
    wire::{
        ChatMessage, ChatRequest, ContextTurn, ConversationDetail, DeadLetter, FinishReason,
        HistoryGetRequest, HistoryReply, TurnRecord, Usage,
    },
};
use chrono::Utc;
use futures::StreamExt as _;
use tracing::Instrument as _;

pub use crate::context::HISTORY_BUDGET_BYTES;
use crate::{
    context::{self, Contexts, HISTORY_TURNS},
    frames::{FrameWriter, TokenPipe, TurnLog, WriteError},
    turn::Turn,
    upstream::{self, Event, Upstream},
};

/// Un-awaited publishes a JetStream context allows in all (async-nats's
/// `max_ack_inflight`), less headroom for records and dead letters. Each
/// turn has at most one frame publish in flight, so this bounds the turns a
/// process may run at once.
pub const ACK_BUDGET: usize = 4_000;

/// How long the persister may take to answer a history request.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(2);

/// The error code of a turn closed because its deliveries ran out.
pub const EXHAUSTED_CODE: &str = "delivery_exhausted";
const EXHAUSTED_MESSAGE: &str =
    "the answer could not be completed after several attempts; please send it again";

/// What a worker needs; cloned cheaply into each task.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Core NATS, for cancel subscriptions and lease renewals.
    pub client: async_nats::Client,
    /// JetStream, for frames and records.
    pub js: jetstream::Context,
    /// The provider.
    pub upstream: Upstream,
    /// The operator's system prompt; the rules a turn is grounded in are
    /// added to it per turn.
    pub system_prompt: String,
    /// The disposal rules and their index.
    pub grounding: std::sync::Arc<crate::grounding::Grounding>,
    /// Default token cap.
    pub max_tokens: u32,
    /// The consumer's ack wait: a worker renews its lease on a request every
    /// third of it.
    pub lease: Duration,
    /// Asks the persisters for a conversation's earlier turns when its
    /// context entry cannot answer.
    pub history: bus::history::HistoryClient,
    /// After a turn's first token, at most one bus message per this long
    /// (`STREAMER_TOKEN_LINGER_MS`).
    pub token_linger: Duration,
    /// Each conversation's newest turns: the prompt's context in one read.
    pub context: Contexts,
}

/// The earlier turns a prompt carried, and what is known of the
/// conversation's newest turns to start its context entry with.
struct Earlier {
    turns: Vec<ContextTurn>,
    /// `None` when the conversation's newest turns are not known (the
    /// persisters did not answer): an entry started without them would hide
    /// them from every later prompt.
    seed: Option<Vec<ContextTurn>>,
}

impl Worker {
    /// Handles one delivery of a `chat.req.*` message, acking, nacking or
    /// leaving it (when another worker took it over).
    pub async fn handle(&self, message: jetstream::Message) {
        let _lease = bus::lease::Lease::keep(&self.client, &message, self.lease / 3);
        let deliveries = bus::dlq::deliveries(&message);
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
                metrics::counter!("streamer_chat_dead_letters_total").increment(1);
                return;
            }
        };
        if deliveries == 1 {
            let waited = (Utc::now() - request.created_at)
                .to_std()
                .unwrap_or_default();
            metrics::histogram!("streamer_request_wait_seconds").record(waited.as_secs_f64());
        }
        let span = tracing::info_span!("turn", turn = %request.turn_id, conversation = %request.conversation_id);
        // Instrumented, not entered: a guard held across awaits would lend
        // the span to whatever else runs on the thread meanwhile.
        match self.answer(&request, deliveries).instrument(span).await {
            Ok(()) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(%error, "Ack of a finished turn failed; it will be redelivered and rebuilt.");
                }
            }
            Err(WriteError::Fenced) => {
                // Neither ack nor nak: the delivery belongs to whoever wrote
                // after us, and a nak would hand it to a third worker.
                tracing::warn!("Another worker is writing this turn; leaving it to them.");
            }
            Err(WriteError::Bus(error)) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "Turn failed on the bus; handing it back."
                );
                // Not sooner than half the lease: the redelivery must not
                // take our own last frame for a live writer's and step back.
                let _ = message
                    .ack_with(AckKind::Nak(Some(self.lease / 2 + Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn answer(&self, request: &ChatRequest, deliveries: u64) -> Result<(), WriteError> {
        let tok_subject =
            subject::chat_tok(&request.conversation_id, &request.turn_id).context("turn ids")?;
        // A first delivery has nothing stored; if another writer stored
        // something anyway, the fence on an empty subject stops us.
        let log = if deliveries > 1 {
            TurnLog::read(&self.js, &tok_subject).await?
        } else {
            TurnLog::default()
        };
        if log.is_done() {
            tracing::info!("Turn was already complete; publishing its record again.");
            return self.republish(request, &log, deliveries).await;
        }
        // A redelivery reaches a live writer's turn only when it sat in a
        // frozen worker's buffer (it was sent while that worker held a pull
        // request): the turn's writer is whoever wrote last, and a dead one
        // has written nothing for at least two thirds of the lease.
        if log.written_within(self.lease / 2) {
            return Err(WriteError::Fenced);
        }
        let mut writer = FrameWriter::after(&self.js, tok_subject, &request.turn_id, &log);
        if !log.frames.is_empty() {
            writer.reset("worker_restarted").await?;
            metrics::counter!("streamer_turn_resets_total").increment(1);
        }
        let (prompt, seed, sources) = self.prompt(request).await;
        let (mut turn, writer) = self.generate(request, &prompt, writer).await?;
        turn.sources = sources;
        self.conclude(request, turn, writer, deliveries, seed.as_deref())
            .await
    }

    /// The upstream request (system prompt grounded in the rules the
    /// conversation is about, earlier turns, the new message), the seed of
    /// the conversation's context entry ([`Earlier::seed`]) and the rule
    /// categories the prompt carries (the turn's `sources`).
    async fn prompt(
        &self,
        request: &ChatRequest,
    ) -> (upstream::Request, Option<Vec<ContextTurn>>, Vec<String>) {
        let mut messages = vec![ChatMessage {
            role: "system".into(),
            content: self.system_prompt.clone(),
        }];
        let seed = if request.history.is_empty() && !request.new_conversation {
            let earlier = self.earlier_turns(request).await;
            messages.extend(earlier.turns.into_iter().flat_map(|t| {
                let answer = (!t.assistant_text.is_empty()).then(|| ChatMessage {
                    role: "assistant".into(),
                    content: t.assistant_text,
                });
                std::iter::once(ChatMessage {
                    role: "user".into(),
                    content: t.user_text,
                })
                .chain(answer)
            }));
            earlier.seed
        } else {
            messages.extend(request.history.iter().cloned());
            new_conversation_seed(request)
        };
        let earlier: Vec<&str> = messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .collect();
        let grounded = self
            .grounding
            .chat(&self.system_prompt, &request.content, &earlier);
        messages[0].content = grounded.system;
        messages.push(ChatMessage {
            role: "user".into(),
            content: request.content.clone(),
        });
        let prompt = upstream::Request {
            messages,
            model: request.model.clone(),
            max_tokens: request
                .max_tokens
                .unwrap_or(self.max_tokens)
                .min(self.max_tokens),
            temperature: request.temperature,
        };
        (prompt, seed, grounded.sources)
    }

    /// Streams the answer into token frames until the provider finishes,
    /// the user cancels, or the writer is fenced (then the upstream call is
    /// dropped, which closes it).
    async fn generate(
        &self,
        request: &ChatRequest,
        prompt: &upstream::Request,
        writer: FrameWriter,
    ) -> Result<(Turn, FrameWriter), WriteError> {
        let mut cancel = self
            .client
            .subscribe(subject::chat_cancel(&request.turn_id).context("turn id")?)
            .await
            .context("subscribing to cancels")?;
        let mut turn = Turn::new(request, self.upstream.model());
        let pipe = TokenPipe::start(writer, self.token_linger);
        let started = tokio::time::Instant::now();
        let opened = tokio::select! {
            opened = self.upstream.stream(prompt) => Some(opened),
            _ = cancel.next() => None,
        };
        match opened {
            None => turn.finish = FinishReason::Cancelled,
            Some(Err(error)) => turn.fail(error),
            Some(Ok(mut stream)) => loop {
                tokio::select! {
                    biased;
                    _ = cancel.next() => {
                        turn.finish = FinishReason::Cancelled;
                        break;
                    }
                    // Fenced or the bus failed: `finish` below says which.
                    _ = pipe.stopped() => break,
                    event = stream.next() => match event {
                        None => break,
                        Some(Ok(Event::Delta(delta))) => {
                            turn.record_timing(request, started);
                            turn.tokens += 1;
                            turn.text.push_str(&delta);
                            pipe.send(delta);
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
        let writer = pipe.finish().await?;
        Ok((turn, writer))
    }

    /// Ends the turn: its error frame, `done`, the turn in the
    /// conversation's context, the dead letter of a failed turn, the record.
    async fn conclude(
        &self,
        request: &ChatRequest,
        turn: Turn,
        mut writer: FrameWriter,
        deliveries: u64,
        seed: Option<&[ContextTurn]>,
    ) -> Result<(), WriteError> {
        if let Some(error) = &turn.error {
            writer.error(turn.error_code, error).await?;
        }
        writer
            .done(turn.finish, turn.usage(), turn.sources.clone())
            .await?;
        metrics::counter!("streamer_turns_total", "finish_reason" => turn.finish.as_str())
            .increment(1);
        let record = turn.record(request);
        self.remember(&record, seed).await;
        if let Some(error) = &record.error {
            self.dead_letter(request, error, deliveries).await?;
        }
        Ok(self.publish_record(request, record).await?)
    }

    /// The record of a turn whose `done` is stored, published again (the
    /// record's message id makes it a no-op when it is already stored).
    async fn republish(
        &self,
        request: &ChatRequest,
        log: &TurnLog,
        deliveries: u64,
    ) -> Result<(), WriteError> {
        let mut turn = Turn::new(request, self.upstream.model());
        turn.rebuild(&log.frames);
        let record = turn.record(request);
        self.remember(&record, new_conversation_seed(request).as_deref())
            .await;
        if let Some(error) = &record.error {
            self.dead_letter(request, error, deliveries).await?;
        }
        Ok(self.publish_record(request, record).await?)
    }

    /// Closes a turn whose request used up its deliveries (the advisory of
    /// its stream sequence `stream_seq`): an `error` frame with the turn id
    /// and `done` with `finish_reason: "error"` after whatever the client was
    /// shown, the failed record holding that text, and a dead letter. A turn
    /// that reached `done` after all only gets its record again.
    ///
    /// # Errors
    /// When the bus fails; the advisory is then handed back and retried.
    pub async fn close_exhausted(&self, stream_seq: u64, deliveries: u64) -> anyhow::Result<()> {
        let Some(request) =
            original::<ChatRequest>(&self.js, streams::CHAT_REQ, stream_seq).await?
        else {
            return Ok(());
        };
        let span = tracing::info_span!("turn", turn = %request.turn_id, conversation = %request.conversation_id);
        // Instrumented, not entered: a guard held across awaits lends the
        // span to whatever else runs on this thread meanwhile.
        self.close_exhausted_turn(&request, deliveries)
            .instrument(span)
            .await
    }

    async fn close_exhausted_turn(
        &self,
        request: &ChatRequest,
        deliveries: u64,
    ) -> anyhow::Result<()> {
        let tok_subject = subject::chat_tok(&request.conversation_id, &request.turn_id)?;
        // A worker still writing (slow, not dead) is fenced by our frames;
        // if it wrote between our read and our write, read again.
        for _ in 0..5 {
            let log = TurnLog::read(&self.js, &tok_subject).await?;
            if log.is_done() {
                return match self.republish(request, &log, deliveries).await {
                    Ok(()) | Err(WriteError::Fenced) => Ok(()),
                    Err(WriteError::Bus(e)) => Err(e),
                };
            }
            let (text, frames) = log.shown();
            let mut writer =
                FrameWriter::after(&self.js, tok_subject.clone(), &request.turn_id, &log);
            let usage = Usage {
                prompt_tokens: 0,
                completion_tokens: frames,
            };
            let written = match writer.error(EXHAUSTED_CODE, EXHAUSTED_MESSAGE).await {
                Ok(()) => writer.done(FinishReason::Error, usage, Vec::new()).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => {}
                Err(WriteError::Fenced) => continue,
                Err(WriteError::Bus(e)) => return Err(e),
            }
            tracing::warn!(deliveries, "Turn used up its deliveries; closed as failed.");
            metrics::counter!("streamer_turns_total", "finish_reason" => FinishReason::Error.as_str())
                .increment(1);
            metrics::counter!("streamer_exhausted_total", "kind" => "chat").increment(1);
            let mut turn = Turn::new(request, self.upstream.model());
            turn.text = text;
            turn.tokens = frames;
            turn.finish = FinishReason::Error;
            turn.error = Some(format!(
                "{EXHAUSTED_CODE}: delivered {deliveries} times without finishing"
            ));
            let record = turn.record(request);
            self.remember(&record, new_conversation_seed(request).as_deref())
                .await;
            self.dead_letter(
                request,
                record.error.as_deref().unwrap_or_default(),
                deliveries,
            )
            .await?;
            return self.publish_record(request, record).await;
        }
        anyhow::bail!("another worker kept writing the turn")
    }

    /// The conversation's turns older than this one, the newest that fit
    /// [`HISTORY_BUDGET_BYTES`], at most [`HISTORY_TURNS`]: one read of its
    /// context entry, or, when that cannot answer, one page of the
    /// persisters' history. Without either in time the turn goes on with
    /// the new message alone: an answer without context beats no answer.
    async fn earlier_turns(&self, request: &ChatRequest) -> Earlier {
        // Older than this turn: a redelivered request must not see itself,
        // nor turns sent after it.
        let before = bus::history::TurnCursor::at(request.created_at, &request.turn_id);
        let read = self
            .context
            .read(&request.conversation_id, &request.user_id, &before);
        match tokio::time::timeout(context::KV_TIMEOUT, read).await {
            Ok(Ok(Some(turns))) => {
                metrics::counter!("streamer_context_reads_total", "source" => "kv").increment(1);
                return Earlier {
                    seed: Some(turns.clone()),
                    turns,
                };
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => tracing::warn!(
                error = format!("{error:#}"),
                "Conversation context unreadable; asking the persisters."
            ),
            Err(_) => tracing::warn!("Conversation context timed out; asking the persisters."),
        }
        let query = HistoryGetRequest {
            user_id: request.user_id.clone(),
            conversation_id: request.conversation_id.clone(),
            limit: Some(HISTORY_TURNS as u32),
            before: Some(before.to_string()),
            // The budget counts text, the persister counts JSON (field names,
            // escapes): twice the budget still holds every turn that fits.
            max_bytes: Some(2 * HISTORY_BUDGET_BYTES as u32),
        };
        let (turns, seed, source) = match self.history.get(&query, HISTORY_TIMEOUT).await {
            Ok(Some(HistoryReply::Ok(ConversationDetail { turns, .. }))) => {
                let turns = context::fit(context::from_records(turns));
                (turns.clone(), Some(turns), "persisters")
            }
            // No persister holds a turn of it: the turns still in flight
            // add themselves when they conclude, so an entry may start empty.
            Ok(Some(HistoryReply::Err(body))) if body.error.code == "not_found" => {
                (Vec::new(), Some(Vec::new()), "none")
            }
            Ok(Some(HistoryReply::Err(_))) => (Vec::new(), None, "none"),
            _ => {
                metrics::counter!("streamer_history_unavailable_total").increment(1);
                tracing::warn!("History unavailable; answering without context.");
                (Vec::new(), None, "none")
            }
        };
        metrics::counter!("streamer_context_reads_total", "source" => source).increment(1);
        Earlier { turns, seed }
    }

    /// Adds a concluded turn to its conversation's context entry. A failure
    /// costs the next turn a read of the persisters, not this turn.
    async fn remember(&self, record: &TurnRecord, seed: Option<&[ContextTurn]>) {
        // Each compare-and-set attempt is a read and a write.
        let limit = context::KV_TIMEOUT * 4;
        let outcome = match tokio::time::timeout(limit, self.context.add(record, seed)).await {
            Ok(Ok(context::Added::Erased)) => {
                metrics::counter!("streamer_context_erased_total").increment(1);
                tracing::debug!("Turn of an erased user not added to its conversation's context.");
                return;
            }
            Ok(Ok(_)) => return,
            Ok(Err(error)) => format!("{error:#}"),
            Err(_) => format!("timed out after {limit:?}"),
        };
        metrics::counter!("streamer_context_write_failures_total").increment(1);
        tracing::warn!(
            error = outcome,
            "Turn not added to its conversation's context; the next turn reads the persisters."
        );
    }

    /// Stores the dead letter of a failed turn on `dlq.chat`, once per turn
    /// (its message id is the turn id) however many workers conclude it.
    async fn dead_letter(
        &self,
        request: &ChatRequest,
        error: &str,
        deliveries: u64,
    ) -> anyhow::Result<()> {
        let letter = DeadLetter {
            subject: subject::chat_req(&request.conversation_id)?,
            error: error.to_owned(),
            deliveries,
            payload: serde_json::to_string(request)?,
            failed_at: Utc::now(),
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&letter)?.into())
            .message_id(format!("chat:{}", request.turn_id));
        self.js
            .send_publish(subject::dlq("chat").expect("static kind"), publish)
            .await?
            .await
            .context("the dead letter was not stored")?;
        metrics::counter!("streamer_chat_dead_letters_total").increment(1);
        Ok(())
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

/// The work message stored at `stream_seq` of `stream`, decoded; `None`
/// when it is gone (aged out) or undecodable (it was dead-lettered when it
/// was first handled).
///
/// # Errors
/// When the stream cannot be read.
pub async fn original<T: serde::de::DeserializeOwned>(
    js: &jetstream::Context,
    stream: &str,
    stream_seq: u64,
) -> anyhow::Result<Option<T>> {
    let stream = js.get_stream(stream).await?;
    let message = match stream.get_raw_message(stream_seq).await {
        Ok(message) => message,
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            tracing::warn!(
                stream_seq,
                "An exhausted request is no longer stored; nothing to close."
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(serde_json::from_slice(&message.payload).ok())
}

/// The seed of a new conversation's context entry: it has no earlier turns.
/// `None` for any other conversation, whose newest turns only a read knows.
fn new_conversation_seed(request: &ChatRequest) -> Option<Vec<ContextTurn>> {
    request.new_conversation.then(Vec::new)
}
