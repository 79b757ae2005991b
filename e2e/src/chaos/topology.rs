//! What the chaos run stands on: the bus (one secured nats-server or the
//! shipped 3-node cluster), Postgres, a stand-in provider, and two of each
//! service as processes it can kill.

use std::time::Duration;

use anyhow::Context as _;
use testkit::{NatsCluster, NatsServer, Passwords, Postgres, StandInLlm};

use crate::Service;

/// The bus under test.
pub enum Bus {
    /// One nats-server, R1.
    Single(NatsServer),
    /// Three clustered nodes, R3.
    Cluster(NatsCluster),
}

impl Bus {
    /// Starts it with the shipped configuration (users, permissions).
    ///
    /// # Errors
    /// When a server does not start.
    pub async fn start(clustered: bool) -> anyhow::Result<Self> {
        Ok(if clustered {
            Self::Cluster(NatsCluster::start().await?)
        } else {
            Self::Single(NatsServer::start_secured().await?)
        })
    }

    /// `NATS_URL` for the services.
    pub fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    /// The users' passwords.
    pub fn passwords(&self) -> &Passwords {
        match self {
            Self::Single(server) => server.passwords(),
            Self::Cluster(cluster) => cluster.passwords(),
        }
    }

    /// `BUS_REPLICAS` for the services.
    pub fn replicas(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster(_) => 3,
        }
    }

    /// How many nodes it has.
    pub fn nodes(&self) -> usize {
        self.replicas()
    }

    /// An admin client (reads leaders and dead letters).
    ///
    /// # Errors
    /// When no node answers.
    pub async fn admin(&self) -> anyhow::Result<async_nats::Client> {
        match self {
            Self::Single(server) => server.client_as("admin").await,
            Self::Cluster(cluster) => cluster.client_as("admin").await,
        }
    }

    /// The node leading `stream` (0 on a single server).
    ///
    /// # Errors
    /// When the stream's info cannot be read.
    pub async fn leader_of(&self, stream: &str) -> anyhow::Result<usize> {
        let Self::Cluster(cluster) = self else {
            return Ok(0);
        };
        let client = cluster.client_as("admin").await?;
        let js = async_nats::jetstream::new(client);
        let info = js.get_stream(stream).await?.info().await?.clone();
        let leader = info
            .cluster
            .and_then(|c| c.leader)
            .with_context(|| format!("{stream} has no leader"))?;
        cluster
            .index_of(&leader)
            .with_context(|| format!("no node named {leader}"))
    }

    /// SIGKILLs node `i`, waits `down`, starts it again and waits until the
    /// bus is healthy.
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn crash_node(&mut self, i: usize, down: Duration) -> anyhow::Result<()> {
        match self {
            Self::Single(server) => {
                server.kill();
                tokio::time::sleep(down).await;
                server.start_again().await
            }
            Self::Cluster(cluster) => {
                cluster.kill(i);
                tokio::time::sleep(down).await;
                cluster.restart(i)?;
                cluster.wait_ready().await
            }
        }
    }

    /// Stops node `i` cleanly (SIGTERM), starts it again and waits until the
    /// bus is healthy: one step of a rolling restart.
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        match self {
            Self::Single(server) => {
                server.stop();
                server.start_again().await
            }
            Self::Cluster(cluster) => {
                cluster.stop(i);
                cluster.restart(i)?;
                cluster.wait_ready().await
            }
        }
    }
}

/// Which service kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The HTTP edge.
    Gateway,
    /// The LLM core.
    Streamer,
    /// The store.
    Persister,
}

/// The whole system: the bus, Postgres, the provider and 2 of each service.
pub struct Topology {
    /// The bus.
    pub bus: Bus,
    /// The system of record.
    pub pg: Postgres,
    /// Its database.
    pub database: String,
    /// The provider.
    pub llm: StandInLlm,
    /// Two gateways.
    pub gateways: Vec<Service>,
    /// Two streamers.
    pub streamers: Vec<Service>,
    /// Two persisters, each with its own SQLite file.
    pub persisters: Vec<Service>,
    /// Logs and SQLite files, kept until the end of the run.
    pub dir: tempfile::TempDir,
}

/// The streamers' ack wait: how soon a dead or frozen worker's work moves.
pub const ACK_WAIT: Duration = Duration::from_secs(2);

impl Topology {
    /// Starts everything and waits until every service is ready.
    ///
    /// # Errors
    /// When something does not start.
    pub async fn start(
        clustered: bool,
        database: &str,
        script: testkit::Script,
    ) -> anyhow::Result<Self> {
        let bin = crate::build_binaries()?;
        let bus = Bus::start(clustered).await?;
        let pg = Postgres::start().await?;
        let database_url = pg.create_database(database)?;
        let llm = StandInLlm::start(script).await?;
        let dir = tempfile::Builder::new().prefix("chaos-").tempdir()?;
        let url = bus.url();
        let replicas = ("BUS_REPLICAS", bus.replicas().to_string());
        let folder = |name: String| -> anyhow::Result<std::path::PathBuf> {
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path)?;
            Ok(path)
        };
        let env = |user: &str, extra: &[(&'static str, String)]| {
            let mut env = bus.passwords().service_env(user);
            env.push(replicas.clone());
            env.extend_from_slice(extra);
            env
        };
        let mut persisters = Vec::new();
        let mut streamers = Vec::new();
        let mut gateways = Vec::new();
        for i in 1..=2 {
            let data = folder(format!("persister-{i}"))?;
            persisters.push(Service::persister(
                &bin,
                &data,
                &url,
                &database_url,
                &data,
                &env("persister", &[]),
            ));
            streamers.push(Service::streamer(
                &bin,
                &folder(format!("streamer-{i}"))?,
                &url,
                llm.base_url(),
                &env(
                    "streamer",
                    &[("STREAMER_ACK_WAIT_MS", ACK_WAIT.as_millis().to_string())],
                ),
            ));
            gateways.push(Service::gateway(
                &bin,
                &folder(format!("gateway-{i}"))?,
                &url,
                &env("gateway", &[("GATEWAY_RELAY_RECHECK_MS", "1000".into())]),
            ));
        }
        let mut topology = Self {
            bus,
            pg,
            database: database.to_owned(),
            llm,
            gateways,
            streamers,
            persisters,
            dir,
        };
        for kind in [Kind::Persister, Kind::Streamer, Kind::Gateway] {
            for service in topology.services(kind) {
                service.start().await?;
            }
        }
        Ok(topology)
    }

    /// The services of `kind`.
    pub fn services(&mut self, kind: Kind) -> &mut Vec<Service> {
        match kind {
            Kind::Gateway => &mut self.gateways,
            Kind::Streamer => &mut self.streamers,
            Kind::Persister => &mut self.persisters,
        }
    }

    /// The gateways' addresses.
    pub fn gateway_addrs(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.addr.clone()).collect()
    }

    /// The last lines of every service's log, for a failure message.
    pub fn log_tails(&self) -> String {
        let all = self
            .gateways
            .iter()
            .chain(&self.streamers)
            .chain(&self.persisters);
        all.map(|s| format!("--- {}\n{}", s.addr, s.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
