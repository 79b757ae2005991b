//! Following one turn's frames for one client: what `CHAT_TOK` holds after
//! the client's `seq` (replay), then the live frames from a core NATS
//! subscription, each `seq` exactly once, refilling gaps from the stream.
//! A relay that hears nothing re-reads the stream, so a frame the live path
//! lost (a NATS restart or reconnect) still arrives, and it ends with an
//! error frame rather than silence when the turn stalls or cannot be read.
//!
//! Frames travel as the bytes the streamer published ([`RawFrame`]): a
//! batch is split into its frames and each is forwarded untouched; only
//! `type` and `seq` are read to order them.

use bus::{
    batch::{self, Kind, RawFrame},
    streams,
    wire::ServerFrame,
};
use futures::StreamExt as _;

use crate::turns::error;

/// How long a relay waits for room in a receiver's buffer before the
/// receiver counts as too slow.
pub const SLOW_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a relay delivers frames. `deliver` waits (up to [`SLOW_AFTER`])
/// while the receiver catches up, so a replay burst is paced rather than
/// dropped; it returns false when the receiver is gone or too slow, which
/// ends the relay (never the turn).
pub trait FrameSink: Send + Sync + 'static {
    /// Delivers one frame.
    fn deliver(&self, frame: RawFrame) -> impl std::future::Future<Output = bool> + Send;
}

/// For readers that look inside every frame (the OpenAI endpoint, which
/// turns them into its own chunks).
impl FrameSink for tokio::sync::mpsc::Sender<ServerFrame> {
    async fn deliver(&self, frame: RawFrame) -> bool {
        match frame.decode() {
            Some(frame) => self.send_timeout(frame, SLOW_AFTER).await.is_ok(),
            None => true,
        }
    }
}

/// A subscription to one turn's frames, taken before anything was published.
pub struct Follow {
    pub(crate) live: async_nats::Subscriber,
    /// Subscribed before the turn's request was published: nothing to replay.
    pub(crate) fresh: bool,
    pub(crate) subject: String,
    pub(crate) turn_id: String,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) timing: RelayTiming,
    /// The `seq` after which an `error` frame was sent to the client, so a
    /// replay does not send it twice.
    pub(crate) error_at: Option<u64>,
}

/// How a relay notices what the live path lost.
#[derive(Debug, Clone, Copy)]
pub struct RelayTiming {
    /// Silence after which the relay re-reads the turn from `CHAT_TOK`: a
    /// frame published while this node's NATS connection was away (a
    /// restart, a reconnect) is never delivered live.
    pub recheck: std::time::Duration,
    /// Silence after which the relay gives up with `turn_stalled` (the
    /// client may resume later). Longer than a turn's worst case: its
    /// deliveries times the lease, after which the streamer closes it.
    pub stall: std::time::Duration,
}

/// Attempts of one replay before the relay reports `replay_failed`.
const REPLAY_ATTEMPTS: u32 = 3;

/// What a replay from `CHAT_TOK` found.
enum Replayed {
    /// The turn's `done` was delivered, or the sink is gone.
    Ended,
    /// Delivered what was stored; the turn goes on.
    More,
    /// The stream could not be read.
    Failed,
}

impl Follow {
    /// True when the subscription was taken before the turn was published
    /// (nothing stored to replay).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The `seq` of the turn's last stored `reset` (0: none): a client that
    /// cannot drop text follows from there.
    pub async fn last_reset(&self) -> u64 {
        let Ok(stored) = bus::replay::payloads(&self.js, streams::CHAT_TOK, &self.subject).await
        else {
            return 0;
        };
        stored
            .iter()
            .flat_map(batch::split)
            .filter(|f| f.kind == Kind::Reset)
            .filter_map(|f| f.seq)
            .last()
            .unwrap_or(0)
    }

