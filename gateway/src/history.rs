//! `GET /v1/conversations` and `GET /v1/conversations/{id}`: history, answered
//! by every live persister over NATS request-reply (`history.list`,
//! `history.get`) and merged ([`bus::history::HistoryClient`]).
//!
//! Ownership is checked here against the `conversations` KV bucket, the same
//! record that decides who may continue a conversation.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bus::wire::{
    ConversationDetail, ConversationList, ErrorBody, HistoryGetRequest, HistoryListRequest,
    HistoryReply,
};
use serde::Deserialize;

use crate::{AppState, auth::User, error::ApiError};

/// How long the persister may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Query of `GET /v1/conversations/{id}`: kept as text, so a bad value gets
/// the API's JSON error rather than the extractor's plain-text one.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Turns per page, 1 to 200 (default 50).
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// A `next_cursor` from an earlier page: continue with older turns.
    #[serde(default)]
    cursor: Option<String>,
}

impl PageQuery {
    /// The page size (1 to [`bus::history::MAX_TURNS`], default
    /// [`bus::history::DEFAULT_TURNS`]) and the cursor to read before.
    fn parse(self) -> Result<(Option<u32>, Option<String>), ApiError> {
        let max = bus::history::MAX_TURNS;
        let limit = match self.limit {
            None => None,
            Some(text) => match text.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => Some(n),
                _ => {
                    return Err(ApiError::BadRequest {
                        code: "invalid_limit",
                        message: format!("limit must be a number from 1 to {max}"),
                    });
                }
            },
        };
        if let Some(cursor) = &self.cursor
            && bus::history::TurnCursor::parse(cursor).is_none()
        {
            return Err(ApiError::BadRequest {
                code: "invalid_cursor",
                message: "cursor must be a next_cursor this endpoint returned".into(),
            });
        }
        Ok((limit, self.cursor))
    }
}

/// Query of `GET /v1/conversations`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many conversations, 1 to 200 (default 50).
    #[serde(default)]
    #[param(minimum = 1, maximum = 200)]
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
#[utoipa::path(get, path = "/v1/conversations", operation_id = "listConversations", tag = "history", params(ListQuery),
    responses(
        (status = 200, description = "The caller's conversations, newest first", body = ConversationList),
        (status = 400, description = "`invalid_limit`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 503, description = "`unavailable`: no persister answered in time", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let max = bus::history::MAX_CONVERSATIONS;
    let limit = match query {
        Ok(Query(ListQuery { limit })) if limit.is_none_or(|n| (1..=max).contains(&n)) => limit,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                format!("limit must be a number from 1 to {max}"),
            );
        }
    };
    let request = HistoryListRequest {
        user_id: user,
        limit,
    };
    respond(state.history.list(&request, TIMEOUT).await)
}

/// `GET /v1/conversations/{id}?limit=N&cursor=C`: one page of one of the
/// caller's conversations: its newest turns (oldest first), then, with
/// `cursor` = the page's `next_cursor`, older ones while `has_more`.
#[utoipa::path(get, path = "/v1/conversations/{id}", operation_id = "getConversation", tag = "history",
    params(("id" = String, Path, description = "The conversation id"), PageQuery),
    responses(
        (status = 200, description = "One page of the conversation's turns, oldest first", body = ConversationDetail),
        (status = 400, description = "`invalid_query`, `invalid_limit`, `invalid_cursor`, `invalid_conversation_id`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another user's conversation", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    User(user): User,
    Path(conversation_id): Path<String>,
    page: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(page)) = page else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the query string must be limit=N and/or cursor=C, each at most once",
        );
    };
    let (limit, before) = match page.parse() {
        Ok(page) => page,
        Err(refused) => return refused.into_response(),
    };
    if bus::subject::token(&conversation_id).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_conversation_id",
            "conversation_id is not a valid id",
        );
    }
    match state.owners.owner(&conversation_id).await {
        Ok(Some(owner)) if owner == user => {}
        Ok(Some(_)) => {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this conversation belongs to another user",
            );
        }
        Ok(None) => return error(StatusCode::NOT_FOUND, "not_found", "no such conversation"),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "Conversation owner lookup failed."
            );
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
        limit,
        before,
        max_bytes: None,
    };
    respond(state.history.get(&request, TIMEOUT).await)
}
