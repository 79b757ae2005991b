//! Health, readiness and Prometheus metrics, served the same way by every
//! service (the gateway mounts these routes on its API port, or on
//! `GATEWAY_ADMIN_LISTEN`; the streamer and persister serve them on their own
//! listen address).
//!
//! Readiness is checked in the background ([`ReadyState`]) and `/readyz`
//! answers from the last result: a probe costs bus calls (the NATS probe
//! asks JetStream for every stream), and a flood of `/readyz` must not turn
//! into a flood on the bus.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::wire::{ErrorBody, ErrorDetail};

/// What `/readyz` reports: ready or not, and the individual checks.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// 200 when true, 503 when false.
    pub ready: bool,
    /// `"ok"`, `"degraded"` (ready but impaired) or `"unavailable"`.
    pub status: &'static str,
    /// Named checks and what they found.
    #[schema(value_type = Object)]
    pub checks: serde_json::Map<String, serde_json::Value>,
}

/// A readiness probe: run by [`ReadyState`] in the background, never per
/// request.
pub type ReadyFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Readiness> + Send>> + Send + Sync>;

/// How often the streamer and persister re-run their readiness probe (the
/// gateway's is `GATEWAY_READY_REFRESH_MS`, this by default): seven
/// JetStream calls a second per process is nothing, and a dependency that
/// goes away shows on `/readyz` within about this long.
pub const READY_REFRESH: Duration = Duration::from_secs(1);

/// A probe that has not answered within this counts as not ready: a hung
/// dependency must not leave the last "ready" standing.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Readiness {
    fn unavailable(check: &str, finding: String) -> Self {
        let mut checks = serde_json::Map::new();
        checks.insert(check.into(), json!(finding));
        Self {
            ready: false,
            status: "unavailable",
            checks,
        }
    }
}

/// What `/readyz` answers: the last result of a probe that a background task
/// re-runs, so a request costs no call to any dependency. Cheap to clone.
#[derive(Clone)]
pub struct ReadyState {
    /// The last result and when it was found; the refresh task owns the sender.
    latest: tokio::sync::watch::Receiver<(Readiness, Instant)>,
    /// Older than this, the result is not trusted (the refresh task died).
    stale_after: Duration,
}

impl ReadyState {
    /// Runs `probe` once and waits for it, so the first answer is never
    /// "ready" before a check passed, then re-runs it every `every` in a
    /// task until `shutdown` fires; from then on it answers not ready, so a
    /// draining process is taken out of rotation.
    pub async fn start(probe: ReadyFn, every: Duration, shutdown: CancellationToken) -> Self {
        let first = run_probe(&probe).await;
        log_change(None, &first);
        record_status(first.status);
        let (tx, latest) = tokio::sync::watch::channel((first, Instant::now()));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            // A slow probe delays the next one instead of causing a burst.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    // Nobody serves this state any more.
                    () = tx.closed() => return,
                    _ = ticks.tick() => {}
                }
                let readiness = tokio::select! {
                    () = shutdown.cancelled() => break,
                    readiness = run_probe(&probe) => readiness,
                };
                log_change(Some(&tx.borrow().0), &readiness);
                record_status(readiness.status);
                tx.send_replace((readiness, Instant::now()));
            }
            record_status("unavailable");
            tx.send_replace((
                Readiness::unavailable("shutdown", "draining".into()),
                Instant::now(),
            ));
        });
        Self {
            latest,
            stale_after: 2 * (every + PROBE_TIMEOUT),
        }
    }

    /// The last result, or not ready when it is stale.
    pub fn current(&self) -> Readiness {
        let (readiness, at) = &*self.latest.borrow();
        let age = at.elapsed();
        if age > self.stale_after {
            return Readiness::unavailable(
                "readiness",
                format!("stale: last checked {} s ago", age.as_secs()),
            );
        }
        readiness.clone()
    }
}

async fn run_probe(probe: &ReadyFn) -> Readiness {
    tokio::time::timeout(PROBE_TIMEOUT, probe())
        .await
        .unwrap_or_else(|_| {
            Readiness::unavailable(
                "probe",
                format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            )
        })
}

