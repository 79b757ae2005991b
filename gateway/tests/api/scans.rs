//! Scans end to end in-process: the real gateway and streamer (the local
//! EfficientNet-Lite0 model on real photos, or an OpenAI-compatible vision
//! stand-in), a real nats-server, and a stand-in LLM for the explanation.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::Value;
use testkit::Script;

use crate::helpers::{TestApp, token_for};

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../streamer/tests/fixtures/images/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

pub(crate) fn answer() -> Script {
    Script::new(
        ["Rinse ", "it, ", "then ", "use ", "the ", "right ", "bin."],
        Duration::from_millis(5),
    )
}

/// One SSE event as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sse {
    pub(crate) id: u64,
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// Reads an SSE response to its end (or `limit`), returning the events and
/// the number of keep-alive comments.
pub(crate) async fn read_sse(response: reqwest::Response, limit: Duration) -> (Vec<Sse>, usize) {
    assert_eq!(response.status(), 200, "SSE refused");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let mut comments = 0;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => chunk.unwrap(),
            Ok(None) | Err(_) => break,
        };
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if line.starts_with(':') {
                    comments += 1;
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().parse().unwrap());
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).unwrap());
                }
            }
            if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                events.push(Sse { id, event, data });
            }
        }
    }
    (events, comments)
}

