//! Grounded answers through the gateway: `sources` on the WebSocket's
//! `done`, in the OpenAI endpoint's extension field, and the public guide
//! they link to (with a real streamer retrieving the rules).

use std::time::Duration;

use bus::wire::ServerFrame;
use serde_json::{Value, json};
use testkit::Script;

use crate::helpers::{TestApp, token_for};

fn script() -> Script {
    Script::new(["Rinse ", "it."], Duration::from_millis(1))
}

#[tokio::test]
async fn sources_reach_the_websocket_and_the_openai_extension_field() {
    let app = TestApp::start(script()).await;
    let mut ws = app.ws("dana").await;
    ws.send_json(json!({"type": "send", "conversation_id": null,
        "content": "Where does a soju bottle go?", "request_id": "g-1"}))
        .await;
    let frames = ws.until_done().await;
    match frames.last() {
        Some(ServerFrame::Done { sources, .. }) => {
            assert_eq!(sources.first().map(String::as_str), Some("glass"))
        }
        other => panic!("done: {other:?}"),
    }

    let token = token_for("dana", 600);
    let body: Value = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&json!({"messages": [{"role": "user", "content": "건전지는 어디에 버려요?"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["sources"][0], "battery", "{body}");

    // Streamed: on the chunk with `finish_reason`; empty for small talk.
    let text = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(
            &json!({"messages": [{"role": "user", "content": "What's the weather like today?"}],
                      "stream": true}),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let finish: Value = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|c| *c != "[DONE]")
        .map(|c| serde_json::from_str::<Value>(c).unwrap())
        .find(|v| v["choices"][0]["finish_reason"].is_string())
        .expect("a finish chunk");
    assert_eq!(finish["sources"], json!([]), "{finish}");
}

#[tokio::test]
async fn the_guide_is_public_cacheable_and_refuses_unknowns() {
    let app = TestApp::start(script()).await;
    // No token: the guide is public.
    let list = app
        .http
        .get(app.url("/v1/guide?lang=en"))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let list: Value = list.json().await.unwrap();
    assert!(list["categories"].as_array().unwrap().len() >= 10);

    let rule = app
        .http
        .get(app.url("/v1/guide/styrofoam?lang=ko"))
        .send()
        .await
        .unwrap();
    assert_eq!(rule.status(), 200);
    let etag = rule.headers()["etag"].to_str().unwrap().to_owned();
    let rule: Value = rule.json().await.unwrap();
    assert_eq!(rule["bin"], "스티로폼 수거함");
    let again = app
        .http
        .get(app.url("/v1/guide/styrofoam?lang=ko"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    for (path, status, code) in [
        ("/v1/guide/spaceship?lang=en", 404, "not_found"),
        ("/v1/guide?lang=de", 400, "invalid_lang"),
    ] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}");
    }
}

/// A small valid PNG.
fn png() -> Vec<u8> {
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &[200u8; 8 * 8 * 3],
        8,
        8,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

#[tokio::test]
async fn a_scan_without_lang_is_explained_in_the_accept_language() {
    // No streamer: the scan requests stay in SCAN_REQ to be read.
    let app = crate::helpers::GatewayOnly::start(&[]).await;
    let http = reqwest::Client::new();
    let token = token_for("dana", 600);
    let requests = app.js.get_stream(bus::streams::SCAN_REQ).await.unwrap();
    for (query, accept, expected) in [
        ("", Some("ko-KR,ko;q=0.9,en-US;q=0.8"), "ko"),
        ("?lang=en", Some("ko-KR,ko;q=0.9"), "en"),
        ("", Some("fr-FR, de;q=0.5"), "en"),
        ("", None, "en"),
    ] {
        let mut request = http
            .post(format!("http://{}/v1/scans{query}", app.addr))
            .bearer_auth(&token)
            .header("content-type", "image/png")
            .body(png());
        if let Some(accept) = accept {
            request = request.header("accept-language", accept);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 202, "{query} {accept:?}");
        let body: Value = response.json().await.unwrap();
        let scan_id = body["scan_id"].as_str().unwrap();
        let message = requests
            .get_last_raw_message_by_subject(&bus::subject::scan_req(scan_id).unwrap())
            .await
            .unwrap();
        let job: bus::wire::ScanRequest = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(job.lang, expected, "{query} {accept:?}");
    }
}
