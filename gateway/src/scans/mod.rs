//! Scans at the edge: `POST /v1/scans` (upload), `GET /v1/scans/{id}`
//! (status) and `GET /v1/scans` (the caller's past scans, from the
//! persisters); the SSE stream of a scan's events is [`crate::scan_events`].
//!
//! What an upload must be is `inspect`'s, checked as its bytes stream past;
//! taking the image out of the request into the object store, and the order
//! of the writes, is `upload`'s; the object-store writer, which keeps an
//! image invisible until it is committed and takes back a refused one, is
//! `store`'s; `status` and `list` read. This module keeps what they share:
//! who may see a scan and how a refusal is answered.

mod inspect;
pub(crate) mod list;
pub(crate) mod status;
mod store;
pub(crate) mod upload;

use axum::{http::StatusCode, response::Response};
use bus::{subject, wire::ScanOwner};

pub use inspect::{Format, Inspected, Refusal, inspect};
pub use list::{ListQuery, list};
pub use status::status;
pub use upload::{MAX_BODY, UploadQuery, upload};

use crate::AppState;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    bus::ops::error_response(status, code, message)
}

pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "{what} failed.");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the message bus is unavailable; try again",
    )
}

pub(crate) fn refuse(r: Refusal) -> Response {
    error(r.status, r.code, r.message)
}

/// Checks the id and that `user` owns the scan.
pub(crate) async fn owned(
    state: &AppState,
    user: &str,
    scan_id: &str,
) -> Result<ScanOwner, Response> {
    if subject::token(scan_id).is_err() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_scan_id",
            "scan_id is not a valid id",
        ));
    }
    let entry = state
        .scans
        .get(scan_id)
        .await
        .map_err(|e| unavailable("Scan owner lookup", e))?;
    let Some(entry) = entry else {
        return Err(error(StatusCode::NOT_FOUND, "not_found", "no such scan"));
    };
    let owner: ScanOwner =
        serde_json::from_slice(&entry).map_err(|e| unavailable("Decoding the scan owner", e))?;
    if owner.user_id != user {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this scan belongs to another user",
        ));
    }
    Ok(owner)
}
