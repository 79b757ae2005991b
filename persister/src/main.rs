//! `persister` binary: parses its configuration and runs [`persister::run`].

use clap::Parser as _;

#[tokio::main]
async fn main() {
    let config = persister::Config::parse();
    bus::telemetry::init(
        "persister=info,bus=info,async_nats=warn,sqlx=warn",
        config.log_json,
    );
    let shutdown = bus::shutdown::on_signal();
    bus::exit_on_error(persister::run(config, shutdown).await);
}
