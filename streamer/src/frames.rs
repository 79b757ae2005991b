//! One turn's frames on `chat.tok.<conv>.<turn>`, written by one worker at a
//! time.
//!
//! Every frame is published with `Nats-Expected-Last-Subject-Sequence` set to
//! the stream sequence of the turn's previous frame. Two workers that hold
//! the same turn (a slow one and its replacement, or a worker and the closer
//! of a turn out of deliveries) therefore cannot interleave: the first to
//! publish after the other's last frame wins, the loser is [`Fenced`] and
//! stops. That also keeps `seq` contiguous, since a writer continues from the
//! last stored frame.
//!
//! Because each publish waits for the previous one's ack, deltas that arrive
//! while a publish is in flight go out together in the next message, each
//! its own token frame with its own `seq` ([`bus::batch`]): at low load every
//! frame is a message and nothing waits, at high load the number of bus
//! messages per token falls instead of queueing behind acks. A turn's
//! first token always goes alone and at once; with a linger
//! (`STREAMER_TOKEN_LINGER_MS`) a turn publishes at most one message per
//! linger: a delta that comes sooner after the previous message waits for
//! the rest of the linger and travels with the ones that join it. That cuts
//! the bus messages per token at moderate load too, for at most a linger of
//! added delay between tokens; a model slower than the linger is not
//! delayed at all.
//!
//! [`Fenced`]: WriteError::Fenced

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishErrorKind};
use bus::{
    batch,
    fence::Settled,
    streams,
    wire::{FinishReason, ServerFrame, Usage},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why a writer stopped.
#[derive(Debug)]
pub enum WriteError {
    /// Another worker wrote this turn's frames since our last one.
    Fenced,
    /// The bus failed; the turn is handed back and redone from what is stored.
    Bus(anyhow::Error),
}

impl From<anyhow::Error> for WriteError {
    fn from(e: anyhow::Error) -> Self {
        Self::Bus(e)
    }
}

/// What `CHAT_TOK` holds of a turn.
#[derive(Debug, Default)]
pub struct TurnLog {
    /// Its frames, oldest first.
    pub frames: Vec<ServerFrame>,
    /// Stream sequence of the last one (0: none).
    pub last_stream_seq: u64,
    /// When the last one was stored.
    pub last_stored_at: Option<std::time::SystemTime>,
}

impl TurnLog {
    /// Reads the turn's stored frames.
    ///
    /// # Errors
    /// When the stream cannot be read.
    pub async fn read(js: &jetstream::Context, subject: &str) -> anyhow::Result<Self> {
        let stored = bus::replay::messages(js, streams::CHAT_TOK, subject).await?;
        Ok(Self {
            last_stream_seq: stored.last().map_or(0, |m| m.sequence),
            last_stored_at: stored.last().map(|m| m.stored_at),
            frames: stored
                .iter()
                .flat_map(|m| batch::decode(&m.payload))
                .collect(),
        })
    }

    /// True when a frame was stored less than `within` ago: some worker is
    /// writing the turn right now.
    pub fn written_within(&self, within: std::time::Duration) -> bool {
        self.last_stored_at
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age < within)
    }

    /// The last `seq` used.
    pub fn last_seq(&self) -> u64 {
        self.frames
            .iter()
            .filter_map(ServerFrame::seq)
            .max()
            .unwrap_or(0)
    }

    /// True when the turn reached `done`.
    pub fn is_done(&self) -> bool {
        self.frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Done { .. }))
    }

    /// The text a client following the turn holds: the token deltas since
    /// the last `reset`, and how many token frames carried them.
    pub fn shown(&self) -> (String, u32) {
        bus::wire::shown_text(&self.frames)
    }
}

/// Publishes one turn's frames, fenced.
pub struct FrameWriter {
    js: jetstream::Context,
    subject: String,
    turn_id: String,
    last_stream_seq: u64,
    seq: u64,
}

