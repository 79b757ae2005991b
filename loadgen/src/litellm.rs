//! The LiteLLM proxy as a peer to compare with: started by the tool from a
//! venv that `scripts/bench.sh compare` installs (PyPI `litellm[proxy]`),
//! with a generated config whose only model is the stand-in upstream, one
//! worker, no database, the local model cost map and a master key. It owns
//! that process's life (its own process group, killed on drop); the load
//! against it is [`crate::load`]'s.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// The model name the proxy serves the stand-in as.
pub const MODEL: &str = "bench";

/// A running LiteLLM proxy.
pub struct LiteLlmProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The master key clients send as `Authorization: Bearer`.
    pub key: String,
    /// `litellm` package version, from the venv's metadata.
    pub version: String,
    /// From spawn to `/health/liveliness` answering.
    pub startup: Duration,
    /// Its output, for diagnostics.
    pub log: PathBuf,
    dir: PathBuf,
}

/// The proxy's configuration: the stand-in as its only model.
fn config(upstream_base_url: &str, key: &str) -> String {
    format!(
        "model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n      api_base: {upstream_base_url}\n      api_key: sk-stand-in\ngeneral_settings:\n  master_key: {key}\n"
    )
}

impl LiteLlmProcess {
    /// Starts `bin` (the venv's `litellm` script) on a free loopback port in
    /// front of `upstream_base_url` (ending in `/v1`) and waits until it
    /// answers.
    ///
    /// # Errors
    /// When it cannot start or does not answer within 120 s.
    pub async fn start(bin: &Path, upstream_base_url: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "loadgen-litellm-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let key = format!("sk-bench-{}", uuid::Uuid::new_v4().simple());
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config(upstream_base_url, &key))?;
        let port = testkit::free_port();
        let log = std::env::temp_dir().join(format!("loadgen-litellm-{}.log", std::process::id()));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let started = Instant::now();
        let child = Command::new(bin)
            .args(["--config"])
            .arg(&config_path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", "1"])
            .current_dir(&dir)
            // No database: every key but the master key is refused, nothing is spent-tracked.
            .env_remove("DATABASE_URL")
            .env_remove("LITELLM_MASTER_KEY")
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_LOG", "ERROR")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own group, so a forked worker dies with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut process = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            key,
            version: version(bin),
            startup: Duration::ZERO,
            log,
            dir,
        };
        testkit::wait_http_ok(
            "LiteLLM's /health/liveliness",
            &format!("{}/health/liveliness", process.base_url),
            Duration::from_secs(120),
        )
        .await
        .with_context(|| format!("see {}", process.log.display()))?;
        process.startup = started.elapsed();
        Ok(process)
    }

    /// The pid of its main process (the CPU reading adds its descendants).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LiteLlmProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The installed `litellm` version, read with the venv's own Python.
fn version(bin: &Path) -> String {
    let python = bin.with_file_name("python");
    Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_the_stand_in_as_the_only_model() {
        let text = config("http://127.0.0.1:5/v1", "sk-x");
        assert!(text.contains("model: openai/bench\n"));
        assert!(text.contains("api_base: http://127.0.0.1:5/v1\n"));
        assert!(text.contains("master_key: sk-x\n"));
        assert_eq!(text.matches("model_name:").count(), 1);
    }
}
