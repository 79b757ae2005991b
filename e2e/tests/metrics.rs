//! A freshly started gateway, streamer and persister show their metric
//! series on `/metrics` at zero before any traffic, so dashboards and alerts
//! (`rate()`, "absent" rules) work from the first scrape, not from the first
//! request.

use std::time::Duration;

use e2e::Bed;
use testkit::Script;

/// The value of every sample line whose series starts with `name` (the
/// name itself, `name{...}`, or a summary's `name_count`).
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .collect()
}

fn assert_zero(text: &str, service: &str, names: &[&str]) {
    for name in names {
        let found = samples(text, name);
        assert!(
            !found.is_empty(),
            "{service}: {name} is missing from /metrics:\n{text}"
        );
        for (series, value) in found {
            assert_eq!(value, "0", "{service}: {series} before any traffic");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_services_expose_their_series_at_zero() {
    testkit::init_logs();
    let bed = Bed::start("metrics", Script::new(["hi"], Duration::ZERO)).await;
    let mut persister = bed.persister();
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[]);
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();

    assert_zero(
        &e2e::scrape_metrics(&gateway.addr).await,
        "gateway",
        &[
            "gateway_turns_accepted_total",
            "gateway_scans_accepted_total",
            "gateway_scan_streams_total",
            "gateway_resumes_total",
            "gateway_cancels_total",
            "gateway_ws_open",
            "gateway_ws_frames_sent_total",
            "gateway_ws_slow_closes_total",
            "gateway_ttft_seconds_count",
        ],
    );
    let streamer_metrics = e2e::scrape_metrics(&streamer.addr).await;
    assert_zero(
        &streamer_metrics,
        "streamer",
        &[
            "streamer_turns_total",
            "streamer_tokens_total",
            "streamer_scans_total",
            "streamer_scan_dead_letters_total",
            "streamer_upstream_requests_total",
            "streamer_upstream_errors_total",
            "streamer_consumer_pending",
            "streamer_upstream_fallbacks_total",
            "streamer_upstream_ttft_seconds_count",
            "streamer_scan_vision_seconds_count",
        ],
    );
    // Labelled counters show each of their few label values.
    for series in [
        "streamer_turns_total{finish_reason=\"error\"}",
        "streamer_scans_total{status=\"failed\",cached=\"false\"}",
        "streamer_upstream_errors_total{kind=\"rate_limited\",code=\"upstream_rate_limited\"}",
    ] {
        assert!(
            streamer_metrics.lines().any(|l| l == format!("{series} 0")),
            "{series} missing:\n{streamer_metrics}"
        );
    }
    assert_zero(
        &e2e::scrape_metrics(&persister.addr).await,
        "persister",
        &[
            "persister_commits_total",
            "persister_rows_ingested_total",
            "persister_scan_commits_total",
            "persister_rows_synced_total",
            "persister_scan_rows_synced_total",
            "persister_sync_failures_total",
            "persister_dead_letters_total",
            "persister_commit_seconds_count",
            "persister_sync_lag_seconds_count",
            "persister_sync_oldest_pending_seconds",
            "persister_consumer_pending",
        ],
    );
}
