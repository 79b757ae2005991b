//! `GET /v1/scans`: the caller's finished scans, which the persisters hold.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bus::{
    history::MAX_SCANS,
    wire::{ErrorBody, ScanRecord},
};
use serde::Deserialize;

use super::error;
use crate::{AppState, auth::User};

/// Query of `GET /v1/scans`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many, 1 to 100 (default 20).
    #[serde(default)]
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// `GET /v1/scans`'s body.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ScanListBody {
    /// The caller's finished scans, newest first.
    scans: Vec<ScanRecord>,
}

/// `GET /v1/scans?limit=N` (1 to 100, default 20): the caller's finished
/// scans, newest first, from the persisters.
#[utoipa::path(get, path = "/v1/scans", operation_id = "listScans", tag = "scans", params(ListQuery),
    responses(
        (status = 200, description = "The caller's finished scans, newest first", body = ScanListBody),
        (status = 400, description = "`invalid_limit`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let limit = match query {
        Ok(Query(ListQuery { limit: None })) => 20,
        Ok(Query(ListQuery { limit: Some(n) })) if (1..=MAX_SCANS).contains(&n) => n,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                format!("limit must be a number from 1 to {MAX_SCANS}"),
            );
        }
    };
    match state.history.scans(&user, limit).await {
        Ok(scans) => Json(ScanListBody { scans }).into_response(),
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
