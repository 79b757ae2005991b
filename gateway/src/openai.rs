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
use bus::wire::ErrorBody;
use bus::wire::{ChatMessage, FinishReason, ServerFrame, Usage};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    AppState,
    apidoc::CompletionSseEvent,
    auth::User,
    turns::{Accepted, NewTurn},
};

/// Frames buffered for one HTTP response before the client counts as too slow.
const BUFFER: usize = 4096;

/// The body of `POST /v1/chat/completions`: OpenAI's, of which these
/// fields are read (others are ignored).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct CompletionRequest {
    /// One of `GET /v1/models`; the default model when left out.
    #[serde(default)]
    model: Option<String>,
    /// The conversation; the last must have role `user`.
    #[schema(min_items = 1)]
    messages: Vec<InMessage>,
    /// Server-sent chunks (`text/event-stream`) instead of one JSON body.
    #[serde(default)]
    stream: bool,
    /// With `include_usage`, a last chunk carries the usage.
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Most tokens in the answer, 1 to the operator's cap.
    #[serde(default)]
    #[schema(minimum = 1)]
    max_tokens: Option<u32>,
    /// Newer name of `max_tokens`; wins when both are set.
    #[serde(default)]
    #[schema(minimum = 1)]
    max_completion_tokens: Option<u32>,
    /// Sampling temperature, passed on.
    #[serde(default)]
    temperature: Option<f32>,
}

/// `stream_options` of a completion request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    #[serde(default)]
    include_usage: bool,
}

/// One message of a completion request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct InMessage {
    /// `system`, `developer`, `user` or `assistant`.
    #[schema(pattern = "^(system|developer|user|assistant)$")]
    role: String,
    /// Text, or parts of type `text`.
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `text` parts are supported.
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct Part {
    /// `text` (other types are refused with `unsupported_content`).
    #[serde(rename = "type")]
    kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    text: Option<String>,
}

/// A non-streamed answer of `POST /v1/chat/completions`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Completion {
    /// `chatcmpl-<turn_id>`.
    id: String,
    /// Always `chat.completion`.
    object: &'static str,
    /// Unix seconds.
    created: i64,
    /// The model asked for (`gateway` when none was).
    model: String,
    /// Exactly one choice.
    choices: Vec<Choice>,
    /// Token usage as the provider reported it.
    usage: CompletionUsage,
    /// The gateway's own finish reason: `stop`, `length`, `cancelled`, `error`.
    x_finish_reason: &'static str,
    /// Extension: the disposal-rule categories the answer was grounded in,
    /// most relevant first (empty when no rule applied).
    sources: Vec<String>,
}

/// The one choice of a [`Completion`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Choice {
    /// Always 0.
    index: u32,
    /// The answer.
    message: AnswerMessage,
    /// `stop` or `length`, OpenAI's spelling.
    finish_reason: &'static str,
}

/// The assistant's message in a [`Choice`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AnswerMessage {
    /// Always `assistant`.
    role: &'static str,
    /// The whole answer.
    content: String,
}

/// OpenAI's usage object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CompletionUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for CompletionUsage {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
        }
    }
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

