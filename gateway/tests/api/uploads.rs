//! Uploads are streamed into the object store as they arrive: what is stored
//! is byte for byte what was sent, the store sees the image before the body
//! has ended, and a refused upload (too large, truncated, corrupt) leaves no
//! chunk, no object, no owner record and no scan request behind.
//!
//! The gateway runs alone (no streamer), so the scan requests it publishes
//! stay in `SCAN_REQ` for the test to read, and no pipeline competes for the
//! two cores while megabytes move.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _, channel::mpsc};
use serde_json::Value;
use tokio::io::AsyncReadExt as _;

use crate::helpers::{GatewayOnly, token_for};

/// Name of the stream behind the `scan_images` object store.
fn object_stream() -> String {
    format!("OBJ_{}", bus::streams::OBJ_SCAN_IMAGES)
}

/// An RGB PNG of noise, uncompressed: `height * (3 * width + 1)` bytes of
/// image data, so its size is chosen exactly and it costs no deflate time.
fn noise_png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let pixels: Vec<u8> = (0..width as usize * height as usize * 3)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        PngEncoder::new_with_quality(
            &mut out,
            CompressionType::Uncompressed,
            FilterType::NoFilter,
        ),
        &pixels,
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

/// Rewrites a PNG's IHDR: `width` x `height`, and a checksum that matches
/// or not.
fn with_ihdr(mut png: Vec<u8>, width: u32, height: u32, valid_crc: bool) -> Vec<u8> {
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = crate::scans::crc32(&png[12..29]);
    if !valid_crc {
        crc ^= 1;
    }
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

const BOUNDARY: &str = "uploadboundary42";

/// `bytes` as the multipart field `image`, with the envelope around it.
fn multipart(bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nfrom the kitchen\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

#[derive(Clone, Copy, Debug)]
enum Sent {
    /// Raw `image/png` with a `Content-Length`.
    Raw,
    /// Raw `image/png`, chunked: no `Content-Length`.
    RawChunked,
    /// Multipart with a `Content-Length`.
    Multipart,
    /// Multipart, chunked.
    MultipartChunked,
}

impl Sent {
    fn content_type(self) -> String {
        match self {
            Self::Raw | Self::RawChunked => "image/png".into(),
            Self::Multipart | Self::MultipartChunked => {
                format!("multipart/form-data; boundary={BOUNDARY}")
            }
        }
    }

    fn body(self, image: &[u8]) -> Vec<u8> {
        match self {
            Self::Raw | Self::RawChunked => image.to_vec(),
            Self::Multipart | Self::MultipartChunked => multipart(image),
        }
    }

    fn chunked(self) -> bool {
        matches!(self, Self::RawChunked | Self::MultipartChunked)
    }
}

/// A body the test feeds piece by piece, sent chunked.
struct Feed {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Feed {
    /// Sends `bytes` in 64 KiB pieces; false once the server stopped reading.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        for piece in bytes.chunks(64 * 1024) {
            if self
                .tx
                .send(Ok(Bytes::copy_from_slice(piece)))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

struct Uploads {
    gateway: GatewayOnly,
    http: reqwest::Client,
}

impl Uploads {
    async fn start() -> Self {
        Self {
            gateway: GatewayOnly::start(&[]).await,
            http: reqwest::Client::new(),
        }
    }

    fn request(&self, content_type: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("http://{}/v1/scans", self.gateway.addr))
            .bearer_auth(token_for("alice", 3600))
            .header("content-type", content_type)
    }

    /// Sends `image` as `how` and returns the status and JSON body.
    async fn upload(&self, image: &[u8], how: Sent) -> (u16, Value) {
        self.send(how.body(image), &how.content_type(), how.chunked())
            .await
    }

    /// Sends `body` as it is, chunked or with its length.
    async fn send(&self, body: Vec<u8>, content_type: &str, chunked: bool) -> (u16, Value) {
        let body = Bytes::from(body);
        let request = self.request(content_type);
        let request = if chunked {
            let pieces: Vec<Result<Bytes, std::io::Error>> = (0..body.len())
                .step_by(64 * 1024)
                .map(|at| Ok(body.slice(at..(at + 64 * 1024).min(body.len()))))
                .collect();
            request.body(reqwest::Body::wrap_stream(futures::stream::iter(pieces)))
        } else {
            request.body(body)
        };
        let response = tokio::time::timeout(Duration::from_secs(120), request.send())
            .await
            .expect("an answer within 120 s")
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// Starts a chunked upload whose body the test writes through the
    /// returned [`Feed`]; the task ends with the status and JSON body.
    fn upload_fed(&self, content_type: &str) -> (Feed, tokio::task::JoinHandle<(u16, Value)>) {
        let (tx, rx) = mpsc::channel(4);
        let request = self
            .request(content_type)
            .body(reqwest::Body::wrap_stream(rx));
        let answer = tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap())
        });
        (Feed { tx }, answer)
    }

    /// The stored object `name`, read back through the object store (whose
    /// reader checks the SHA-256 digest the gateway wrote).
    async fn object(&self, name: &str) -> Vec<u8> {
        let store = self
            .gateway
            .js
            .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
            .await
            .unwrap();
        let mut object = store.get(name).await.unwrap();
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .expect("the object reads back with a matching digest");
        bytes
    }

    /// The scan request published for `scan_id`.
    async fn scan_request(&self, scan_id: &str) -> bus::wire::ScanRequest {
        let stream = self
            .gateway
            .js
            .get_stream(bus::streams::SCAN_REQ)
            .await
            .unwrap();
        let message = stream
            .get_last_raw_message_by_subject(&bus::subject::scan_req(scan_id).unwrap())
            .await
            .unwrap();
        serde_json::from_slice(&message.payload).unwrap()
    }

    /// Bytes in the object store's stream: chunks, stored or in progress,
    /// and object infos.
    async fn stored_bytes(&self) -> (u64, u64) {
        let mut stream = self.gateway.js.get_stream(object_stream()).await.unwrap();
        let state = &stream.info().await.unwrap().state;
        (state.messages, state.bytes)
    }

    /// Waits until the object store's stream holds at least `bytes`.
    async fn until_stored(&self, bytes: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, stored) = self.stored_bytes().await;
            if stored >= bytes {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {stored} of {bytes} bytes reached the object store while the body was arriving"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts that nothing of any upload is stored: no chunk (not even an
    /// orphan without its info), no object, no owner, no scan request.
    async fn assert_nothing_stored(&self, what: &str) {
        let js = &self.gateway.js;
        let (messages, bytes) = self.stored_bytes().await;
        assert_eq!(
            (messages, bytes),
            (0, 0),
            "{what}: chunks left in the object store"
        );
        let images = js
            .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
            .await
            .unwrap();
        assert_eq!(images.list().await.unwrap().count().await, 0, "{what}");
        let mut requests = js.get_stream(bus::streams::SCAN_REQ).await.unwrap();
        assert_eq!(
            requests.info().await.unwrap().state.messages,
            0,
            "{what}: a scan request was published"
        );
        let owners = js.get_key_value(bus::streams::KV_SCANS).await.unwrap();
        assert_eq!(owners.keys().await.unwrap().count().await, 0, "{what}");
    }

    /// Asserts that the accepted upload `answer` stored exactly `image` and
    /// queued a scan request describing it.
    async fn assert_stored(&self, answer: &(u16, Value), image: &[u8], what: &str) {
        let (status, body) = (answer.0, &answer.1);
        assert_eq!(status, 202, "{what}: {body}");
        let scan_id = body["scan_id"].as_str().unwrap();
        let stored = self.object(scan_id).await;
        assert!(
            stored == image,
            "{what}: the stored object ({} bytes) differs from the upload ({} bytes)",
            stored.len(),
            image.len()
        );
        let request = self.scan_request(scan_id).await;
        assert_eq!(request.object, scan_id, "{what}");
        assert_eq!(request.bytes, image.len() as u64, "{what}");
        assert_eq!(request.content_type, "image/png", "{what}");
    }
}

#[tokio::test]
async fn photos_up_to_the_limit_are_stored_byte_for_byte_raw_and_multipart() {
    let app = Uploads::start().await;
    // 5 MB: 1000 x 1747 pixels; ~19.9 MB: 2000 x 3477.
    let five = noise_png(1000, 1747, 5);
    let almost_twenty = noise_png(2000, 3477, 20);
    assert!(
        (5_000_000..5_500_000).contains(&five.len()),
        "{}",
        five.len()
    );
    let limit = bus::wire::MAX_UPLOAD_BYTES;
    assert!(
        (limit - 200_000..limit).contains(&almost_twenty.len()),
        "{}",
        almost_twenty.len()
    );
    for (image, how) in [
        (&five, Sent::Raw),
        (&five, Sent::MultipartChunked),
        (&almost_twenty, Sent::RawChunked),
        (&almost_twenty, Sent::Multipart),
    ] {
        let what = format!("{} bytes sent {how:?}", image.len());
        let answer = app.upload(image, how).await;
        app.assert_stored(&answer, image, &what).await;
        let request = app
            .scan_request(answer.1["scan_id"].as_str().unwrap())
            .await;
        let (width, height) = if image.len() == five.len() {
            (1000, 1747)
        } else {
            (2000, 3477)
        };
        assert_eq!((request.width, request.height), (width, height), "{what}");
    }
}

#[tokio::test]
async fn the_image_reaches_the_store_while_the_body_is_still_arriving() {
    let app = Uploads::start().await;
    let image = noise_png(1000, 2000, 7);
    for how in [Sent::RawChunked, Sent::MultipartChunked] {
        let body = how.body(&image);
        let (mut feed, answer) = app.upload_fed(&how.content_type());
        let (_, before) = app.stored_bytes().await;
        let (first, rest) = body.split_at(4 * 1024 * 1024);
        assert!(feed.send(first).await);
        // Half of what was sent is in the store although the body has not
        // ended: the gateway does not wait for the whole body.
        app.until_stored(before + 2 * 1024 * 1024).await;
        assert!(
            !answer.is_finished(),
            "{how:?}: answered before the body ended"
        );
        assert!(feed.send(rest).await);
        drop(feed);
        let answer = tokio::time::timeout(Duration::from_secs(60), answer)
            .await
            .expect("an answer within 60 s")
            .unwrap();
        app.assert_stored(&answer, &image, &format!("{how:?}"))
            .await;
    }
}

#[tokio::test]
async fn an_unannounced_body_over_20_mb_gets_413_and_leaves_no_chunk_behind() {
    let app = Uploads::start().await;
    // A valid PNG, so the gateway stores its first 20 MB before it can know
    // the body is too large.
    let image = noise_png(2000, 4200, 25);
    assert!(image.len() > bus::wire::MAX_UPLOAD_BYTES + 4 * 1024 * 1024);
    for how in [Sent::RawChunked, Sent::MultipartChunked] {
        let body = how.body(&image);
        let (mut feed, answer) = app.upload_fed(&how.content_type());
        let (first, rest) = body.split_at(8 * 1024 * 1024);
        assert!(feed.send(first).await);
        // Chunks of the upload are stored by now...
        app.until_stored(4 * 1024 * 1024).await;
        // ...and the rest pushes the body past the limit (the server may
        // stop reading once it has seen enough).
        feed.send(rest).await;
        drop(feed);
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), answer)
            .await
            .expect("an answer within 60 s")
            .unwrap();
        assert_eq!(status, 413, "{how:?}: {body}");
        assert_eq!(body["error"]["code"], "too_large", "{how:?}: {body}");
        // ...and none of them stays.
        app.assert_nothing_stored(&format!("{how:?}")).await;
    }
    // The same without feeding by hand, and a declared length.
    for how in [Sent::RawChunked, Sent::Raw] {
        let (status, body) = app.upload(&image, how).await;
        assert_eq!(status, 413, "{how:?}: {body}");
        assert_eq!(body["error"]["code"], "too_large", "{how:?}: {body}");
    }
    app.assert_nothing_stored("after every oversized upload")
        .await;
}

