//! `streamer` binary: parses its configuration and runs [`streamer::run`],
//! or the operator command `dlq-reprocess`.

use clap::Parser as _;

#[tokio::main]
async fn main() {
    let config = streamer::Config::parse();
    match config.command.clone() {
        None | Some(streamer::Command::Run) => {
            bus::telemetry::init("streamer=info,bus=info,async_nats=warn", config.log_json);
            let shutdown = bus::shutdown::on_signal();
            bus::exit_on_error(streamer::run(config, shutdown).await);
        }
        Some(streamer::Command::DlqReprocess { limit }) => {
            bus::telemetry::init("streamer=warn", config.log_json);
            bus::exit_on_error(
                async {
                    let client = config.bus.connect("streamer-dlq").await?;
                    let js = async_nats::jetstream::new(client);
                    bus::streams::ensure_all(&js, config.bus.bus_replicas).await?;
                    let report = streamer::scan::reprocess_dead_letters(&js, limit).await?;
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    Ok(())
                }
                .await,
            );
        }
    }
}
