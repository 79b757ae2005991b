//! The streamer's configuration: flags, each also read from its env var.

use std::time::Duration;

use secrecy::SecretString;

/// Default system prompt: the product is a recycling assistant.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a friendly recycling assistant. \
Explain briefly and concretely how to sort, prepare and dispose of household waste, \
following Korean separation rules when the user asks about a bin. If unsure, say so.";

/// Everything the streamer needs to run.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "streamer",
    version,
    about = "Answers chat turns and runs scan jobs from NATS JetStream."
)]
pub struct Config {
    /// How to reach the bus (NATS_URL, NATS_USER, NATS_PASSWORD, NATS_CREDS,
    /// BUS_REPLICAS).
    #[command(flatten)]
    pub bus: bus::connect::BusConfig,
    /// Address of the health, readiness and metrics listener.
    #[arg(long, env = "STREAMER_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// OpenAI-compatible API base URL (the part before `/chat/completions`).
    #[arg(long, env = "LLM_BASE_URL", default_value = "http://127.0.0.1:8090/v1")]
    pub llm_base_url: String,
    /// API key sent as `Authorization: Bearer`; unset sends none.
    #[arg(long, env = "LLM_API_KEY", value_parser = bus::parse_secret, hide_env_values = true)]
    pub llm_api_key: Option<SecretString>,
    /// Model name sent to the provider.
    #[arg(long, env = "LLM_MODEL", default_value = "smollm2-135m-instruct")]
    pub llm_model: String,
    /// System prompt put before every conversation.
    #[arg(long, env = "STREAMER_SYSTEM_PROMPT", default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system_prompt: String,
    /// Fallback providers, tried in order when the primary fails before the
    /// first token (after its retries): comma-separated
    /// `BASE_URL|MODEL|API_KEY_ENV` entries, MODEL and API_KEY_ENV optional
    /// (the key is read from the named variable, so no secret sits in this
    /// list). Example: `http://127.0.0.1:11434/v1|llama3.1,https://api.openai.com/v1|gpt-4o-mini|OPENAI_API_KEY`.
    #[arg(long, env = "LLM_FALLBACKS", default_value = "")]
    pub llm_fallbacks: String,
    /// Chat turns generated at once by this process.
    #[arg(long, env = "STREAMER_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Upper bound on the answer's tokens when the request sets none; the
    /// gateway reads the same variable as the most a request may ask for.
    #[arg(long, env = "LLM_MAX_TOKENS", default_value_t = 512)]
    pub max_tokens: u32,
    /// Time allowed to connect to the provider, in milliseconds.
    #[arg(long, env = "LLM_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub connect_timeout_ms: u64,
    /// Longest silence allowed between two chunks of a stream (and before the
    /// response headers), in milliseconds.
    #[arg(long, env = "LLM_READ_TIMEOUT_MS", default_value_t = 60_000)]
    pub read_timeout_ms: u64,
    /// Retries of a failed request before its first token (429, 5xx, network).
    #[arg(long, env = "LLM_MAX_RETRIES", default_value_t = 3)]
    pub max_retries: u32,
    /// Overrides the chat and scan consumers' ack wait (ms): how long a turn
    /// or scan whose worker died waits before redelivery. Default:
    /// nats/consumers/*.json.
    #[arg(long, env = "STREAMER_ACK_WAIT_MS")]
    pub ack_wait_ms: Option<u64>,
    /// After a turn's first token, at most one bus message per this many
    /// ms: a delta that comes sooner after the previous message waits and
    /// travels with the ones that join it. Fewer messages per token for at
    /// most that much added delay between tokens. 0: only deltas that
    /// queued behind the previous publish travel together.
    #[arg(long, env = "STREAMER_TOKEN_LINGER_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub token_linger_ms: u64,
    /// OpenAI-compatible vision API base URL; unset = the embedded local
    /// image model (VISION_LOCAL_MODEL).
    #[arg(long, env = "VISION_BASE_URL")]
    pub vision_base_url: Option<String>,
    /// Vision model name sent to VISION_BASE_URL.
    #[arg(long, env = "VISION_MODEL", default_value = "gpt-4o-mini")]
    pub vision_model: String,
    /// API key for VISION_BASE_URL (default: LLM_API_KEY, but only when
    /// VISION_BASE_URL is on the same scheme, host and port as LLM_BASE_URL).
    #[arg(long, env = "VISION_API_KEY", value_parser = bus::parse_secret, hide_env_values = true)]
    pub vision_api_key: Option<SecretString>,
    /// The local model's weights (safetensors); default
    /// `$DATA_DIR/models/efficientnet-lite0.safetensors`, as `scripts/setup.sh` leaves it.
    #[arg(long, env = "VISION_LOCAL_MODEL")]
    pub vision_local_model: Option<std::path::PathBuf>,
    /// Below this confidence the category is `unknown`.
    #[arg(long, env = "VISION_THRESHOLD", default_value_t = crate::vision::waste::DEFAULT_THRESHOLD)]
    pub vision_threshold: f64,
    /// Scan jobs run at once by this process (vision is CPU-bound).
    #[arg(long, env = "SCAN_CONCURRENCY", default_value_t = 4)]
    pub scan_concurrency: usize,
    /// A disposal-rules JSON file replacing the built-in one
    /// (nats/rules/disposal_rules.json); give the gateway the same file.
    #[arg(long, env = "SCAN_RULES")]
    pub scan_rules: Option<std::path::PathBuf>,
    /// A character catalogue JSON file replacing the built-in one
    /// (streamer/rules/characters.json); it seeds the `characters` KV bucket
    /// only when that bucket was never written.
    #[arg(long, env = "SCAN_CHARACTERS")]
    pub scan_characters: Option<std::path::PathBuf>,
    /// Reward stage: after this many ms a "taking longer" progress is sent.
    #[arg(long, env = "SCAN_REWARD_SOFT_TIMEOUT_MS", default_value_t = 10_000)]
    pub reward_soft_timeout_ms: u64,
    /// Reward stage: after this many ms the scan completes with `reward:
    /// null` and a dead letter that the reprocessing pass grants later.
    #[arg(long, env = "SCAN_REWARD_HARD_TIMEOUT_MS", default_value_t = 15_000)]
    pub reward_hard_timeout_ms: u64,
    /// Vision stage: after this many ms a "taking longer" progress is sent.
    #[arg(long, env = "SCAN_VISION_SOFT_TIMEOUT_MS", default_value_t = 60_000)]
    pub vision_soft_timeout_ms: u64,
    /// Vision stage: an attempt is abandoned (and retried) after this many ms.
    #[arg(long, env = "SCAN_VISION_HARD_TIMEOUT_MS", default_value_t = 90_000)]
    pub vision_hard_timeout_ms: u64,
    /// Answer stage: after this many ms a "taking longer" progress is sent.
    #[arg(long, env = "SCAN_ANSWER_SOFT_TIMEOUT_MS", default_value_t = 60_000)]
    pub answer_soft_timeout_ms: u64,
    /// Answer stage: an attempt is abandoned (and retried) after this many ms.
    #[arg(long, env = "SCAN_ANSWER_HARD_TIMEOUT_MS", default_value_t = 90_000)]
    pub answer_hard_timeout_ms: u64,
    /// Attempts per stage (vision, answer) before the scan fails.
    #[arg(long, env = "SCAN_MAX_ATTEMPTS", default_value_t = 3)]
    pub scan_max_attempts: u32,
    /// First retry delay in ms; doubles each attempt, with jitter.
    #[arg(long, env = "SCAN_RETRY_BASE_MS", default_value_t = 1_000)]
    pub scan_retry_base_ms: u64,
    /// How often failed scans are sent back from the DLQ, in seconds (0 = never;
    /// `streamer dlq-reprocess` does one pass by hand).
    #[arg(long, env = "SCAN_DLQ_REPROCESS_EVERY_S", default_value_t = 300)]
    pub dlq_reprocess_every_s: u64,
    /// Operator commands; none runs the streamer.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "LOG_JSON")]
    pub log_json: bool,
}

