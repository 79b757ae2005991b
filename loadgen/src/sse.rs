//! The OpenAI streaming client (`POST /v1/chat/completions` with `stream:
//! true`, answered with SSE) that three of the measured paths share: the
//! stand-in upstream directly, the gateway's OpenAI endpoint and the LiteLLM
//! proxy. It owns reading the chunks; timing and verifying the answer is
//! [`load::Check`]'s.

use std::time::Instant;

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;

use crate::{
    load::{Check, LoadSpec},
    stats::TurnObservation,
};

/// One OpenAI-compatible endpoint and how a client of it authenticates.
#[derive(Clone)]
pub struct SseClient {
    /// The pool this client's connection lives in.
    pub http: reqwest::Client,
    /// The chat completions URL.
    pub url: String,
    /// The `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// The `model` to ask for (`None`: leave it out, the server's default).
    pub model: Option<String>,
}

/// What one `data:` line of an OpenAI stream means to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkEvent {
    /// `[DONE]`: the stream is complete.
    Done,
    /// Answer text (never empty).
    Content(String),
    /// A chunk without text: the role, the finish reason, usage.
    Nothing,
    /// An error object in place of a chunk (a provider or proxy failed mid-stream).
    Error(String),
}

/// The parts of a stream chunk the client reads.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// Reads one event's `data`.
///
/// # Errors
/// When the data is neither `[DONE]` nor a JSON chunk.
pub fn parse_event(data: &str) -> Result<ChunkEvent, String> {
    if data.trim() == "[DONE]" {
        return Ok(ChunkEvent::Done);
    }
    let chunk: Chunk = serde_json::from_str(data).map_err(|e| format!("unreadable chunk: {e}"))?;
    if let Some(error) = chunk.error {
        let code = error
            .get("code")
            .and_then(|c| {
                c.as_str()
                    .map(str::to_owned)
                    .or_else(|| Some(c.to_string()))
            })
            .filter(|c| c != "null");
        let message = error
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("no message");
        let message: String = message.chars().take(120).collect();
        return Ok(ChunkEvent::Error(match code {
            Some(code) => format!("error chunk {code}: {message}"),
            None => format!("error chunk: {message}"),
        }));
    }
    Ok(chunk
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.delta.content)
        .filter(|c| !c.is_empty())
        .map_or(ChunkEvent::Nothing, ChunkEvent::Content))
}

/// One streamed turn: each text chunk counts as the next `seq` (so the
/// checks are on the text: every script token once, in order).
pub async fn turn(client: &SseClient, spec: &LoadSpec, epoch: Instant) -> TurnObservation {
    let mut body = json!({
        "stream": true,
        "messages": [{"role": "user", "content": "Where does a glass bottle go?"}],
    });
    if let Some(model) = &client.model {
        body["model"] = json!(model);
    }
    let mut check = Check::new(&spec.expected, epoch);
    let run = async {
        let mut request = client.http.post(&client.url).json(&body);
        if let Some(authorization) = &client.authorization {
            request = request.header("authorization", authorization);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let text: String = text.chars().take(120).collect();
            return Err(format!("HTTP {status}: {text}"));
        }
        let mut events = response.bytes_stream().eventsource();
        let mut seq = 0;
        while let Some(event) = events.next().await {
            let at = Instant::now();
            let event = event.map_err(|e| format!("stream error: {e}"))?;
            match parse_event(&event.data)? {
                ChunkEvent::Done => return Ok(()),
                ChunkEvent::Content(text) => {
                    seq += 1;
                    check.token(at, seq, &text);
                }
                ChunkEvent::Nothing => {}
                ChunkEvent::Error(why) => return Err(why),
            }
        }
        Err("stream ended without [DONE]".to_owned())
    };
    match tokio::time::timeout(spec.turn_timeout, run).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => check.problem(why),
        Err(_) => check.problem("turn timed out".into()),
    }
    check.finish(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_the_three_servers_read_the_same() {
        // The stand-in and the gateway open with the role, LiteLLM with a null content.
        let role = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(parse_event(role), Ok(ChunkEvent::Nothing));
        let null = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#;
        assert_eq!(parse_event(null), Ok(ChunkEvent::Nothing));
        let text = r#"{"choices":[{"index":0,"delta":{"content":"w1 "},"finish_reason":null}],"model":"bench"}"#;
        assert_eq!(parse_event(text), Ok(ChunkEvent::Content("w1 ".into())));
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(parse_event(finish), Ok(ChunkEvent::Nothing));
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#;
        assert_eq!(parse_event(usage), Ok(ChunkEvent::Nothing));
        assert_eq!(parse_event("[DONE]"), Ok(ChunkEvent::Done));
    }

    #[test]
    fn error_chunks_and_garbage_are_failures() {
        let gateway = r#"{"error":{"code":"answer_restarted","message":"started over","type":"server_error"}}"#;
        assert_eq!(
            parse_event(gateway),
            Ok(ChunkEvent::Error(
                "error chunk answer_restarted: started over".into()
            ))
        );
        let litellm = r#"{"error":{"message":"litellm.APIConnectionError","type":null,"param":null,"code":"500"}}"#;
        assert_eq!(
            parse_event(litellm),
            Ok(ChunkEvent::Error(
                "error chunk 500: litellm.APIConnectionError".into()
            ))
        );
        let numeric = r#"{"error":{"message":"m","code":429}}"#;
        assert_eq!(
            parse_event(numeric),
            Ok(ChunkEvent::Error("error chunk 429: m".into()))
        );
        assert!(parse_event("not json").is_err());
    }
}
