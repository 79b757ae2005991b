//! `GET /v1/conversations` and `GET /v1/conversations/{id}`: history, answered
//! by the persister over NATS request-reply (`history.list`, `history.get`).
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
use bus::wire::{
    ConversationDetail, ConversationList, HistoryGetRequest, HistoryListRequest, HistoryReply,
};
use serde::{Deserialize, de::DeserializeOwned};

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

async fn ask<Q: serde::Serialize, A: DeserializeOwned + serde::Serialize>(
    state: &AppState,
    subject: &'static str,
    query: &Q,
) -> Response {
    let body = serde_json::to_vec(query).expect("serializes");
    let reply = tokio::time::timeout(TIMEOUT, state.client.request(subject, body.into())).await;
    let message = match reply {
        Ok(Ok(message)) => message,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, subject, "History request failed.");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "history is unavailable (no persister answered); try again",
            );
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "history did not answer in time; try again",
            );
        }
    };
    match serde_json::from_slice::<HistoryReply<A>>(&message.payload) {
        Ok(HistoryReply::Ok(answer)) => Json(answer).into_response(),
        Ok(HistoryReply::Err(body)) => {
            let status = match body.error.code.as_str() {
                "not_found" => StatusCode::NOT_FOUND,
                "forbidden" => StatusCode::FORBIDDEN,
                "invalid_request" => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, Json(body)).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, subject, "Unreadable history reply.");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
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
    ask::<_, ConversationList>(&state, bus::subject::HISTORY_LIST, &request).await
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
    };
    ask::<_, ConversationDetail>(&state, bus::subject::HISTORY_GET, &request).await
}
