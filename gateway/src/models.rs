//! The models a client may ask for and the most tokens it may ask for:
//! `GET /v1/models` (OpenAI's list format) and the check that both the
//! OpenAI-compatible endpoint and the WebSocket `send` run before a turn is
//! accepted.
//!
//! The operator sets both in the same variables the streamer reads
//! (`LLM_MODELS`/`LLM_MODEL`, `LLM_MAX_TOKENS`), so one env file configures
//! the two services alike. The gateway refuses; the streamer only ever sees
//! turns that passed.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bus::wire::{ErrorBody, ServerFrame};
use serde_json::json;

use crate::{AppState, Config, auth::User};

/// What a client may ask for.
#[derive(Debug, Clone)]
pub struct Models {
    /// Allowed model ids, in the operator's order.
    ids: Vec<String>,
    /// Largest `max_tokens` a request may set.
    max_tokens: u32,
    /// `created` of every listed model: when this gateway started, since the
    /// operator's list carries no dates and clients only need an integer.
    created: i64,
}

/// Why a request's model or token cap is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The model is not in the operator's list.
    #[error(
        "the model {model:?} does not exist or is not allowed here; GET /v1/models lists the allowed ones"
    )]
    NotFound {
        /// What the client asked for.
        model: String,
    },
    /// `max_tokens` above the operator's cap.
    #[error("max_tokens {asked} is above this server's cap of {cap}")]
    TooManyTokens {
        /// What the client asked for.
        asked: u32,
        /// `LLM_MAX_TOKENS`.
        cap: u32,
    },
    /// `max_tokens` of zero: no answer could be written.
    #[error("max_tokens must be at least 1")]
    ZeroTokens,
}

impl ModelError {
    /// The error code, the same on HTTP and the WebSocket.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "model_not_found",
            Self::TooManyTokens { .. } => "max_tokens_too_large",
            Self::ZeroTokens => "invalid_max_tokens",
        }
    }

    /// The request field at fault, as OpenAI's `param` names it.
    fn param(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "model",
            Self::TooManyTokens { .. } | Self::ZeroTokens => "max_tokens",
        }
    }

    /// The WebSocket `error` frame.
    pub fn frame(&self) -> ServerFrame {
        ServerFrame::error(None, self.code(), self.to_string())
    }

    /// The error in OpenAI's shape: the contract's `code` and `message`,
    /// plus `type` and `param`, which OpenAI's client libraries read.
    fn response(&self, status: StatusCode) -> Response {
        let body = json!({"error": {
            "code": self.code(),
            "message": self.to_string(),
            "type": "invalid_request_error",
            "param": self.param(),
        }});
        (status, Json(body)).into_response()
    }
}

impl IntoResponse for ModelError {
    /// 400: the request asked for something this server does not allow.
    fn into_response(self) -> Response {
        self.response(StatusCode::BAD_REQUEST)
    }
}

impl Models {
    /// `LLM_MODELS` (blank entries ignored), else `LLM_MODEL` alone.
    pub fn from_config(config: &Config) -> Self {
        let mut ids: Vec<String> = Vec::new();
        for id in config.llm_models.iter().map(|m| m.trim()) {
            if !id.is_empty() && !ids.iter().any(|known| known == id) {
                ids.push(id.to_owned());
            }
        }
        if ids.is_empty() {
            ids.push(config.llm_model.clone());
        }
        Self {
            ids,
            max_tokens: config.llm_max_tokens,
            created: chrono::Utc::now().timestamp(),
        }
    }

    /// Checks what a turn asks for. No model means the streamer's default
    /// (`LLM_MODEL`), no `max_tokens` the streamer's default cap.
    ///
    /// # Errors
    /// [`ModelError`] naming the field at fault.
    pub fn check(&self, model: Option<&str>, max_tokens: Option<u32>) -> Result<(), ModelError> {
        if let Some(model) = model
            && !self.ids.iter().any(|id| id == model)
        {
            return Err(ModelError::NotFound {
                model: model.to_owned(),
            });
        }
        match max_tokens {
            Some(0) => Err(ModelError::ZeroTokens),
            Some(asked) if asked > self.max_tokens => Err(ModelError::TooManyTokens {
                asked,
                cap: self.max_tokens,
            }),
            _ => Ok(()),
        }
    }

    fn entry(&self, id: &str) -> Model {
        Model {
            id: id.to_owned(),
            object: "model",
            created: self.created,
            owned_by: "system",
        }
    }
}

/// One model, in OpenAI's format.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Model {
    /// The id to put in a request's `model`.
    id: String,
    /// Always `model`.
    object: &'static str,
    /// Unix seconds (when this gateway started).
    created: i64,
    /// Always `system`.
    owned_by: &'static str,
}

/// `GET /v1/models`'s body, in OpenAI's list format.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    object: &'static str,
    /// The allowed models, in the operator's order.
    data: Vec<Model>,
}

/// `GET /v1/models`: the allowed models, in OpenAI's list format.
#[utoipa::path(get, path = "/v1/models", operation_id = "listModels", tag = "chat",
    responses(
        (status = 200, description = "The models a request may name", body = ModelList),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
    ))]
pub async fn list(State(state): State<AppState>, _user: User) -> Json<ModelList> {
    let models = &state.models;
    Json(ModelList {
        object: "list",
        data: models.ids.iter().map(|id| models.entry(id)).collect(),
    })
}

/// `GET /v1/models/{id}`: one allowed model, or 404 `model_not_found`.
#[utoipa::path(get, path = "/v1/models/{id}", operation_id = "getModel", tag = "chat",
    params(("id" = String, Path, description = "A model id")),
    responses(
        (status = 200, description = "The model", body = Model),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 404, description = "`model_not_found`, in OpenAI's error shape (with `type` and `param`)", body = ErrorBody),
    ))]
pub async fn get(State(state): State<AppState>, _user: User, Path(id): Path<String>) -> Response {
    match state.models.check(Some(&id), None) {
        Ok(()) => Json(state.models.entry(&id)).into_response(),
        Err(error) => error.response(StatusCode::NOT_FOUND),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn models(args: &[&str]) -> Models {
        let mut all = vec!["gateway"];
        all.extend_from_slice(args);
        Models::from_config(&Config::parse_from(all))
    }

    #[test]
    fn the_list_is_llm_models_or_else_llm_model() {
        assert_eq!(models(&[]).ids, ["smollm2-135m-instruct"]);
        assert_eq!(models(&["--llm-model", "m1"]).ids, ["m1"]);
        assert_eq!(
            models(&["--llm-model", "m1", "--llm-models", " a,,b ,a"]).ids,
            ["a", "b"]
        );
        assert_eq!(
            models(&["--llm-models", " , "]).ids,
            ["smollm2-135m-instruct"]
        );
    }

    #[test]
    fn unknown_models_and_token_counts_outside_1_to_the_cap_are_refused() {
        let m = models(&["--llm-models", "a,b", "--llm-max-tokens", "100"]);
        assert_eq!(m.check(None, None), Ok(()));
        assert_eq!(m.check(Some("b"), Some(100)), Ok(()));
        assert_eq!(
            m.check(Some("c"), None).unwrap_err().code(),
            "model_not_found"
        );
        assert_eq!(
            m.check(None, Some(101)).unwrap_err().code(),
            "max_tokens_too_large"
        );
        assert!(
            m.check(None, Some(101))
                .unwrap_err()
                .to_string()
                .contains("100")
        );
        assert_eq!(
            m.check(None, Some(0)).unwrap_err().code(),
            "invalid_max_tokens"
        );
    }
}
