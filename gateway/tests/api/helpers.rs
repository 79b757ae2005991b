//! A gateway and a streamer in-process against a real nats-server and a
//! stand-in LLM, plus a small WebSocket client.

use std::time::Duration;

use bus::wire::ServerFrame;
use clap::Parser as _;
use futures::{SinkExt as _, StreamExt as _};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use testkit::{NatsServer, Script, StandInLlm};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    _nats: NatsServer,
    pub llm: StandInLlm,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn token_for(user: &str, exp_offset: i64) -> String {
    let exp = chrono::Utc::now().timestamp() + exp_offset;
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn gateway_config(nats_url: &str, extra: &[&str]) -> gateway::Config {
    let mut args = vec![
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--nats-url",
        nats_url,
        "--auth-jwt-secret",
        SECRET,
        "--web-dir",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../web"),
    ];
    args.extend_from_slice(extra);
    gateway::Config::parse_from(args)
}

impl TestApp {
    pub async fn start(script: Script) -> Self {
        Self::start_with(script, &["--dev-login"]).await
    }

    pub async fn start_with(script: Script, extra: &[&str]) -> Self {
        Self::start_full(script, extra, &[]).await
    }

    /// With extra gateway and streamer flags.
    pub async fn start_full(script: Script, extra: &[&str], streamer_extra: &[&str]) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start()
            .await
            .expect("nats-server (run scripts/setup.sh)");
        let llm = StandInLlm::start(script).await.unwrap();
        let shutdown = CancellationToken::new();
        let nats_url = nats.url();
        let mut args = vec![
            "streamer",
            "--nats-url",
            &nats_url,
            "--listen",
            "127.0.0.1:0",
            "--llm-base-url",
            llm.base_url(),
        ];
        args.extend_from_slice(streamer_extra);
        let streamer = streamer::Streamer::build(streamer::Config::parse_from(args))
            .await
            .unwrap();
        tokio::spawn(streamer.run(shutdown.clone()));
        let gateway = gateway::Gateway::build(gateway_config(&nats.url(), extra), shutdown.clone())
            .await
            .unwrap();
        let addr = gateway.local_addr().unwrap();
        tokio::spawn(gateway.run(shutdown.clone()));
        Self {
            addr,
            _nats: nats,
            llm,
            http: reqwest::Client::new(),
            shutdown,
        }
    }

    /// A gateway without a streamer: the test starts its own streamers
    /// (their configuration from [`Self::streamer_config`]).
    pub async fn without_streamer(script: Script) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start()
            .await
            .expect("nats-server (run scripts/setup.sh)");
        let llm = StandInLlm::start(script).await.unwrap();
        let shutdown = CancellationToken::new();
        let gateway = gateway::Gateway::build(gateway_config(&nats.url(), &[]), shutdown.clone())
            .await
            .unwrap();
        let addr = gateway.local_addr().unwrap();
        tokio::spawn(gateway.run(shutdown.clone()));
        Self {
            addr,
            _nats: nats,
            llm,
            http: reqwest::Client::new(),
            shutdown,
        }
    }

    /// A streamer's configuration on this app's LLM, reaching NATS at `nats_url`.
    pub fn streamer_config(&self, nats_url: &str, extra: &[&str]) -> streamer::Config {
        let mut args = vec![
            "streamer",
            "--nats-url",
            nats_url,
            "--listen",
            "127.0.0.1:0",
            "--llm-base-url",
            self.llm.base_url(),
        ];
        args.extend_from_slice(extra);
        streamer::Config::parse_from(args)
    }

    /// Starts a streamer in-process; it stops when `stop` fires.
    pub async fn add_streamer(
        &self,
        config: streamer::Config,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let streamer = streamer::Streamer::build(config).await.unwrap();
        tokio::spawn(streamer.run(stop.clone()))
    }

    /// The app's nats-server.
    pub fn nats(&self) -> &NatsServer {
        &self._nats
    }

    /// A second gateway node on the same bus.
    pub async fn another_gateway(&self, extra: &[&str]) -> std::net::SocketAddr {
        let gateway = gateway::Gateway::build(
            gateway_config(&self._nats.url(), extra),
            self.shutdown.clone(),
        )
        .await
        .unwrap();
        let addr = gateway.local_addr().unwrap();
        tokio::spawn(gateway.run(self.shutdown.clone()));
        addr
    }

    /// A JetStream context on the app's nats-server.
    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self._nats.client().await.unwrap())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn ws(&self, user: &str) -> Ws {
        ws_to(self.addr, user).await
    }
}

/// A gateway alone on a real nats-server: the test plays the streamer.
pub struct GatewayOnly {
    pub addr: std::net::SocketAddr,
    _nats: NatsServer,
    _proxy: Option<testkit::DelayProxy>,
    pub js: async_nats::jetstream::Context,
    shutdown: CancellationToken,
}