/// Sets `readiness_status{status}` to 1 for `status` and 0 for the others,
/// so an alert sees "degraded" (ready but impaired: the persister without
/// Postgres), which `/readyz`'s 200 hides from a plain HTTP probe.
fn record_status(status: &str) {
    for known in crate::series::READINESS_STATUSES {
        let value = if known == status { 1.0 } else { 0.0 };
        metrics::gauge!("readiness_status", "status" => known).set(value);
    }
}

/// How often [`watch_consumers`] asks JetStream for each consumer's backlog:
/// a scrape every 15 s or so sees fresh numbers at one call per consumer
/// every few seconds.
pub const CONSUMER_REFRESH: Duration = Duration::from_secs(5);

/// Keeps two gauges per durable consumer in `consumers` up to date until
/// `shutdown` fires: `pending` (messages the stream holds that the consumer
/// has not delivered yet) and `ack_pending` (delivered, not acknowledged),
/// each labelled `stream` and `consumer`. nats-server's own monitoring port
/// serves JSON that Prometheus cannot scrape, so the services report the
/// backlog of the consumers they read. Every process of a service reports the
/// same shared consumer: take `max`, not `sum`, across instances. When
/// JetStream does not answer the gauges keep their last value; readiness
/// (`readiness_status`) reports the lost connection.
pub fn watch_consumers(
    js: async_nats::jetstream::Context,
    consumers: &[crate::streams::ConsumerDef],
    pending: &'static str,
    ack_pending: &'static str,
    every: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let consumers: Vec<(&'static str, String)> = consumers
        .iter()
        .filter_map(|def| Some((def.stream, def.config().ok()?.durable_name?)))
        .collect();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            for (stream, consumer) in &consumers {
                let info = async {
                    js.get_stream_no_info(*stream)
                        .await
                        .ok()?
                        .consumer_info(consumer)
                        .await
                        .ok()
                };
                let info = tokio::select! {
                    () = shutdown.cancelled() => return,
                    info = tokio::time::timeout(PROBE_TIMEOUT, info) => info.ok().flatten(),
                };
                let Some(info) = info else {
                    tracing::debug!(stream, consumer, "Consumer info unavailable.");
                    continue;
                };
                let labels = [
                    ("stream", (*stream).to_owned()),
                    ("consumer", consumer.clone()),
                ];
                metrics::gauge!(pending, &labels).set(info.num_pending as f64);
                metrics::gauge!(ack_pending, &labels).set(info.num_ack_pending as f64);
            }
        }
    })
}

/// Logs when readiness flips: with `/readyz` no longer probing per request,
/// the log is where an operator sees when and why it changed.
fn log_change(before: Option<&Readiness>, now: &Readiness) {
    if before.is_some_and(|b| b.ready == now.ready) {
        return;
    }
    let checks = serde_json::Value::Object(now.checks.clone());
    if now.ready {
        tracing::info!(status = now.status, %checks, "Ready.");
    } else {
        tracing::warn!(status = now.status, %checks, "Not ready.");
    }
}

/// The process-wide Prometheus recorder. Installed on first use; later calls
/// (another service in the same test process) share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness):
            // then this handle renders an empty registry, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// What kind of metric a [`Series`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (rendered as a summary: quantiles, `_sum`, `_count`).
    Histogram,
}

/// One metric a service emits, as its catalogue lists it.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    /// The metric name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Every label set it is emitted with (few, by design); empty for an
    /// unlabelled metric.
    pub labels: &'static [&'static [(&'static str, &'static str)]],
}

