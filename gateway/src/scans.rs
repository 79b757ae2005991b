//! Scans at the edge: `POST /v1/scans` (upload), `GET /v1/scans/{id}`
//! (status) and `GET /v1/scans` (the caller's past scans, from the
//! persisters); the SSE stream of a scan's events is [`crate::scan_events`].
//!
//! An upload is checked completely before anything is stored: size, magic
//! bytes, the decoded header's dimensions (so a decompression bomb is refused
//! from its header) and the format's end marker (so a truncated file is
//! refused too). Only then are the owner record, the image and the job
//! written, in that order, so that an SSE subscriber racing the `202`
//! already passes the ownership check.

use std::io::Cursor;

use async_nats::jetstream;
use axum::{
    Json,
    body::{Body, Bytes},
    extract::{
        FromRequest as _, Multipart, Path, Query, Request, State, rejection::QueryRejection,
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bus::{
    subject,
    wire::{
        MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES, ScanEvent, ScanEventData, ScanOwner, ScanRequest,
        ScanStage, ScanStatus,
    },
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{AppState, auth::User};

/// Longest side either dimension may have, whatever the pixel count: a
/// 1 x 10^6 strip is as useless to the model as it is costly to resize.
const MAX_SIDE: u32 = 20_000;
/// Room for the multipart envelope around a maximal image.
const MULTIPART_OVERHEAD: usize = 64 * 1024;
/// The largest request body `POST /v1/scans` reads.
pub const MAX_BODY: usize = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD;
/// Chunk size in the object store; under the server's default max payload
/// of 1 MiB.
const OBJECT_CHUNK: usize = 512 * 1024;

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

/// An image format the pipeline accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JPEG.
    Jpeg,
    /// PNG.
    Png,
    /// WebP.
    Webp,
}

impl Format {
    /// Recognises the format from the file's first bytes, whatever the
    /// client claimed.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(Self::Webp)
        } else {
            None
        }
    }

    /// Its media type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Webp => "image/webp",
        }
    }

    fn image_format(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::Webp => image::ImageFormat::WebP,
        }
    }

    /// True when the file ends the way a complete file of this format
    /// ends: cheap, and catches uploads cut off in transit.
    fn looks_complete(self, bytes: &[u8]) -> bool {
        match self {
            // EOI; some encoders pad after it, so look at the tail.
            Self::Jpeg => bytes[bytes.len().saturating_sub(64)..]
                .windows(2)
                .any(|w| w == [0xFF, 0xD9]),
            // The IEND chunk: length 0, type, CRC.
            Self::Png => bytes.ends_with(b"\0\0\0\0IEND\xAE\x42\x60\x82"),
            // RIFF's own length field covers the rest of the file.
            Self::Webp => {
                let declared = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                declared as usize + 8 <= bytes.len()
            }
        }
    }
}

/// Why an upload was refused: the status, a specific code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 413 or 415.
    pub status: StatusCode,
    /// A stable code.
    pub code: &'static str,
    /// What to fix.
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

/// What the checks learnt about an accepted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspected {
    /// The format from the magic bytes.
    pub format: Format,
    /// Width from the header.
    pub width: u32,
    /// Height from the header.
    pub height: u32,
}

/// Checks an upload without decoding its pixels.
///
/// # Errors
/// A [`Refusal`] naming what is wrong.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, Refusal> {
    if bytes.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "empty_upload",
            "the upload is empty",
        ));
    }
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(too_large());
    }
    let format = Format::sniff(bytes).ok_or_else(|| {
        Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image_type",
            "the file is not a JPEG, PNG or WebP image",
        )
    })?;
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format.image_format());
    let (width, height) = reader.into_dimensions().map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "corrupt_image",
            format!("the {} header cannot be read: {e}", format.mime()),
        )
    })?;
    if width == 0 || height == 0 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "corrupt_image",
            "the image has no pixels",
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS
        || width > MAX_SIDE
        || height > MAX_SIDE
    {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_pixels",
            format!(
                "the image is {width} x {height} pixels; at most {MAX_IMAGE_PIXELS} pixels and {MAX_SIDE} per side are accepted"
            ),
        ));
    }
    if !format.looks_complete(bytes) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "truncated_image",
            format!("the {} file is cut off before its end", format.mime()),
        ));
    }
    Ok(Inspected {
        format,
        width,
        height,
    })
}