impl FrameWriter {
    /// A writer that continues after what `log` holds.
    pub fn after(js: &jetstream::Context, subject: String, turn_id: &str, log: &TurnLog) -> Self {
        Self {
            js: js.clone(),
            subject,
            turn_id: turn_id.to_owned(),
            last_stream_seq: log.last_stream_seq,
            seq: log.last_seq(),
        }
    }

    /// The last `seq` written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Token frames, one per delta, in as few messages as fit.
    pub async fn tokens(&mut self, deltas: Vec<String>) -> Result<(), WriteError> {
        let frames: Vec<ServerFrame> = (self.seq + 1..)
            .zip(deltas)
            .map(|(seq, delta)| ServerFrame::Token {
                turn_id: self.turn_id.clone(),
                seq,
                delta,
            })
            .collect();
        self.write(&frames).await
    }

    /// A reset: the client drops what it has of the turn.
    pub async fn reset(&mut self, reason: &str) -> Result<(), WriteError> {
        let frame = ServerFrame::Reset {
            turn_id: self.turn_id.clone(),
            seq: self.seq + 1,
            reason: reason.to_owned(),
        };
        self.write(std::slice::from_ref(&frame)).await
    }

    /// An error frame for the turn (it carries no `seq`).
    pub async fn error(&mut self, code: &str, message: &str) -> Result<(), WriteError> {
        let frame = ServerFrame::error(Some(self.turn_id.clone()), code, message);
        self.write(std::slice::from_ref(&frame)).await
    }

    /// The final frame, with the rule categories the answer was grounded in.
    pub async fn done(
        &mut self,
        finish_reason: FinishReason,
        usage: Usage,
        sources: Vec<String>,
    ) -> Result<(), WriteError> {
        let frame = ServerFrame::Done {
            turn_id: self.turn_id.clone(),
            seq: self.seq + 1,
            finish_reason,
            usage,
            sources,
        };
        self.write(std::slice::from_ref(&frame)).await
    }

    /// Publishes `frames` in order, batched up to [`batch::MAX_BATCH_BYTES`]
    /// a message.
    async fn write(&mut self, frames: &[ServerFrame]) -> Result<(), WriteError> {
        let mut body = Vec::new();
        let mut last_seq = None;
        for frame in frames {
            let mut one = Vec::new();
            batch::push(&mut one, frame);
            if !body.is_empty() && body.len() + 1 + one.len() > batch::MAX_BATCH_BYTES {
                self.publish(std::mem::take(&mut body), last_seq).await?;
            }
            if !body.is_empty() {
                body.push(b'\n');
            }
            body.extend_from_slice(&one);
            last_seq = frame.seq().or(last_seq);
        }
        if !body.is_empty() {
            self.publish(body, last_seq).await?;
        }
        Ok(())
    }

    /// Publishes one message, fenced; `last_seq` is the last `seq` it carries.
    async fn publish(&mut self, body: Vec<u8>, last_seq: Option<u64>) -> Result<(), WriteError> {
        // No Nats-Msg-Id: the fence already makes a frame unrepeatable, and
        // the server's dedupe window would cost memory per message.
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.clone().into())
            .expected_last_subject_sequence(self.last_stream_seq);
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .context("publishing a frame")?
            .await;
        match ack {
            Ok(ack) => {
                self.last_stream_seq = ack.sequence;
                self.seq = last_seq.unwrap_or(self.seq);
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                metrics::counter!("streamer_turns_fenced_total").increment(1);
                Err(WriteError::Fenced)
            }
            Err(e) => {
                let error = anyhow::Error::new(e).context("a frame was not stored");
                self.settle(last_seq, &body, error).await
            }
        }
    }

    /// After a publish whose outcome is unknown (its ack timed out, for
    /// instance because this process was frozen): our frame landed, another
    /// writer's is there (we are fenced: a nak now would hand the turn to a
    /// third worker), or nothing new (a real bus failure).
    async fn settle(
        &mut self,
        last_seq: Option<u64>,
        body: &[u8],
        error: anyhow::Error,
    ) -> Result<(), WriteError> {
        match bus::fence::settle(
            &self.js,
            streams::CHAT_TOK,
            &self.subject,
            self.last_stream_seq,
            body,
        )
        .await
        {
            Settled::Landed(sequence) => {
                self.last_stream_seq = sequence;
                self.seq = last_seq.unwrap_or(self.seq);
                Ok(())
            }
            Settled::Fenced => {
                metrics::counter!("streamer_turns_fenced_total").increment(1);
                Err(WriteError::Fenced)
            }
            Settled::Unknown => Err(WriteError::Bus(error)),
        }
    }
}

