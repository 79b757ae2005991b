//! `POST /v1/scans`: takes the image out of the request (the raw body, or
//! the multipart field `image`) and streams it into the object store while
//! the [`Inspector`] checks it, so no upload is ever held whole. Once the
//! image is complete and valid it writes the owner record, makes the image
//! visible and queues the job, in that order, so that an SSE subscriber
//! racing the `202` already passes the ownership check. A refused upload
//! leaves nothing: its chunks are purged and nothing else was written.
//!
//! The answer to an upload is the one reading it whole first would give:
//! the body's size (or its breaking off) decides before anything about its
//! content, so a refused upload is still read to its end, just not stored.
//!
//! What one upload holds in memory is bounded whatever the image's size, so
//! that a hundred concurrent 20 MB uploads do not need 2 GB: the
//! inspector's copy of the image's start (at most 1 MiB, and only until the
//! header parses, which for a camera's file is within the first few dozen
//! KiB), the object chunk being filled (512 KiB) and the chunks the NATS
//! client may not have sent yet (the writer's window, 2 MiB): about 3.5 MiB
//! at worst, under 3 MiB as a rule.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
};

use async_nats::jetstream;
use axum::{
    Json,
    body::{Body, BodyDataStream, Bytes},
    extract::{
        FromRequest as _, Multipart, Query, Request, State, multipart::MultipartError,
        rejection::QueryRejection,
    },
    http::{HeaderMap, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use bus::wire::ErrorBody;
use bus::{
    subject,
    wire::{MAX_UPLOAD_BYTES, ScanOwner, ScanRequest},
};
use chrono::Utc;
use futures::{Stream, StreamExt as _};
use serde::Deserialize;

use super::{
    Inspected, Refusal, error,
    inspect::{Inspector, too_large},
    refuse,
    store::ObjectWriter,
    unavailable,
};
use crate::{AppState, auth::User};

/// Room for the multipart envelope around a maximal image.
const MULTIPART_OVERHEAD: usize = 64 * 1024;
/// The largest request body `POST /v1/scans` reads.
pub const MAX_BODY: usize = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD;

/// Query of `POST /v1/scans`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Language of the explanation: `en` or `ko`; without it, the better
    /// of the two by `Accept-Language`, else `en`.
    #[serde(default)]
    #[param(pattern = "^(en|ko)$")]
    lang: Option<String>,
}

/// `POST /v1/scans`'s answer: where to follow the scan.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ScanAccepted {
    /// The new scan.
    scan_id: String,
    /// Its live events (SSE).
    events_url: String,
    /// Its status (also the `Location` header).
    status_url: String,
}

/// A multipart upload: the image in a part named `image` (or the first
/// file part).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct UploadForm {
    /// The photo: JPEG, PNG or WebP, at most 20 MiB.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// `POST /v1/scans[?lang=en|ko]`: stores the image and queues the scan.
#[utoipa::path(post, path = "/v1/scans", operation_id = "uploadScan", tag = "scans", params(UploadQuery),
    request_body(description = "The photo, as the raw body or a multipart form",
        content(
            (String = "image/jpeg"), (String = "image/png"), (String = "image/webp"),
            (UploadForm = "multipart/form-data"),
        )),
    responses(
        (status = 202, description = "Stored and queued; `Location` is the status URL", body = ScanAccepted,
            headers(("Location" = String, description = "`/v1/scans/{id}`"))),
        (status = 400, description = "`invalid_lang`, `empty_upload`, `missing_image`, `malformed_multipart`, \
            `corrupt_image`, `truncated_image`, `upload_interrupted`", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`, `token_expired`", body = ErrorBody),
        (status = 413, description = "`too_large` (over 20 MiB), `too_many_pixels`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`, `unsupported_image_type`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub async fn upload(
    State(state): State<AppState>,
    User(user): User,
    query: Result<Query<UploadQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let lang = match query {
        Ok(Query(UploadQuery { lang: None })) => crate::lang::preferred(request.headers())
            .unwrap_or("en")
            .to_owned(),
        Ok(Query(UploadQuery { lang: Some(l) })) if l == "en" || l == "ko" => l,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_lang",
                "lang must be en or ko",
            );
        }
    };
    let (envelope, limit) = match envelope(request.headers()) {
        Ok(e) => e,
        Err(r) => return refuse(r),
    };
    let mut writer = ObjectWriter::begin(&state.js, bus::streams::OBJ_SCAN_IMAGES);
    let inspected = match receive(request, envelope, limit, &mut writer).await {
        Ok(i) => i,
        Err(stop) => {
            writer.abort().await;
            return match stop {
                Stop::Cut(r) | Stop::Refused(r) => refuse(r),
                Stop::Store(e) => unavailable("Storing the image", format!("{e:#}")),
            };
        }
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
        bytes: writer.size() as u64,
        width: inspected.width,
        height: inspected.height,
        created_at,
        reprocessed: 0,
        lang,
    };
    if let Err(response) = store(&state, &owner, &job, &mut writer).await {
        // Leave nothing half-stored behind a failed request.
        writer.abort().await;
        let _ = state.scan_images.delete(&job.object).await;
        let _ = state.scans.purge(&scan_id).await;
        return response;
    }
    metrics::counter!("gateway_scans_accepted_total").increment(1);
    let status_url = format!("/v1/scans/{scan_id}");
    let body = ScanAccepted {
        scan_id,
        events_url: format!("{status_url}/events"),
        status_url: status_url.clone(),
    };
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(body),
    )
        .into_response()
}

