//! `GET /v1/chat/ws`: one WebSocket chat session.
//!
//! The socket has one task, which reads the client's frames and writes what
//! the bounded outbox holds (a second task per socket would cost every idle
//! connection its memory). Each turn the
//! client follows gets a relay task ([`crate::turns::Follow::relay`]): replay
//! from the stream, then live frames, each `seq` exactly once. No JetStream
//! consumer is created per socket on the live path. A client that cannot
//! keep up fills the outbox and is closed with code 4008; it reconnects and
//! resumes. A disconnect stops only the relays, never the turns.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code},
    },
    response::Response,
};
use bus::{
    batch::RawFrame,
    wire::{ClientFrame, ErrorBody, ServerFrame},
};
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    AppState,
    auth::StreamUser,
    relay::{Follow, FrameSink, SLOW_AFTER},
    turns::NewTurn,
};

/// Longest a single write to a client may take before the socket is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest WebSocket message read at all; bigger ones close the socket
/// (1009). Up to this size, oversized `content` gets a `too_large` frame.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Read buffer per socket. Every idle socket holds it (tungstenite fills
/// it before each read), and client frames are small: a 64 KiB `send`
/// takes more reads, an idle connection less memory.
const READ_BUFFER: usize = 1024;
/// Server pings this often; a client that answers nothing for
/// [`IDLE_TIMEOUT`] is closed.
const PING_EVERY: Duration = Duration::from_secs(25);
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Close code: the client fell behind; reconnect and `resume`.
const CLOSE_SLOW: u16 = 4008;
/// Authenticates (header or `?access_token=`) before upgrading: a bad token
/// gets `401` JSON and no socket.
#[utoipa::path(get, path = "/v1/chat/ws", operation_id = "openChatSocket", tag = "chat",
    security(("bearer" = []), ("access_token" = [])),
    responses(
        (status = 101, description = "A WebSocket: the client sends `ClientFrame`s and receives \
            `ServerFrame`s, one JSON text message each (see the components)"),
        (status = 400, description = "Not a WebSocket upgrade request", body = String, content_type = "text/plain"),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
    ))]
pub async fn upgrade(
    State(state): State<AppState>,
    StreamUser(user): StreamUser,
    ws: WebSocketUpgrade,
) -> Response {
    // tungstenite zero-fills its whole read buffer before each read; the
    // 128 KiB default made every idle socket cost ~150 KiB. Client frames
    // are small, and the buffer still grows for a large one.
    ws.max_message_size(MAX_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| Session::new(state, user).run(socket))
}

/// Sends frames to the socket's writer; knows when the client is too slow.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Message>,
    slow: CancellationToken,
}