impl Drop for GatewayOnly {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl GatewayOnly {
    pub async fn start(extra: &[&str]) -> Self {
        Self::start_delayed(extra, None).await
    }

    /// With `one_way` set, the gateway reaches NATS through a proxy that
    /// delays each direction by it (the test's own connection is direct).
    pub async fn start_delayed(extra: &[&str], one_way: Option<Duration>) -> Self {
        testkit::init_logs();
        let nats = NatsServer::start()
            .await
            .expect("nats-server (run scripts/setup.sh)");
        let shutdown = CancellationToken::new();
        let proxy = match one_way {
            Some(delay) => {
                let upstream = format!("127.0.0.1:{}", nats.port()).parse().unwrap();
                Some(testkit::DelayProxy::start(upstream, delay).await.unwrap())
            }
            None => None,
        };
        let url = proxy
            .as_ref()
            .map_or_else(|| nats.url(), |p| format!("nats://{}", p.addr()));
        let gateway = gateway::Gateway::build(gateway_config(&url, extra), shutdown.clone())
            .await
            .unwrap();
        let addr = gateway.local_addr().unwrap();
        tokio::spawn(gateway.run(shutdown.clone()));
        let js = async_nats::jetstream::new(nats.client().await.unwrap());
        Self {
            addr,
            _nats: nats,
            _proxy: proxy,
            js,
            shutdown,
        }
    }

    pub async fn ws(&self, user: &str) -> Ws {
        ws_to(self.addr, user).await
    }

    /// Publishes a frame of `turn` on `chat.tok.<conv>.<turn>` as a streamer would.
    /// The bus's URL, for a client of the test's own.
    pub fn nats_url(&self) -> String {
        self._nats.url()
    }

    pub async fn publish(&self, conversation: &str, frame: &ServerFrame) {
        self.publish_batch(conversation, std::slice::from_ref(frame))
            .await;
    }

    /// Publishes frames of one turn in one message, as a streamer under load does.
    pub async fn publish_batch(&self, conversation: &str, frames: &[ServerFrame]) {
        let turn = match &frames[0] {
            ServerFrame::Token { turn_id, .. }
            | ServerFrame::Done { turn_id, .. }
            | ServerFrame::Reset { turn_id, .. } => turn_id.clone(),
            _ => panic!("a turn frame"),
        };
        let mut message = Vec::new();
        for frame in frames {
            bus::batch::push(&mut message, frame);
        }
        self.publish_raw(conversation, &turn, message).await;
    }

    /// Publishes `payload` as it is on the turn's subject.
    pub async fn publish_raw(&self, conversation: &str, turn: &str, payload: Vec<u8>) {
        self.js
            .publish(
                bus::subject::chat_tok(conversation, turn).unwrap(),
                payload.into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Opens the chat WebSocket of the gateway at `addr` as `user`.
pub async fn ws_to(addr: std::net::SocketAddr, user: &str) -> Ws {
    {
        let mut request = format!("ws://{addr}/v1/chat/ws")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token_for(user, 3600)).parse().unwrap(),
        );
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("ws connects");
        Ws { socket }
    }
}

pub struct Ws {
    pub socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Ws {
    pub async fn send_json(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.unwrap();
    }

    /// The next JSON frame (skipping pings), within 10 s.
    pub async fn next(&mut self) -> ServerFrame {
        serde_json::from_str(&self.next_text().await).expect("a server frame")
    }

    /// The next text message as it came (skipping pings), within 10 s.
    pub async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a frame within 10 s")
                .expect("socket open")
                .expect("no socket error");
            match message {
                Message::Text(text) => return text.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Frames until (and including) the turn's `done`.
    pub async fn until_done(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let done = matches!(frame, ServerFrame::Done { .. });
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }
}

pub fn text_of(frames: &[ServerFrame]) -> String {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Token { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}

/// Sends a turn on `ws` (a new conversation) and returns its conversation
/// and turn ids from `accepted`.
pub async fn send(ws: &mut Ws, request_id: &str) -> (String, String) {
    ws.send_json(
        json!({"type": "send", "conversation_id": null, "content": "hi", "request_id": request_id}),
    )
    .await;
    match ws.next().await {
        ServerFrame::Accepted {
            conversation_id,
            turn_id,
            ..
        } => (conversation_id, turn_id),
        other => panic!("accepted: {other:?}"),
    }
}

/// A token frame of `turn`, as a streamer publishes it.
pub fn token(turn: &str, seq: u64, delta: &str) -> ServerFrame {
    ServerFrame::Token {
        turn_id: turn.to_owned(),
        seq,
        delta: delta.to_owned(),
    }
}

/// The `done` frame of `turn`.
pub fn done(turn: &str, seq: u64) -> ServerFrame {
    ServerFrame::Done {
        turn_id: turn.to_owned(),
        seq,
        finish_reason: bus::wire::FinishReason::Stop,
        usage: bus::wire::Usage::default(),
        sources: vec![],
    }
}