    /// Delivers the turn's frames after `after_seq` to `sink`, in order,
    /// each exactly once, until `done`, the sink gives up, or the turn is
    /// silent past [`RelayTiming::stall`]; a turn whose stored frames
    /// cannot be read ends with `replay_failed`.
    pub async fn relay<S: FrameSink>(mut self, after_seq: u64, sink: S) {
        let mut last_seq = after_seq;
        let started = tokio::time::Instant::now();
        let sink = TimedSink {
            inner: sink,
            started,
            first: std::sync::atomic::AtomicBool::new(after_seq == 0),
        };
        if !self.fresh && self.replay_or_report(&mut last_seq, &sink).await.is_none() {
            return;
        }
        let mut heard = tokio::time::Instant::now();
        loop {
            let message = match tokio::time::timeout(self.timing.recheck, self.live.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_) => {
                    match self.recheck(&mut last_seq, &sink).await {
                        None => return,
                        Some(true) => heard = tokio::time::Instant::now(),
                        Some(false) => {}
                    }
                    if heard.elapsed() >= self.timing.stall {
                        metrics::counter!("gateway_relays_stalled_total").increment(1);
                        let frame = error(
                            Some(&self.turn_id),
                            "turn_stalled",
                            "no progress on this turn for a while; resume it later or load it from history",
                        );
                        sink.deliver(RawFrame::from(&frame)).await;
                        return;
                    }
                    continue;
                }
            };
            heard = tokio::time::Instant::now();
            for frame in batch::split(&message.payload) {
                match frame.seq {
                    // Advisory frames (error) have no seq.
                    None => {
                        self.error_at = Some(last_seq);
                        if !sink.deliver(frame).await {
                            return;
                        }
                    }
                    Some(seq) if seq <= last_seq => {}
                    Some(seq) if seq > last_seq + 1 => {
                        // A gap on the live path: the stream has what we
                        // missed, this frame and the rest of its batch too.
                        if self.replay_or_report(&mut last_seq, &sink).await.is_none() {
                            return;
                        }
                    }
                    Some(_) => {
                        if forward(&mut last_seq, frame, &sink).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// After a silence: one cheap look at the turn's last stored frame, and
    /// a replay only when it is past what the client has. `None` when the
    /// relay is over; otherwise whether the client moved on.
    async fn recheck<S: FrameSink>(&mut self, last_seq: &mut u64, sink: &S) -> Option<bool> {
        metrics::counter!("gateway_relay_rechecks_total").increment(1);
        // Nothing stored yet, or the stream cannot be read just now (the bus
        // is away, its leader is being elected): the stall bound decides.
        let Ok(stream) = self.js.get_stream(streams::CHAT_TOK).await else {
            return Some(false);
        };
        let newer = match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(last) => {
                batch::last(&last.payload).is_some_and(|f| f.seq.is_none_or(|seq| seq > *last_seq))
            }
            Err(_) => false,
        };
        if !newer {
            return Some(false);
        }
        self.replay_or_report(last_seq, sink).await
    }

    /// [`Self::replay`] with retries; on failure the client gets a
    /// `replay_failed` frame. `None` when the relay is over.
    async fn replay_or_report<S: FrameSink>(
        &mut self,
        last_seq: &mut u64,
        sink: &S,
    ) -> Option<bool> {
        let before = *last_seq;
        for attempt in 0..REPLAY_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(bus::backoff::delay(
                    std::time::Duration::from_millis(200),
                    attempt - 1,
                    std::time::Duration::from_secs(2),
                ))
                .await;
            }
            match self.replay(last_seq, sink).await {
                Replayed::Ended => return None,
                Replayed::More => return Some(*last_seq > before),
                Replayed::Failed => {}
            }
        }
        metrics::counter!("gateway_replays_failed_total").increment(1);
        let frame = error(
            Some(&self.turn_id),
            "replay_failed",
            "the turn's stored frames could not be read; resume it later",
        );
        sink.deliver(RawFrame::from(&frame)).await;
        None
    }

    /// Sends the stored frames after `last_seq`.
    async fn replay<S: FrameSink>(&mut self, last_seq: &mut u64, sink: &S) -> Replayed {
        let stored = match bus::replay::payloads(&self.js, streams::CHAT_TOK, &self.subject).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "Replay from CHAT_TOK failed.");
                return Replayed::Failed;
            }
        };
        // An `error` frame has no seq: it is the client's when it comes
        // right after the frame the client has last (and was not sent yet).
        let mut at_cursor = *last_seq == 0;
        for frame in stored.iter().flat_map(batch::split) {
            match frame.seq {
                None if at_cursor && self.error_at != Some(*last_seq) => {
                    self.error_at = Some(*last_seq);
                    if !sink.deliver(frame).await {
                        return Replayed::Ended;
                    }
                }
                None => {}
                // The client has the turn's end already (a resume after `done`).
                Some(seq) if seq <= *last_seq && frame.is_done() => {
                    return Replayed::Ended;
                }
                Some(seq) if seq == *last_seq + 1 => {
                    metrics::counter!("gateway_replayed_frames_total").increment(1);
                    if forward(last_seq, frame, sink).await {
                        return Replayed::Ended;
                    }
                    at_cursor = true;
                }
                Some(seq) => at_cursor = seq == *last_seq,
            }
        }
        Replayed::More
    }
}