/// Describes `catalogue` and registers each series (each label set) at
/// zero, so a fresh process shows them on `/metrics` before any traffic:
/// `rate()` and absence alerts work from the first scrape. Registering adds
/// nothing to a series that already counts (another service in the same
/// test process), so calling it twice is harmless.
pub fn register(catalogue: &[Series]) {
    // The recorder must exist before anything registers with it.
    let _ = metrics_handle();
    for series in crate::series::SERIES.iter().chain(catalogue) {
        let label_sets: Vec<Vec<metrics::Label>> = if series.labels.is_empty() {
            vec![Vec::new()]
        } else {
            series
                .labels
                .iter()
                .map(|set| {
                    set.iter()
                        .map(|(k, v)| metrics::Label::new(*k, *v))
                        .collect()
                })
                .collect()
        };
        match series.kind {
            Kind::Counter => {
                metrics::describe_counter!(series.name, series.help);
                for labels in label_sets {
                    metrics::counter!(series.name, labels).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(series.name, series.help);
                for labels in label_sets {
                    metrics::gauge!(series.name, labels).increment(0.0);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(series.name, series.help);
                for labels in label_sets {
                    // A handle is enough: the exporter renders it with count 0.
                    let _ = metrics::histogram!(series.name, labels);
                }
            }
        }
    }
}

/// The metric names `source` mentions as string literals starting with
/// `prefix` (`"gateway_`): what a catalogue test checks against the
/// catalogue, so a series added in code without its entry is caught.
pub fn metric_names_in(source: &str, prefix: &str) -> Vec<String> {
    let quoted = format!("\"{prefix}");
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find(&quoted) {
        let after = &rest[start + 1..];
        let end = after.find('"').unwrap_or(after.len());
        let name = &after[..end];
        if name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            names.push(name.to_owned());
        }
        rest = &after[(end + 1).min(after.len())..];
    }
    names
}

/// [`metric_names_in`] over every `.rs` file under `dir`, with the file
/// each name is in.
///
/// # Errors
/// When a folder or file cannot be read.
pub fn metric_names_under(
    dir: &std::path::Path,
    prefix: &str,
) -> std::io::Result<Vec<(std::path::PathBuf, String)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(metric_names_under(&path, prefix)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path)?;
            for name in metric_names_in(&source, prefix) {
                found.push((path.clone(), name));
            }
        }
    }
    Ok(found)
}

/// A stream's name and one of its durable consumers'.
pub type StreamConsumer = (String, String);

/// The `(stream, durable)` pairs `series` (a per-consumer gauge such as
/// `<service>_consumer_pending`, labelled `stream` then `consumer`) is
/// registered for, and those of `consumers`: equal when the catalogue lists
/// a series for every consumer the service watches, and only those.
///
/// # Panics
/// When a consumer's definition does not parse or has no durable name.
pub fn consumer_gauge_labels(
    series: &Series,
    consumers: &[crate::streams::ConsumerDef],
) -> (Vec<StreamConsumer>, Vec<StreamConsumer>) {
    let registered = series
        .labels
        .iter()
        .map(|set| (set[0].1.to_owned(), set[1].1.to_owned()))
        .collect();
    let watched = consumers
        .iter()
        .map(|def| {
            let durable = def.config().expect("consumer definition").durable_name;
            (def.stream.to_owned(), durable.expect("a durable consumer"))
        })
        .collect();
    (registered, watched)
}

/// What differs between a service's catalogue `series` and the metric names
/// with `prefix` its sources under `src` use (its `series.rs` aside): each
/// name used but not listed, and each listed but never used. Empty when
/// they agree.
///
/// # Errors
/// When a folder or file cannot be read.
pub fn catalogue_mismatches(
    series: &[Series],
    src: &std::path::Path,
    prefix: &str,
) -> std::io::Result<Vec<String>> {
    let used: Vec<_> = metric_names_under(src, prefix)?
        .into_iter()
        .filter(|(path, _)| !path.ends_with("series.rs"))
        .collect();
    let mut mismatches: Vec<String> = used
        .iter()
        .filter(|(_, name)| !series.iter().any(|s| s.name == *name))
        .map(|(path, name)| format!("{name} (in {}) is not in the catalogue", path.display()))
        .collect();
    mismatches.extend(
        series
            .iter()
            .filter(|s| !used.iter().any(|(_, name)| name == s.name))
            .map(|s| format!("{} is catalogued but nothing emits it", s.name)),
    );
    Ok(mismatches)
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(ready: ReadyState) -> Router {
    let handle = metrics_handle();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz).with_state(ready))
        .route("/metrics", get(move || async move { handle.render() }))
}

