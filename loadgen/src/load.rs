//! The chat clients and the phase that runs many of them: the baseline reads
//! the stand-in upstream directly (HTTP SSE, as the streamer does); the
//! others go through the gateway's WebSocket, the gateway's OpenAI endpoint
//! or the LiteLLM proxy (the last two with the same SSE client, [`sse`]).
//! Each records, per turn, the time to first token and each token's
//! arrival, and verifies the answer: every token, once, in order, and the
//! exact text.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bus::wire::{FinishReason, ServerFrame};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::{net::TcpStream, sync::Barrier};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest as _, protocol::WebSocketConfig},
};

use crate::{
    procfs,
    sse::{self, SseClient},
    stats::{self, PhaseStats, TurnObservation},
};

/// A WebSocket client connection.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a phase loads the system.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent clients, each with at most one turn in flight.
    pub clients: usize,
    /// Unmeasured turns each client runs first.
    pub warmup: usize,
    /// Measured turns per client.
    pub rounds: usize,
    /// Client `i` starts `i * stagger / clients` after the phase starts; then
    /// it runs its turns back to back (a steady load of `clients` turns).
    pub stagger: Duration,
    /// All clients send each measured turn at the same instant (a burst).
    pub burst: bool,
    /// The answer every turn must deliver.
    pub expected: Arc<[String]>,
    /// Longest a single turn may take.
    pub turn_timeout: Duration,
    /// Longest the whole phase may take.
    pub phase_timeout: Duration,
    /// Prefix of request ids and user ids, unique to the run.
    pub nonce: String,
    /// After this long from the phase's start a client begins no further
    /// measured turn (it runs at least one); `None`: all `rounds`.
    pub budget: Option<Duration>,
    /// How long CPU is still counted after the last turn (work that trails
    /// the answers, such as persisting them).
    pub settle: Duration,
}

/// What a phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// The figures.
    pub stats: PhaseStats,
    /// Wall time of the phase (clients connected to last turn done).
    pub wall: Duration,
    /// CPU per component over the phase, % of one core.
    pub cpu: Vec<(String, f64)>,
    /// CPU time per component over the phase, unfiltered.
    pub cpu_time: Vec<(String, Duration)>,
    /// Clients that could not connect.
    pub connect_failures: usize,
}

/// Which path a phase measures.
pub enum Target {
    /// The stand-in upstream directly: POST `/v1/chat/completions` with SSE.
    Direct {
        /// The stand-in's chat completions URL.
        url: String,
    },
    /// The gateway's WebSocket.
    Gateway {
        /// The gateway's address.
        addr: SocketAddr,
        /// HS256 key for the clients' tokens.
        secret: String,
    },
    /// The gateway's `POST /v1/chat/completions` with `stream: true` (SSE),
    /// one user per client.
    OpenAi {
        /// The gateway's address.
        addr: SocketAddr,
        /// HS256 key for the clients' tokens.
        secret: String,
    },
    /// The LiteLLM proxy's `POST /v1/chat/completions` (SSE).
    LiteLlm {
        /// Its base URL (`http://127.0.0.1:PORT`).
        base_url: String,
        /// Its master key.
        key: String,
        /// The model name it serves the stand-in as.
        model: String,
    },
}

enum Client {
    Sse(SseClient),
    Gateway { socket: Option<Box<Socket>> },
}

