//! `POST /v1/scans`: reads the image out of the request, has it checked,
//! and writes the owner record, the image and the job, in that order, so
//! that an SSE subscriber racing the `202` already passes the ownership
//! check.

use async_nats::jetstream;
use axum::{
    Json,
    body::{Body, Bytes},
    extract::{FromRequest as _, Multipart, Query, Request, State, rejection::QueryRejection},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bus::{
    subject,
    wire::{MAX_UPLOAD_BYTES, ScanOwner, ScanRequest},
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::{Refusal, error, inspect, inspect::too_large, refuse, store::put_object, unavailable};
use crate::{AppState, auth::User};

/// Room for the multipart envelope around a maximal image.
const MULTIPART_OVERHEAD: usize = 64 * 1024;
/// The largest request body `POST /v1/scans` reads.
pub const MAX_BODY: usize = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD;

/// Query of `POST /v1/scans`.
#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    /// Language of the explanation: `en` (default) or `ko`.
    #[serde(default)]
    lang: Option<String>,
}

/// Reads the image out of the request: a multipart field `image`, or the
/// whole body when it is sent raw as `image/jpeg|png|webp`.
async fn read_image(request: Request) -> Result<Bytes, Refusal> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let multipart = essence == "multipart/form-data";
    if !multipart && !matches!(essence.as_str(), "image/jpeg" | "image/png" | "image/webp") {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send multipart/form-data with a field named image, or a raw image/jpeg, image/png or image/webp body",
        ));
    }
    let limit = if multipart {
        MAX_BODY
    } else {
        MAX_UPLOAD_BYTES
    };
    // Refuse a declared oversize body before reading a byte of it.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "upload_interrupted",
                "the upload could not be read completely",
            )
        }
    })?;
    if !multipart {
        return Ok(bytes);
    }
    let request = Request::from_parts(parts, Body::from(bytes));
    let mut form = Multipart::from_request(request, &()).await.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "malformed_multipart",
            format!("the multipart body cannot be read: {}", e.body_text()),
        )
    })?;
    loop {
        let field = form.next_field().await.map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "malformed_multipart",
                format!("the multipart body cannot be read: {}", e.body_text()),
            )
        })?;
        let Some(field) = field else {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "missing_image",
                "the multipart body has no field named image",
            ));
        };
        if field.name() == Some("image") {
            let bytes = field.bytes().await.map_err(|e| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_multipart",
                    format!("the image field cannot be read: {}", e.body_text()),
                )
            })?;
            if bytes.len() > MAX_UPLOAD_BYTES {
                return Err(too_large());
            }
            return Ok(bytes);
        }
    }
}

/// `POST /v1/scans[?lang=en|ko]`: stores the image and queues the scan.
pub async fn upload(
    State(state): State<AppState>,
    User(user): User,
    query: Result<Query<UploadQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let lang = match query {
        Ok(Query(UploadQuery { lang: None })) => "en".to_owned(),
        Ok(Query(UploadQuery { lang: Some(l) })) if l == "en" || l == "ko" => l,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_lang",
                "lang must be en or ko",
            );
        }
    };
    let bytes = match read_image(request).await {
        Ok(bytes) => bytes,
        Err(r) => return refuse(r),
    };
    let inspected = match inspect(&bytes) {
        Ok(i) => i,
        Err(r) => return refuse(r),
    };
    let scan_id = uuid::Uuid::now_v7().to_string();
    let created_at = Utc::now();
    let owner = ScanOwner {
        user_id: user.clone(),
        created_at,
    };
    let job = ScanRequest {
        scan_id: scan_id.clone(),
        user_id: user,
        object: scan_id.clone(),
        content_type: inspected.format.mime().into(),
        bytes: bytes.len() as u64,
        width: inspected.width,
        height: inspected.height,
        created_at,
        reprocessed: 0,
        lang,
    };
    if let Err(response) = store(&state, &owner, &job, &bytes).await {
        // Leave nothing half-stored behind a failed request.
        let _ = state.scan_images.delete(&job.object).await;
        let _ = state.scans.purge(&scan_id).await;
        return response;
    }
    metrics::counter!("gateway_scans_accepted_total").increment(1);
    let status_url = format!("/v1/scans/{scan_id}");
    let body = json!({
        "scan_id": scan_id,
        "events_url": format!("{status_url}/events"),
        "status_url": status_url,
    });
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(body),
    )
        .into_response()
}

async fn store(
    state: &AppState,
    owner: &ScanOwner,
    job: &ScanRequest,
    bytes: &Bytes,
) -> Result<(), Response> {
    let owner = serde_json::to_vec(owner).expect("owner serialises");
    state
        .scans
        .put(&job.scan_id, owner.into())
        .await
        .map_err(|e| unavailable("Storing the scan owner", e))?;
    put_object(&state.js, bus::streams::OBJ_SCAN_IMAGES, &job.object, bytes)
        .await
        .map_err(|e| unavailable("Storing the image", format!("{e:#}")))?;
    let subject = subject::scan_req(&job.scan_id).expect("uuid is a token");
    let payload = serde_json::to_vec(job).expect("job serialises");
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(&job.scan_id);
    let ack = state
        .js
        .send_publish(subject, publish)
        .await
        .map_err(|e| unavailable("Publishing the scan job", e))?;
    ack.await
        .map_err(|e| unavailable("Publishing the scan job", e))?;
    Ok(())
}
