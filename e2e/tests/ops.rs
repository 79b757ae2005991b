//! The operator's files in `ops/`: the Prometheus rules pass Debian's
//! `promtool` (syntax, and their unit tests on synthetic series), every
//! alert has a unit test where it fires and one where it does not, and every
//! metric name the rules and the Grafana dashboard query is one the real
//! binaries expose on `/metrics` (or one a rule records, or Prometheus's own
//! `up`), so a renamed series cannot leave a dashboard blank or an alert
//! silent.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use e2e::Bed;
use testkit::Script;

const RULES: &str = "ops/prometheus/rules.yml";
const RULE_TESTS: &str = "ops/prometheus/tests.yml";
const DASHBOARD: &str = "ops/grafana/gateway.json";

/// Series Prometheus makes itself rather than scraping them.
const PROMETHEUS_OWN: &[&str] = &["up"];

fn path(relative: &str) -> PathBuf {
    testkit::project_root().join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// Runs promtool from Debian's `prometheus` package; a missing tool fails
/// the test rather than skipping it (`scripts/setup.sh` installs it).
fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(testkit::project_root())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): run scripts/setup.sh (installs Debian's prometheus)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {}:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", RULES]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The `- alert:` names of the rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// For each `alertname:` case of the unit tests: the alert and whether it
/// expects it to fire (a non-empty `exp_alerts`).
fn alert_cases(tests: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let mut cases = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let expected = lines[i + 1..]
            .iter()
            .find_map(|l| l.strip_prefix("exp_alerts:"))
            .unwrap_or_else(|| panic!("{name}: no exp_alerts"));
        cases.push((name.trim().to_owned(), expected.trim() != "[]"));
    }
    cases
}

#[test]
fn every_alert_has_a_test_where_it_fires_and_one_where_it_does_not() {
    let alerts = alert_names(&read(RULES));
    assert!(alerts.len() >= 10, "{alerts:?}");
    let cases = alert_cases(&read(RULE_TESTS));
    for alert in &alerts {
        for fires in [true, false] {
            assert!(
                cases.contains(&(alert.clone(), fires)),
                "{alert} has no unit test where it {}",
                if fires { "fires" } else { "stays quiet" }
            );
        }
    }
    for (name, _) in &cases {
        assert!(
            alerts.contains(name),
            "the tests name an unknown alert {name}"
        );
    }
}

/// Words of PromQL that are not metric names: aggregations, their
/// modifiers and the binary operators.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects. Strings, label matchers
/// (`{...}`) and ranges (`[...]`) are dropped; an identifier followed by `(`
/// is a function, and the parenthesised label list after `by`, `without`,
/// `on`, `ignoring` and `group_*` holds labels, not metrics.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = next < chars.len() && chars[next] == '(';
                let label_list = matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                if label_list && call {
                    i = skip_to(next + 1, ')');
                } else if !call && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The `expr:` values of the rules file (one line, or a `|` block) and the
/// names its recording rules define.
fn rule_exprs(rules: &str) -> (Vec<String>, BTreeSet<String>) {
    let lines: Vec<&str> = rules.lines().collect();
    let (mut exprs, mut recorded) = (Vec::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- record:") {
            recorded.insert(name.trim().to_owned());
        }
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        if value.trim() != "|" {
            exprs.push(value.trim().to_owned());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .copied()
            .collect();
        exprs.push(block.join("\n"));
    }
    (exprs, recorded)
}

/// Every `expr` of the dashboard's panel targets.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

/// The metric names of `/metrics` sample lines (a summary's `_sum` and
/// `_count` are names of their own).
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_name_extraction_skips_functions_labels_strings_and_ranges() {
    let names = metric_names(
        r#"sum by (quantile) (rate(a_total{job="x", le="0.5"}[5m])) / on (instance) group_left(job)
           max without (instance) (b_seconds{quantile="0.99"}) > 1e3
           or label_replace(c:rec:rate5m, "subject", "dlq.chat", "", "") and d offset 5m"#,
    );
    let expected: BTreeSet<String> = ["a_total", "b_seconds", "c:rec:rate5m", "d"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_query_only_series_the_services_expose() {
    testkit::init_logs();
    let bed = Bed::start("ops", Script::new(["hi"], Duration::ZERO)).await;
    let mut persister = bed.persister();
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[]);
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();

    let mut exposed = BTreeSet::new();
    for addr in [&gateway.addr, &streamer.addr, &persister.addr] {
        exposed.extend(exposed_names(&e2e::scrape_metrics(addr).await));
    }
    let (rule_exprs, recorded) = rule_exprs(&read(RULES));
    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let dashboard_exprs = dashboard_exprs(&dashboard);
    assert!(rule_exprs.len() >= 14, "{rule_exprs:#?}");
    assert!(dashboard_exprs.len() >= 20, "{dashboard_exprs:#?}");

    let mut used = BTreeSet::new();
    for (file, exprs) in [(RULES, &rule_exprs), (DASHBOARD, &dashboard_exprs)] {
        for expr in exprs {
            for name in metric_names(expr) {
                let known = exposed.contains(&name)
                    || recorded.contains(&name)
                    || PROMETHEUS_OWN.contains(&name.as_str());
                assert!(
                    known,
                    "{file}: {name} is not on any service's /metrics (in {expr})"
                );
                used.insert(name);
            }
        }
    }
    // The check saw the queries it is about, not an empty parse.
    for name in [
        "gateway_ws_open",
        "gateway_ttft_seconds",
        "streamer_inter_token_seconds",
        "streamer_upstream_requests_total",
        "persister_sync_oldest_pending_seconds",
        "persister_rows_pending_sync",
        "streamer_consumer_pending",
        "readiness_status",
    ] {
        assert!(used.contains(name), "{name} is queried nowhere: {used:?}");
    }

    // The series the alerts were added for move with the facts they report.
    for addr in [&gateway.addr, &streamer.addr, &persister.addr] {
        let text = e2e::scrape_metrics(addr).await;
        assert!(
            text.lines()
                .any(|l| l == r#"readiness_status{status="ok"} 1"#),
            "{addr} is not reported ready:\n{text}"
        );
    }
    let mut ws = e2e::ws_connect(&gateway.addr, "ops-user").await.unwrap();
    e2e::ws_send(
        &mut ws,
        serde_json::json!({"type": "send", "conversation_id": null, "content": "hello", "request_id": "r1"}),
    )
    .await
    .unwrap();
    let frames = e2e::ws_until_done(&mut ws, Duration::from_secs(30)).await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, bus::wire::ServerFrame::Done { .. })),
        "the turn did not finish: {frames:?}"
    );
    let text = e2e::scrape_metrics(&streamer.addr).await;
    assert!(
        text.lines()
            .any(|l| l == "streamer_upstream_requests_total 1"),
        "one turn, one provider request:\n{text}"
    );
}