impl TestApp {
    pub(crate) async fn upload(
        &self,
        user: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> reqwest::Response {
        self.http
            .post(self.url("/v1/scans"))
            .bearer_auth(token_for(user, 3600))
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn upload_multipart(&self, user: &str, bytes: Vec<u8>) -> reqwest::Response {
        let boundary = "scanboundary7d1";
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        self.http
            .post(self.url("/v1/scans"))
            .bearer_auth(token_for(user, 3600))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Uploads and returns the scan id.
    pub(crate) async fn scan(&self, user: &str, bytes: Vec<u8>) -> String {
        let response = self.upload_multipart(user, bytes).await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        let id = body["scan_id"].as_str().unwrap().to_owned();
        assert_eq!(body["events_url"], format!("/v1/scans/{id}/events"));
        assert_eq!(body["status_url"], format!("/v1/scans/{id}"));
        id
    }

    pub(crate) async fn events(&self, user: &str, id: &str, after: Option<u64>) -> Vec<Sse> {
        let mut request = self
            .http
            .get(self.url(&format!("/v1/scans/{id}/events")))
            .bearer_auth(token_for(user, 3600));
        if let Some(after) = after {
            request = request.header("last-event-id", after.to_string());
        }
        read_sse(request.send().await.unwrap(), Duration::from_secs(60))
            .await
            .0
    }

    pub(crate) async fn status(&self, user: &str, id: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(&format!("/v1/scans/{id}")))
            .bearer_auth(token_for(user, 3600))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }
}

pub(crate) fn progress(events: &[Sse]) -> Vec<(String, u64)> {
    events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| {
            (
                e.data["stage"].as_str().unwrap().to_owned(),
                e.data["percent"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub(crate) fn tokens(events: &[Sse]) -> String {
    events
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_photo_goes_through_every_stage_and_resumes_from_every_event_id() {
    let app = TestApp::start(answer()).await;
    let id = app.scan("alice", fixture("coffee.jpg")).await;
    let all = app.events("alice", &id, None).await;

    let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=all.len() as u64).collect::<Vec<_>>(),
        "ids contiguous from 1"
    );
    assert_eq!(
        progress(&all),
        [
            ("stored", 10),
            ("hashed", 20),
            ("preprocessed", 30),
            ("vision", 50),
            ("vision", 60),
            ("rules", 70),
            ("answer", 80),
            ("answer", 90),
            ("reward", 95),
            ("done", 100)
        ]
        .map(|(s, p)| (s.to_owned(), p))
    );
    assert_eq!(tokens(&all), "Rinse it, then use the right bin.");
    let result = all.last().unwrap();
    assert_eq!(result.event, "result");
    let record = &result.data;
    assert_eq!(record["scan_id"], id.as_str());
    assert_eq!(record["user_id"], "alice");
    assert_eq!(record["status"], "done");
    assert_eq!(record["cached"], false);
    assert_eq!(record["answer"], "Rinse it, then use the right bin.");
    assert_eq!(record["vision_model"], "local:efficientnet-lite0");
    assert_eq!(record["labels"].as_array().unwrap().len(), 5);
    assert_eq!(
        record["labels"][0]["label"], "espresso",
        "the real model sees the coffee"
    );
    assert_eq!(record["rule"]["category"], record["category"]);
    assert_eq!(record["phash"].as_str().unwrap().len(), 16);
    assert_eq!(record["sha256"].as_str().unwrap().len(), 64);

    // Resuming after any id gives exactly the rest, by header and by query.
    for after in 0..=all.len() as u64 {
        let rest = app.events("alice", &id, Some(after)).await;
        assert_eq!(rest, all[after as usize..], "resume after {after}");
    }
    let by_query = app
        .http
        .get(app.url(&format!(
            "/v1/scans/{id}/events?last_event_id=3&access_token={}",
            token_for("alice", 3600)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        read_sse(by_query, Duration::from_secs(10)).await.0,
        all[3..]
    );

    let (code, status) = app.status("alice", &id).await;
    assert_eq!(code, 200);
    assert_eq!(status["status"], "done");
    assert_eq!(status["stage"], "done");
    assert_eq!(status["percent"], 100);
    assert_eq!(&status["result"], record);
}

/// A real photo upscaled to `width` x `height` with noise, as a
/// high-quality JPEG: several MB, like a phone camera's.
fn big_photo(width: u32, height: u32) -> Vec<u8> {
    let photo = image::load_from_memory(&fixture("rocket.jpg")).unwrap();
    let mut big = photo
        .resize_exact(width, height, image::imageops::FilterType::Triangle)
        .to_rgb8();
    // Sensor noise, which is what makes camera JPEGs large.
    let mut state = 0x2545_f491_u32;
    for pixel in big.pixels_mut() {
        for channel in pixel.0.iter_mut() {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *channel = channel.saturating_add((state >> 28) as u8);
        }
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 97)
        .encode_image(&big)
        .unwrap();
    out
}

#[tokio::test]
async fn multi_megabyte_photos_are_accepted_raw_and_as_multipart() {
    let app = TestApp::start(answer()).await;
    let photo = big_photo(3000, 2250);
    assert!(photo.len() > 2 * 1024 * 1024, "{} bytes", photo.len());
    let id = app.scan("alice", photo.clone()).await;
    let events = app.events("alice", &id, None).await;
    assert_eq!(events.last().unwrap().event, "result");
    let stored = events[0].data["message"].as_str().unwrap();
    assert!(stored.contains("3000 x 2250"), "{stored}");
    let raw = app.upload("alice", photo, "image/jpeg").await;
    assert_eq!(raw.status(), 202);
}

#[tokio::test]
async fn the_same_photo_again_is_a_cache_hit_without_vision_or_llm() {
    let app = TestApp::start(answer()).await;
    let first = app.scan("alice", fixture("rocket.jpg")).await;
    let first_events = app.events("alice", &first, None).await;
    let first_record = first_events.last().unwrap().data.clone();
    let llm_calls = app.llm.requests().len();

    // Another user, the same photo re-encoded as PNG: other bytes, same item.
    let png = {
        let image = image::load_from_memory(&fixture("rocket.jpg")).unwrap();
        let mut out = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let second = app.scan("bob", png).await;
    let events = app.events("bob", &second, None).await;
    assert_eq!(
        progress(&events),
        [
            ("stored", 10),
            ("hashed", 20),
            ("cache_hit", 90),
            ("reward", 95),
            ("done", 100)
        ]
        .map(|(s, p)| (s.to_owned(), p))
    );
    let record = &events.last().unwrap().data;
    assert_eq!(record["cached"], true);
    assert_eq!(record["scan_id"], second.as_str());
    assert_eq!(record["user_id"], "bob");
    assert_eq!(record["answer"], first_record["answer"]);
    assert_eq!(record["category"], first_record["category"]);
    assert_ne!(record["sha256"], first_record["sha256"]);
    assert_eq!(app.llm.requests().len(), llm_calls, "no LLM call for a hit");
}

/// A PNG whose header claims `width` x `height` (the CRC fixed up), with a
/// tiny body: what a decompression bomb looks like from the outside.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(4, 4)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn bad_uploads_get_specific_errors_and_store_nothing() {
    let app = TestApp::start(answer()).await;
    let photo = fixture("coffee.jpg");
    let mut corrupt = photo[..2000].to_vec();
    corrupt.extend(std::iter::repeat_n(0x5Au8, 4000));
    corrupt.extend_from_slice(&[0xFF, 0xD9]);
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("empty", vec![], "image/jpeg", 400, "empty_upload"),
        (
            "truncated jpeg",
            photo[..photo.len() / 2].to_vec(),
            "image/jpeg",
            400,
            "truncated_image",
        ),
        (
            "corrupt header",
            b"\xFF\xD8\xFF\xE0\x00\x10JFIF-nonsense".to_vec(),
            "image/jpeg",
            400,
            "corrupt_image",
        ),
        (
            "gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            "image/png",
            415,
            "unsupported_image_type",
        ),
        (
            "pdf as text",
            b"%PDF-1.4".to_vec(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "pixel bomb",
            png_claiming(60_000, 60_000),
            "image/png",
            413,
            "too_many_pixels",
        ),
        (
            "oversized",
            vec![0xFF; 20 * 1024 * 1024 + 1],
            "image/jpeg",
            413,
            "too_large",
        ),
    ];
    for (what, bytes, content_type, status, code) in cases {
        let response = app.upload("alice", bytes, content_type).await;
        assert_eq!(response.status().as_u16(), status, "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    let no_field = app
        .http
        .post(app.url("/v1/scans"))
        .bearer_auth(token_for("alice", 3600))
        .header("content-type", "multipart/form-data; boundary=b")
        .body("--b\r\nContent-Disposition: form-data; name=\"photo\"\r\n\r\nxyz\r\n--b--\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(no_field.status(), 400);
    assert_eq!(
        no_field.json::<Value>().await.unwrap()["error"]["code"],
        "missing_image"
    );
    let garbage = app
        .http
        .post(app.url("/v1/scans"))
        .bearer_auth(token_for("alice", 3600))
        .header("content-type", "multipart/form-data; boundary=b")
        .body("this is not multipart at all")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let unauthenticated = app
        .http
        .post(app.url("/v1/scans"))
        .header("content-type", "image/jpeg")
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let bad_lang = app
        .http
        .post(app.url("/v1/scans?lang=fr"))
        .bearer_auth(token_for("alice", 3600))
        .header("content-type", "image/jpeg")
        .body(photo)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_lang.status(), 400);

    // Nothing reached the bus.
    let js = app.js().await;
    let mut requests = js.get_stream(bus::streams::SCAN_REQ).await.unwrap();
    assert_eq!(requests.info().await.unwrap().state.messages, 0);
    let images = js
        .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
        .await
        .unwrap();
    assert_eq!(images.list().await.unwrap().count().await, 0);
    let owners = js.get_key_value(bus::streams::KV_SCANS).await.unwrap();
    assert_eq!(owners.keys().await.unwrap().count().await, 0);
}

#[tokio::test]
async fn scans_are_private_and_ids_and_cursors_are_checked() {
    let app = TestApp::start(answer()).await;
    let id = app.scan("alice", fixture("chelsea.png")).await;
    assert_eq!(app.status("mallory", &id).await.0, 403);
    let foreign = app
        .http
        .get(app.url(&format!("/v1/scans/{id}/events")))
        .bearer_auth(token_for("mallory", 3600))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    assert_eq!(
        foreign.json::<Value>().await.unwrap()["error"]["code"],
        "forbidden"
    );
    assert_eq!(app.status("alice", "no-such-scan").await.0, 404);
    assert_eq!(app.status("alice", "a.b").await.0, 400);
    let no_token = app
        .http
        .get(app.url(&format!("/v1/scans/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let expired = app
        .http
        .get(app.url(&format!(
            "/v1/scans/{id}/events?access_token={}",
            token_for("alice", -120)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 401);
    let bad_cursor = app
        .http
        .get(app.url(&format!("/v1/scans/{id}/events")))
        .bearer_auth(token_for("alice", 3600))
        .header("last-event-id", "seven")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_cursor.status(), 400);
    assert_eq!(
        bad_cursor.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_last_event_id"
    );
    // The owner's stream still completes.
    assert_eq!(
        app.events("alice", &id, None).await.last().unwrap().event,
        "result"
    );
}

#[tokio::test]
async fn keep_alive_comments_flow_while_a_scan_is_idle() {
    // A slow explanation keeps the stream open and quiet between tokens.
    let slow = Script::new(["Slowly.", " Done."], Duration::from_millis(1500));
    let app = TestApp::start_full(slow, &["--sse-keepalive-ms", "200"], &[]).await;
    let id = app.scan("alice", fixture("astronaut.jpg")).await;
    let response = app
        .http
        .get(app.url(&format!("/v1/scans/{id}/events")))
        .bearer_auth(token_for("alice", 3600))
        .send()
        .await
        .unwrap();
    let (events, comments) = read_sse(response, Duration::from_secs(60)).await;
    assert!(comments >= 3, "only {comments} keep-alive comments");
    assert_eq!(events.last().unwrap().event, "result");
}
