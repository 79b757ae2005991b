//! End-to-end harness: runs the real `gateway`, `streamer` and `persister`
//! binaries as processes against real nats-server and Postgres, so tests can
//! SIGKILL and restart them the way production fails. It owns process
//! control for those binaries; the servers themselves come from `testkit`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

pub mod chaos;

/// HS256 key the harness configures and signs test tokens with.
pub const SECRET: &str = "e2e-secret-e2e-secret-e2e-secret-0123456";

/// Builds the three binaries (a no-op when up to date) and returns their folder.
///
/// # Errors
/// When cargo fails.
pub fn build_binaries() -> anyhow::Result<PathBuf> {
    let mut cargo = Command::new(env!("CARGO"));
    // Not the variables cargo sets for this test: build scripts that watch
    // one (ring watches CARGO_MANIFEST_DIR) would otherwise see a change and
    // rebuild half the tree here, and again in the next plain `cargo build`.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            cargo.env_remove(key.as_ref());
        }
    }
    let status = cargo
        .args([
            "build",
            "--quiet",
            "-p",
            "gateway",
            "-p",
            "streamer",
            "-p",
            "persister",
            "--bins",
        ])
        .current_dir(testkit::project_root())
        .status()
        .context("cannot run cargo build")?;
    anyhow::ensure!(status.success(), "cargo build of the binaries failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::project_root().join("target"));
    Ok(target.join("debug"))
}

/// One service binary run as a child process; SIGKILLed on drop.
pub struct Service {
    name: &'static str,
    binary: PathBuf,
    env: Vec<(String, String)>,
    /// Its health/readiness address.
    pub addr: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Describes a service; `start` runs it.
    pub fn new(
        bin_dir: &std::path::Path,
        name: &'static str,
        addr: String,
        env: Vec<(String, String)>,
        logs: &std::path::Path,
    ) -> Self {
        Self {
            name,
            binary: bin_dir.join(name),
            env,
            addr,
            log: logs.join(format!("{name}.log")),
            child: None,
        }
    }

    /// A gateway on a free port, signing with [`SECRET`], plus `extra` env.
    pub fn gateway(bin_dir: &Path, logs: &Path, nats_url: &str, extra: &[(&str, String)]) -> Self {
        let mut env = vec![("AUTH_JWT_SECRET", SECRET.to_owned())];
        env.extend_from_slice(extra);
        Self::on_free_port(bin_dir, "gateway", "GATEWAY_LISTEN", logs, nats_url, &env)
    }

    /// A streamer on a free port answering from the LLM at `llm_base_url`,
    /// plus `extra` env (it inherits `VISION_LOCAL_MODEL` from the test's
    /// environment, as setup.sh exports it).
    pub fn streamer(
        bin_dir: &Path,
        logs: &Path,
        nats_url: &str,
        llm_base_url: &str,
        extra: &[(&str, String)],
    ) -> Self {
        let mut env = vec![("LLM_BASE_URL", llm_base_url.to_owned())];
        env.extend_from_slice(extra);
        Self::on_free_port(bin_dir, "streamer", "STREAMER_LISTEN", logs, nats_url, &env)
    }

    /// A persister on a free port with its SQLite file in `data_dir`,
    /// syncing to `database_url` every 200 ms when idle, plus `extra` env.
    pub fn persister(
        bin_dir: &Path,
        logs: &Path,
        nats_url: &str,
        database_url: &str,
        data_dir: &Path,
        extra: &[(&str, String)],
    ) -> Self {
        let mut env = vec![
            ("DATABASE_URL", database_url.to_owned()),
            (
                "PERSISTER_SQLITE_PATH",
                data_dir.join("persister.db").display().to_string(),
            ),
            ("PERSISTER_SYNC_INTERVAL_MS", "200".to_owned()),
        ];
        env.extend_from_slice(extra);
        Self::on_free_port(
            bin_dir,
            "persister",
            "PERSISTER_LISTEN",
            logs,
            nats_url,
            &env,
        )
    }

    fn on_free_port(
        bin_dir: &Path,
        name: &'static str,
        listen_var: &str,
        logs: &Path,
        nats_url: &str,
        extra: &[(&str, String)],
    ) -> Self {
        let addr = format!("127.0.0.1:{}", testkit::free_port());
        let mut env = vec![
            ("NATS_URL".to_owned(), nats_url.to_owned()),
            (listen_var.to_owned(), addr.clone()),
        ];
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self::new(bin_dir, name, addr, env, logs)
    }

