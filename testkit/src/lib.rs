//! Dev-only test harness: starts the real servers our tests need and stops
//! them on `Drop`.
//!
//! It owns process management for tests: a real `nats-server` with JetStream
//! ([`NatsServer`]), a real Postgres cluster ([`Postgres`]), the real local LLM
//! ([`LocalLlm`]), and a stand-in for a third-party OpenAI-compatible provider
//! ([`StandInLlm`]) — the only thing we stand in for, because it is not ours.
//! Every server gets a random loopback port and a temp dir. Binaries come from
//! the project's data dir, which `scripts/setup.sh` fills.

mod cluster;
mod delay;
mod llm;
mod nats;
mod postgres;

pub use cluster::NatsCluster;
pub use delay::DelayProxy;
pub use llm::{LocalLlm, Quirks, Script, StandInLlm};
pub use nats::{NatsServer, Passwords};
pub use postgres::Postgres;

use std::{net::TcpListener, path::PathBuf, time::Duration};

/// The repository root.
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the workspace")
        .to_path_buf()
}

/// The project's data dir (`DATA_DIR`, default `<root>/.data`).
pub fn data_dir() -> PathBuf {
    std::env::var_os("DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join(".data"))
}

/// A program from the project's venv, or from `PATH` when the venv lacks it.
pub fn venv_bin(name: &str) -> PathBuf {
    let local = data_dir().join("venv/bin").join(name);
    if local.exists() {
        local
    } else {
        PathBuf::from(name)
    }
}

/// A free loopback port. The tiny race with another process binding it is
/// acceptable in tests; a fixed port lets a server restart on the same address.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Installs a test log subscriber once (honours `RUST_LOG`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it returns `Some` or `timeout` passes.
///
/// # Errors
/// When the timeout passes first; the message names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True once something accepts TCP connections on `127.0.0.1:port`.
pub async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Polls `url` until it answers 2xx or `timeout` passes.
///
/// # Errors
/// When the timeout passes first; the message names `what`.
pub async fn wait_http_ok(what: &str, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    wait_for(what, timeout, || {
        let request = http.get(url).send();
        async move {
            request
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await
}