fn too_large() -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("uploads are limited to {MAX_UPLOAD_BYTES} bytes"),
    )
}

pub(crate) fn refuse(r: Refusal) -> Response {
    error(r.status, r.code, r.message)
}

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

/// Stores `bytes` as object `name`, laid out exactly as async-nats'
/// `ObjectStore::put` does (chunks on `$O.<bucket>.C.<nuid>`, then the object
/// info on `$O.<bucket>.M.<base64url(name)>` with a subject rollup), so any
/// object-store client reads it back. The difference: every chunk is in
/// flight at once and the acks are awaited together, where the library
/// waits one round trip per chunk; on a 5 MB photo that is most of the
/// upload's latency. The info is published only after every chunk is
/// stored, so a reader never sees a partial object.
async fn put_object(
    js: &jetstream::Context,
    bucket: &str,
    name: &str,
    bytes: &Bytes,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    use jetstream::object_store::{ObjectInfo, ObjectOptions};
    use sha2::Digest as _;

    let hashing = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || sha2::Sha256::digest(&bytes))
    };
    let nuid = uuid::Uuid::new_v4().simple().to_string();
    let chunk_subject = format!("$O.{bucket}.C.{nuid}");
    let mut acks = Vec::with_capacity(bytes.len().div_ceil(OBJECT_CHUNK));
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + OBJECT_CHUNK).min(bytes.len());
        acks.push(
            js.publish(chunk_subject.clone(), bytes.slice(offset..end))
                .await?,
        );
        offset = end;
    }
    let chunks = acks.len();
    let acks = acks.into_iter().map(std::future::IntoFuture::into_future);
    if let Err(e) = futures::future::try_join_all(acks).await {
        // Chunks without an info are invisible but take space: drop them.
        if let Ok(stream) = js.get_stream(format!("OBJ_{bucket}")).await {
            let _ = stream.purge().filter(&chunk_subject).await;
        }
        return Err(e.into());
    }
    let digest = hashing.await?;
    let info = ObjectInfo {
        name: name.to_owned(),
        description: None,
        metadata: Default::default(),
        headers: None,
        options: Some(ObjectOptions {
            link: None,
            max_chunk_size: Some(OBJECT_CHUNK),
        }),
        bucket: bucket.to_owned(),
        nuid,
        size: bytes.len(),
        chunks,
        modified: None,
        digest: Some(format!(
            "SHA-256={}",
            base64::engine::general_purpose::URL_SAFE.encode(digest)
        )),
        deleted: false,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    let meta_subject = format!(
        "$O.{bucket}.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(name)
    );
    js.publish_with_headers(meta_subject, headers, serde_json::to_vec(&info)?.into())
        .await?
        .await?;
    Ok(())
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

/// Query of `GET /v1/scans/{id}/events`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_complete_png_passes_and_reports_its_size() {
        let i = inspect(&png(7, 5)).unwrap();
        assert_eq!((i.format, i.width, i.height), (Format::Png, 7, 5));
    }

    #[test]
    fn truncated_wrong_and_empty_files_are_refused_specifically() {
        let full = png(64, 64);
        assert_eq!(
            inspect(&full[..full.len() - 10]).unwrap_err().code,
            "truncated_image"
        );
        assert_eq!(
            inspect(b"GIF89a....").unwrap_err().code,
            "unsupported_image_type"
        );
        assert_eq!(inspect(b"").unwrap_err().code, "empty_upload");
        assert_eq!(
            inspect(&full[..20]).unwrap_err().code,
            "corrupt_image",
            "a PNG cut inside its header"
        );
    }

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
