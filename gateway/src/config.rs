//! The gateway's configuration: flags, each also read from its env var.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use secrecy::SecretString;

/// Everything the gateway needs to run.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "gateway",
    version,
    about = "HTTP, WebSocket and SSE edge of the streaming LLM gateway."
)]
pub struct Config {
    /// Address the HTTP API (and /healthz, /readyz, /metrics, unless
    /// GATEWAY_ADMIN_LISTEN is set) listens on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Address that serves /metrics, /readyz and /healthz apart from the API,
    /// which then answers 404 for /metrics and /readyz (it keeps /healthz,
    /// for load balancers). Unset: all three stay on GATEWAY_LISTEN.
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// How often (ms) readiness is re-checked in the background; /readyz
    /// answers from the last check and never calls NATS itself.
    #[arg(long, env = "GATEWAY_READY_REFRESH_MS", default_value_t = 1_000)]
    pub ready_refresh_ms: u64,
    /// How to reach the bus (NATS_URL, NATS_USER, NATS_PASSWORD, NATS_CREDS,
    /// BUS_REPLICAS).
    #[command(flatten)]
    pub bus: bus::connect::BusConfig,
    /// HS256 key for JWTs: its bytes as given. Set this or AUTH_JWT_PUBLIC_KEY.
    #[arg(long, env = "AUTH_JWT_SECRET", value_parser = bus::parse_secret, hide_env_values = true)]
    pub auth_jwt_secret: Option<SecretString>,
    /// RS256/ES256 public key: PEM text, or the path of a PEM file.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY", allow_hyphen_values = true)]
    pub auth_jwt_public_key: Option<String>,
    /// Pins the accepted algorithm (HS256, RS256 or ES256); by default HS256
    /// with a secret, and RS256 or ES256 from the public key's type.
    #[arg(long, env = "AUTH_JWT_ALGORITHM")]
    pub auth_jwt_algorithm: Option<String>,
    /// Required `aud` claim; unchecked when unset.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// Required `iss` claim; unchecked when unset.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// The JWT claim that carries the caller's role; `admin` in it (a
    /// string, or one element of an array) may change the character catalogue.
    #[arg(long, env = "AUTH_ROLE_CLAIM", default_value = "role")]
    pub auth_role_claim: String,
    /// Enables `POST /v1/dev/token`, which mints a token for any user id.
    /// For local development only; needs AUTH_JWT_SECRET.
    /// Refused on a GATEWAY_LISTEN that is not loopback, unless
    /// GATEWAY_DEV_LOGIN_ALLOW_PUBLIC is set.
    #[arg(long, env = "GATEWAY_DEV_LOGIN")]
    pub dev_login: bool,
    /// Lets dev login run on a non-loopback GATEWAY_LISTEN (anyone who
    /// reaches the port can then mint tokens): a shared test box, never
    /// production.
    #[arg(long, env = "GATEWAY_DEV_LOGIN_ALLOW_PUBLIC")]
    pub dev_login_allow_public: bool,
    /// Turns one user may have in progress at once, counted across every
    /// gateway node (a disconnect does not give a place back; a finished
    /// turn does).
    #[arg(long, env = "GATEWAY_MAX_TURNS_PER_USER", default_value_t = 8)]
    pub max_turns_per_user: usize,
    /// Frames a WebSocket may have queued before the client counts as too
    /// slow and is closed with 4008 (it then reconnects and resumes).
    #[arg(long, env = "GATEWAY_WS_OUTBOX_FRAMES", default_value_t = 1024)]
    pub ws_outbox_frames: usize,
    /// Silence (ms) after which a turn's relay re-reads its frames from
    /// JetStream, in case the live path lost one (a NATS restart or reconnect).
    #[arg(long, env = "GATEWAY_RELAY_RECHECK_MS", default_value_t = 5_000)]
    pub relay_recheck_ms: u64,
    /// Silence (ms) after which a client following a turn gets `turn_stalled`
    /// and the stream ends (it may resume later). Longer than the streamer
    /// needs to close work whose deliveries ran out (5 x the 60 s ack wait
    /// of scans) and than a worker may spend opening the upstream.
    #[arg(long, env = "GATEWAY_TURN_STALL_MS", default_value_t = 600_000)]
    pub turn_stall_ms: u64,
    /// Deadline (ms) of a non-streaming `POST /v1/chat/completions`.
    #[arg(long, env = "GATEWAY_COMPLETION_TIMEOUT_MS", default_value_t = 600_000)]
    pub completion_timeout_ms: u64,
    /// Turns one WebSocket may follow at once (sends and resumes); a resume
    /// of a turn already followed replaces it.
    #[arg(long, env = "GATEWAY_WS_MAX_STREAMS", default_value_t = 16)]
    pub ws_max_streams: usize,
    /// The model the streamer uses when a request names none; must match the
    /// streamer's `LLM_MODEL` (same default).
    #[arg(long, env = "LLM_MODEL", default_value = "smollm2-135m-instruct")]
    pub llm_model: String,
    /// Models clients may ask for, comma-separated (`GET /v1/models`);
    /// empty allows `LLM_MODEL` alone.
    #[arg(long, env = "LLM_MODELS", value_delimiter = ',')]
    pub llm_models: Vec<String>,
    /// Largest `max_tokens` a request may set; the streamer's `LLM_MAX_TOKENS`
    /// (its default when a request sets none), so both read one value.
    #[arg(long, env = "LLM_MAX_TOKENS", default_value_t = 512)]
    pub llm_max_tokens: u32,
    /// Interval of SSE keep-alive comments on an idle scan stream, in ms.
    #[arg(long, env = "GATEWAY_SSE_KEEPALIVE_MS", default_value_t = 15_000)]
    pub sse_keepalive_ms: u64,
    /// Folder of the web UI's static files.
    #[arg(long, env = "GATEWAY_WEB_DIR", default_value = "web")]
    pub web_dir: PathBuf,
    /// A disposal-rules JSON file replacing the built-in one
    /// (nats/rules/disposal_rules.json); set it to the streamer's
    /// `SCAN_RULES` so the guide shows the rules answers come from.
    #[arg(long, env = "SCAN_RULES")]
    pub scan_rules: Option<PathBuf>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, env = "LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    /// Refuses dev login on an address other machines can reach, unless
    /// overridden: it mints a token for any user id, so whoever reaches the
    /// port is anyone. `bound` is where the API listener really is, so a
    /// host name counts by what it resolved to.
    ///
    /// # Errors
    /// One line naming both settings.
    pub(crate) fn check_dev_login_exposure(&self, bound: SocketAddr) -> anyhow::Result<()> {
        if !self.dev_login || is_loopback(bound.ip()) {
            return Ok(());
        }
        if self.dev_login_allow_public {
            tracing::warn!(
                addr = %bound,
                "Dev login is reachable beyond this machine (GATEWAY_DEV_LOGIN_ALLOW_PUBLIC): anyone who reaches the port can mint tokens."
            );
            return Ok(());
        }
        anyhow::bail!(
            "GATEWAY_DEV_LOGIN is on but GATEWAY_LISTEN={} is not a loopback address, so anyone who reaches it could mint tokens: listen on 127.0.0.1, localhost or [::1], turn GATEWAY_DEV_LOGIN off, or set GATEWAY_DEV_LOGIN_ALLOW_PUBLIC=true to accept that",
            self.listen
        )
    }
}

/// 127.0.0.0/8 and ::1 (also as an IPv4-mapped address). The unspecified
/// 0.0.0.0 and :: are not: they listen on every interface.
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn loopback_means_127_slash_8_and_colon_colon_1_only() {
        for loopback in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(loopback.parse().unwrap()), "{loopback}");
        }
        for public in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.168.1.2",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_loopback(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn dev_login_on_a_public_address_needs_the_override() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let parse = |extra: &[&str]| {
            let mut args = vec!["gateway", "--listen", "0.0.0.0:8080"];
            args.extend_from_slice(extra);
            Config::parse_from(args)
        };
        let error = parse(&["--dev-login"])
            .check_dev_login_exposure(public)
            .unwrap_err()
            .to_string();
        assert!(error.contains("GATEWAY_LISTEN=0.0.0.0:8080"), "{error}");
        assert!(
            error.contains("GATEWAY_DEV_LOGIN_ALLOW_PUBLIC=true"),
            "{error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");
        parse(&["--dev-login", "--dev-login-allow-public"])
            .check_dev_login_exposure(public)
            .unwrap();
        parse(&["--dev-login"])
            .check_dev_login_exposure(local)
            .unwrap();
        parse(&[]).check_dev_login_exposure(public).unwrap();
    }
}
