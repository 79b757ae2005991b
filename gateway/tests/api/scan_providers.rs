//! Scans against OpenAI-compatible vision providers (stand-ins speaking
//! their wire format): classification from a data URI, a provider that is
//! down (DLQ and reprocessing), one that hangs (soft and hard timeouts), and
//! error bodies and keys that must not leak.

use std::time::Duration;

use serde_json::json;
use testkit::{Quirks, Script, StandInLlm};

use crate::{
    helpers::TestApp,
    scans::{Sse, answer, fixture},
};

/// A vision stand-in that answers like an OpenAI-compatible vision model.
async fn vision_standin(reply: &str) -> StandInLlm {
    StandInLlm::start(Script::new([reply], Duration::ZERO))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_openai_compatible_vision_model_classifies_from_a_data_uri() {
    let vision = vision_standin(
        "```json\n{\"category\":\"glass\",\"confidence\":0.93,\"labels\":[{\"label\":\"green wine bottle\",\"score\":0.93}]}\n```",
    )
    .await;
    let app = TestApp::start_full(
        answer(),
        &[],
        &[
            "--vision-base-url",
            vision.base_url(),
            "--vision-model",
            "gpt-4o-mini",
        ],
    )
    .await;
    let id = app.scan("alice", fixture("coffee.jpg")).await;
    let events = app.events("alice", &id, None).await;
    let record = &events.last().unwrap().data;
    assert_eq!(record["category"], "glass");
    assert_eq!(record["vision_model"], "openai:gpt-4o-mini");
    assert_eq!(
        record["rule"]["bin"]["ko"],
        "유리병 수거함 (보증금 대상 병은 소매점에 반환)"
    );
    let request = &vision.requests()[0];
    let url = request["messages"][1]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap();
    assert!(url.starts_with("data:image/jpeg;base64,"));
    // The explanation prompt carries the category and the rule.
    let prompt = app.llm.requests()[0]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(prompt.contains("Glass bottle"), "{prompt}");
}

#[tokio::test]
async fn a_vision_provider_that_is_down_fails_cleanly_into_the_dlq_and_reprocesses() {
    let vision = StandInLlm::start(
        Script::new(
            ["{\"category\":\"metal_can\",\"confidence\":0.8}"],
            Duration::ZERO,
        )
        .with_quirks(Quirks {
            fail_first: vec![(503, None), (500, None), (502, None)],
            ..Quirks::default()
        }),
    )
    .await
    .unwrap();
    let app = TestApp::start_full(
        answer(),
        &[],
        &[
            "--vision-base-url",
            vision.base_url(),
            "--scan-retry-base-ms",
            "20",
            "--dlq-reprocess-every-s",
            "0",
        ],
    )
    .await;
    let id = app.scan("alice", fixture("coffee.jpg")).await;
    let events = app.events("alice", &id, None).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["code"], "vision_failed");
    assert_eq!(last.data["stage"], "vision");
    assert_eq!(vision.requests().len(), 3, "three attempts");
    let (_, status) = app.status("alice", &id).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["stage"], "vision");

    let js = app.js().await;
    let dlq = js.get_stream(bus::streams::DLQ).await.unwrap();
    let letter = dlq
        .get_last_raw_message_by_subject("dlq.scan")
        .await
        .unwrap();
    let letter: bus::wire::DeadLetter = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter.subject, format!("scan.req.{id}"));
    assert!(
        letter.error.starts_with("vision_failed"),
        "{}",
        letter.error
    );

    // The provider is back (its failures are spent): one reprocess pass
    // sends the scan through again and its stream continues to a result.
    let report = streamer::scan::reprocess_dead_letters(&js, 10)
        .await
        .unwrap();
    assert_eq!(report.requeued, vec![id.clone()]);
    // A stream resumed after a terminal event ends at once, so wait until
    // the new run has written something.
    testkit::wait_for(
        "the reprocessed run to start",
        Duration::from_secs(30),
        || async { (app.status("alice", &id).await.1["status"] != "failed").then_some(()) },
    )
    .await
    .unwrap();
    let rest = app.events("alice", &id, Some(last.id)).await;
    assert_eq!(rest.first().unwrap().id, last.id + 1);
    assert_eq!(rest.last().unwrap().event, "result");
    assert_eq!(rest.last().unwrap().data["category"], "metal_can");
    let answer_start = rest
        .iter()
        .find(|e| e.event == "progress" && e.data["stage"] == "answer")
        .unwrap();
    assert_eq!(answer_start.data["reset"], true, "earlier events exist");
    let (_, status) = app.status("alice", &id).await;
    assert_eq!(status["status"], "done");
    // A second pass finds nothing to do.
    let report = streamer::scan::reprocess_dead_letters(&js, 10)
        .await
        .unwrap();
    assert!(report.requeued.is_empty() && report.archived.is_empty());
}