/// Records the client hop's time to first token for fresh turns.
struct TimedSink<S> {
    inner: S,
    started: tokio::time::Instant,
    /// True until the first token of a turn followed from its start.
    first: std::sync::atomic::AtomicBool,
}

impl<S: FrameSink> FrameSink for TimedSink<S> {
    fn deliver(&self, frame: RawFrame) -> impl std::future::Future<Output = bool> + Send {
        if frame.kind == Kind::Token && self.first.swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            metrics::histogram!("gateway_ttft_seconds")
                .record(self.started.elapsed().as_secs_f64());
        }
        self.inner.deliver(frame)
    }
}

/// Sends one in-order frame; true when it ended the turn or the sink.
async fn forward<S: FrameSink>(last_seq: &mut u64, frame: RawFrame, sink: &S) -> bool {
    *last_seq = frame.seq.unwrap_or(*last_seq);
    let done = frame.is_done();
    !sink.deliver(frame).await || done
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;

    /// Keeps every frame it is given.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<RawFrame>>>);

    impl FrameSink for Kept {
        async fn deliver(&self, frame: RawFrame) -> bool {
            self.0.lock().expect("kept lock").push(frame);
            true
        }
    }

    // Found by the chaos run: while CHAT_TOK's leader was being elected, a
    // relay's recheck could not read the stream and the relay ended without
    // a word, leaving a WebSocket client waiting and ending an OpenAI stream
    // with `[DONE]` after part of the answer.
    #[tokio::test]
    async fn a_recheck_that_cannot_read_the_stream_leaves_the_verdict_to_the_stall_bound() {
        let nats = testkit::NatsServer::start().await.unwrap();
        let client = nats.client().await.unwrap();
        // No CHAT_TOK at all: every look at it fails.
        let subject = "chat.tok.c.t".to_owned();
        let follow = Follow {
            live: client.subscribe(subject.clone()).await.unwrap(),
            fresh: true,
            subject,
            turn_id: "t".into(),
            js: async_nats::jetstream::new(client),
            timing: RelayTiming {
                recheck: Duration::from_millis(50),
                stall: Duration::from_millis(600),
            },
            error_at: None,
        };
        let kept = Kept::default();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), follow.relay(0, kept.clone()))
            .await
            .expect("the relay ends at the stall bound");
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "it ended early"
        );
        let frames = kept.0.lock().unwrap();
        let codes: Vec<String> = frames
            .iter()
            .filter_map(RawFrame::decode)
            .filter_map(|f| match f {
                ServerFrame::Error { code, .. } => Some(code),
                _ => None,
            })
            .collect();
        assert_eq!(codes, ["turn_stalled"], "the client is told");
    }
}
