//! The state of one turn while it is generated, and the record it ends as.

use bus::wire::{ChatRequest, FinishReason, ServerFrame, TurnRecord, Usage};
use chrono::{DateTime, Utc};

use crate::upstream;

/// The state of one turn being generated.
pub(crate) struct Turn {
    /// Upstream deltas received, for usage when the provider reports none.
    pub(crate) tokens: u32,
    pub(crate) text: String,
    pub(crate) model: String,
    pub(crate) finish: FinishReason,
    pub(crate) finish_seen: bool,
    pub(crate) usage: Option<Usage>,
    /// A plain message for the client and the record.
    pub(crate) error: Option<String>,
    /// The code of the `error` frame.
    pub(crate) error_code: &'static str,
    pub(crate) first_token_at: Option<DateTime<Utc>>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) last_token: Option<tokio::time::Instant>,
    /// The rule categories the prompt carried (the `done` frame's `sources`).
    pub(crate) sources: Vec<String>,
}

impl Turn {
    pub(crate) fn new(request: &ChatRequest, model: &str) -> Self {
        Self {
            tokens: 0,
            text: String::new(),
            model: request.model.clone().unwrap_or_else(|| model.to_owned()),
            finish: FinishReason::Stop,
            finish_seen: false,
            usage: None,
            error: None,
            error_code: "upstream_error",
            first_token_at: None,
            created_at: request.created_at,
            last_token: None,
            sources: Vec::new(),
        }
    }

    /// Time to first token (upstream hop, and accept to first token) and
    /// inter-token gaps.
    pub(crate) fn record_timing(&mut self, request: &ChatRequest, started: tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        match self.last_token {
            None => {
                let at = Utc::now();
                self.first_token_at = Some(at);
                metrics::histogram!("streamer_upstream_ttft_seconds")
                    .record(started.elapsed().as_secs_f64());
                let queued = (at - request.created_at).to_std().unwrap_or_default();
                metrics::histogram!("streamer_accept_to_first_token_seconds")
                    .record(queued.as_secs_f64());
            }
            Some(previous) => {
                metrics::histogram!("streamer_inter_token_seconds")
                    .record((now - previous).as_secs_f64());
            }
        }
        self.last_token = Some(now);
    }

    pub(crate) fn saw_finish(&self) -> bool {
        self.finish_seen || self.finish != FinishReason::Stop
    }

    /// The provider's detail (its body, our URL) goes to the log only; the
    /// client, the record and the dead letter get a code and a plain message.
    pub(crate) fn fail(&mut self, error: upstream::UpstreamError) {
        tracing::warn!(%error, kind = error.kind(), code = error.code(), "LLM stream failed.");
        self.finish = FinishReason::Error;
        self.error_code = error.code();
        self.error = Some(error.public_message().to_owned());
    }

    pub(crate) fn usage(&self) -> Usage {
        // The provider's figure when it gave one; otherwise what we counted.
        self.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: self.tokens,
        })
    }

    /// Takes the outcome of a turn whose frames reached `done`: the text
    /// since the last reset, the finish reason, usage and error.
    pub(crate) fn rebuild(&mut self, frames: &[ServerFrame]) {
        let mut text = String::new();
        for frame in frames {
            match frame {
                ServerFrame::Token { delta, .. } => {
                    self.tokens += 1;
                    if self.first_token_at.is_none() {
                        self.first_token_at = Some(Utc::now());
                    }
                    text.push_str(delta);
                }
                // What an earlier attempt failed with is not this answer's.
                ServerFrame::Reset { .. } => {
                    text.clear();
                    self.tokens = 0;
                    self.error = None;
                }
                ServerFrame::Error { message, .. } => self.error = Some(message.clone()),
                ServerFrame::Done {
                    finish_reason,
                    usage,
                    sources,
                    ..
                } => {
                    self.sources = sources.clone();
                    self.text = std::mem::take(&mut text);
                    self.finish = *finish_reason;
                    self.usage = Some(*usage);
                    return;
                }
                _ => {}
            }
        }
    }

    pub(crate) fn record(&self, request: &ChatRequest) -> TurnRecord {
        TurnRecord {
            turn_id: request.turn_id.clone(),
            conversation_id: request.conversation_id.clone(),
            user_id: request.user_id.clone(),
            request_id: request.request_id.clone(),
            model: self.model.clone(),
            user_text: request.content.clone(),
            assistant_text: self.text.clone(),
            finish_reason: self.finish,
            usage: self.usage(),
            sources: self.sources.clone(),
            error: self.error.clone(),
            created_at: self.created_at,
            first_token_at: self.first_token_at,
            completed_at: Utc::now(),
        }
    }
}