    /// Starts the process and waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// When it does not start or become ready within 30 s.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        let url = format!("http://{}/readyz", self.addr);
        let what = format!("{} to be ready", self.name);
        testkit::wait_http_ok(&what, &url, Duration::from_secs(30)).await
    }

    /// SIGKILL: no drain, no acks, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process is frozen, alive but silent (a long GC-like
    /// pause); its sockets stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} {}", self.name);
        }
    }

    /// The tail of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A signed token for `user`, valid for an hour.
pub fn token_for(user: &str) -> String {
    sign(serde_json::json!({"sub": user}))
}

/// A signed token for `user` with the admin role, valid for an hour.
pub fn admin_token_for(user: &str) -> String {
    sign(serde_json::json!({"sub": user, "role": "admin"}))
}

fn sign(mut claims: serde_json::Value) -> String {
    claims["exp"] = (chrono::Utc::now().timestamp() + 3600).into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token encodes")
}

/// A WebSocket chat client.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/v1/chat/ws` on `gateway` as `user`.
///
/// # Errors
/// When the gateway refuses or is unreachable.
pub async fn ws_connect(gateway: &str, user: &str) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = format!("ws://{gateway}/v1/chat/ws").into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token_for(user)).parse()?,
    );
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// Sends a JSON frame.
///
/// # Errors
/// When the socket is closed.
pub async fn ws_send(ws: &mut Ws, frame: serde_json::Value) -> anyhow::Result<()> {
    use futures::SinkExt as _;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        frame.to_string().into(),
    ))
    .await?;
    Ok(())
}

/// Reads frames until `done` of `turn_id` (any turn when `None`), or
/// `limit` passes, or the socket ends; returns what it read.
pub async fn ws_until_done(ws: &mut Ws, limit: Duration) -> Vec<bus::wire::ServerFrame> {
    use futures::StreamExt as _;
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, ws.next()).await {
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
            continue;
        };
        let Ok(frame) = serde_json::from_str::<bus::wire::ServerFrame>(&text) else {
            continue;
        };
        let done = matches!(frame, bus::wire::ServerFrame::Done { .. });
        frames.push(frame);
        if done {
            break;
        }
    }
    frames
}

/// One SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `id:`.
    pub id: u64,
    /// `event:`.
    pub event: String,
    /// `data:`, parsed.
    pub data: serde_json::Value,
}

impl SseEvent {
    /// `result` or `error`: the scan's last event.
    pub fn is_terminal(&self) -> bool {
        self.event == "result" || self.event == "error"
    }
}

/// Takes the next complete block off `buffer`: `None` when there is none
/// yet, `Some(None)` for a block that is not an event (a comment).
pub fn next_sse_event(buffer: &mut String) -> Option<Option<SseEvent>> {
    let end = buffer.find("\n\n")?;
    let block: String = buffer.drain(..end + 2).collect();
    let field = |name: &str| {
        block
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    let (Some(id), Some(event), Some(data)) = (field("id:"), field("event:"), field("data:"))
    else {
        return Some(None);
    };
    Some(Some(SseEvent {
        id: id.parse().unwrap_or(0),
        event,
        data: serde_json::from_str(&data).unwrap_or_default(),
    }))
}

/// Reads SSE events from `response` until a `result` or `error` event, or
/// `limit` passes, or the body ends.
pub async fn sse_until_terminal(response: reqwest::Response, limit: Duration) -> Vec<SseEvent> {
    use futures::StreamExt as _;
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(event) = next_sse_event(&mut buffer) {
            let Some(event) = event else { continue };
            let terminal = event.is_terminal();
            seen.push(event);
            if terminal {
                return seen;
            }
        }
    }
    seen
}