/// How the image travels in the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Envelope {
    /// The whole body, sent as `image/jpeg|png|webp`.
    Raw,
    /// The multipart field `image`.
    Multipart,
}

/// The envelope from the content type, and the body's limit; a declared
/// oversize body is refused before a byte of it is read.
fn envelope(headers: &HeaderMap) -> Result<(Envelope, usize), Refusal> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let (envelope, limit) = match essence {
        "multipart/form-data" => (Envelope::Multipart, MAX_BODY),
        "image/jpeg" | "image/png" | "image/webp" => (Envelope::Raw, MAX_UPLOAD_BYTES),
        _ => {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send multipart/form-data with a field named image, or a raw image/jpeg, image/png or image/webp body",
            ));
        }
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    Ok((envelope, limit))
}

/// Why an upload was not taken.
enum Stop {
    /// The body, or the image in it, is over the limit or broke off:
    /// nothing else about it matters, and there is nothing more to read.
    Cut(Refusal),
    /// The image is refused; the rest of the body may still overrule that.
    Refused(Refusal),
    /// The object store failed.
    Store(anyhow::Error),
}

/// Streams the image into `writer` while it is checked, then reads what
/// the body holds after it.
async fn receive(
    request: Request,
    envelope: Envelope,
    limit: usize,
    writer: &mut ObjectWriter,
) -> Result<Inspected, Stop> {
    let (parts, body) = request.into_parts();
    let incoming = Incoming::new(body, limit);
    let mut image = Image {
        inspector: Inspector::new(),
        writer,
    };
    let read = match envelope {
        Envelope::Raw => image.take_body(&incoming).await,
        Envelope::Multipart => image.take_field(parts, &incoming).await,
    };
    match read {
        Ok(()) => {
            incoming.drain().await.map_err(Stop::Cut)?;
            image.inspector.finish().map_err(Stop::Refused)
        }
        Err(Stop::Refused(refusal)) => {
            incoming.drain().await.map_err(Stop::Cut)?;
            Err(Stop::Refused(refusal))
        }
        Err(stop) => Err(stop),
    }
}

/// The image's bytes on their way: checked, and stored while not refused.
struct Image<'a> {
    inspector: Inspector,
    writer: &'a mut ObjectWriter,
}