/// Builds one SSE client per load client for `target` (`None` for the
/// WebSocket) and opens their connections with one cheap request each
/// (all at once, so each gets its own). Returns the clients and how many
/// failed to connect.
async fn sse_clients(
    target: &Target,
    spec: &LoadSpec,
) -> anyhow::Result<Option<(Vec<SseClient>, usize)>> {
    // One pool, as a process full of clients would have.
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()?;
    let clients: Vec<(SseClient, reqwest::RequestBuilder)> = match target {
        Target::Gateway { .. } => return Ok(None),
        Target::Direct { url } => (0..spec.clients)
            .map(|_| {
                let warm = http.post(url).json(
                    &json!({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}),
                );
                let client = SseClient {
                    http: http.clone(),
                    url: url.clone(),
                    authorization: None,
                    model: Some("bench".into()),
                };
                (client, warm)
            })
            .collect(),
        Target::OpenAi { addr, secret } => (0..spec.clients)
            .map(|i| {
                let token = crate::stack::token_for(secret, &format!("lg-{}-{i}", spec.nonce))?;
                let authorization = format!("Bearer {token}");
                let warm = http
                    .get(format!("http://{addr}/v1/models"))
                    .header("authorization", &authorization);
                let client = SseClient {
                    http: http.clone(),
                    url: format!("http://{addr}/v1/chat/completions"),
                    authorization: Some(authorization),
                    model: None,
                };
                Ok((client, warm))
            })
            .collect::<anyhow::Result<_>>()?,
        Target::LiteLlm {
            base_url,
            key,
            model,
        } => (0..spec.clients)
            .map(|_| {
                let warm = http.get(format!("{base_url}/health/liveliness"));
                let client = SseClient {
                    http: http.clone(),
                    url: format!("{base_url}/v1/chat/completions"),
                    authorization: Some(format!("Bearer {key}")),
                    model: Some(model.clone()),
                };
                (client, warm)
            })
            .collect(),
    };
    let (clients, warms): (Vec<_>, Vec<_>) = clients.into_iter().unzip();
    let warm = futures::future::join_all(warms.into_iter().map(|request| async move {
        let response = request.send().await?.error_for_status()?;
        response.bytes().await
    }))
    .await;
    let failures = warm.iter().filter(|r| r.is_err()).count();
    Ok(Some((clients, failures)))
}

/// Runs one phase against `target` and reduces what the clients saw.
///
/// # Errors
/// When the phase cannot be set up at all (individual failures are counted).
pub async fn run_phase(
    target: &Target,
    spec: &LoadSpec,
    processes: &[(&'static str, u32)],
) -> anyhow::Result<PhaseResult> {
    let mut clients = Vec::with_capacity(spec.clients);
    let mut connect_failures = 0;
    match (target, sse_clients(target, spec).await?) {
        (_, Some((sse, failures))) => {
            connect_failures = failures;
            clients.extend(sse.into_iter().map(Client::Sse));
        }
        (Target::Gateway { addr, secret }, None) => {
            let sockets = futures::stream::iter(0..spec.clients)
                .map(|i| {
                    let user = format!("lg-{}-{i}", spec.nonce);
                    async move {
                        let token = crate::stack::token_for(secret, &user)?;
                        connect_ws(*addr, &token, None).await
                    }
                })
                .buffered(64)
                .collect::<Vec<_>>()
                .await;
            for socket in sockets {
                match socket {
                    Ok(socket) => clients.push(Client::Gateway {
                        socket: Some(Box::new(socket)),
                    }),
                    Err(_) => {
                        connect_failures += 1;
                        clients.push(Client::Gateway { socket: None });
                    }
                }
            }
        }
        (_, None) => anyhow::bail!("no clients for this target"),
    }

    let barrier = Arc::new(Barrier::new(spec.clients));
    let cpu_before = procfs::cpu_snapshot_of(processes);
    let epoch = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let spec = spec.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move { run_client(i, client, &spec, &barrier, epoch).await })
        })
        .collect();
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let joined = tokio::time::timeout(spec.phase_timeout, futures::future::join_all(tasks)).await;
    let wall = epoch.elapsed();
    tokio::time::sleep(spec.settle).await;
    let cpu_after = procfs::cpu_snapshot_of(processes);
    let cpu = procfs::cpu_between(&cpu_before, &cpu_after, epoch.elapsed());
    let cpu_time = procfs::cpu_time_between(&cpu_before, &cpu_after);
    let (per_client, timed_out) = match joined {
        Ok(results) => (
            results
                .into_iter()
                .map(|r| r.unwrap_or_default())
                .collect::<Vec<_>>(),
            false,
        ),
        Err(_) => {
            aborts.iter().for_each(|a| a.abort());
            (Vec::new(), true)
        }
    };
    let mut stats = stats::reduce(&per_client);
    if timed_out {
        stats.problems.push((
            format!("phase timed out after {:?}", spec.phase_timeout),
            spec.clients,
        ));
    }
    Ok(PhaseResult {
        stats,
        wall,
        cpu,
        cpu_time,
        connect_failures,
    })
}

