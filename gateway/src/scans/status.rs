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
    wire::{ScanEvent, ScanEventData, ScanStage, ScanStatus},
};
use serde_json::{Value, json};

use super::{owned, unavailable};
use crate::{AppState, auth::User};

/// `GET /v1/scans/{id}`: the status from the latest event.
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
fn status_of(scan_id: &str, event: Option<&ScanEvent>) -> Value {
    let (status, stage, percent, result) = match event.map(|e| &e.data) {
        None => (ScanStatus::Queued, None, 0, None),
        Some(ScanEventData::Progress(p)) => (ScanStatus::Running, Some(p.stage), p.percent, None),
        // Tokens are written during the answer stage, which starts at 80 %.
        Some(ScanEventData::Token { .. }) => {
            (ScanStatus::Running, Some(ScanStage::Answer), 80, None)
        }
        Some(ScanEventData::Result(r)) => (
            r.status,
            Some(ScanStage::Done),
            100,
            Some(serde_json::to_value(r).expect("record serialises")),
        ),
        Some(ScanEventData::Error(e)) => (ScanStatus::Failed, e.stage, 100, None),
    };
    let mut body = json!({
        "scan_id": scan_id,
        "status": status,
        "stage": stage,
        "percent": percent,
    });
    if let Some(result) = result {
        body["result"] = result;
    }
    if let Some(ScanEventData::Error(e)) = event.map(|e| &e.data) {
        body["error"] = json!({"code": e.code, "message": e.message});
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_latest_event() {
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
