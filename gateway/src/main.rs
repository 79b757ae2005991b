//! `gateway` binary: parses its configuration and runs [`gateway::run`].

use clap::Parser as _;

#[tokio::main]
async fn main() {
    let config = gateway::Config::parse();
    bus::telemetry::init(
        "gateway=info,bus=info,tower_http=warn,async_nats=warn",
        config.log_json,
    );
    let shutdown = bus::shutdown::on_signal();
    bus::exit_on_error(gateway::run(config, shutdown).await);
}
