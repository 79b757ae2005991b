//! `GET /v1/scans/{id}`: where a scan is, from its latest event, or from
//! the persisters once its events have aged out.

use async_nats::jetstream;
use axum::{
    Json,
    extract::{Path, State},
    response::{IntoResponse, Response},
};
use bus::{
    subject,
    wire::{ErrorBody, ErrorDetail, ScanEvent, ScanEventData, ScanRecord, ScanStage, ScanStatus},
};

use super::{owned, unavailable};
use crate::{AppState, auth::User};

/// `GET /v1/scans/{id}`'s body: where the scan is.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ScanStatusBody {
    /// The scan.
    scan_id: String,
    /// `queued`, `running`, `completed`, `failed`.
    status: ScanStatus,
    /// The stage of the latest event, `null` while queued.
    stage: Option<ScanStage>,
    /// 0 to 100.
    percent: u8,
    /// The finished scan, once it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<ScanRecord>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
}

/// `GET /v1/scans/{id}`: the status from the latest event.
#[utoipa::path(get, path = "/v1/scans/{id}", operation_id = "getScan", tag = "scans",
    params(("id" = String, Path, description = "The scan id `POST /v1/scans` returned")),
    responses(
        (status = 200, description = "The scan's status", body = ScanStatusBody),
        (status = 400, description = "`invalid_scan_id`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another user's scan", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub async fn status(
    State(state): State<AppState>,
    User(user): User,
    Path(scan_id): Path<String>,
) -> Response {
    if let Err(response) = owned(&state, &user, &scan_id).await {
        return response;
    }
    let subject = subject::scan_evt(&scan_id).expect("checked token");
    let stream = match state.js.get_stream(bus::streams::SCAN_EVT).await {
        Ok(s) => s,
        Err(e) => return unavailable("Reading scan events", e),
    };
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Some(m),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => None,
        Err(e) => return unavailable("Reading scan events", e),
    };
    let event = last.and_then(|m| serde_json::from_slice::<ScanEvent>(&m.payload).ok());
    if event.is_none() {
        // No events: queued, or finished so long ago that its events aged
        // out of SCAN_EVT while the record lives on in the persister.
        if let Ok(Some(record)) = state.history.scan(&user, &scan_id).await {
            let event = ScanEvent {
                id: 0,
                data: ScanEventData::Result(Box::new(record)),
            };
            return Json(status_of(&scan_id, Some(&event))).into_response();
        }
    }
    Json(status_of(&scan_id, event.as_ref())).into_response()
}

/// The status document for a scan whose latest event is `event`.
fn status_of(scan_id: &str, event: Option<&ScanEvent>) -> ScanStatusBody {
    let (status, stage, percent, result) = match event.map(|e| &e.data) {
        None => (ScanStatus::Queued, None, 0, None),
        Some(ScanEventData::Progress(p)) => (ScanStatus::Running, Some(p.stage), p.percent, None),
        // Tokens are written during the answer stage, which starts at 80 %.
        Some(ScanEventData::Token { .. }) => {
            (ScanStatus::Running, Some(ScanStage::Answer), 80, None)
        }
        Some(ScanEventData::Result(r)) => {
            (r.status, Some(ScanStage::Done), 100, Some((**r).clone()))
        }
        Some(ScanEventData::Error(e)) => (ScanStatus::Failed, e.stage, 100, None),
    };
    let error = match event.map(|e| &e.data) {
        Some(ScanEventData::Error(e)) => Some(ErrorDetail {
            code: e.code.clone(),
            message: e.message.clone(),
        }),
        _ => None,
    };
    ScanStatusBody {
        scan_id: scan_id.to_owned(),
        status,
        stage,
        percent,
        result,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_latest_event() {
        let status_of = |id, event| serde_json::to_value(status_of(id, event)).unwrap();
        assert_eq!(status_of("s", None)["status"], "queued");
        let token = ScanEvent {
            id: 9,
            data: ScanEventData::Token { delta: "x".into() },
        };
        let s = status_of("s", Some(&token));
        assert_eq!(
            (s["status"].as_str(), s["stage"].as_str()),
            (Some("running"), Some("answer"))
        );
    }
}
