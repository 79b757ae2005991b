//! `POST /v1/chat/completions`: the OpenAI-compatible front door.
//!
//! Each call is one turn through exactly the same path as a WebSocket `send`
//! (a new conversation whose earlier messages are the request's), so it is
//! streamed from the bus and persisted like any turn. `Idempotency-Key`, when
//! sent, is the turn's request id: a retried call does not start a second
//! generation.

use std::convert::Infallible;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use bus::wire::{ChatMessage, FinishReason, ServerFrame, Usage};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    AppState,
    auth::User,
    turns::{Accepted, NewTurn},
};

/// Frames buffered for one HTTP response before the client counts as too slow.
const BUFFER: usize = 4096;

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    /// The text, or the name of the first part type that is not text.
    fn text(self) -> Result<String, String> {
        match self {
            Self::Text(text) => Ok(text),
            Self::Parts(parts) => parts
                .into_iter()
                .map(|p| match (p.kind.as_str(), p.text) {
                    ("text", Some(text)) => Ok(text),
                    (kind, _) => Err(kind.to_owned()),
                })
                .collect(),
        }
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    bus::ops::error_response(status, code, message)
}

/// The HTTP status for a turn error code.
fn status_for(code: &str) -> StatusCode {
    match code {
        "forbidden" => StatusCode::FORBIDDEN,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "too_many_turns" => StatusCode::TOO_MANY_REQUESTS,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "not_found" | "resume_expired" => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn frame_error(frame: ServerFrame) -> Response {
    match frame {
        ServerFrame::Error { code, message, .. } => error(status_for(&code), &code, message),
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected frame {other:?}"),
        ),
    }
}

/// `POST /v1/chat/completions`, stream or not.
pub async fn completions(
    State(state): State<AppState>,
    User(user): User,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not JSON: {e}"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("bad request body: {e}"),
            );
        }
    };
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    if let Err(refused) = state.models.check(request.model.as_deref(), max_tokens) {
        return refused.into_response();
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for message in request.messages {
        if !matches!(
            message.role.as_str(),
            "system" | "developer" | "user" | "assistant"
        ) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("message role {:?} is not supported", message.role),
            );
        }
        let content = match message.content.map(Content::text).transpose() {
            Ok(content) => content.unwrap_or_default(),
            Err(kind) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_content",
                    format!("content part type {kind:?} is not supported; send text"),
                );
            }
        };
        let role = if message.role == "developer" {
            "system".to_owned()
        } else {
            message.role
        };
        messages.push(ChatMessage { role, content });
    }
    let Some(last) = messages.pop().filter(|m| m.role == "user") else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the last message must have role user",
        );
    };
    let request_id = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let turn = NewTurn {
        conversation_id: None,
        content: last.content,
        request_id,
        history: messages,
        model: request.model.clone(),
        max_tokens,
        temperature: request.temperature,
    };
    let accepted = match state.accept_turn(&user, turn).await {
        Ok(accepted) => accepted,
        Err(frame) => return frame_error(frame),
    };
    let model = request.model.unwrap_or_else(|| "gateway".into());
    let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
    if request.stream {
        stream(state, accepted, model, include_usage).into_response()
    } else {
        complete(accepted, model).await
    }
}

fn ids(accepted: &Accepted) -> (String, [(&'static str, String); 2]) {
    (
        format!("chatcmpl-{}", accepted.turn_id),
        [
            ("x-conversation-id", accepted.conversation_id.clone()),
            ("x-turn-id", accepted.turn_id.clone()),
        ],
    )
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        // OpenAI has no "cancelled"; a stopped or failed answer ends as "stop"
        // and the gateway's own reason travels in x_finish_reason.
        _ => "stop",
    }
}

async fn complete(accepted: Accepted, model: String) -> Response {
    let (id, headers) = ids(&accepted);
    let (tx, mut rx) = tokio::sync::mpsc::channel(BUFFER);
    tokio::spawn(accepted.follow.relay(0, tx));
    let mut text = String::new();
    while let Some(frame) = rx.recv().await {
        match frame {
            ServerFrame::Token { delta, .. } => text.push_str(&delta),
            ServerFrame::Reset { .. } => text.clear(),
            ServerFrame::Done {
                finish_reason: reason,
                usage,
                ..
            } => {
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": chrono::Utc::now().timestamp(),
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish_reason(reason),
                    }],
                    "usage": usage_json(usage),
                    "x_finish_reason": reason.as_str(),
                });
                return (headers, Json(body)).into_response();
            }
            _ => {}
        }
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the turn's stream ended early; retry with the same Idempotency-Key",
    )
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

fn stream(
    state: AppState,
    accepted: Accepted,
    model: String,
    include_usage: bool,
) -> impl IntoResponse {
    let (id, headers) = ids(&accepted);
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    tokio::spawn(accepted.follow.relay(0, tx));
    let created = chrono::Utc::now().timestamp();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let first = futures::stream::once({
        let c = chunk(json!({"role": "assistant", "content": ""}), None);
        async move { c }
    });
    let frames = tokio_stream_from(rx).flat_map(move |frame| {
        let out: Vec<Value> = match frame {
            ServerFrame::Token { delta, .. } => vec![chunk(json!({"content": delta}), None)],
            ServerFrame::Done {
                finish_reason: reason,
                usage,
                ..
            } => {
                let mut out = vec![chunk(json!({}), Some(finish_reason(reason)))];
                if include_usage {
                    let mut last = chunk(json!({}), None);
                    last["choices"] = json!([]);
                    last["usage"] = usage_json(usage);
                    out.push(last);
                }
                out
            }
            ServerFrame::Error { code, message, .. } => {
                vec![json!({"error": {"code": code, "message": message, "type": "upstream_error"}})]
            }
            _ => vec![],
        };
        futures::stream::iter(out)
    });
    let events = first
        .chain(frames)
        .map(|v| Event::default().data(v.to_string()))
        .chain(futures::stream::once(async {
            Event::default().data("[DONE]")
        }))
        .map(Ok::<_, Infallible>)
        .take_until(state.shutdown.clone().cancelled_owned());
    (headers, Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Ends after `done`: the relay closes the channel when it returns.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<ServerFrame>,
) -> impl futures::Stream<Item = ServerFrame> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
