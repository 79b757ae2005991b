//! `GET /openapi.json`: the HTTP API as OpenAPI 3.1.
//!
//! The routes are registered through [`utoipa_axum::router::OpenApiRouter`]
//! from the handlers' own `#[utoipa::path]` annotations (see `lib.rs`), so a
//! route cannot exist without its description, and the bodies are the
//! types the handlers serialise. What OpenAPI cannot express as an
//! operation (the WebSocket's frames, the SSE events) is described as named
//! schemas the operations point to.

use std::sync::Arc;

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use bus::ops::Readiness;
use bus::wire::{ClientFrame, ErrorBody, ScanEvent, ScanEventData, ServerFrame};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};

/// The name of the `Authorization: Bearer <JWT>` scheme (the macros'
/// `security(...)` attributes spell it as a literal).
const BEARER: &str = "bearer";
/// The name of the `?access_token=<JWT>` scheme, for clients (browsers'
/// `WebSocket` and `EventSource`) that cannot set headers.
const QUERY_TOKEN: &str = "access_token";

/// The document's frame: title, tags, security schemes and the schemas no
/// operation reaches by itself.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Gateway API",
        description = "Chat over WebSocket (`GET /v1/chat/ws`, frames `ClientFrame` and `ServerFrame`) \
            or the OpenAI-compatible `POST /v1/chat/completions`; waste scans uploaded to \
            `POST /v1/scans` and followed over SSE (`ScanEvent`). Errors are \
            `{\"error\":{\"code\",\"message\"}}` with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(healthz, readyz, metrics, openapi_json),
    components(schemas(ClientFrame, ServerFrame, ScanEvent, ScanEventData, ErrorBody)),
    modifiers(&Security),
    // Every operation needs a token unless it says otherwise.
    security(("bearer" = [])),
    tags(
        (name = "chat", description = "Turns over WebSocket and the OpenAI-compatible endpoint"),
        (name = "history", description = "Stored conversations"),
        (name = "scans", description = "Waste scans: upload, status, live events"),
        (name = "characters", description = "The character catalogue and collections"),
        (name = "guide", description = "The disposal guide: public, read-only, cacheable"),
        (name = "account", description = "The caller's data: erasure"),
        (name = "auth", description = "Development login"),
        (name = "ops", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT signed with the gateway's key (HS256); `sub` is the user id.",
                    ))
                    .build(),
            ),
        );
        let mut query = ApiKeyValue::new(QUERY_TOKEN);
        query.description =
            Some("The same JWT as a query parameter, for the WebSocket and SSE routes.".into());
        components.add_security_scheme(QUERY_TOKEN, SecurityScheme::ApiKey(ApiKey::Query(query)));
    }
}

/// One server-sent event of `GET /v1/scans/{id}/events`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ScanSseEvent {
    /// The event's `id`, contiguous from 1: send it back as `Last-Event-ID`.
    #[schema(pattern = "^[0-9]+$")]
    id: String,
    /// What `data` holds.
    event: ScanSseKind,
    /// JSON: the `data` of a [`ScanEvent`] of that kind.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The kinds of scan events; `result` and `error` end the stream.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ScanSseKind {
    /// `ScanProgress`: a stage reached.
    Progress,
    /// `{"delta"}`: a piece of the explanation.
    Token,
    /// `ScanRecord`: the finished scan (last event).
    Result,
    /// `ScanError`: why it failed (last event).
    Error,
}

/// One server-sent event of a streamed `POST /v1/chat/completions`:
/// only `data`, a `chat.completion.chunk` as JSON or the final `[DONE]`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CompletionSseEvent {
    /// A chunk's JSON, an error chunk's JSON, or `[DONE]`.
    data: String,
}

/// The serialised document, built once at startup from the router's paths.
#[derive(Clone)]
pub struct Document(Arc<String>);

impl Document {
    /// Serialises the document the router was built with.
    pub fn new(openapi: &utoipa::openapi::OpenApi) -> Self {
        Self(Arc::new(
            openapi
                .to_pretty_json()
                .expect("the OpenAPI document serialises"),
        ))
    }

    /// `GET /openapi.json`.
    pub fn response(&self) -> Response {
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            self.0.as_str().to_owned(),
        )
            .into_response()
    }
}

// The ops routes come from `bus::ops` (every service serves them), so they
// are described here rather than annotated where they are defined.

/// Liveness: `{"status":"ok"}` while the process serves.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "ops", security(()),
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"}))))]
#[allow(dead_code)]
fn healthz() {}

/// Readiness: 200 when NATS and the KV buckets answer, 503 with the
/// failing checks otherwise. 404 on this port when
/// `GATEWAY_ADMIN_LISTEN` serves it apart.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "ops", security(()), responses(
    (status = 200, description = "Ready (`status` `ok` or `degraded`)", body = Readiness),
    (status = 404, description = "Served on the admin listener instead", body = ErrorBody),
    (status = 503, description = "Not ready; `checks` names what is failing", body = Readiness),
))]
#[allow(dead_code)]
fn readyz() {}

/// This document (OpenAPI 3.1, JSON).
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "ops", security(()),
    responses((status = 200, description = "The OpenAPI description of this API", body = Object)))]
#[allow(dead_code)]
fn openapi_json() {}

/// Prometheus metrics in the text exposition format. 404 on this port when
/// `GATEWAY_ADMIN_LISTEN` serves it apart.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "ops", security(()), responses(
    (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
    (status = 404, description = "Served on the admin listener instead", body = ErrorBody),
))]
#[allow(dead_code)]
fn metrics() {}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    /// The document the gateway serves, as JSON.
    fn document() -> Value {
        let (_, openapi) = crate::api_routes().split_for_parts();
        serde_json::from_str(&super::Document::new(&openapi).0).unwrap()
    }

    fn refs(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("$ref", Value::String(r)) => {
                            out.insert(r.clone());
                        }
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_reference_resolves() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
        let mut all = BTreeSet::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for reference in all {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {reference}"));
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{reference} does not resolve"
            );
        }
    }

    #[test]
    fn every_operation_documents_its_errors_and_its_security() {
        let doc = document();
        let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
        assert!(schemes.contains_key(super::BEARER) && schemes.contains_key(super::QUERY_TOKEN));
        let paths = doc["paths"].as_object().unwrap();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                let public = op["security"] == serde_json::json!([{}]);
                assert!(
                    public || responses.contains_key("401"),
                    "{method} {path} needs a token but documents no 401"
                );
                if path.starts_with("/v1/") && method != "get" || path.contains('{') {
                    assert!(
                        responses.keys().any(|s| s.starts_with('4')),
                        "{method} {path} documents no client error"
                    );
                }
            }
        }
    }

    #[test]
    fn the_websocket_frames_and_scan_events_are_named_schemas() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in ["ClientFrame", "ServerFrame", "ScanEvent", "ErrorBody"] {
            assert!(schemas.contains_key(name), "{name} missing");
        }
        std::fs::write(
            std::env::temp_dir().join("gateway-openapi.json"),
            serde_json::to_string_pretty(&doc).unwrap(),
        )
        .unwrap();
    }
}