/// The streamer's operator commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Runs the streamer (the default).
    Run,
    /// Sends failed scans in the DLQ back to the pipeline once: at most
    /// `--limit` of them; a scan already reprocessed 3 times is archived on
    /// `dlq.scan_archive` instead. Prints what it did as JSON.
    DlqReprocess {
        /// Dead letters handled in this pass.
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
}

/// One OpenAI-compatible provider.
#[derive(Clone)]
pub struct Provider {
    /// Base URL (before `/chat/completions`).
    pub base_url: String,
    /// Model name sent to it.
    pub model: String,
    /// Its API key, if any.
    pub api_key: Option<SecretString>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Config {
    /// The primary provider, then the fallbacks, in the order to try them.
    ///
    /// # Errors
    /// When a fallback entry is malformed or names an unset key variable.
    pub fn providers(&self) -> anyhow::Result<Vec<Provider>> {
        let mut providers = vec![Provider {
            base_url: self.llm_base_url.trim_end_matches('/').to_owned(),
            model: self.llm_model.clone(),
            api_key: self.llm_api_key.clone(),
        }];
        for entry in self
            .llm_fallbacks
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let mut parts = entry.split('|');
            let base_url = parts
                .next()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_owned();
            anyhow::ensure!(
                base_url.starts_with("http://") || base_url.starts_with("https://"),
                "LLM_FALLBACKS entry {entry:?} does not start with an http(s) URL"
            );
            let model = parts
                .next()
                .filter(|m| !m.is_empty())
                .unwrap_or(&self.llm_model)
                .to_owned();
            let api_key = match parts.next().filter(|k| !k.is_empty()) {
                Some(var) => Some(SecretString::from(std::env::var(var).map_err(|_| {
                    anyhow::anyhow!("LLM_FALLBACKS names the key variable {var}, which is not set")
                })?)),
                None => None,
            };
            providers.push(Provider {
                base_url,
                model,
                api_key,
            });
        }
        Ok(providers)
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    /// Where the local image model is: the flag, else `$DATA_DIR/models`,
    /// else the source tree's `.data/models` (what `scripts/setup.sh` fills).
    pub fn local_model_path(&self) -> std::path::PathBuf {
        const FILE: &str = "models/efficientnet-lite0.safetensors";
        if let Some(path) = &self.vision_local_model {
            return path.clone();
        }
        if let Some(dir) = std::env::var_os("DATA_DIR") {
            return std::path::PathBuf::from(dir).join(FILE);
        }
        let cwd = std::path::Path::new(".data").join(FILE);
        if cwd.exists() {
            return cwd;
        }
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.data")
            .join(FILE)
    }
}