/// One client: its start offset, then its turns; every turn is recorded
/// (flagged measured or warm-up), a dead connection fails the rest.
async fn run_client(
    index: usize,
    mut client: Client,
    spec: &LoadSpec,
    barrier: &Barrier,
    epoch: Instant,
) -> Vec<(bool, TurnObservation)> {
    let offset = spec
        .stagger
        .mul_f64(index as f64 / spec.clients.max(1) as f64);
    tokio::time::sleep_until((epoch + offset).into()).await;
    let mut turns = Vec::with_capacity(spec.warmup + spec.rounds);
    for round in 0..spec.warmup + spec.rounds {
        let measured = round >= spec.warmup;
        // (Not in a burst: the others would wait at the barrier for this one.)
        if round > spec.warmup && !spec.burst && spec.budget.is_some_and(|b| epoch.elapsed() >= b) {
            break;
        }
        if spec.burst && measured {
            barrier.wait().await;
        }
        let request_id = format!("{}-{index}-{round}", spec.nonce);
        let turn = match &mut client {
            Client::Sse(sse) => sse::turn(sse, spec, epoch).await,
            Client::Gateway { socket } => match socket {
                Some(ws) => {
                    let (turn, alive) = gateway_turn(ws, &request_id, spec, epoch).await;
                    if !alive {
                        *socket = None;
                    }
                    turn
                }
                None => failed("no connection"),
            },
        };
        turns.push((measured, turn));
    }
    if let Client::Gateway { socket: Some(ws) } = &mut client {
        let _ = ws.close().await;
    }
    turns
}

fn failed(why: &str) -> TurnObservation {
    TurnObservation {
        problem: Some(why.to_owned()),
        ..Default::default()
    }
}

/// Opens an authenticated WebSocket to the gateway. `config` defaults to
/// small buffers (the client side's memory is not what is measured).
///
/// # Errors
/// When the TCP connect or the upgrade fails.
pub async fn connect_ws(
    addr: SocketAddr,
    token: &str,
    config: Option<WebSocketConfig>,
) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{addr}/v1/chat/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let config = config.unwrap_or_else(|| {
        WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
    });
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .context("WebSocket connect")?;
    Ok(socket)
}

/// Tracks one turn's token frames against the expected answer. Timing is
/// kept per script token, each timed when the frame completing it arrives,
/// so the check holds for any split of the text into frames (ours carry one
/// upstream delta each; other paths' chunks need not).
pub(crate) struct Check<'a> {
    expected: &'a [String],
    /// Where each script token ends in the whole text.
    ends: Vec<usize>,
    /// Script tokens completed so far.
    completed: usize,
    epoch: Instant,
    sent: Instant,
    last_seq: u64,
    text: String,
    turn: TurnObservation,
}

impl<'a> Check<'a> {
    pub(crate) fn new(expected: &'a [String], epoch: Instant) -> Self {
        let ends = expected
            .iter()
            .scan(0, |end, token| {
                *end += token.len();
                Some(*end)
            })
            .collect();
        Self {
            expected,
            ends,
            completed: 0,
            epoch,
            sent: Instant::now(),
            last_seq: 0,
            text: String::new(),
            turn: TurnObservation {
                token_times_us: Vec::with_capacity(expected.len()),
                ..Default::default()
            },
        }
    }

