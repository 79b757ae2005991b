//! The client for OpenAI-compatible streaming chat completions.
//!
//! It owns retries before the first token (429/5xx/network, exponential
//! backoff with jitter, `Retry-After`), timeouts, and the parsing of real
//! providers' stream quirks: keep-alive comments, role-only first chunks,
//! `content: null`, chunks with empty `choices`, the usage-only chunk, CRLF,
//! `data:` without a space, UTF-8 split across reads (eventsource-stream
//! buffers those), an error object mid-stream, and a stream that ends
//! without `[DONE]`.

use std::{pin::Pin, time::Duration};

use bus::wire::{ChatMessage, FinishReason, Usage};
use eventsource_stream::Eventsource as _;
use futures::{Stream, StreamExt as _};
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use std::borrow::Cow;

/// One thing the provider told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Text to append.
    Delta(String),
    /// The provider's finish reason.
    Finish(FinishReason),
    /// The provider's usage figure.
    Usage(Usage),
    /// The model name the provider reports.
    Model(String),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect, or the connection broke.
    #[error("network error talking to the LLM provider: {0}")]
    Network(String),
    /// No bytes for longer than the read timeout.
    #[error("the LLM provider sent nothing for {0:?}")]
    Timeout(Duration),
    /// An HTTP error status.
    #[error("the LLM provider answered HTTP {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
        /// Seconds to wait, from `Retry-After`.
        retry_after: Option<u64>,
    },
    /// An error object inside the stream.
    #[error("the LLM provider reported an error mid-stream: {0}")]
    Provider(String),
    /// Something that is not the OpenAI wire format.
    #[error("the LLM provider sent an unreadable chunk: {0}")]
    Protocol(String),
    /// The stream ended without `[DONE]` or a finish reason.
    #[error("the LLM provider closed the stream before it finished")]
    Truncated,
}

impl UpstreamError {
    /// A stable short code for clients, records and metrics:
    /// `upstream_unavailable` (unreachable, 5xx), `upstream_rate_limited`
    /// (429), `upstream_timeout` (silence past the read timeout, 408, 504),
    /// `upstream_rejected` (another 4xx: a bad key, a bad model) or
    /// `upstream_interrupted` (the stream broke off, carried an error
    /// object, or was unreadable).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Network(_) => "upstream_unavailable",
            Self::Timeout(_) => "upstream_timeout",
            Self::Status { status, .. } => status_code(*status),
            Self::Provider(_) | Self::Protocol(_) | Self::Truncated => "upstream_interrupted",
        }
    }

    /// What a client may be told: a plain sentence per [`Self::code`],
    /// never the provider's URL or body (those can carry keys, account
    /// details and internal hosts; they go to the logs, with `Display`).
    pub fn public_message(&self) -> &'static str {
        match self.code() {
            "upstream_rate_limited" => "the language model provider is busy; try again shortly",
            "upstream_timeout" => "the language model provider did not answer in time",
            "upstream_rejected" => "the language model provider refused the request",
            "upstream_interrupted" => "the language model provider's answer broke off",
            _ => "the language model provider is unavailable",
        }
    }

    /// A low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Network(_) => "network",
            Self::Timeout(_) => "timeout",
            Self::Status { status: 429, .. } => "rate_limited",
            Self::Status { .. } => "status",
            Self::Provider(_) => "provider",
            Self::Protocol(_) => "protocol",
            Self::Truncated => "truncated",
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Self::Network(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// The [`UpstreamError::code`] of an HTTP error status from a provider
/// (also used for the vision provider).
pub fn status_code(status: u16) -> &'static str {
    match status {
        429 => "upstream_rate_limited",
        408 | 504 => "upstream_timeout",
        500.. => "upstream_unavailable",
        _ => "upstream_rejected",
    }
}

/// A stream of provider events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, UpstreamError>> + Send>>;

/// What to ask for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The whole prompt.
    pub messages: Vec<ChatMessage>,
    /// Model override.
    pub model: Option<String>,
    /// Token cap.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: Option<f32>,
}

/// The configured OpenAI-compatible providers: the primary, then fallbacks.
#[derive(Debug, Clone)]
pub struct Upstream {
    http: reqwest::Client,
    providers: Vec<crate::config::Provider>,
    read_timeout: Duration,
    max_retries: u32,
}