#[tokio::test]
async fn a_body_past_its_limit_after_a_valid_image_gets_413_and_leaves_nothing() {
    let app = Uploads::start().await;
    // The image is fine and stored; a field after it takes the body past the
    // limit, which decides as when the body was read whole.
    let image = noise_png(1000, 1000, 11);
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&image);
    body.extend_from_slice(
        format!("\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"padding\"\r\n\r\n")
            .as_bytes(),
    );
    body.resize(bus::wire::MAX_UPLOAD_BYTES + 1024 * 1024, b'p');
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let (status, json) = app.send(body, &Sent::Multipart.content_type(), true).await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["code"], "too_large", "{json}");
    app.assert_nothing_stored("an image followed by 21 MB")
        .await;
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_upload_leaves_no_chunk_behind() {
    let app = Uploads::start().await;
    let image = noise_png(1000, 2000, 13);
    let (mut feed, answer) = app.upload_fed("image/png");
    assert!(feed.send(&image[..4 * 1024 * 1024]).await);
    app.until_stored(2 * 1024 * 1024).await;
    // The client goes away: its connection closes with the body unfinished.
    answer.abort();
    drop(feed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.stored_bytes().await.0 > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chunks of an abandoned upload stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.assert_nothing_stored("an abandoned upload").await;
}

#[tokio::test]
async fn truncated_and_corrupt_images_keep_their_codes_and_leave_nothing_stored() {
    let app = Uploads::start().await;
    let image = noise_png(1000, 2000, 3);
    let truncated = image[..4 * 1024 * 1024].to_vec();
    let bad_checksum = with_ihdr(image.clone(), 1000, 2000, false);
    let bomb = with_ihdr(image.clone(), 60_000, 60_000, true);
    let not_an_image = {
        let mut gif = b"GIF89a".to_vec();
        gif.extend_from_slice(&image[6..]);
        gif
    };
    let cases: [(&str, &[u8], u16, &str); 4] = [
        (
            "a PNG cut off after 4 MB",
            &truncated,
            400,
            "truncated_image",
        ),
        (
            "a PNG whose header checksum is wrong",
            &bad_checksum,
            400,
            "corrupt_image",
        ),
        (
            "a PNG claiming 60000 x 60000 pixels",
            &bomb,
            413,
            "too_many_pixels",
        ),
        ("a GIF", &not_an_image, 415, "unsupported_image_type"),
    ];
    for (what, bytes, status, code) in cases {
        for how in [Sent::Raw, Sent::RawChunked, Sent::MultipartChunked] {
            let (got, body) = app.upload(bytes, how).await;
            assert_eq!(got, status, "{what} sent {how:?}: {body}");
            assert_eq!(body["error"]["code"], code, "{what} sent {how:?}: {body}");
            app.assert_nothing_stored(&format!("{what} sent {how:?}"))
                .await;
        }
    }
}

#[tokio::test]
async fn twenty_concurrent_5_mb_uploads_are_all_stored_intact() {
    let app = Uploads::start().await;
    let images: Vec<Vec<u8>> = (0..20).map(|seed| noise_png(1000, 1747, seed)).collect();
    let answers = futures::future::join_all(images.iter().enumerate().map(|(i, image)| {
        let how = if i % 2 == 0 {
            Sent::RawChunked
        } else {
            Sent::Multipart
        };
        app.upload(image, how)
    }))
    .await;
    let mut ids = std::collections::HashSet::new();
    for (i, (answer, image)) in answers.iter().zip(&images).enumerate() {
        app.assert_stored(answer, image, &format!("upload {i}"))
            .await;
        ids.insert(answer.1["scan_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 20, "every upload is its own scan");
}
