//! Token frames that travel batched on `chat.tok` (several frames in one bus
//! message) reach clients as the contract's frames: one WebSocket message
//! per `seq`, bytes untouched, resumable from inside a batch, across a
//! `reset`, and through the OpenAI endpoint. The test plays the streamer.

use bus::wire::{ChatRequest, ServerFrame};
use futures::StreamExt as _;
use serde_json::json;

use crate::helpers::{GatewayOnly, done, send, token, token_for};

fn reset(turn: &str, seq: u64) -> ServerFrame {
    ServerFrame::Reset {
        turn_id: turn.to_owned(),
        seq,
        reason: "upstream_retry".to_owned(),
    }
}

#[tokio::test]
async fn a_batch_reaches_the_client_as_one_frame_per_seq_and_a_resume_lands_inside_it() {
    let app = GatewayOnly::start(&[]).await;
    let mut live = app.ws("alice").await;
    let (conversation, turn) = send(&mut live, "r-batch").await;
    let first: Vec<ServerFrame> = (1..=5)
        .map(|seq| token(&turn, seq, &format!("w{seq} ")))
        .collect();
    app.publish_batch(&conversation, &first).await;
    for frame in &first {
        assert_eq!(&live.next().await, frame, "one message per frame");
    }

    // Another socket resumes after seq 3: the middle of that batch.
    let mut resumed = app.ws("alice").await;
    resumed
        .send_json(json!({"type": "resume", "turn_id": turn, "after_seq": 3}))
        .await;
    assert_eq!(resumed.next().await, first[3]);
    assert_eq!(resumed.next().await, first[4]);

    // A batch with a reset inside it: both clients get every frame once, in
    // order, and the text after the reset is what counts.
    let second = vec![
        token(&turn, 6, "lost "),
        reset(&turn, 7),
        token(&turn, 8, "kept"),
        done(&turn, 9),
    ];
    app.publish_batch(&conversation, &second).await;
    assert_eq!(live.until_done().await, second);
    assert_eq!(resumed.until_done().await, second);

    // A late resume from 0 replays both stored batches frame by frame.
    let mut late = app.ws("alice").await;
    late.send_json(json!({"type": "resume", "turn_id": turn, "after_seq": 0}))
        .await;
    let all: Vec<ServerFrame> = first.iter().chain(&second).cloned().collect();
    assert_eq!(late.until_done().await, all);
    let (text, _) = bus::wire::shown_text(&all);
    assert_eq!(text, "kept");
}

#[tokio::test]
async fn frames_are_relayed_as_the_bytes_published_not_re_encoded() {
    let app = GatewayOnly::start(&[]).await;
    let mut ws = app.ws("bob").await;
    let (conversation, turn) = send(&mut ws, "r-bytes").await;
    // Valid frames in a spelling serde would not produce (key order,
    // spaces, an escaped character): a re-encoding gateway changes them.
    let lines = [
        format!(r#"{{"seq":1, "delta":"caf\u00e9 ", "type":"token", "turn_id":"{turn}"}}"#),
        format!(r#"{{"turn_id":"{turn}","type":"token","seq":2,"delta":"au lait"}}"#),
        format!(
            r#"{{"type":"done","turn_id":"{turn}","seq":3,"finish_reason":"stop","usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#
        ),
    ];
    app.publish_raw(&conversation, &turn, lines.join("\n").into_bytes())
        .await;
    for line in &lines {
        assert_eq!(&ws.next_text().await, line);
    }
}

#[tokio::test]
async fn the_openai_endpoint_reads_batches_across_a_reset() {
    let app = GatewayOnly::start(&[]).await;
    let mut requests = app.js.client().subscribe("chat.req.>").await.unwrap();
    app.js.client().flush().await.unwrap();
    let http = reqwest::Client::new();
    let response = tokio::spawn(
        http.post(format!("http://{}/v1/chat/completions", app.addr))
            .bearer_auth(token_for("carol", 600))
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send(),
    );
    let request = tokio::time::timeout(std::time::Duration::from_secs(10), requests.next())
        .await
        .expect("the turn's request")
        .unwrap();
    let request: ChatRequest = serde_json::from_slice(&request.payload).unwrap();
    let turn = request.turn_id.as_str();
    app.publish_batch(
        &request.conversation_id,
        &[
            token(turn, 1, "Hel"),
            token(turn, 2, "lo"),
            reset(turn, 3),
            token(turn, 4, "Hi"),
            token(turn, 5, " there"),
            done(turn, 6),
        ],
    )
    .await;
    let body: serde_json::Value = response.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hi there");
}
