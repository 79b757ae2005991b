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
