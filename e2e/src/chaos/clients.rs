//! The chaos run's users: WebSocket chat clients that drop and resume
//! (sometimes on the other gateway), OpenAI endpoint clients that retry with
//! their `Idempotency-Key`, and scan clients that reconnect their SSE stream
//! with `Last-Event-ID`. Each records what it ended with.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bus::wire::ServerFrame;
use futures::StreamExt as _;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{next_sse_event, token_for, ws_connect, ws_send};

/// The text that makes the stand-in provider refuse a request (a failure
/// no retry cures, so the turn must end in a dead letter).
pub const REJECT_MARKER: &str = "REJECT-ME";

/// A client that has not ended its stream after this long has hung.
pub const HANG: Duration = Duration::from_secs(240);

/// Silence on a connection after which a client drops it and resumes.
const IDLE: Duration = Duration::from_secs(20);

/// Which client followed a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `/v1/chat/ws`.
    WebSocket,
    /// `POST /v1/chat/completions` with `stream: true`.
    OpenAi,
}

/// How a client's stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// `done` (or `[DONE]`) with this finish reason.
    Finished(String),
    /// Never ended within [`HANG`].
    Hung,
    /// Refused before acceptance with this code (not a turn).
    Refused(String),
}

/// One turn as its client saw it.
#[derive(Debug, Clone)]
pub struct TurnSeen {
    /// Its id (`accepted` or `x-turn-id`).
    pub turn_id: String,
    /// Through which endpoint.
    pub via: Via,
    /// How it ended.
    pub end: End,
    /// The error code reported for it, if any.
    pub error: Option<String>,
    /// The text the client ended with.
    pub text: String,
    /// `Err` when `seq` skipped or repeated.
    pub order: Result<(), String>,
    /// When the client first sent it.
    pub sent_at: Instant,
    /// From sending to the first token, when the connection held until then.
    pub ttft: Option<Duration>,
    /// From sending to its end.
    pub took: Duration,
    /// Connections it took.
    pub connections: u32,
    /// Connections given up after [`IDLE`] of silence mid-stream.
    pub silences: u32,
}

/// One scan as its client saw it.
#[derive(Debug, Clone)]
pub struct ScanSeen {
    /// Its id.
    pub scan_id: String,
    /// `result`, `error`, or `hung`.
    pub end: String,
    /// The `result` event's `answer`.
    pub answer: Option<String>,
    /// The `result` event's `reward`: the character and whether it was new.
    pub reward: Option<(String, bool)>,
    /// Its user.
    pub user: String,
    /// `Err` when SSE ids skipped or repeated.
    pub order: Result<(), String>,
    /// When the upload started.
    pub sent_at: Instant,
    /// From upload to its last event.
    pub took: Duration,
    /// Connections of the event stream.
    pub connections: u32,
    /// Connections given up after [`IDLE`] of silence mid-stream.
    pub silences: u32,
}

/// What every client recorded.
#[derive(Default)]
pub struct Seen {
    /// Turns.
    pub turns: Mutex<Vec<TurnSeen>>,
    /// Scans.
    pub scans: Mutex<Vec<ScanSeen>>,
    /// Uploads retried after the connection failed (each may have created a
    /// scan its client never heard of).
    pub uploads_retried: std::sync::atomic::AtomicUsize,
    /// Requests refused that should not have been (the gateway said
    /// something other than "try again"), each described.
    pub refused: Mutex<Vec<String>>,
}

