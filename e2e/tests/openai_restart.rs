//! No glued answers on the OpenAI endpoint: a streaming
//! `/v1/chat/completions` whose streamer is SIGKILLed mid-answer never gets
//! the restarted answer appended to the text it already has. It ends with
//! an `answer_restarted` error chunk; the same `Idempotency-Key` then gets
//! the whole answer, once.

use std::time::Duration;

use e2e::{Service, build_binaries, token_for};
use futures::StreamExt as _;
use serde_json::{Value, json};
use testkit::{NatsServer, Script, StandInLlm};

fn words() -> Vec<String> {
    (0..40).map(|i| format!("w{i} ")).collect()
}

/// Streams one completion; `on_chunk` sees the content count after each
/// chunk. Returns the text and the error chunks.
async fn stream(gateway: &str, key: &str, mut on_chunk: impl FnMut(usize)) -> (String, Vec<Value>) {
    let response = reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat/completions"))
        .bearer_auth(token_for("alice"))
        .header("idempotency-key", key)
        .json(&json!({"stream": true, "messages": [{"role": "user", "content": "count"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let (mut buffer, mut text, mut errors, mut chunks) =
        (String::new(), String::new(), Vec::new(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(Ok(bytes))) = tokio::time::timeout_at(deadline, body.next()).await {
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                return (text, errors);
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            if chunk.get("error").is_some() {
                errors.push(chunk);
                continue;
            }
            if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str()
                && !delta.is_empty()
            {
                text.push_str(delta);
                chunks += 1;
                on_chunk(chunks);
            }
        }
    }
    panic!("no [DONE]: {text:?} {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_stream_across_a_streamer_kill_never_repeats_text() {
    testkit::init_logs();
    let bin = build_binaries().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await.unwrap();
    let llm = StandInLlm::start(Script::new(words(), Duration::from_millis(60)))
        .await
        .unwrap();
    let mut gateway = Service::gateway(&bin, logs.path(), &nats.url(), &[]);
    let mut streamer = Service::streamer(
        &bin,
        logs.path(),
        &nats.url(),
        llm.base_url(),
        &[("STREAMER_ACK_WAIT_MS", "1500".into())],
    );
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let full: String = words().concat();

    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = gateway.addr.clone();
    let client = tokio::spawn(async move {
        stream(&addr, "oai-1", |n| {
            if n == 5 {
                let _ = kill_tx.send(());
            }
        })
        .await
    });
    kill_rx.recv().await.expect("five chunks arrived");
    streamer.kill();
    streamer.start().await.unwrap();
    let (text, errors) = client.await.unwrap();
    assert!(full.starts_with(&text), "text repeated: {text:?}");
    assert!(
        text.len() < full.len(),
        "the kill came too late to test anything"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["error"]["code"], "answer_restarted");

    // The same key again: the answer from its restart, whole and once.
    let (again, errors) = stream(&gateway.addr, "oai-1", |_| {}).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(again, full);
}
