//! `GET /v1/conversations` and `GET /v1/conversations/{id}`: history, answered
//! by every live persister over NATS request-reply (`history.list`,
//! `history.get`) and merged ([`bus::history::HistoryClient`]).
//!
//! Ownership is checked here against the `conversations` KV bucket, the same
//! record that decides who may continue a conversation.

use std::time::Duration;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bus::wire::{HistoryGetRequest, HistoryListRequest, HistoryReply};
use serde::Deserialize;

use crate::{AppState, auth::User};

/// How long the persister may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Query of `GET /v1/conversations`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<u32>,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    bus::ops::error_response(status, code, message)
}

fn respond<A: serde::Serialize>(reply: anyhow::Result<Option<HistoryReply<A>>>) -> Response {
    match reply {
        Ok(Some(HistoryReply::Ok(answer))) => Json(answer).into_response(),
        Ok(Some(HistoryReply::Err(body))) => {
            let status = match body.error.code.as_str() {
                "not_found" => StatusCode::NOT_FOUND,
                "forbidden" => StatusCode::FORBIDDEN,
                "invalid_request" => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, Json(body)).into_response()
        }
        Ok(None) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "history is unavailable (no persister answered in time); try again",
        ),
        Err(e) => {
            tracing::warn!(error = %e, "History request failed.");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the message bus is unavailable; try again",
            )
        }
    }
}

/// `GET /v1/conversations?limit=N`: the caller's conversations, newest first.
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    Query(query): Query<ListQuery>,
) -> Response {
    let request = HistoryListRequest {
        user_id: user,
        limit: query.limit,
    };
    respond(state.history.list(&request, TIMEOUT).await)
}

/// `GET /v1/conversations/{id}`: one of the caller's conversations with its turns.
pub async fn get(
    State(state): State<AppState>,
    User(user): User,
    Path(conversation_id): Path<String>,
) -> Response {
    if bus::subject::token(&conversation_id).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_conversation_id",
            "conversation_id is not a valid id",
        );
    }
    match state.conversations.get(&conversation_id).await {
        Ok(Some(owner)) if owner == user.as_bytes() => {}
        Ok(Some(_)) => {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this conversation belongs to another user",
            );
        }
        Ok(None) => return error(StatusCode::NOT_FOUND, "not_found", "no such conversation"),
        Err(e) => {
            tracing::warn!(error = %e, "Conversation owner lookup failed.");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the message bus is unavailable; try again",
            );
        }
    }
    let request = HistoryGetRequest {
        user_id: user,
        conversation_id,
        ..Default::default()
    };
    respond(state.history.get(&request, TIMEOUT).await)
}