/// `POST /v1/chat/completions`, stream or not: one turn, as OpenAI's API
/// answers it. `Idempotency-Key` makes a retry follow the same turn.
#[utoipa::path(post, path = "/v1/chat/completions", operation_id = "createChatCompletion", tag = "chat",
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key follows the same turn instead of starting another")),
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The answer: JSON, or with `stream: true` server-sent \
            `chat.completion.chunk` events ending in `data: [DONE]` (an error mid-stream comes as a chunk \
            `{\"error\":{\"code\",\"message\"}}` before `[DONE]`). Headers `x-conversation-id` and `x-turn-id` name the turn.",
            content((Completion = "application/json"), (CompletionSseEvent = "text/event-stream"))),
        (status = 400, description = "`invalid_json`, `invalid_request`, `unsupported_content`, `model_not_found`, `max_tokens_too_large`, `invalid_max_tokens`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 413, description = "`too_large`: the last message is over 64 KiB", body = ErrorBody),
        (status = 429, description = "`too_many_turns`: the caller has too many turns in flight", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
        (status = 504, description = "`timeout`: retry with the same Idempotency-Key", body = ErrorBody),
    ))]
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
    // An OpenAI client cannot drop text it was given: a repeated request
    // follows the turn from its last restart, not from its first token.
    let after_seq = if accepted.follow.is_fresh() {
        0
    } else {
        accepted.follow.last_reset().await
    };
    if request.stream {
        stream(state, accepted, after_seq, model, include_usage).into_response()
    } else {
        complete(accepted, after_seq, model, state.completion_timeout).await
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

async fn complete(
    accepted: Accepted,
    after_seq: u64,
    model: String,
    deadline: std::time::Duration,
) -> Response {
    let (id, headers) = ids(&accepted);
    let (tx, mut rx) = tokio::sync::mpsc::channel(BUFFER);
    let relay = tokio::spawn(accepted.follow.relay(after_seq, tx));
    let _stop = AbortOnDrop(relay);
    let deadline = tokio::time::Instant::now() + deadline;
    let mut text = String::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                metrics::counter!("gateway_completion_timeouts_total").increment(1);
                return (
                    headers,
                    error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        "the answer did not finish in time; retry with the same Idempotency-Key to get it",
                    ),
                )
                    .into_response();
            }
        };
        match frame {
            ServerFrame::Token { delta, .. } => text.push_str(&delta),
            ServerFrame::Reset { .. } => text.clear(),
            ServerFrame::Error { code, message, .. } if is_relay_failure(&code) => {
                return (
                    headers,
                    error(StatusCode::SERVICE_UNAVAILABLE, &code, message),
                )
                    .into_response();
            }
            ServerFrame::Done {
                finish_reason: reason,
                usage,
                sources,
                ..
            } => {
                let body = Completion {
                    id,
                    object: "chat.completion",
                    created: chrono::Utc::now().timestamp(),
                    model,
                    choices: vec![Choice {
                        index: 0,
                        message: AnswerMessage {
                            role: "assistant",
                            content: text,
                        },
                        finish_reason: finish_reason(reason),
                    }],
                    usage: usage.into(),
                    x_finish_reason: reason.as_str(),
                    sources,
                };
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
    serde_json::to_value(CompletionUsage::from(usage)).expect("usage serialises")
}

fn stream(
    state: AppState,
    accepted: Accepted,
    after_seq: u64,
    model: String,
    include_usage: bool,
) -> impl IntoResponse {
    let (id, headers) = ids(&accepted);
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    let relay = tokio::spawn(accepted.follow.relay(after_seq, tx));
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
    let mut translate = Translate {
        chunk,
        include_usage,
        sent_text: false,
        over: false,
        _relay: AbortOnDrop(relay),
    };
    // `None` marks the relay's end, whatever ended it.
    let frames = tokio_stream_from(rx)
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .map(move |frame| {
            futures::stream::iter(match frame {
                Some(frame) => translate.frame(frame),
                None => translate.end(),
            })
        })
        .flatten();
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

/// Turns a turn's frames into OpenAI chunks. A `reset` after text was sent
/// ends the stream with an error chunk (`answer_restarted`) instead of
/// appending a second answer to the first: the client retries with the
/// same `Idempotency-Key` and gets the answer from its restart.
struct Translate<C> {
    chunk: C,
    include_usage: bool,
    sent_text: bool,
    /// An error or the finish was sent: nothing more.
    over: bool,
    /// The relay stops when the response does.
    _relay: AbortOnDrop,
}

impl<C: Fn(Value, Option<&str>) -> Value> Translate<C> {
    fn frame(&mut self, frame: ServerFrame) -> Vec<Value> {
        if self.over {
            return Vec::new();
        }
        match frame {
            ServerFrame::Token { delta, .. } => {
                self.sent_text |= !delta.is_empty();
                vec![(self.chunk)(json!({"content": delta}), None)]
            }
            ServerFrame::Reset { .. } if self.sent_text => {
                self.over = true;
                metrics::counter!("gateway_openai_restarts_total").increment(1);
                vec![error_chunk(
                    "answer_restarted",
                    "the answer was interrupted and started over; retry with the same Idempotency-Key to receive it whole",
                )]
            }
            ServerFrame::Done {
                finish_reason: reason,
                usage,
                sources,
                ..
            } => {
                self.over = true;
                let mut finish = (self.chunk)(json!({}), Some(finish_reason(reason)));
                // Extension: the disposal-rule categories the answer used,
                // on the chunk that carries `finish_reason`.
                finish["sources"] = json!(sources);
                let mut out = vec![finish];
                if self.include_usage {
                    let mut last = (self.chunk)(json!({}), None);
                    last["choices"] = json!([]);
                    last["usage"] = usage_json(usage);
                    out.push(last);
                }
                out
            }
            ServerFrame::Error { code, message, .. } => {
                // The relay ends after these; the turn's own errors are
                // followed by `done`.
                self.over |= is_relay_failure(&code);
                vec![error_chunk(&code, &message)]
            }
            _ => vec![],
        }
    }
}

impl<C> Translate<C> {
    /// After the relay's last frame: a stream that neither finished nor
    /// reported why it stopped gets an error chunk before `[DONE]`, so a
    /// client never takes part of an answer for all of it.
    fn end(&mut self) -> Vec<Value> {
        if std::mem::replace(&mut self.over, true) {
            return Vec::new();
        }
        vec![error_chunk(
            "unavailable",
            "the turn's stream ended early; retry with the same Idempotency-Key",
        )]
    }
}

fn error_chunk(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message, "type": "server_error"}})
}