impl Outbox {
    /// Queues a control frame (accepted, error, pong) without waiting.
    fn send(&self, frame: &ServerFrame) -> bool {
        let text = serde_json::to_string(frame).expect("frames serialize");
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

impl FrameSink for Outbox {
    /// Forwards the frame's bytes as they came off the bus.
    async fn deliver(&self, frame: RawFrame) -> bool {
        // The bus carries JSON, which is UTF-8; a frame that is not is
        // dropped rather than sent as a broken text message.
        let Ok(text) = Utf8Bytes::try_from(frame.bytes) else {
            return true;
        };
        match self.tx.send_timeout(Message::Text(text), SLOW_AFTER).await {
            Ok(()) => {
                metrics::counter!("gateway_ws_frames_sent_total").increment(1);
                true
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.slow.cancel();
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }
}

struct Session {
    state: AppState,
    user: String,
    /// Relays of this socket; cancelled when it closes (the turns go on).
    relays: CancellationToken,
    /// The turns this socket follows, each with its relay's stop token.
    streams: Arc<Mutex<Streams>>,
}

/// The relays of one socket, by turn.
#[derive(Default)]
struct Streams {
    by_turn: HashMap<String, (u64, CancellationToken)>,
    next: u64,
}

impl Session {
    fn new(state: AppState, user: String) -> Self {
        let relays = state.shutdown.child_token();
        Self {
            state,
            user,
            relays,
            streams: Arc::default(),
        }
    }

    /// Refuses a new stream past the socket's cap (a turn already followed
    /// is replaced instead, so it needs no room).
    fn room_for(&self, turn_id: Option<&str>) -> Result<(), ServerFrame> {
        let streams = self.streams.lock().expect("streams lock");
        let max = self.state.ws_max_streams;
        if turn_id.is_some_and(|t| streams.by_turn.contains_key(t)) || streams.by_turn.len() < max {
            return Ok(());
        }
        metrics::counter!("gateway_ws_streams_refused_total").increment(1);
        Err(ServerFrame::error(
            turn_id.map(str::to_owned),
            "too_many_streams",
            format!("a socket may follow at most {max} turns at once; wait for one to finish"),
        ))
    }

    async fn run(self, mut socket: WebSocket) {
        metrics::gauge!("gateway_ws_open").increment(1.0);
        let (tx, mut rx) = mpsc::channel::<Message>(self.state.ws_outbox);
        let outbox = Outbox {
            tx,
            slow: CancellationToken::new(),
        };
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = tokio::time::Instant::now();
        // The client frame being handled (an accept waits on the bus): polled
        // beside the writes so other turns' frames keep flowing, and the next
        // frame is read only after it, so the client's frames keep their order.
        // Boxed: the accept path's futures are large, and an idle socket
        // should not carry their space.
        let mut handling: Option<futures::future::BoxFuture<'_, ()>> = None;
        // Each branch's future is dropped before its handler runs, so the
        // handlers may write to the socket the read branch borrows.
        let close = loop {
            tokio::select! {
                () = async { handling.as_mut().expect("guarded").await }, if handling.is_some() => {
                    handling = None;
                }
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
                Some(message) = rx.recv() => {
                    if !write_queued(&mut socket, message, &mut rx).await {
                        break None;
                    }
                }
                message = socket.next(), if handling.is_none() => {
                    last_heard = tokio::time::Instant::now();
                    match message {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                        Some(Ok(Message::Text(text))) => {
                            let (session, outbox) = (&self, &outbox);
                            handling = Some(Box::pin(async move { session.on_text(&text, outbox).await }));
                        }
                        Some(Ok(Message::Binary(_))) => {
                            outbox.send(&ServerFrame::error(None, "binary_not_supported", "send JSON text frames"));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
            }
        };
        // An accept under way finishes: cut short, it could leave a turn
        // counted and indexed whose request was never published.
        if let Some(handling) = handling {
            handling.await;
        }
        // Relays stop; the turns themselves go on (a disconnect never cancels).
        self.relays.cancel();
        // A close goes out right after the frame being written and what is
        // still queued is dropped, since the client resumes from its last
        // `seq`. A client that reads nothing cannot hold the session: after
        // the write timeout its socket is dropped.
        if let Some((code, reason)) = close {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            }));
            let _ = tokio::time::timeout(WRITE_TIMEOUT, socket.send(frame)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.close()).await;
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
                model,
                max_tokens,
            } => {
                let turn = NewTurn {
                    conversation_id,
                    content,
                    request_id,
                    history: Vec::new(),
                    model,
                    max_tokens,
                    temperature: None,
                };
                self.send(turn, outbox).await
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
        turn: NewTurn,
        outbox: &Outbox,
    ) -> Result<Option<ServerFrame>, ServerFrame> {
        self.state
            .models
            .check(turn.model.as_deref(), turn.max_tokens)
            .map_err(|refused| refused.frame())?;
        let request_id = turn.request_id.clone();
        self.room_for(None)?;
        let accepted = self.state.accept_turn(&self.user, turn).await?;
        outbox.send(&ServerFrame::Accepted {
            request_id,
            conversation_id: accepted.conversation_id,
            turn_id: accepted.turn_id.clone(),
        });
        self.spawn_relay(accepted.turn_id, accepted.follow, 0, outbox);
        Ok(None)
    }

    async fn resume(
        &self,
        turn_id: String,
        after_seq: u64,
        outbox: &Outbox,
    ) -> Result<Option<ServerFrame>, ServerFrame> {
        metrics::counter!("gateway_resumes_total").increment(1);
        self.room_for(Some(&turn_id))?;
        let follow = self.state.follow_turn(&self.user, &turn_id).await?;
        self.spawn_relay(turn_id, follow, after_seq, outbox);
        Ok(None)
    }

    async fn cancel(&self, turn_id: String) -> Result<Option<ServerFrame>, ServerFrame> {
        self.state.cancel_turn(&self.user, &turn_id).await?;
        Ok(None)
    }

    /// Follows a turn; a relay already following it stops first, so a
    /// client that resumes twice gets each frame once.
    fn spawn_relay(&self, turn_id: String, follow: Follow, after_seq: u64, outbox: &Outbox) {
        let stop = self.relays.child_token();
        let id = {
            let mut streams = self.streams.lock().expect("streams lock");
            streams.next += 1;
            let id = streams.next;
            if let Some((_, replaced)) = streams.by_turn.insert(turn_id.clone(), (id, stop.clone()))
            {
                replaced.cancel();
            }
            id
        };
        let (streams, outbox) = (self.streams.clone(), outbox.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = follow.relay(after_seq, outbox) => {}
            }
            let mut streams = streams.lock().expect("streams lock");
            if streams
                .by_turn
                .get(&turn_id)
                .is_some_and(|(current, _)| *current == id)
            {
                streams.by_turn.remove(&turn_id);
            }
        });
    }
}

/// Writes `first` and whatever else is queued, flushed once: a burst of
/// frames (a batch from the bus) costs one write, not one per frame. False
/// when the socket failed or the client took longer than the write timeout.
async fn write_queued(
    socket: &mut WebSocket,
    first: Message,
    rx: &mut mpsc::Receiver<Message>,
) -> bool {
    let write = async {
        socket.feed(first).await?;
        while let Ok(more) = rx.try_recv() {
            socket.feed(more).await?;
        }
        socket.flush().await
    };
    matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
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
}
