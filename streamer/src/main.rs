//! `streamer` binary: parses its configuration and runs [`streamer::run`].

use clap::Parser as _;

#[tokio::main]
async fn main() {
    let config = streamer::Config::parse();
    bus::telemetry::init("streamer=info,bus=info,async_nats=warn", config.log_json);
    let shutdown = bus::shutdown::on_signal();
    bus::exit_on_error(streamer::run(config, shutdown).await);
}
