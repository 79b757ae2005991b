//! The system under test, started by the tool itself on loopback: a testkit
//! nats-server, a stand-in OpenAI-compatible upstream, and the streamer and
//! gateway in this process, each on its own named Tokio runtime (as if each
//! were its own process, and so that CPU time can be told apart); a
//! persister in its own process when asked for (with a testkit Postgres);
//! plus, for the memory measurement, a gateway in a separate process.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser as _;
use testkit::{NatsServer, Script, StandInLlm};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Builds a multi-threaded runtime whose threads are named `name-N`.
///
/// # Errors
/// When the OS refuses threads.
pub fn runtime(name: &'static str, workers: usize) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("cannot build the {name} runtime"))
}

/// The answer the stand-in streams: `count` distinct tokens, so a lost,
/// doubled or reordered one changes the text.
pub fn tokens(count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("w{i} ")).collect()
}

/// A random HS256 key for this run (the loopback gateway's only secret).
pub fn run_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// An HS256 token for `user`, valid for an hour.
///
/// # Errors
/// When signing fails.
pub fn token_for(secret: &str, user: &str) -> anyhow::Result<String> {
    let exp = chrono::Utc::now().timestamp() + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Everything the chat phases talk to. Dropping it stops it all.
pub struct Stack {
    /// The gateway's address (WebSocket at `/v1/chat/ws`).
    pub gateway_addr: SocketAddr,
    /// The stand-in upstream; its script is swapped between phases.
    pub llm: StandInLlm,
    /// The HS256 key the gateway accepts.
    pub secret: String,
    /// The streamers' `STREAMER_TOKEN_LINGER_MS` (taken from the environment).
    pub token_linger_ms: u64,
    shutdown: CancellationToken,
    gateway_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    streamer_tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    // Runtimes last: they are shut down in `stop`.
    gateway_rt: Option<Runtime>,
    streamer_rt: Option<Runtime>,
    upstream_rt: Option<Runtime>,
}

impl Stack {
    /// Starts the stand-in, `streamers` streamers (sharing the durable
    /// consumer, as replicas would) and the gateway against `nats`.
    ///
    /// # Errors
    /// When a component fails to start.
    pub fn start(
        nats: &NatsServer,
        script: Script,
        workers: usize,
        streamers: usize,
        streamer_concurrency: usize,
    ) -> anyhow::Result<Self> {
        let upstream_rt = runtime("lg-upstream", workers)?;
        let streamer_rt = runtime("lg-streamer", workers)?;
        let gateway_rt = runtime("lg-gateway", workers)?;
        let llm = upstream_rt.block_on(StandInLlm::start(script))?;
        let shutdown = CancellationToken::new();
        let secret = run_secret();

        // --ack-wait-ms is left at its default (nats/consumers/*.json).
        let concurrency = streamer_concurrency.to_string();
        let streamer_config = streamer::Config::parse_from([
            "streamer",
            "--nats-url",
            &nats.url(),
            "--listen",
            "127.0.0.1:0",
            "--llm-base-url",
            llm.base_url(),
            "--concurrency",
            &concurrency,
        ]);
        let mut streamer_tasks = Vec::with_capacity(streamers);
        for _ in 0..streamers.max(1) {
            let streamer = streamer_rt
                .block_on(streamer::Streamer::build(streamer_config.clone()))
                .context("the streamer did not start")?;
            streamer_tasks.push(streamer_rt.spawn(streamer.run(shutdown.clone())));
        }

        let web_dir = testkit::project_root().join("web");
        let gateway_config = gateway::Config::parse_from([
            "gateway".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--nats-url".into(),
            nats.url(),
            "--auth-jwt-secret".into(),
            secret.clone(),
            "--web-dir".into(),
            web_dir.display().to_string(),
        ]);
        let gateway = gateway_rt
            .block_on(gateway::Gateway::build(gateway_config, shutdown.clone()))
            .context("the gateway did not start")?;
        let gateway_addr = gateway.local_addr()?;
        let gateway_task = gateway_rt.spawn(gateway.run(shutdown.clone()));
        Ok(Self {
            gateway_addr,
            llm,
            secret,
            token_linger_ms: streamer_config.token_linger_ms,
            shutdown,
            gateway_task: Some(gateway_task),
            streamer_tasks,
            gateway_rt: Some(gateway_rt),
            streamer_rt: Some(streamer_rt),
            upstream_rt: Some(upstream_rt),
        })
    }

    /// The stand-in's chat completions URL (the baseline's target).
    pub fn upstream_url(&self) -> String {
        format!("{}/chat/completions", self.llm.base_url())
    }

    /// Stops the gateway and streamer (each drains, bounded) and the runtimes.
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        let limit = Duration::from_secs(15);
        if let (Some(rt), Some(task)) = (&self.gateway_rt, self.gateway_task.take()) {
            let _ = rt.block_on(async { tokio::time::timeout(limit, task).await });
        }
        if let Some(rt) = &self.streamer_rt {
            let tasks = std::mem::take(&mut self.streamer_tasks);
            let _ = rt.block_on(async {
                tokio::time::timeout(limit, futures::future::join_all(tasks)).await
            });
        }
        for rt in [
            self.gateway_rt.take(),
            self.streamer_rt.take(),
            self.upstream_rt.take(),
        ]
        .into_iter()
        .flatten()
        {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A gateway in its own process (for the memory measurement); killed on drop.
pub struct GatewayProcess {
    child: Child,
    /// Its listen address.
    pub addr: SocketAddr,
    /// What ran: the release binary, or this tool's `serve-gateway`.
    pub program: String,
    /// Its stderr, for diagnostics.
    pub log: PathBuf,
}

impl GatewayProcess {
    /// Starts `gateway_bin` (or, when it is missing, this executable's
    /// `serve-gateway`) and waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// When it cannot start or does not become ready within 30 s.
    pub async fn start(
        gateway_bin: Option<PathBuf>,
        nats_url: &str,
        secret: &str,
    ) -> anyhow::Result<Self> {
        let (mut command, program) = service_command("gateway", gateway_bin)?;
        let port = testkit::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = std::env::temp_dir().join(format!("loadgen-gateway-{}.log", std::process::id()));
        command
            .env("GATEWAY_LISTEN", addr.to_string())
            .env("NATS_URL", nats_url)
            .env("AUTH_JWT_SECRET", secret)
            .env("GATEWAY_WEB_DIR", testkit::project_root().join("web"))
            .env("RUST_LOG", "warn")
            .env_remove("GATEWAY_DEV_LOGIN")
            // Its /readyz is awaited on the API port.
            .env_remove("GATEWAY_ADMIN_LISTEN")
            .env_remove("AUTH_JWT_PUBLIC_KEY");
        let child = spawn_logged(&mut command, &program, &log)?;
        let process = Self {
            child,
            addr,
            program,
            log,
        };
        let url = format!("http://{addr}/readyz");
        testkit::wait_http_ok(
            "the gateway process's /readyz",
            &url,
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("see {}", process.log.display()))?;
        Ok(process)
    }

    /// Its pid, for `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The command that runs service `name`: `bin`, else the binary of that
/// name next to this executable, else this executable's `serve-<name>`.
fn service_command(name: &str, bin: Option<PathBuf>) -> anyhow::Result<(Command, String)> {
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name(name);
    Ok(match bin.or_else(|| sibling.exists().then_some(sibling)) {
        Some(bin) => (Command::new(&bin), bin.display().to_string()),
        None => {
            let mut command = Command::new(&me);
            command.arg(format!("serve-{name}"));
            (command, format!("{} serve-{name}", me.display()))
        }
    })
}

/// A persister in its own process, its SQLite buffer in a fresh temp dir,
/// syncing to a testkit Postgres when one starts (else it runs degraded,
/// SQLite only, as it does through a Postgres outage); killed on drop.
pub struct PersisterProcess {
    child: Child,
    /// What ran: the release binary, or this tool's `serve-persister`.
    pub program: String,
    /// Where its Postgres rows go, for the report.
    pub postgres_note: String,
    /// Its stderr, for diagnostics.
    pub log: PathBuf,
    dir: PathBuf,
    // Dropped after the process is killed (field order).
    _postgres: Option<testkit::Postgres>,
}

impl PersisterProcess {
    /// Starts Postgres (unless `postgres` is false) and the persister against
    /// `nats_url`, and waits until its `/healthz` answers (it has created its
    /// consumers by then).
    ///
    /// # Errors
    /// When the persister cannot start or does not answer within 30 s.
    pub async fn start(
        persister_bin: Option<PathBuf>,
        nats_url: &str,
        postgres: bool,
    ) -> anyhow::Result<Self> {
        let (pg, database_url, postgres_note) = if postgres {
            match start_postgres().await {
                Ok((pg, url)) => (
                    Some(pg),
                    url,
                    "a testkit Postgres (`fsync=off`) on loopback".to_owned(),
                ),
                Err(e) => (
                    None,
                    "postgres://postgres@127.0.0.1:1/none".to_owned(),
                    format!("no Postgres ({e:#}): the persister ran degraded, SQLite only"),
                ),
            }
        } else {
            (
                None,
                "postgres://postgres@127.0.0.1:1/none".to_owned(),
                "no Postgres (`--no-postgres`): the persister ran degraded, SQLite only".to_owned(),
            )
        };
        let (mut command, program) = service_command("persister", persister_bin)?;
        let dir = std::env::temp_dir().join(format!(
            "loadgen-persister-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let addr = format!("127.0.0.1:{}", testkit::free_port());
        let log =
            std::env::temp_dir().join(format!("loadgen-persister-{}.log", std::process::id()));
        command
            .env("NATS_URL", nats_url)
            .env("DATABASE_URL", &database_url)
            .env("PERSISTER_LISTEN", &addr)
            .env("PERSISTER_SQLITE_PATH", dir.join("persister.db"))
            .env("RUST_LOG", "warn");
        let child = spawn_logged(&mut command, &program, &log)?;
        let process = Self {
            child,
            program,
            postgres_note,
            log,
            dir,
            _postgres: pg,
        };
        testkit::wait_http_ok(
            "the persister's /healthz",
            &format!("http://{addr}/healthz"),
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("see {}", process.log.display()))?;
        Ok(process)
    }

    /// Its pid, for `/proc/<pid>/stat`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

async fn start_postgres() -> anyhow::Result<(testkit::Postgres, String)> {
    let pg = testkit::Postgres::start().await?;
    let url = pg.create_database("bench")?;
    Ok((pg, url))
}

impl Drop for PersisterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fs_file(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

/// Starts a service process of the load tool's: no stdin or stdout, its
/// stderr (the logs) into `log`.
fn spawn_logged(
    command: &mut Command,
    program: &str,
    log: &std::path::Path,
) -> anyhow::Result<std::process::Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs_file(log)?)
        .spawn()
        .with_context(|| format!("cannot start {program}"))
}
