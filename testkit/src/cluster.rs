//! A real 3-node nats-server cluster with JetStream, each node on random
//! ports with its own store, run from the shipped `nats/cluster.conf` (and
//! so with its users and permissions).

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

/// One node of a [`NatsCluster`].
struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

/// Three clustered nodes; killed on drop. Stores survive restarts.
pub struct NatsCluster {
    nodes: Vec<Node>,
    binary: PathBuf,
    config: PathBuf,
    passwords: crate::Passwords,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream has a meta leader.
    ///
    /// # Errors
    /// When the binary is missing (run `scripts/setup.sh`) or the cluster
    /// does not form within 30 s.
    pub async fn start() -> anyhow::Result<Self> {
        let binary = crate::nats::binary();
        let nodes = (1..=3)
            .map(|i| {
                Ok(Node {
                    name: format!("n{i}"),
                    client_port: crate::free_port(),
                    cluster_port: crate::free_port(),
                    monitor_port: crate::free_port(),
                    store: tempfile::Builder::new().prefix("nats-node-").tempdir()?,
                    child: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut cluster = Self {
            nodes,
            binary,
            config: crate::project_root().join("nats/cluster.conf"),
            passwords: crate::Passwords::generate(),
        };
        for i in 0..3 {
            cluster.spawn(i)?;
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("nats-route://127.0.0.1:{}", n.cluster_port))
            .collect();
        let node = &self.nodes[i];
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(&self.config)
            .env("NODE_NAME", &node.name)
            .env("CLIENT_PORT", node.client_port.to_string())
            .env("CLUSTER_PORT", node.cluster_port.to_string())
            .env("MONITOR_PORT", node.monitor_port.to_string())
            .env("STORE_DIR", node.store.path())
            .env("ROUTE_1", &routes[0])
            .env("ROUTE_2", &routes[1])
            .env("ROUTE_3", &routes[2])
            .envs(self.passwords.server_env());
        let child = crate::nats::spawn(&mut command, &self.binary)?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running node reports JetStream healthy (a meta
    /// leader elected, its streams current).
    ///
    /// # Errors
    /// When that takes over 30 s.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.monitor_port)
            .collect();
        crate::wait_for("the NATS cluster", Duration::from_secs(30), || {
            let ports = ports.clone();
            async move {
                for port in ports {
                    let url = format!("http://127.0.0.1:{port}/healthz");
                    let ok = reqwest::get(&url)
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ok {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// Every node's client URL, comma-separated (a `NATS_URL`).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The users' passwords.
    pub fn passwords(&self) -> &crate::Passwords {
        &self.passwords
    }

    /// Node `i`'s client URL alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Node `i`'s server name (as JetStream reports leaders).
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Which node has `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `i` the way an operator restarting it does (SIGTERM: it
    /// hands off its leaderships, flushes its store, closes clients).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// A client of the whole cluster connected as `user`, with that user's
    /// reply-inbox prefix, as the services do.
    ///
    /// # Errors
    /// When no node is reachable or it refuses the user.
    pub async fn client_as(&self, user: &str) -> anyhow::Result<async_nats::Client> {
        let urls: Vec<String> = self.url().split(',').map(str::to_owned).collect();
        Ok(async_nats::ConnectOptions::new()
            .user_and_password(user.to_owned(), self.passwords.of(user).to_owned())
            .custom_inbox_prefix(format!("_INBOX_{user}"))
            .connect(urls.as_slice())
            .await?)
    }

    /// Starts node `i` again on its ports and store.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
