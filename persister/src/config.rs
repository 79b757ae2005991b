//! The persister's configuration: flags, each also read from its env var.

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;

/// Everything the persister needs to run.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "persister",
    version,
    about = "Drains completed turns and scans from NATS JetStream into SQLite (WAL), then Postgres."
)]
pub struct Config {
    /// How to reach the bus (NATS_URL, NATS_USER, NATS_PASSWORD, NATS_CREDS,
    /// BUS_REPLICAS).
    #[command(flatten)]
    pub bus: bus::connect::BusConfig,
    /// Postgres URL of the system of record; migrations run against it at startup.
    #[arg(
        long,
        env = "DATABASE_URL",
        value_parser = bus::parse_secret,
        default_value = "postgres://postgres@127.0.0.1:5432/gateway",
        hide_env_values = true
    )]
    pub database_url: SecretString,
    /// Address of the health, readiness and metrics listener.
    #[arg(long, env = "PERSISTER_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: String,
    /// The local SQLite buffer (WAL mode): every turn is committed here before
    /// it is acked, then copied to Postgres. Its directory is created if missing.
    #[arg(
        long,
        env = "PERSISTER_SQLITE_PATH",
        default_value = ".data/persister.db"
    )]
    pub sqlite_path: PathBuf,
    /// Most turn records fetched from JetStream and committed to SQLite in one transaction.
    #[arg(long, env = "PERSISTER_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,
    /// Most rows copied from SQLite to Postgres in one transaction. Large by
    /// default so a backlog left by an outage drains fast (`loadgen persister`:
    /// over two runs the sync loop moved 1 KB rows at 15.6-19.6k rows/s with
    /// 256, 17.3-23.8k with 1000, 21.4-28.0k with 4000, Postgres fsync on,
    /// 2 CPUs); a quiet system copies
    /// whatever is there, so this only matters with a backlog.
    #[arg(long, env = "PERSISTER_SYNC_BATCH", default_value_t = MAX_SYNC_BATCH)]
    pub sync_batch: usize,
    /// How often, in milliseconds, the sync loop looks for unsynced rows (and
    /// checks Postgres) when nothing new was committed.
    #[arg(long, env = "PERSISTER_SYNC_INTERVAL_MS", default_value_t = 1_000)]
    pub sync_interval_ms: u64,
    /// Most character grants written to Postgres in one commit (the seeds'
    /// 50 rows).
    #[arg(long, env = "PERSISTER_REWARD_BATCH", default_value_t = 50)]
    pub reward_batch: usize,
    /// Longest a grant waits for its batch to fill before the batch is
    /// written anyway, in milliseconds (the seeds' 5 s).
    #[arg(long, env = "PERSISTER_REWARD_FLUSH_MS", default_value_t = 5_000)]
    pub reward_flush_ms: u64,
    /// Hours a row is kept in SQLite after it reached Postgres.
    #[arg(long, env = "PERSISTER_RETENTION_HOURS", default_value_t = 168)]
    pub retention_hours: u64,
    /// Days a Postgres row keeps its user id; older rows get a keyed hash
    /// of it instead (see PERSISTER_ANON_KEY).
    #[arg(long, env = "PERSISTER_PG_RETENTION_DAYS", default_value_t = 365)]
    pub pg_retention_days: u32,
    /// The HMAC-SHA256 key that anonymises user ids of rows older than the
    /// retention. Unset: rows keep their user ids (a warning at startup).
    #[arg(
        long,
        env = "PERSISTER_ANON_KEY",
        value_parser = bus::parse_secret,
        hide_env_values = true
    )]
    pub anon_key: Option<SecretString>,
    /// Seconds between two retention runs (the first runs at startup).
    #[arg(
        long,
        env = "PERSISTER_PG_RETENTION_INTERVAL_S",
        default_value_t = 3_600
    )]
    pub pg_retention_interval_s: u64,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "LOG_JSON")]
    pub log_json: bool,
    /// Operator commands; without one the service runs.
    #[command(subcommand)]
    pub command: Option<crate::admin::Command>,
}

/// Rows per Postgres statement are bounded by its 65535 bind parameters;
/// a turn binds 14, so 4000 rows leave room.
pub const MAX_SYNC_BATCH: usize = 4_000;

/// Grants per commit are bounded by the consumer's `max_ack_pending` (2000).
pub const MAX_REWARD_BATCH: usize = 1_000;

impl Config {
    /// How long a grant waits for its batch to fill.
    pub fn reward_flush(&self) -> Duration {
        Duration::from_millis(self.reward_flush_ms.max(1))
    }

    /// The idle poll interval of the sync loop.
    pub fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_interval_ms.max(10))
    }

    /// How long a synced row stays in SQLite.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours.saturating_mul(3600))
    }

    /// How long a Postgres row keeps its user id.
    pub fn pg_retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.pg_retention_days).saturating_mul(24 * 3600))
    }

    /// Time between two retention runs.
    pub fn pg_retention_interval(&self) -> Duration {
        Duration::from_secs(self.pg_retention_interval_s.max(1))
    }

    /// Checks the numeric settings.
    ///
    /// # Errors
    /// One line naming the variable to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.batch_size > 0,
            "PERSISTER_BATCH_SIZE must be at least 1"
        );
        anyhow::ensure!(
            (1..=MAX_REWARD_BATCH).contains(&self.reward_batch),
            "PERSISTER_REWARD_BATCH must be between 1 and {MAX_REWARD_BATCH}"
        );
        anyhow::ensure!(
            (1..=MAX_SYNC_BATCH).contains(&self.sync_batch),
            "PERSISTER_SYNC_BATCH must be between 1 and {MAX_SYNC_BATCH}"
        );
        anyhow::ensure!(
            self.anon_key
                .as_ref()
                .is_none_or(|k| !secrecy::ExposeSecret::expose_secret(k).is_empty()),
            "PERSISTER_ANON_KEY must not be empty (leave it unset to keep user ids)"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_serve_a_laptop_and_debug_hides_the_database_url() {
        let config =
            Config::parse_from(["persister", "--database-url", "postgres://u:hunter2@h/db"]);
        assert_eq!(config.listen, "127.0.0.1:8082");
        assert_eq!(config.sqlite_path, PathBuf::from(".data/persister.db"));
        assert_eq!(config.batch_size, 256);
        assert_eq!(config.sync_batch, MAX_SYNC_BATCH);
        assert_eq!(config.reward_batch, 50);
        assert_eq!(config.reward_flush(), Duration::from_secs(5));
        assert_eq!(config.pg_retention(), Duration::from_secs(365 * 24 * 3600));
        assert!(config.anon_key.is_none());
        config.validate().unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