impl Image<'_> {
    async fn take(&mut self, bytes: Bytes) -> Result<(), Stop> {
        self.inspector.feed(&bytes).map_err(Stop::Cut)?;
        // Once refused, the rest is only counted: storing it would be waste.
        if !self.inspector.refused() {
            self.writer.write(bytes).await.map_err(Stop::Store)?;
        }
        Ok(())
    }

    async fn take_body(&mut self, incoming: &Incoming) -> Result<(), Stop> {
        let mut body = incoming.clone();
        while let Some(bytes) = body.next().await {
            self.take(bytes.map_err(|cut| Stop::Cut(cut.refusal()))?)
                .await?;
        }
        Ok(())
    }

    async fn take_field(&mut self, parts: Parts, incoming: &Incoming) -> Result<(), Stop> {
        let malformed = |what: &str, e: MultipartError| {
            incoming.stop(Refusal::new(
                StatusCode::BAD_REQUEST,
                "malformed_multipart",
                format!("{what} cannot be read: {}", e.body_text()),
            ))
        };
        let request = Request::from_parts(parts, Body::from_stream(incoming.clone()));
        let mut form = Multipart::from_request(request, &()).await.map_err(|e| {
            Stop::Refused(Refusal::new(
                StatusCode::BAD_REQUEST,
                "malformed_multipart",
                format!("the multipart body cannot be read: {}", e.body_text()),
            ))
        })?;
        loop {
            let field = form
                .next_field()
                .await
                .map_err(|e| malformed("the multipart body", e))?;
            let Some(mut field) = field else {
                return Err(Stop::Refused(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "missing_image",
                    "the multipart body has no field named image",
                )));
            };
            if field.name() == Some("image") {
                while let Some(bytes) = field
                    .chunk()
                    .await
                    .map_err(|e| malformed("the image field", e))?
                {
                    self.take(bytes).await?;
                }
                return Ok(());
            }
        }
    }
}

/// The request body, counted against its limit as it arrives. Clones share
/// one body, so what the multipart parser leaves unread is still read and
/// counted afterwards, as when the body was read whole before parsing.
#[derive(Clone)]
struct Incoming(Arc<Mutex<Reading>>);

struct Reading {
    body: BodyDataStream,
    read: usize,
    limit: usize,
    /// Set when the body broke off or went over the limit; it then ends.
    cut: Option<Cut>,
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Cut {
    #[error("the request body is over the limit")]
    TooLarge,
    #[error("the request body broke off")]
    Broken,
}

impl Cut {
    fn refusal(self) -> Refusal {
        match self {
            Self::TooLarge => too_large(),
            Self::Broken => Refusal::new(
                StatusCode::BAD_REQUEST,
                "upload_interrupted",
                "the upload could not be read completely",
            ),
        }
    }
}

impl Incoming {
    fn new(body: Body, limit: usize) -> Self {
        Self(Arc::new(Mutex::new(Reading {
            body: body.into_data_stream(),
            read: 0,
            limit,
            cut: None,
        })))
    }

    fn cut(&self) -> Option<Cut> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).cut
    }

    /// `refusal`, unless the body was cut: the parser's errors then only
    /// echo that.
    fn stop(&self, refusal: Refusal) -> Stop {
        match self.cut() {
            Some(cut) => Stop::Cut(cut.refusal()),
            None => Stop::Refused(refusal),
        }
    }

    /// Reads the rest of the body, counting it.
    ///
    /// # Errors
    /// When the body is over its limit or broke off.
    async fn drain(&self) -> Result<(), Refusal> {
        let mut rest = self.clone();
        while let Some(bytes) = rest.next().await {
            bytes.map_err(Cut::refusal)?;
        }
        self.cut().map_or(Ok(()), |cut| Err(cut.refusal()))
    }
}

impl Stream for Incoming {
    type Item = Result<Bytes, Cut>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut reading = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if reading.cut.is_some() {
            return Poll::Ready(None);
        }
        let polled = ready!(reading.body.poll_next_unpin(cx));
        let item = match polled {
            None => return Poll::Ready(None),
            Some(Err(_)) => Err(Cut::Broken),
            Some(Ok(bytes)) => {
                reading.read += bytes.len();
                if reading.read > reading.limit {
                    Err(Cut::TooLarge)
                } else {
                    Ok(bytes)
                }
            }
        };
        if let Err(cut) = item {
            reading.cut = Some(cut);
        }
        Poll::Ready(Some(item))
    }
}

/// Writes the owner record, makes the image visible as `job.object` and
/// publishes the job.
async fn store(
    state: &AppState,
    owner: &ScanOwner,
    job: &ScanRequest,
    writer: &mut ObjectWriter,
) -> Result<(), Response> {
    let owner = serde_json::to_vec(owner).expect("owner serialises");
    state
        .scans
        .put(&job.scan_id, owner.into())
        .await
        .map_err(|e| unavailable("Storing the scan owner", e))?;
    writer
        .commit(&job.object)
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
