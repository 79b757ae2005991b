//! `GET /v1/scans`: the caller's finished scans, which the persisters hold.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;

use super::error;
use crate::{AppState, auth::User};

/// Query of `GET /v1/scans`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /v1/scans?limit=N` (default 20, at most 100): the caller's finished
/// scans, newest first, from the persisters.
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let limit = match query {
        Ok(Query(ListQuery { limit: None })) => 20,
        Ok(Query(ListQuery { limit: Some(n) })) if n >= 1 => n,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                "limit must be a positive integer",
            );
        }
    };
    match state.history.scans(&user, limit).await {
        Ok(scans) => Json(json!({ "scans": scans })).into_response(),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "Listing scans failed.");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "scan history is unavailable (no persister answered in time); try again",
            )
        }
    }
}