impl Upstream {
    /// Builds the client.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn build(config: &crate::Config) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout())
            .read_timeout(config.read_timeout())
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            providers: config.providers()?,
            read_timeout: config.read_timeout(),
            max_retries: config.max_retries,
        })
    }

    /// The primary provider's model name.
    pub fn model(&self) -> &str {
        &self.providers[0].model
    }

    /// Opens a streaming completion, retrying failures that happen before the
    /// stream starts. Dropping the returned stream closes the HTTP request.
    ///
    /// # Errors
    /// The last error once retries are spent, or at once for a non-retryable one.
    pub async fn stream(&self, request: &Request) -> Result<EventStream, UpstreamError> {
        let mut last = None;
        for (index, provider) in self.providers.iter().enumerate() {
            // A model override names the primary's model; a fallback uses its own.
            let model = match (index, &request.model) {
                (0, Some(model)) => model.as_str(),
                _ => provider.model.as_str(),
            };
            match self.stream_from(provider, model, request).await {
                Ok(stream) => return Ok(stream),
                Err(error) => {
                    if index + 1 < self.providers.len() {
                        metrics::counter!("streamer_upstream_fallbacks_total").increment(1);
                        tracing::warn!(%error, provider = %bus::connect::redact(&provider.base_url), "LLM provider failed; trying the next one.");
                    }
                    last = Some(error);
                }
            }
        }
        Err(last.expect("at least one provider"))
    }

    async fn stream_from(
        &self,
        provider: &crate::config::Provider,
        model: &str,
        request: &Request,
    ) -> Result<EventStream, UpstreamError> {
        let mut attempt = 0;
        loop {
            match self.open(provider, model, request).await {
                Ok(stream) => return Ok(stream),
                Err(error) if error.retryable() && attempt < self.max_retries => {
                    count(&error);
                    let delay = backoff(attempt, &error);
                    tracing::warn!(%error, attempt, ?delay, "LLM request failed; retrying.");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(error) => {
                    count(&error);
                    return Err(error);
                }
            }
        }
    }

    async fn open(
        &self,
        provider: &crate::config::Provider,
        model: &str,
        request: &Request,
    ) -> Result<EventStream, UpstreamError> {
        // Every attempt, retries and fallbacks included: the denominator of
        // the error rate, whose numerator `count` adds per failed attempt.
        metrics::counter!("streamer_upstream_requests_total").increment(1);
        let mut body = json!({
            "model": model,
            "messages": request.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": request.max_tokens,
        });
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        let mut builder = self
            .http
            .post(format!("{}/chat/completions", provider.base_url))
            .header("accept", "text/event-stream")
            .json(&body);
        if let Some(key) = &provider.api_key {
            builder = builder.bearer_auth(key.expose_secret());
        }
        let response = builder
            .send()
            .await
            .map_err(|e| network(&e, self.read_timeout))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let text = response.text().await.unwrap_or_default();
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
                retry_after,
            });
        }
        let read_timeout = self.read_timeout;
        let events = response.bytes_stream().eventsource();
        let stream =
            futures::stream::unfold((events, false), move |(mut events, finished)| async move {
                if finished {
                    return None;
                }
                loop {
                    match events.next().await {
                        None => return Some((Err(UpstreamError::Truncated), (events, true))),
                        Some(Err(e)) => {
                            let error = match e {
                                eventsource_stream::EventStreamError::Transport(t) => {
                                    network(&t, read_timeout)
                                }
                                other => UpstreamError::Protocol(other.to_string()),
                            };
                            return Some((Err(error), (events, true)));
                        }
                        Some(Ok(event)) => {
                            let data = event.data.trim();
                            if data.is_empty() {
                                continue;
                            }
                            if data == "[DONE]" {
                                return None;
                            }
                            match parse_chunk(data) {
                                Ok(parsed) if parsed.is_empty() => continue,
                                Ok(parsed) => {
                                    return Some((Ok(parsed), (events, false)));
                                }
                                Err(error) => return Some((Err(error), (events, true))),
                            }
                        }
                    }
                }
            })
            .flat_map(|item| match item {
                Ok(events) => futures::stream::iter(events.into_iter().map(Ok).collect::<Vec<_>>()),
                Err(e) => futures::stream::iter(vec![Err(e)]),
            });
        Ok(Box::pin(stream))
    }
}

/// Counts a failed request. The detail (status, body, URL) is in the
/// warning logged beside it; the labels are the few stable values.
fn count(error: &UpstreamError) {
    metrics::counter!("streamer_upstream_errors_total", "kind" => error.kind(), "code" => error.code())
        .increment(1);
}

fn network(error: &reqwest::Error, read_timeout: Duration) -> UpstreamError {
    if error.is_timeout() {
        UpstreamError::Timeout(read_timeout)
    } else {
        // The chain carries the useful part (connection refused, reset...).
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        UpstreamError::Network(text)
    }
}

/// Exponential backoff with full jitter, at least `Retry-After` when given.
fn backoff(attempt: u32, error: &UpstreamError) -> Duration {
    if let UpstreamError::Status {
        retry_after: Some(seconds),
        ..
    } = error
    {
        return Duration::from_secs((*seconds).min(60));
    }
    bus::backoff::delay(Duration::from_millis(200), attempt, Duration::from_secs(5))
}