/// Codes with which a relay ends without the turn's `done`.
fn is_relay_failure(code: &str) -> bool {
    matches!(code, "turn_stalled" | "replay_failed")
}

/// Aborts a spawned relay when the response using it is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ends after `done`: the relay closes the channel when it returns.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<ServerFrame>,
) -> impl futures::Stream<Item = ServerFrame> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate() -> Translate<impl Fn(Value, Option<&str>) -> Value> {
        Translate {
            chunk: |delta: Value, finish: Option<&str>| json!({"choices": [{"delta": delta, "finish_reason": finish}]}),
            include_usage: false,
            sent_text: false,
            over: false,
            _relay: AbortOnDrop(tokio::spawn(async {})),
        }
    }

    fn token(seq: u64, delta: &str) -> ServerFrame {
        ServerFrame::Token {
            turn_id: "t".into(),
            seq,
            delta: delta.into(),
        }
    }

    // Found by the chaos run: a relay that ended early (its stream could not
    // be read during a leader election) closed the response with `[DONE]`
    // after part of the answer, which an OpenAI client takes as all of it.
    #[tokio::test]
    async fn a_relay_that_ends_without_done_ends_the_stream_with_an_error() {
        let mut translate = translate();
        assert_eq!(translate.frame(token(1, "half an ")).len(), 1);
        let end = translate.end();
        assert_eq!(end.len(), 1, "{end:?}");
        assert_eq!(end[0]["error"]["code"], "unavailable");
    }

    #[tokio::test]
    async fn after_done_the_end_adds_nothing() {
        let mut translate = translate();
        translate.frame(token(1, "whole"));
        let done = ServerFrame::Done {
            turn_id: "t".into(),
            seq: 2,
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
            sources: vec!["glass".into()],
        };
        let out = translate.frame(done);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["sources"], json!(["glass"]), "the extension field");
        assert!(translate.end().is_empty());
    }
}