/// `/healthz`: the process answers. Checks nothing else, so it is cheap
/// enough to serve anywhere.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(ready): State<ReadyState>) -> Response {
    let readiness = ready.current();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// A JSON error response in the contract's shape.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

/// The fallback for unknown routes: `404 {"error":{"code":"not_found",...}}`.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

/// Serves the ops router on `listener` until `shutdown` fires.
///
/// # Errors
/// When the server fails while running.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ready: ReadyState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = router(ready).fallback(not_found);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Binds a listen address with an actionable error (a port in use, a bad address).
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: &str, env_name: &str) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (in use or not a local address? set {env_name})")
    })
}

/// Readiness from NATS: connected and every stream of the contract present.
pub async fn nats_checks(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    checks: &mut serde_json::Map<String, serde_json::Value>,
) -> bool {
    let connected = client.connection_state() == async_nats::connection::State::Connected;
    checks.insert(
        "nats".into(),
        json!(if connected {
            "connected"
        } else {
            "disconnected"
        }),
    );
    let streams = connected && crate::streams::all_exist(js).await;
    checks.insert(
        "streams".into(),
        json!(if streams { "present" } else { "missing" }),
    );
    connected && streams
}

/// A readiness probe for a service whose only dependency is NATS: ready when
/// connected and every stream of the contract exists (one JetStream call per
/// stream, hence [`ReadyState`]).
pub fn nats_ready(client: async_nats::Client, js: async_nats::jetstream::Context) -> ReadyFn {
    Arc::new(move || {
        let (client, js) = (client.clone(), js.clone());
        Box::pin(async move {
            let mut checks = serde_json::Map::new();
            let ok = nats_checks(&client, &js, &mut checks).await;
            Readiness {
                ready: ok,
                status: if ok { "ok" } else { "unavailable" },
                checks,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting_probe(calls: Arc<AtomicUsize>) -> ReadyFn {
        Arc::new(move || {
            let calls = calls.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Readiness {
                    ready: true,
                    status: "ok",
                    checks: serde_json::Map::new(),
                }
            })
        })
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_is_answered_from_the_background_refresh_not_per_request() {
        let calls = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let every = Duration::from_secs(60);
        let state = ReadyState::start(counting_probe(calls.clone()), every, shutdown.clone()).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the first check runs before start returns"
        );
        for _ in 0..500 {
            assert!(state.current().ready);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(every + Duration::from_millis(1)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let draining = state.current();
        assert!(!draining.ready);
        assert_eq!(draining.checks["shutdown"], "draining");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_counts_as_not_ready() {
        let hung: ReadyFn = Arc::new(|| Box::pin(std::future::pending()));
        let state = ReadyState::start(hung, READY_REFRESH, CancellationToken::new()).await;
        let readiness = state.current();
        assert!(!readiness.ready);
        assert_eq!(readiness.status, "unavailable");
        assert!(readiness.checks.contains_key("probe"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_the_refresh_stopped_renewing_is_not_trusted() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        // Ready once, then the refresh task dies (a panicking probe).
        let probe: ReadyFn = Arc::new(move || {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                assert!(first, "the probe fails after its first run");
                Readiness {
                    ready: true,
                    status: "ok",
                    checks: serde_json::Map::new(),
                }
            })
        });
        let state = ReadyState::start(probe, READY_REFRESH, CancellationToken::new()).await;
        assert!(state.current().ready);
        tokio::time::sleep(2 * (READY_REFRESH + PROBE_TIMEOUT) + READY_REFRESH).await;
        let readiness = state.current();
        assert!(!readiness.ready);
        assert!(
            readiness.checks["readiness"]
                .as_str()
                .unwrap()
                .starts_with("stale")
        );
    }
}
