//! A real nats-server with JetStream on a random port: bare, or secured
//! with the shipped configuration (one NATS user per service, subject
//! permissions, no anonymous clients).

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
    /// With the shipped `nats/nats-server.conf`: each user's password.
    secured: Option<Passwords>,
    /// A configuration file of the caller's (`start_with_config`).
    config: Option<PathBuf>,
}

/// The users of `nats/auth.conf` and the passwords a test run gave them.
#[derive(Debug, Clone)]
pub struct Passwords(Vec<(&'static str, String)>);

impl Passwords {
    /// Fresh random passwords for every user.
    pub fn generate() -> Self {
        Self(
            ["gateway", "streamer", "persister", "admin"]
                .into_iter()
                .map(|user| (user, uuid::Uuid::new_v4().simple().to_string()))
                .collect(),
        )
    }

    /// `user`'s password.
    ///
    /// # Panics
    /// For a user `nats/auth.conf` does not have.
    pub fn of(&self, user: &str) -> &str {
        &self
            .0
            .iter()
            .find(|(u, _)| *u == user)
            .unwrap_or_else(|| panic!("no NATS user {user}"))
            .1
    }

    /// The environment nats-server reads them from.
    pub fn server_env(&self) -> impl Iterator<Item = (String, &str)> {
        self.0.iter().map(|(user, password)| {
            (
                format!("{}_NATS_PASSWORD", user.to_uppercase()),
                password.as_str(),
            )
        })
    }

    /// A service's environment: `NATS_USER` and `NATS_PASSWORD`.
    pub fn service_env(&self, user: &str) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_USER", user.to_owned()),
            ("NATS_PASSWORD", self.of(user).to_owned()),
        ]
    }
}

impl NatsServer {
    /// Starts nats-server with JetStream and waits until it accepts clients.
    ///
    /// # Errors
    /// When the binary is missing (run `scripts/setup.sh`) or it does not come up.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None, None).await
    }

    /// Like [`Self::start`], with `config` (nats-server configuration text,
    /// for example `jetstream { sync_interval: always }`) as its config file.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub async fn start_with_config(config: &str) -> anyhow::Result<Self> {
        Self::start_with(None, Some(config)).await
    }

    async fn start_with(secured: Option<Passwords>, config: Option<&str>) -> anyhow::Result<Self> {
        let binary = binary();
        let store = tempfile::Builder::new().prefix("nats-js-").tempdir()?;
        let config = match config.filter(|text| !text.trim().is_empty()) {
            Some(text) => {
                let path = store.path().join("extra.conf");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let mut server = Self {
            port: crate::free_port(),
            monitor_port: crate::free_port(),
            store,
            child: None,
            binary,
            secured,
            config,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// Starts nats-server with the shipped configuration (`nats/nats-server.conf`
    /// and its users), on random ports.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub async fn start_secured() -> anyhow::Result<Self> {
        Self::start_with(Some(Passwords::generate()), None).await
    }

    /// The users' passwords of a secured server.
    ///
    /// # Panics
    /// When the server is not secured.
    pub fn passwords(&self) -> &Passwords {
        self.secured.as_ref().expect("a secured nats-server")
    }

    /// Starts the server again on the same port and store (after [`Self::kill`]).
    ///
    /// # Errors
    /// When it does not come up within 10 s.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        // A random port another process took meanwhile makes nats-server
        // exit after it opened its client port: ready means both ports
        // answer and the process is still there; otherwise try new ones.
        let mut last = None;
        for _ in 0..3 {
            match self.spawn_once().await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    self.kill();
                    self.monitor_port = crate::free_port();
                    last = Some(error);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        if let Some(passwords) = &self.secured {
            // The flags below override the file's ports (the monitoring
            // one too), so parallel tests do not collide.
            command
                .arg("-c")
                .arg(crate::project_root().join("nats/nats-server.conf"))
                .envs(passwords.server_env());
        } else if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
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
            .arg(self.store.path());
        self.child = Some(spawn(&mut command, &self.binary)?);
        let health = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        crate::wait_http_ok("nats-server", &health, Duration::from_secs(10)).await?;
        let port = self.port;
        crate::wait_for("nats-server", Duration::from_secs(10), || async move {
            crate::port_open(port).await.then_some(())
        })
        .await?;
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            _ => anyhow::bail!("nats-server exited right after starting"),
        }
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
        self.client_as("admin").await
    }

    /// A client connected as `user` of a secured server (anonymous on a
    /// bare one), with that user's reply-inbox prefix, as the services do.
    ///
    /// # Errors
    /// When the server is not reachable or refuses the user.
    pub async fn client_as(&self, user: &str) -> anyhow::Result<async_nats::Client> {
        let options = match &self.secured {
            Some(passwords) => async_nats::ConnectOptions::new()
                .user_and_password(user.to_owned(), passwords.of(user).to_owned())
                .custom_inbox_prefix(format!("_INBOX_{user}")),
            None => async_nats::ConnectOptions::new(),
        };
        Ok(options.connect(self.url()).await?)
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

/// The nats-server binary: `NATS_SERVER_BIN`, else the one setup installed.
pub(crate) fn binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::venv_bin("nats-server"))
}

/// Starts `command` (a nats-server), quiet, with an actionable error.
pub(crate) fn spawn(command: &mut Command, binary: &std::path::Path) -> anyhow::Result<Child> {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (run scripts/setup.sh, or set NATS_SERVER_BIN)",
                binary.display()
            )
        })
}