/// What clients share.
pub struct Clients {
    /// Gateway addresses; each connection picks one at random.
    pub gateways: Vec<String>,
    /// Cancelled when no new work should start (work in flight finishes).
    pub stop: CancellationToken,
    /// What they saw.
    pub seen: Arc<Seen>,
    http: reqwest::Client,
    images: Vec<(Vec<u8>, &'static str)>,
}

impl Clients {
    /// Clients of `gateways`.
    pub fn new(gateways: Vec<String>) -> Arc<Self> {
        let coffee = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../streamer/tests/fixtures/images/coffee.jpg"
        ))
        .expect("the coffee fixture");
        Arc::new(Self {
            gateways,
            stop: CancellationToken::new(),
            seen: Arc::default(),
            http: reqwest::Client::new(),
            images: vec![(coffee, "image/jpeg")],
        })
    }

    fn pick<'a>(&'a self, rng: &mut StdRng) -> &'a str {
        &self.gateways[rng.random_range(0..self.gateways.len())]
    }

    /// Runs `users` WebSocket chat users, `openai` OpenAI users and `scans`
    /// scan users until [`Self::stop`]; returns when all have finished.
    pub async fn run(self: Arc<Self>, seed: u64, users: usize, openai: usize, scans: usize) {
        let mut tasks = Vec::new();
        for i in 0..users {
            let rng = StdRng::seed_from_u64(seed ^ (i as u64 + 1));
            tasks.push(tokio::spawn(self.clone().chat_user(format!("ws{i}"), rng)));
        }
        for i in 0..openai {
            let rng = StdRng::seed_from_u64(seed ^ (1000 + i as u64));
            tasks.push(tokio::spawn(
                self.clone().openai_user(format!("oai{i}"), rng),
            ));
        }
        for i in 0..scans {
            let rng = StdRng::seed_from_u64(seed ^ (2000 + i as u64));
            tasks.push(tokio::spawn(
                self.clone().scan_user(format!("scan{i}"), rng),
            ));
        }
        for task in tasks {
            task.await.expect("a client panicked");
        }
    }

    fn refused(&self, what: String) {
        self.seen.refused.lock().expect("refused lock").push(what);
    }

    fn record(&self, turn: TurnSeen) {
        self.seen.turns.lock().expect("turns lock").push(turn);
    }

    fn content(rng: &mut StdRng, n: usize) -> String {
        if rng.random_bool(0.05) {
            format!("count {n} {REJECT_MARKER}")
        } else {
            format!("count {n}")
        }
    }

    async fn chat_user(self: Arc<Self>, user: String, mut rng: StdRng) {
        let mut conversation: Option<String> = None;
        let mut n = 0;
        while !self.stop.is_cancelled() {
            n += 1;
            // Half the turns continue the conversation (history and context
            // under faults), the rest open a new one.
            if rng.random_bool(0.5) {
                conversation = None;
            }
            let content = Self::content(&mut rng, n);
            let request_id = format!("{user}-{n}");
            let (turn, conversation_id) = self
                .chat_turn(&user, &request_id, conversation.clone(), content, &mut rng)
                .await;
            conversation = conversation_id;
            if let Some(turn) = turn {
                self.record(turn);
            }
        }
    }

    /// Follows one turn to its end across as many connections as it takes.
    async fn chat_turn(
        &self,
        user: &str,
        request_id: &str,
        conversation_id: Option<String>,
        content: String,
        rng: &mut StdRng,
    ) -> (Option<TurnSeen>, Option<String>) {
        let sent_at = Instant::now();
        let mut turn_id: Option<String> = None;
        let mut conversation = conversation_id.clone();
        let mut frames: Vec<ServerFrame> = Vec::new();
        let mut order = Ok(());
        let mut error = None;
        let mut ttft = None;
        let (mut connections, mut silences) = (0, 0);
        let end = 'turn: loop {
            if sent_at.elapsed() > HANG {
                break End::Hung;
            }
            let gateway = self.pick(rng).to_owned();
            let Ok(mut ws) = ws_connect(&gateway, user).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            connections += 1;
            let first = match &turn_id {
                None => json!({"type": "send", "conversation_id": conversation_id,
                    "content": content, "request_id": request_id}),
                Some(id) => json!({"type": "resume", "turn_id": id,
                    "after_seq": frames.last().and_then(ServerFrame::seq).unwrap_or(0)}),
            };
            if ws_send(&mut ws, first).await.is_err() {
                continue;
            }
            let drop_after = rng.random_bool(0.3).then(|| rng.random_range(1..15_usize));
            let mut here = 0;
            loop {
                let message = match tokio::time::timeout(IDLE, ws.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => text,
                    Ok(Some(Ok(_))) => continue,
                    Ok(_) => break,
                    Err(_) => {
                        silences += 1;
                        break;
                    }
                };
                let Ok(frame) = serde_json::from_str::<ServerFrame>(&message) else {
                    order = Err(format!("undecodable frame {message}"));
                    continue;
                };
                match frame {
                    ServerFrame::Accepted {
                        turn_id: id,
                        conversation_id,
                        ..
                    } => {
                        if turn_id.as_ref().is_some_and(|t| *t != id) {
                            order = Err(format!("request {request_id} accepted twice"));
                        }
                        turn_id = Some(id);
                        conversation = Some(conversation_id);
                    }
                    ServerFrame::Error { code, .. }
                        if matches!(
                            code.as_str(),
                            "unavailable" | "too_many_turns" | "turn_stalled" | "replay_failed"
                        ) =>
                    {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        break;
                    }
                    ServerFrame::Error {
                        turn_id: Some(_),
                        code,
                        ..
                    } => error = Some(code),
                    ServerFrame::Error { code, .. } => break 'turn End::Refused(code),
                    ServerFrame::Pong => {}
                    frame => {
                        let expected = frames.last().and_then(ServerFrame::seq).unwrap_or(0) + 1;
                        let seq = frame.seq().unwrap_or(0);
                        if seq != expected && order.is_ok() {
                            order = Err(format!("seq {seq} where {expected} was due"));
                        }
                        if ttft.is_none() && connections == 1 {
                            ttft = Some(sent_at.elapsed());
                        }
                        let done = match &frame {
                            ServerFrame::Done { finish_reason, .. } => {
                                Some(serde_json::to_value(finish_reason).expect("serialises"))
                            }
                            _ => None,
                        };
                        frames.push(frame);
                        if let Some(reason) = done {
                            break 'turn End::Finished(reason.as_str().unwrap_or("").to_owned());
                        }
                        here += 1;
                        if Some(here) == drop_after {
                            break;
                        }
                    }
                }
            }
        };
        let Some(turn_id) = turn_id else {
            self.refused(format!("{user} request {request_id}: {end:?}"));
            return (None, conversation);
        };
        let turn = TurnSeen {
            turn_id,
            via: Via::WebSocket,
            end,
            error,
            text: bus::wire::shown_text(&frames).0,
            order,
            sent_at,
            ttft,
            took: sent_at.elapsed(),
            connections,
            silences,
        };
        (Some(turn), conversation)
    }

    async fn openai_user(self: Arc<Self>, user: String, mut rng: StdRng) {
        let mut n = 0;
        while !self.stop.is_cancelled() {
            n += 1;
            let content = Self::content(&mut rng, n);
            let key = format!("{user}-{n}");
            if let Some(turn) = self.openai_turn(&user, &key, &content, &mut rng).await {
                self.record(turn);
            }
        }
    }

    /// One streamed completion, retried with its key until it ends whole.
    async fn openai_turn(
        &self,
        user: &str,
        key: &str,
        content: &str,
        rng: &mut StdRng,
    ) -> Option<TurnSeen> {
        let sent_at = Instant::now();
        let token = token_for(user);
        let body = json!({"stream": true, "messages": [{"role": "user", "content": content}]});
        let mut turn_id = None;
        let mut text = String::new();
        let mut error = None;
        let mut ttft = None;
        let (mut connections, mut silences) = (0, 0);
        let end = 'turn: loop {
            if sent_at.elapsed() > HANG {
                break End::Hung;
            }
            let gateway = self.pick(rng).to_owned();
            let sent = self
                .http
                .post(format!("http://{gateway}/v1/chat/completions"))
                .bearer_auth(&token)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await;
            let Ok(response) = sent else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            connections += 1;
            match response.status().as_u16() {
                200 => {}
                429 | 502 | 503 | 504 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                status => break End::Refused(format!("HTTP {status}")),
            }
            if let Some(id) = response.headers().get("x-turn-id") {
                turn_id = Some(String::from_utf8_lossy(id.as_bytes()).into_owned());
            }
            // Each response carries the answer from its last restart.
            text.clear();
            error = None;
            let drop_after = rng.random_bool(0.15).then(|| rng.random_range(1..15_usize));
            let mut restarted = false;
            let mut stream = response.bytes_stream();
            let mut buffer = String::new();
            let mut chunks = 0;
            'read: while let Some(bytes) = next_chunk(&mut stream, &mut silences).await {
                buffer.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue;
                    };
                    if data == "[DONE]" {
                        if restarted {
                            break 'read;
                        }
                        let reason = if error.is_some() { "error" } else { "stop" };
                        break 'turn End::Finished(reason.to_owned());
                    }
                    let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if let Some(code) = chunk["error"]["code"].as_str() {
                        // The answer restarted, or this response could not
                        // follow the turn: the same key follows it again.
                        if matches!(
                            code,
                            "answer_restarted" | "turn_stalled" | "replay_failed" | "unavailable"
                        ) {
                            restarted = true;
                        } else {
                            error = Some(code.to_owned());
                        }
                        continue;
                    }
                    if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str()
                        && !delta.is_empty()
                    {
                        if ttft.is_none() && connections == 1 {
                            ttft = Some(sent_at.elapsed());
                        }
                        text.push_str(delta);
                        chunks += 1;
                        if Some(chunks) == drop_after {
                            break 'read;
                        }
                    }
                }
            }
        };
        let Some(turn_id) = turn_id else {
            self.refused(format!("{user} completion {key}: {end:?}"));
            return None;
        };
        Some(TurnSeen {
            turn_id,
            via: Via::OpenAi,
            end,
            error,
            text,
            order: Ok(()),
            sent_at,
            ttft,
            took: sent_at.elapsed(),
            connections,
            silences,
        })
    }

    async fn scan_user(self: Arc<Self>, user: String, mut rng: StdRng) {
        while !self.stop.is_cancelled() {
            // Half the photos are new to the cache (the whole pipeline),
            // half the same photo again (a cache hit).
            let image = if rng.random_bool(0.5) {
                (random_picture(&mut rng), "image/png")
            } else {
                self.images[0].clone()
            };
            if let Some(scan) = self.scan(&user, image, &mut rng).await {
                self.seen.scans.lock().expect("scans lock").push(scan);
            }
        }
    }

    async fn scan(
        &self,
        user: &str,
        (image, content_type): (Vec<u8>, &'static str),
        rng: &mut StdRng,
    ) -> Option<ScanSeen> {
        let sent_at = Instant::now();
        let token = token_for(user);
        let scan_id = loop {
            if sent_at.elapsed() > HANG {
                return None;
            }
            let sent = self
                .http
                .post(format!("http://{}/v1/scans", self.pick(rng)))
                .bearer_auth(&token)
                .header("content-type", content_type)
                .body(image.clone())
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == 202 => {
                    let accepted: Value = response.json().await.ok()?;
                    break accepted["scan_id"].as_str()?.to_owned();
                }
                Ok(response) if response.status() == 503 || response.status() == 429 => {}
                Ok(response) => {
                    self.refused(format!("{user} upload: HTTP {}", response.status()));
                    return None;
                }
                Err(_) => {
                    self.seen
                        .uploads_retried
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let mut last_id = 0;
        let mut order = Ok(());
        let (mut connections, mut silences) = (0, 0);
        let mut answer = None;
        let mut reward = None;
        let end = 'scan: loop {
            if sent_at.elapsed() > HANG {
                break "hung".to_owned();
            }
            let mut request = self
                .http
                .get(format!(
                    "http://{}/v1/scans/{scan_id}/events",
                    self.pick(rng)
                ))
                .bearer_auth(&token);
            if last_id > 0 {
                request = request.header("last-event-id", last_id.to_string());
            }
            let response = match request.send().await {
                Ok(response) if response.status() == 200 => response,
                Ok(response) if response.status() != 503 => {
                    self.refused(format!(
                        "{user} events of {scan_id}: HTTP {}",
                        response.status()
                    ));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            };
            connections += 1;
            let drop_after = rng.random_bool(0.3).then(|| rng.random_range(1..8_usize));
            let mut here = 0;
            let mut body = response.bytes_stream();
            let mut buffer = String::new();
            'read: while let Some(bytes) = next_chunk(&mut body, &mut silences).await {
                buffer.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(event) = next_sse_event(&mut buffer) {
                    let Some(event) = event else { continue };
                    if event.id != last_id + 1 && order.is_ok() {
                        order = Err(format!("id {} after {last_id}", event.id));
                    }
                    last_id = event.id;
                    if event.is_terminal() {
                        answer = event.data["answer"].as_str().map(str::to_owned);
                        let earned = &event.data["reward"];
                        reward = earned["character_id"]
                            .as_str()
                            .map(|id| (id.to_owned(), earned["new"] == true));
                        break 'scan event.event;
                    }
                    here += 1;
                    if Some(here) == drop_after {
                        break 'read;
                    }
                }
            }
        };
        Some(ScanSeen {
            scan_id,
            end,
            answer,
            reward,
            user: user.to_owned(),
            order,
            sent_at,
            took: sent_at.elapsed(),
            connections,
            silences,
        })
    }
}

/// The next chunk of a response body: `None` once it ended or broke, or
/// after [`IDLE`] of silence (counted in `silences`).
async fn next_chunk<S>(body: &mut S, silences: &mut u32) -> Option<bytes::Bytes>
where
    S: futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
{
    match tokio::time::timeout(IDLE, body.next()).await {
        Ok(Some(Ok(bytes))) => Some(bytes),
        Ok(_) => None,
        Err(_) => {
            *silences += 1;
            None
        }
    }
}

/// A PNG of random coloured blocks: a photo the cache has never seen.
fn random_picture(rng: &mut StdRng) -> Vec<u8> {
    let blocks: Vec<[u8; 3]> = (0..64).map(|_| rng.random()).collect();
    let picture = image::RgbImage::from_fn(256, 256, |x, y| {
        image::Rgb(blocks[((y / 32) * 8 + x / 32) as usize])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    picture
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("a PNG encodes");
    bytes.into_inner()
}
