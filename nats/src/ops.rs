//! Health, readiness and Prometheus metrics, served the same way by every
//! service (the gateway mounts these routes on its API port; the streamer and
//! persister serve them on their own listen address).

use std::{future::Future, pin::Pin, sync::Arc, sync::OnceLock};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::wire::{ErrorBody, ErrorDetail};

/// What `/readyz` reports: ready or not, and the individual checks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// 200 when true, 503 when false.
    pub ready: bool,
    /// `"ok"`, `"degraded"` (ready but impaired) or `"unavailable"`.
    pub status: &'static str,
    /// Named checks and what they found.
    pub checks: serde_json::Map<String, serde_json::Value>,
}

/// A readiness probe: called on every `/readyz`.
pub type ReadyFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Readiness> + Send>> + Send + Sync>;

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
    for series in catalogue {
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
pub fn router(ready: ReadyFn) -> Router {
    let handle = metrics_handle();
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz).with_state(ready))
        .route("/metrics", get(move || async move { handle.render() }))
}

async fn readyz(State(ready): State<ReadyFn>) -> Response {
    let readiness = ready().await;
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
    ready: ReadyFn,
    shutdown: tokio_util::sync::CancellationToken,
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
/// connected and every stream of the contract exists.
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