/// One streamed chunk, read into borrowed fields: this runs for every token,
/// and a `Value` tree costs an allocation per key.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(default)]
    error: Option<Value>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    /// Kept loose: providers add nested details, and a missing figure is 0.
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

/// Parses one `data:` payload into the events it carries (possibly none).
///
/// # Errors
/// [`UpstreamError::Provider`] for an error object, [`UpstreamError::Protocol`]
/// for a payload that is not a chunk.
pub fn parse_chunk(data: &str) -> Result<Vec<Event>, UpstreamError> {
    let chunk: Chunk<'_> = serde_json::from_str(data).map_err(|e| {
        UpstreamError::Protocol(format!(
            "{e}: {}",
            data.chars().take(120).collect::<String>()
        ))
    })?;
    if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| error.to_string());
        return Err(UpstreamError::Provider(message));
    }
    let mut events = Vec::new();
    if let Some(model) = chunk.model {
        events.push(Event::Model(model.into_owned()));
    }
    if let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) {
        if let Some(text) = choice.delta.and_then(|d| d.content)
            && !text.is_empty()
        {
            events.push(Event::Delta(text.into_owned()));
        }
        if let Some(reason) = choice.finish_reason {
            events.push(Event::Finish(match reason.as_ref() {
                "length" => FinishReason::Length,
                _ => FinishReason::Stop,
            }));
        }
    }
    if let Some(usage) = chunk.usage.filter(|u| !u.is_null()) {
        let get = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        events.push(Event::Usage(Usage {
            prompt_tokens: get("prompt_tokens"),
            completion_tokens: get("completion_tokens"),
        }));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_only_and_null_content_chunks_carry_no_text() {
        let events = parse_chunk(r#"{"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}]}"#).unwrap();
        assert_eq!(events, vec![Event::Model("m".into())]);
    }

    #[test]
    fn usage_only_chunk_with_empty_choices_is_read() {
        let events = parse_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
        )
        .unwrap();
        assert_eq!(
            events,
            vec![Event::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })]
        );
    }

    #[test]
    fn content_and_finish_reason_are_read() {
        let events =
            parse_chunk(r#"{"choices":[{"delta":{"content":"hé"},"finish_reason":"length"}]}"#)
                .unwrap();
        assert_eq!(
            events,
            vec![
                Event::Delta("hé".into()),
                Event::Finish(FinishReason::Length)
            ]
        );
    }

    #[test]
    fn error_object_mid_stream_is_an_error() {
        let error =
            parse_chunk(r#"{"error":{"message":"overloaded","type":"server_error"}}"#).unwrap_err();
        assert!(matches!(error, UpstreamError::Provider(m) if m == "overloaded"));
        assert!(matches!(
            parse_chunk("not json"),
            Err(UpstreamError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn public_messages_carry_neither_urls_nor_provider_bodies() {
        let secret = "sk-live-7f3a9c1e2b4d8a6f";
        let refused = reqwest::get(format!("http://127.0.0.1:1/v1/{secret}"))
            .await
            .unwrap_err();
        let body = |status| UpstreamError::Status {
            status,
            body: format!("{{\"error\":\"bad key {secret} at https://llm.internal/v1\"}}"),
            retry_after: None,
        };
        let cases = [
            (
                network(&refused, Duration::from_secs(1)),
                "upstream_unavailable",
            ),
            (
                UpstreamError::Timeout(Duration::from_secs(60)),
                "upstream_timeout",
            ),
            (body(429), "upstream_rate_limited"),
            (body(503), "upstream_unavailable"),
            (body(504), "upstream_timeout"),
            (body(401), "upstream_rejected"),
            (body(400), "upstream_rejected"),
            (
                UpstreamError::Provider(format!("quota of {secret}")),
                "upstream_interrupted",
            ),
            (
                UpstreamError::Protocol(format!("bad chunk {secret}")),
                "upstream_interrupted",
            ),
            (UpstreamError::Truncated, "upstream_interrupted"),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
            let public = error.public_message();
            assert!(!public.is_empty());
            for leak in [secret, "127.0.0.1", "llm.internal", "http"] {
                assert!(!public.contains(leak), "{code}: {public}");
            }
        }
        // The detail stays available for the logs.
        assert!(body(400).to_string().contains(secret));
    }

    #[test]
    fn backoff_honours_retry_after_and_grows() {
        let limited = UpstreamError::Status {
            status: 429,
            body: String::new(),
            retry_after: Some(2),
        };
        assert_eq!(backoff(0, &limited), Duration::from_secs(2));
        let first = backoff(0, &UpstreamError::Truncated);
        assert!(first <= Duration::from_millis(200));
        assert!(
            backoff(5, &UpstreamError::Truncated)
                >= Duration::from_millis(3_200).min(Duration::from_millis(2_500))
        );
    }
}
