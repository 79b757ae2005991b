//! One tracing subscriber per binary; `RUST_LOG` overrides the default filter.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber: human-readable, or JSON lines when `json`.
/// Does nothing if one is already installed (tests run several services in
/// one process).
pub fn init(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