/// Uploads the coffee photo the scan tests use as `user`, and opens the
/// scan's SSE events; returns the scan id and the open event stream.
///
/// # Panics
/// When the gateway refuses.
pub async fn start_scan(gateway: &str, user: &str) -> (String, reqwest::Response) {
    let http = reqwest::Client::new();
    let token = token_for(user);
    let photo = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../streamer/tests/fixtures/images/coffee.jpg"
    ))
    .expect("the coffee fixture");
    let accepted: serde_json::Value = http
        .post(format!("http://{gateway}/v1/scans"))
        .bearer_auth(&token)
        .header("content-type", "image/jpeg")
        .body(photo)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("202 JSON");
    let scan_id = accepted["scan_id"].as_str().expect("scan_id").to_owned();
    let events = http
        .get(format!("http://{gateway}/v1/scans/{scan_id}/events"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), 200);
    (scan_id, events)
}

/// The Prometheus text a service at `addr` serves on `/metrics`.
///
/// # Panics
/// When it does not answer.
pub async fn scrape_metrics(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics has a body")
}

/// The value `sql` selects in `database`, once it selects one (within 30 s).
///
/// # Panics
/// When nothing is selected in time.
pub async fn pg_value(pg: &testkit::Postgres, database: &str, sql: &str) -> String {
    testkit::wait_for(&format!("a row for {sql}"), Duration::from_secs(30), || {
        let row = pg.psql(database, sql).ok().filter(|r| !r.trim().is_empty());
        async move { row }
    })
    .await
    .unwrap()
    .trim()
    .to_owned()
}

/// What most end-to-end tests stand on: the built binaries, a log and a
/// data folder, a nats-server, a Postgres with one database, and a stand-in
/// LLM answering with a script. Services are described on it and started by
/// the test, which decides when and how to kill them.
pub struct Bed {
    /// Where the binaries are.
    pub bin: PathBuf,
    /// Service logs.
    pub logs: tempfile::TempDir,
    /// The persister's SQLite folder.
    pub data: tempfile::TempDir,
    /// The bus.
    pub nats: testkit::NatsServer,
    /// The system of record.
    pub pg: testkit::Postgres,
    /// The database's name.
    pub database: String,
    /// Its URL.
    pub database_url: String,
    /// The provider.
    pub llm: testkit::StandInLlm,
}

impl Bed {
    /// Builds the binaries and starts the servers.
    ///
    /// # Panics
    /// When a server does not start.
    pub async fn start(database: &str, script: testkit::Script) -> Self {
        testkit::init_logs();
        let bin = build_binaries().expect("binaries build");
        // The shipped configuration: every test on the bed also proves the
        // services' NATS permissions suffice for their work.
        let nats = testkit::NatsServer::start_secured()
            .await
            .expect("nats-server");
        let pg = testkit::Postgres::start().await.expect("postgres");
        let database_url = pg.create_database(database).expect("database");
        let llm = testkit::StandInLlm::start(script)
            .await
            .expect("stand-in LLM");
        Self {
            bin,
            logs: tempfile::tempdir().expect("temp dir"),
            data: tempfile::tempdir().expect("temp dir"),
            nats,
            pg,
            database: database.to_owned(),
            database_url,
            llm,
        }
    }

    /// A gateway with `extra` env.
    pub fn gateway(&self, extra: &[(&str, String)]) -> Service {
        let env = self.as_user("gateway", extra);
        Service::gateway(&self.bin, self.logs.path(), &self.nats.url(), &env)
    }

    /// `extra` and the NATS identity of `user`.
    fn as_user<'a>(&self, user: &str, extra: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
        let mut env = self.nats.passwords().service_env(user);
        env.extend_from_slice(extra);
        env
    }

    /// A streamer with `extra` env, logging to `log_dir` under the logs.
    pub fn streamer(&self, log_dir: &str, extra: &[(&str, String)]) -> Service {
        let logs = self.logs.path().join(log_dir);
        std::fs::create_dir_all(&logs).expect("log dir");
        let env = self.as_user("streamer", extra);
        Service::streamer(
            &self.bin,
            &logs,
            &self.nats.url(),
            self.llm.base_url(),
            &env,
        )
    }

    /// A persister on the bed's database.
    pub fn persister(&self) -> Service {
        Service::persister(
            &self.bin,
            self.logs.path(),
            &self.nats.url(),
            &self.database_url,
            self.data.path(),
            &self.nats.passwords().service_env("persister"),
        )
    }

    /// The value `sql` selects in the bed's database, once it selects one.
    pub async fn pg_value(&self, sql: &str) -> String {
        pg_value(&self.pg, &self.database, sql).await
    }
}