#[tokio::test]
async fn a_scan_reprocessed_three_times_is_archived() {
    let app = TestApp::start(answer()).await;
    let js = app.js().await;
    let request = json!({
        "scan_id": "s-archived", "user_id": "alice", "object": "s-archived",
        "content_type": "image/jpeg", "bytes": 1, "width": 1, "height": 1,
        "created_at": "2026-11-01T00:00:00Z", "reprocessed": 3, "lang": "en"
    });
    let letter = bus::wire::DeadLetter {
        subject: "scan.req.s-archived".into(),
        error: "vision_failed: down".into(),
        deliveries: 3,
        payload: request.to_string(),
        failed_at: chrono::Utc::now(),
    };
    js.publish("dlq.scan", serde_json::to_vec(&letter).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let report = streamer::scan::reprocess_dead_letters(&js, 10)
        .await
        .unwrap();
    assert_eq!(report.archived, ["s-archived"]);
    assert!(report.requeued.is_empty());
    let dlq = js.get_stream(bus::streams::DLQ).await.unwrap();
    let archived = dlq
        .get_last_raw_message_by_subject("dlq.scan_archive")
        .await
        .unwrap();
    let archived: bus::wire::DeadLetter = serde_json::from_slice(&archived.payload).unwrap();
    assert!(archived.error.contains("archived after 3"));
}

#[tokio::test]
async fn a_hanging_vision_provider_hits_the_soft_then_the_hard_timeout() {
    // Accepts connections and never answers: a provider that hangs.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = format!("http://127.0.0.1:{port}/v1");
    let app = TestApp::start_full(
        answer(),
        &[],
        &[
            "--vision-base-url",
            &url,
            "--vision-soft-timeout-ms",
            "150",
            "--vision-hard-timeout-ms",
            "400",
            "--scan-retry-base-ms",
            "10",
            "--scan-max-attempts",
            "2",
        ],
    )
    .await;
    let id = app.scan("alice", fixture("coffee.jpg")).await;
    let events = app.events("alice", &id, None).await;
    let notices = events
        .iter()
        .filter(|e| {
            e.event == "progress" && e.data["message"].as_str().unwrap().starts_with("Still")
        })
        .count();
    assert_eq!(notices, 2, "one soft-timeout notice per attempt");
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert!(
        last.data["message"]
            .as_str()
            .unwrap()
            .contains("failed 2 times")
    );
}

/// Everything about one scan that leaves the system's edge or is stored:
/// its SSE events, its status, its record on `scan.done` (what the
/// persister writes to the database) and its dead letter.
async fn everything_told_about(app: &TestApp, id: &str) -> (Vec<Sse>, String) {
    let events = app.events("alice", id, None).await;
    let (_, status) = app.status("alice", id).await;
    let js = app.js().await;
    let done = js.get_stream(bus::streams::SCAN_DONE).await.unwrap();
    let record = done
        .get_last_raw_message_by_subject(&format!("scan.done.{id}"))
        .await
        .unwrap();
    let dlq = js.get_stream(bus::streams::DLQ).await.unwrap();
    let letter = dlq
        .get_last_raw_message_by_subject("dlq.scan")
        .await
        .unwrap();
    let told = format!(
        "{}\n{status}\n{}\n{}",
        events
            .iter()
            .map(|e| e.data.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&record.payload),
        String::from_utf8_lossy(&letter.payload),
    );
    (events, told)
}

const PROVIDER_SECRET: &str = "sk-live-7f3a9c1e2b4d8a6f";

/// A provider's error body the way real ones look: its own URL, an echo of
/// a key, request ids.
fn leaky_body(base_url: &str) -> String {
    json!({"error": {
        "message": format!("Incorrect API key provided: {PROVIDER_SECRET}. See {base_url}/chat/completions"),
        "type": "invalid_request_error",
    }})
    .to_string()
}

#[tokio::test]
async fn llm_error_bodies_and_urls_reach_neither_the_client_nor_the_record() {
    let vision = vision_standin("{\"category\":\"glass\",\"confidence\":0.9}").await;
    let app = TestApp::start_full(
        answer(),
        &[],
        &[
            "--vision-base-url",
            vision.base_url(),
            "--llm-api-key",
            "sk-llm-only-key",
            "--scan-retry-base-ms",
            "20",
            "--dlq-reprocess-every-s",
            "0",
        ],
    )
    .await;
    let llm_url = app.llm.base_url().to_owned();
    app.llm.set_script(answer().with_quirks(Quirks {
        fail_first: vec![(400, None); 3],
        fail_body: Some(leaky_body(&llm_url)),
        ..Quirks::default()
    }));
    let id = app.scan("alice", fixture("coffee.jpg")).await;
    let (events, told) = everything_told_about(&app, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["code"], "answer_failed");
    assert_eq!(app.llm.requests().len(), 3, "three attempts");
    let message = last.data["message"].as_str().unwrap();
    assert!(message.contains("refused"), "a plain cause: {message}");
    assert!(!told.contains(PROVIDER_SECRET), "{told}");
    let host = llm_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    assert!(!told.contains(host), "{told}");
    assert!(!told.contains("invalid_request_error"), "{told}");
    // Each key goes to its own host only.
    assert!(
        app.llm
            .authorizations()
            .iter()
            .all(|a| a.as_deref() == Some("Bearer sk-llm-only-key")),
        "{:?}",
        app.llm.authorizations()
    );
    assert_eq!(
        vision.authorizations(),
        [None],
        "the LLM key reached the vision host"
    );
}

#[tokio::test]
async fn vision_error_bodies_reach_neither_the_client_nor_the_record_and_get_no_llm_key() {
    let vision = StandInLlm::start(Script::new(["{}"], Duration::ZERO))
        .await
        .unwrap();
    let vision_url = vision.base_url().to_owned();
    vision.set_script(Script::new(["{}"], Duration::ZERO).with_quirks(Quirks {
        fail_first: vec![(503, None); 3],
        fail_body: Some(leaky_body(&vision_url)),
        ..Quirks::default()
    }));
    let app = TestApp::start_full(
        answer(),
        &[],
        &[
            "--vision-base-url",
            &vision_url,
            "--llm-api-key",
            "sk-llm-only-key",
            "--scan-retry-base-ms",
            "20",
            "--dlq-reprocess-every-s",
            "0",
        ],
    )
    .await;
    let id = app.scan("alice", fixture("coffee.jpg")).await;
    let (events, told) = everything_told_about(&app, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["code"], "vision_failed");
    assert_eq!(vision.requests().len(), 3, "three attempts");
    assert!(!told.contains(PROVIDER_SECRET), "{told}");
    let host = vision_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    assert!(!told.contains(host), "{told}");
    assert_eq!(
        vision.authorizations(),
        [None, None, None],
        "the LLM key reached the vision host"
    );
}