    pub(crate) fn token(&mut self, at: Instant, seq: u64, delta: &str) {
        if self.turn.ttft.is_none() {
            self.turn.ttft = Some(at - self.sent);
        }
        if seq as usize > self.expected.len() {
            self.problem(format!(
                "token seq {seq} past the script's {} tokens",
                self.expected.len()
            ));
        }
        if seq <= self.last_seq {
            self.turn.duplicates += 1;
            return;
        }
        if seq != self.last_seq + 1 {
            self.turn.out_of_order += 1;
            self.turn.missing += seq - self.last_seq - 1;
        }
        self.last_seq = seq;
        self.text.push_str(delta);
        let micros = (at - self.epoch).as_micros() as u64;
        while self.completed < self.ends.len() && self.ends[self.completed] <= self.text.len() {
            self.turn.token_times_us.push(micros);
            self.completed += 1;
        }
    }

    pub(crate) fn problem(&mut self, why: String) {
        self.turn.problem.get_or_insert(why);
    }

    /// Closes the turn: `done_seq` is the `done` frame's seq (`None` for SSE).
    pub(crate) fn finish(mut self, done_seq: Option<u64>) -> TurnObservation {
        if let Some(seq) = done_seq
            && seq != self.last_seq + 1
        {
            self.problem(format!("done at seq {seq}, expected {}", self.last_seq + 1));
        }
        if self.turn.missing > 0 || self.turn.duplicates > 0 || self.turn.out_of_order > 0 {
            let why = format!(
                "{} missing, {} duplicated, {} out of order",
                self.turn.missing, self.turn.duplicates, self.turn.out_of_order
            );
            self.problem(why);
        }
        if self.turn.problem.is_none() && self.text != self.expected.concat() {
            self.problem("text differs from the script".into());
        }
        self.turn
    }
}

/// One turn through the gateway. Returns whether the socket is still usable.
async fn gateway_turn(
    socket: &mut Socket,
    request_id: &str,
    spec: &LoadSpec,
    epoch: Instant,
) -> (TurnObservation, bool) {
    let frame = json!({
        "type": "send",
        "conversation_id": null,
        "content": "Where does a glass bottle go?",
        "request_id": request_id,
    })
    .to_string();
    let mut check = Check::new(&spec.expected, epoch);
    if let Err(e) = socket.send(Message::Text(frame.into())).await {
        check.problem(format!("send failed: {e}"));
        return (check.finish(None), false);
    }
    let deadline = tokio::time::Instant::now() + spec.turn_timeout;
    let mut turn_id: Option<String> = None;
    loop {
        let message = match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => {
                check.problem("turn timed out".into());
                return (check.finish(None), false);
            }
            Ok(None) => {
                check.problem("socket closed".into());
                return (check.finish(None), false);
            }
            Ok(Some(Err(e))) => {
                check.problem(format!("socket error: {e}"));
                return (check.finish(None), false);
            }
            Ok(Some(Ok(message))) => message,
        };
        let at = Instant::now();
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(0);
                check.problem(format!("closed by the gateway (code {code})"));
                return (check.finish(None), false);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Binary(_) => {
                check.problem("binary frame".into());
                continue;
            }
        };
        let frame: ServerFrame = match serde_json::from_str(&text) {
            Ok(frame) => frame,
            Err(e) => {
                check.problem(format!("unreadable frame: {e}"));
                continue;
            }
        };
        match frame {
            ServerFrame::Accepted {
                request_id: echoed,
                turn_id: id,
                ..
            } => {
                if echoed != request_id {
                    check.problem("accepted echoes another request_id".into());
                }
                turn_id = Some(id);
            }
            ServerFrame::Token {
                turn_id: id,
                seq,
                delta,
            } => {
                if turn_id.as_deref() != Some(id.as_str()) {
                    check.problem("token before accepted, or of another turn".into());
                }
                check.token(at, seq, &delta);
            }
            ServerFrame::Done {
                seq, finish_reason, ..
            } => {
                if finish_reason != FinishReason::Stop {
                    check.problem(format!("finish_reason {}", finish_reason.as_str()));
                }
                return (check.finish(Some(seq)), true);
            }
            ServerFrame::Error { code, .. } => check.problem(format!("error frame: {code}")),
            ServerFrame::Reset { .. } => check.problem("reset frame".into()),
            ServerFrame::Pong => {}
        }
    }
}
