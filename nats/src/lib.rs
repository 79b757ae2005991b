//! The bus contract shared by every service.
//!
//! This crate owns the names of the NATS subjects ([`subject`]), the wire
//! types that travel on them and over the WebSocket and SSE endpoints
//! ([`wire`], and [`batch`] for several token frames in one message), the JetStream stream and consumer definitions kept as JSON under
//! `nats/` ([`streams`]), and the small plumbing each binary needs the same way:
//! the disposal rules the streamer answers from and the gateway's guide
//! serves ([`rules`]),
//! connecting to NATS ([`connect`]), logging ([`telemetry`]), signals
//! ([`shutdown`]), and the health/readiness/metrics listener ([`ops`]).
//! It owns no business logic: the gateway, streamer and persister do.

pub mod backoff;
pub mod batch;
pub mod connect;
pub mod dlq;
pub mod erase;
pub mod fence;
pub mod history;
pub mod lease;
pub mod ops;
pub mod register;
pub mod replay;
pub mod rules;
pub mod series;
pub mod shutdown;
pub mod streams;
pub mod subject;
pub mod telemetry;
pub mod wire;

/// Runs a service's `main` body and turns a failure into one actionable line
/// on stderr and exit code 1, instead of a backtrace or a multi-line report.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// clap value parser for secrets (`LLM_API_KEY`, `AUTH_JWT_SECRET`,
/// `DATABASE_URL`), so a config's `Debug` never prints them.
///
/// # Errors
/// Never; the signature is clap's.
pub fn parse_secret(value: &str) -> Result<secrecy::SecretString, std::convert::Infallible> {
    Ok(secrecy::SecretString::from(value.to_owned()))
}