/// A [`FrameWriter`] on its own task, fed token deltas without waiting: the
/// generation reads the upstream at its own pace while frames are written
/// one ack at a time, batched when they queue up.
pub struct TokenPipe {
    tx: mpsc::UnboundedSender<String>,
    /// Cancels `closing` when the pipe is finished or dropped: the end of
    /// the turn ends a linger.
    closing: tokio_util::sync::DropGuard,
    stopped: CancellationToken,
    task: tokio::task::JoinHandle<(FrameWriter, Result<(), WriteError>)>,
}

impl TokenPipe {
    /// Starts writing through `writer`; after the first message, at most one
    /// message per `linger` (zero: each waits only for the previous ack).
    pub fn start(writer: FrameWriter, linger: std::time::Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stopped = CancellationToken::new();
        let closing = CancellationToken::new();
        let task = tokio::spawn(pump(writer, rx, closing.clone(), stopped.clone(), linger));
        Self {
            tx,
            closing: closing.drop_guard(),
            stopped,
            task,
        }
    }

    /// Queues a delta.
    pub fn send(&self, delta: String) {
        // A closed pipe has stopped; `stopped()` tells the caller.
        let _ = self.tx.send(delta);
    }

    /// Fires when writing stopped early (fenced or the bus failed).
    pub fn stopped(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stopped.cancelled()
    }

    /// Writes what is queued and hands the writer back.
    ///
    /// # Errors
    /// Why writing stopped early.
    pub async fn finish(self) -> Result<FrameWriter, WriteError> {
        drop(self.tx);
        drop(self.closing);
        let (writer, result) = self.task.await.context("the frame writer panicked")?;
        result.map(|()| writer)
    }
}

async fn pump(
    mut writer: FrameWriter,
    mut rx: mpsc::UnboundedReceiver<String>,
    closing: CancellationToken,
    stopped: CancellationToken,
    linger: std::time::Duration,
) -> (FrameWriter, Result<(), WriteError>) {
    // When the previous message went out: the first goes at once, and a
    // delta that comes a linger or more after the last message goes at
    // once too, so a slow model pays nothing for the linger.
    let mut last_sent: Option<tokio::time::Instant> = None;
    while let Some(delta) = rx.recv().await {
        if let Some(sent) = last_sent.filter(|_| !linger.is_zero()) {
            // Asleep through the linger rather than woken by every delta
            // (a task wake per token); the end of the turn ends it.
            tokio::select! {
                () = tokio::time::sleep_until(sent + linger) => {}
                () = closing.cancelled() => {}
            }
        }
        last_sent = Some(tokio::time::Instant::now());
        let mut deltas = vec![delta];
        while let Ok(more) = rx.try_recv() {
            deltas.push(more);
        }
        let frames = deltas.len() as u64;
        if let Err(error) = writer.tokens(deltas).await {
            stopped.cancel();
            return (writer, Err(error));
        }
        metrics::counter!("streamer_token_frames_total").increment(frames);
        metrics::counter!("streamer_token_messages_total").increment(1);
    }
    (writer, Ok(()))
}
