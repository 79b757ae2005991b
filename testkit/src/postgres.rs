//! A real Postgres cluster in a temp dir on a random port.
//!
//! `initdb` refuses to run as root, so when the tests run as root the cluster
//! directory is handed to the `postgres` user and the tools run through
//! `runuser`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// A running Postgres cluster; stopped (immediately) on drop.
pub struct Postgres {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    running: bool,
    /// `fsync=off` unless a benchmark asked for real durability.
    fsync: bool,
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("Postgres is not installed (run scripts/setup.sh, or set PG_BIN)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn run_as_postgres(program: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // The postgres user must be able to enter the working directory.
    let output = command
        .args(args)
        .current_dir("/tmp")
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {:?} failed: {}",
            program.display(),
            args,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

impl Postgres {
    /// Creates a cluster and starts it, with `fsync=off` (tests, not durability).
    ///
    /// # Errors
    /// When Postgres is not installed or does not start.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("pg-").tempdir()?;
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()?;
            anyhow::ensure!(status.success(), "cannot chown the cluster dir to postgres");
        }
        let data = dir.path().join("data");
        let data_str = data.to_str().context("temp path is UTF-8")?;
        run_as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data_str,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        )?;
        let mut pg = Self {
            port: crate::free_port(),
            dir,
            bin,
            running: false,
            fsync: false,
        };
        pg.start_again().await?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    /// Starts the cluster again (after [`Self::stop`]) on the same port.
    ///
    /// # Errors
    /// When it does not start.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let data = self.data();
        // Tests need no durability; a benchmark of it does (`set_fsync`).
        let fsync = if self.fsync { "on" } else { "off" };
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync={fsync} -c max_connections=200",
            self.port, data
        );
        let log = format!("{data}/server.log");
        run_as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D", &data, "-l", &log, "-w", "-t", "30", "-o", &options, "start",
            ],
        )?;
        self.running = true;
        let port = self.port;
        crate::wait_for("postgres", Duration::from_secs(10), || async move {
            crate::port_open(port).await.then_some(())
        })
        .await
    }

    /// Whether the next [`Self::start_again`] runs with `fsync` on (off by
    /// default: tests need no durability, benchmarks of it do).
    pub fn set_fsync(&mut self, on: bool) {
        self.fsync = on;
    }

    /// Stops the cluster at once (`-m immediate`: like a crash, no checkpoint).
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.running {
            self.running = false;
            run_as_postgres(
                &self.bin.join("pg_ctl"),
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            )?;
        }
        Ok(())
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `name`.
    pub fn url_for(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a fresh, empty database and returns its URL.
    ///
    /// # Errors
    /// When `createdb` fails.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        run_as_postgres(
            &self.bin.join("createdb"),
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name],
        )?;
        Ok(self.url_for(name))
    }

    /// Runs one SQL statement with `psql` and returns its unaligned output.
    ///
    /// # Errors
    /// When psql fails.
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let out = run_as_postgres(
            &self.bin.join("psql"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                database,
                "-At",
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
