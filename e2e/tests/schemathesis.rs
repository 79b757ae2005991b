//! Schemathesis, a property-based API fuzzer we did not write, against a
//! real gateway (with its streamer, persister, nats-server, Postgres and a
//! stand-in LLM) driven only by the gateway's own `GET /openapi.json`.
//!
//! It must find no 5xx, no response that breaks the document (status,
//! content type, headers, body schema), no request that breaks the schema
//! but is accepted, and no operation that ignores its authentication.
//! `positive_data_acceptance` is left out: some schema-valid requests are
//! refused on purpose (a conversation whose last message is not the user's,
//! an image that does not decode), and the document says so per code.

use std::{path::PathBuf, process::Command, time::Duration};

use e2e::{Bed, admin_token_for};
use testkit::Script;

/// Examples per operation: enough to hit every refusal path in a few
/// minutes on two cores; `SCHEMATHESIS_EXAMPLES` raises it.
const EXAMPLES: &str = "60";

fn schemathesis() -> PathBuf {
    let bin = std::env::var_os("SCHEMATHESIS_BIN")
        .map(PathBuf::from)
        .expect("SCHEMATHESIS_BIN (scripts/setup.sh exports it)");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup.sh",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_wrong_with_the_described_api() {
    let bed = Bed::start(
        "fuzz",
        Script::new(["Rinse ", "it."], Duration::from_millis(1)),
    )
    .await;
    let mut persister = bed.persister();
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[("GATEWAY_DEV_LOGIN", "true".into())]);
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();

    let report = tempfile::tempdir().unwrap();
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| EXAMPLES.into());
    // An admin token: the admin routes get fuzzed past their role check too.
    let auth = format!("Authorization: Bearer {}", admin_token_for("fuzzer"));
    let url = format!("http://{}/openapi.json", gateway.addr);
    let bin = schemathesis();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["run", &url, "--header", &auth])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args(["--max-examples", &examples, "--seed", "20261130"])
            .args(["--workers", "1", "--request-timeout", "30", "--no-color"])
            .arg("--report-dir")
            .arg(report.path())
            // Its cache of crashes goes to the working directory.
            .current_dir(report.path())
            .env("SCHEMATHESIS_TELEMETRY", "false")
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}\n--- gateway log ---\n{}",
        String::from_utf8_lossy(&output.stderr),
        gateway.log_tail()
    );
    assert!(
        stdout.contains("passed"),
        "schemathesis ran no checks:\n{stdout}"
    );
}
