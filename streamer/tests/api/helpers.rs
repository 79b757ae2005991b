//! Starting a streamer in-process against a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use bus::wire::{ChatRequest, ConversationContext, DeadLetter, ServerFrame, TurnRecord};
use clap::Parser as _;
use futures::StreamExt as _;
use testkit::NatsServer;
use tokio_util::sync::CancellationToken;

pub struct TestStreamer {
    pub _nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    shutdown: CancellationToken,
}

impl Drop for TestStreamer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config(nats_url: &str, llm_base_url: &str, extra: &[&str]) -> streamer::Config {
    let mut args = vec![
        "streamer",
        "--nats-url",
        nats_url,
        "--listen",
        "127.0.0.1:0",
        "--llm-base-url",
        llm_base_url,
        "--read-timeout-ms",
        "120000",
        "--max-tokens",
        "64",
    ];
    args.extend_from_slice(extra);
    streamer::Config::parse_from(args)
}

/// A streamer on its own runtime and thread, so it can be killed the hard
/// way: every task dropped mid-flight, its NATS connection cut, nothing acked.
pub struct Killable {
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Killable {
    pub fn spawn(config: streamer::Config) -> Self {
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let app = streamer::Streamer::build(config)
                    .await
                    .expect("streamer builds");
                tokio::spawn(app.run(CancellationToken::new()));
            });
            ready_tx.send(()).unwrap();
            let _ = killed.recv();
            runtime.shutdown_background();
        });
        ready_rx.recv().unwrap();
        Self {
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A chat request as the gateway makes it, by `user-1`, accepted now.
pub fn request(conversation_id: &str, content: &str) -> ChatRequest {
    let turn_id = uuid::Uuid::now_v7().to_string();
    ChatRequest {
        request_id: format!("req-{turn_id}"),
        turn_id,
        conversation_id: conversation_id.into(),
        user_id: "user-1".into(),
        content: content.into(),
        history: vec![],
        new_conversation: false,
        model: None,
        max_tokens: None,
        temperature: None,
        created_at: chrono::Utc::now(),
    }
}

impl TestStreamer {
    pub async fn start(llm_base_url: &str) -> Self {
        Self::start_with(llm_base_url, &[]).await
    }

    pub async fn start_with(llm_base_url: &str, extra: &[&str]) -> Self {
        let app = Self::without_streamer().await;
        let streamer = streamer::Streamer::build(config(&app.nats_url(), llm_base_url, extra))
            .await
            .expect("streamer builds");
        tokio::spawn(streamer.run(app.shutdown.clone()));
        app
    }

    /// A nats-server with its streams and no streamer yet.
    pub async fn without_streamer() -> Self {
        testkit::init_logs();
        let nats = NatsServer::start()
            .await
            .expect("nats-server (run scripts/setup.sh)");
        let client = nats.client().await.unwrap();
        let js = jetstream::new(client.clone());
        bus::streams::ensure_all(&js, 1).await.unwrap();
        Self {
            _nats: nats,
            client,
            js,
            shutdown: CancellationToken::new(),
        }
    }

    pub fn nats_url(&self) -> String {
        self._nats.url()
    }

    /// Publishes a chat request the way the gateway does and returns its turn id.
    pub async fn send(&self, conversation_id: &str, content: &str) -> String {
        let request = request(conversation_id, content);
        self.publish(&request).await;
        request.turn_id
    }

    /// Publishes `request` the way the gateway does.
    pub async fn publish(&self, request: &ChatRequest) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            request.turn_id.as_str(),
        );
        self.js
            .publish_with_headers(
                bus::subject::chat_req(&request.conversation_id).unwrap(),
                headers,
                serde_json::to_vec(request).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The conversation's `chat_context` entry and its size in bytes, once
    /// it holds `turn_id`.
    pub async fn context_with(
        &self,
        conversation_id: &str,
        turn_id: &str,
    ) -> (ConversationContext, usize) {
        let kv = self
            .js
            .get_key_value(bus::streams::KV_CONTEXT)
            .await
            .unwrap();
        testkit::wait_for("the turn in its context", Duration::from_secs(10), || {
            let kv = &kv;
            async move {
                let value = kv.get(conversation_id).await.ok()??;
                let context: ConversationContext = serde_json::from_slice(&value).ok()?;
                context
                    .turns
                    .iter()
                    .any(|t| t.turn_id == turn_id)
                    .then_some((context, value.len()))
            }
        })
        .await
        .unwrap()
    }

    /// Every frame of the turn, read back from the CHAT_TOK stream, once `done` is there.
    pub async fn frames_until_done(&self, turn_id: &str) -> Vec<ServerFrame> {
        let subject = format!("chat.tok.*.{turn_id}");
        let mut sub = self.client.subscribe(subject.clone()).await.unwrap();
        // Frames published before we subscribed are in the stream; read those first.
        let stored = self.stored_frames(turn_id).await;
        if stored.iter().any(|f| matches!(f, ServerFrame::Done { .. })) {
            return stored;
        }
        tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(message) = sub.next().await {
                let frames = bus::batch::decode(&message.payload);
                if frames.iter().any(|f| matches!(f, ServerFrame::Done { .. })) {
                    break;
                }
            }
        })
        .await
        .expect("done frame within 120 s");
        self.stored_frames(turn_id).await
    }

    async fn stored_frames(&self, turn_id: &str) -> Vec<ServerFrame> {
        let subject = format!("chat.tok.*.{turn_id}");
        bus::replay::messages(&self.js, bus::streams::CHAT_TOK, &subject)
            .await
            .unwrap()
            .iter()
            .flat_map(|m| bus::batch::decode(&m.payload))
            .collect()
    }

    /// The completed turn record the streamer stored on `chat.done.<conv>`.
    pub async fn turn_record(&self, conversation_id: &str, turn_id: &str) -> TurnRecord {
        let stream = self.js.get_stream(bus::streams::CHAT_DONE).await.unwrap();
        let subject = bus::subject::chat_done(conversation_id).unwrap();
        testkit::wait_for("the turn record", Duration::from_secs(10), || {
            let stream = &stream;
            let subject = &subject;
            async move {
                let message = stream.get_last_raw_message_by_subject(subject).await.ok()?;
                let record: TurnRecord = serde_json::from_slice(&message.payload).ok()?;
                (record.turn_id == turn_id).then_some(record)
            }
        })
        .await
        .unwrap()
    }

    pub async fn dead_letter(&self) -> DeadLetter {
        let stream = self.js.get_stream(bus::streams::DLQ).await.unwrap();
        testkit::wait_for("a dead letter", Duration::from_secs(10), || {
            let stream = &stream;
            async move {
                let message = stream
                    .get_last_raw_message_by_subject("dlq.chat")
                    .await
                    .ok()?;
                serde_json::from_slice(&message.payload).ok()
            }
        })
        .await
        .unwrap()
    }
}
