//! `persister` binary: parses its configuration and runs [`persister::run`],
//! or one of the operator commands (`backlog`, `sync`, `compare`).

use clap::Parser as _;
use persister::admin::Command;

#[tokio::main]
async fn main() {
    let config = persister::Config::parse();
    match config.command.clone() {
        None | Some(Command::Run) => {
            bus::telemetry::init(
                "persister=info,bus=info,async_nats=warn,sqlx=warn",
                config.log_json,
            );
            let shutdown = bus::shutdown::on_signal();
            bus::exit_on_error(persister::run(config, shutdown).await);
        }
        Some(command) => {
            bus::telemetry::init("persister=warn,sqlx=warn", config.log_json);
            bus::exit_on_error(
                async {
                    let report = persister::admin::run(&command, &config).await?;
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    Ok(())
                }
                .await,
            );
        }
    }
}
