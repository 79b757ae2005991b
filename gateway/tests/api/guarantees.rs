//! Never stuck, never doubled: the gateway's side of the guarantees. Most
//! tests here play the streamer themselves (publishing frames on the bus)
//! so the fault is exact.

use std::time::Duration;

use bus::wire::ServerFrame;
use serde_json::json;
use testkit::Script;

use crate::helpers::{GatewayOnly, TestApp, done, send, token};

#[tokio::test]
async fn a_done_the_live_path_lost_is_found_in_jetstream_and_the_client_is_not_left_waiting() {
    let app = GatewayOnly::start(&["--relay-recheck-ms", "300"]).await;
    let mut ws = app.ws("alice").await;
    let (conversation, turn) = send(&mut ws, "r-lost").await;
    app.publish(&conversation, &token(&turn, 1, "hello")).await;
    assert_eq!(ws.next().await, token(&turn, 1, "hello"));

    // `done` reaches the stream but never this node's subscription, as when
    // it is published while the node's NATS connection is away: the stream
    // stops republishing to the live subjects for a moment.
    let js = &app.js;
    let mut tok = js
        .get_stream(bus::streams::CHAT_TOK)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    tok.republish = None;
    js.update_stream(tok).await.unwrap();
    app.publish(&conversation, &done(&turn, 2)).await;
    assert_eq!(
        ws.next().await,
        done(&turn, 2),
        "done arrives after the recheck"
    );
}

#[tokio::test]
async fn a_turn_that_never_progresses_ends_with_turn_stalled_not_silence() {
    let app = GatewayOnly::start(&["--relay-recheck-ms", "200", "--turn-stall-ms", "1500"]).await;
    let mut ws = app.ws("alice").await;
    let (_, turn) = send(&mut ws, "r-stall").await;
    let started = tokio::time::Instant::now();
    match ws.next().await {
        ServerFrame::Error { turn_id, code, .. } => {
            assert_eq!(code, "turn_stalled");
            assert_eq!(turn_id.as_deref(), Some(turn.as_str()));
        }
        other => panic!("turn_stalled: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // The socket is still usable: the client may resume later.
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await, ServerFrame::Pong);
}

#[tokio::test]
async fn a_repeated_request_id_past_the_replay_window_is_resume_expired() {
    let app = GatewayOnly::start(&[]).await;
    let mut ws = app.ws("alice").await;
    let (conversation, turn) = send(&mut ws, "r-old").await;
    app.publish(&conversation, &done(&turn, 1)).await;
    assert_eq!(ws.next().await, done(&turn, 1));
    // Age the turn past CHAT_TOK's max_age (the replay window).
    let kv = app.js.get_key_value(bus::streams::KV_TURNS).await.unwrap();
    let mut index: bus::wire::TurnIndex =
        serde_json::from_slice(&kv.get(&turn).await.unwrap().unwrap()).unwrap();
    index.created_at -= chrono::Duration::hours(2);
    kv.put(&turn, serde_json::to_vec(&index).unwrap().into())
        .await
        .unwrap();

    ws.send_json(
        json!({"type": "send", "conversation_id": null, "content": "hi", "request_id": "r-old"}),
    )
    .await;
    match ws.next().await {
        ServerFrame::Error { turn_id, code, .. } => {
            assert_eq!(code, "resume_expired");
            assert_eq!(turn_id.as_deref(), Some(turn.as_str()));
        }
        other => panic!("resume_expired, not {other:?}"),
    }
}

#[tokio::test]
async fn resuming_a_followed_turn_replaces_its_relay_and_a_socket_has_a_stream_cap() {
    let app = GatewayOnly::start(&["--ws-max-streams", "2"]).await;
    let mut ws = app.ws("alice").await;
    let (conversation, turn) = send(&mut ws, "r-a").await;
    app.publish(&conversation, &token(&turn, 1, "a")).await;
    assert_eq!(ws.next().await, token(&turn, 1, "a"));
    for _ in 0..3 {
        ws.send_json(json!({"type": "resume", "turn_id": turn, "after_seq": 1}))
            .await;
    }
    // Let the resumes' relays subscribe before the next frames.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.publish(&conversation, &token(&turn, 2, "b")).await;
    app.publish(&conversation, &done(&turn, 3)).await;
    assert_eq!(ws.next().await, token(&turn, 2, "b"));
    assert_eq!(ws.next().await, done(&turn, 3));

    // Two turns in flight fill the cap; a third is refused, and nothing is accepted.
    send(&mut ws, "r-b").await;
    send(&mut ws, "r-c").await;
    ws.send_json(
        json!({"type": "send", "conversation_id": null, "content": "hi", "request_id": "r-d"}),
    )
    .await;
    match ws.next().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, "too_many_streams"),
        other => panic!("too_many_streams, not {other:?}"),
    }
    // Each frame once: nothing else arrives for the first turn.
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await, ServerFrame::Pong);
}

#[tokio::test]
async fn a_non_streaming_completion_has_a_deadline() {
    let slow = Script::new(vec!["x "; 50], Duration::from_millis(100));
    let app = TestApp::start_with(slow, &["--completion-timeout-ms", "1000"]).await;
    let started = tokio::time::Instant::now();
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(crate::helpers::token_for("alice", 3600))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(4));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
}

#[tokio::test]
async fn the_turn_limit_counts_a_users_turns_in_flight_across_sockets_and_nodes() {
    // The default limit, 8 turns per user.
    let slow = Script::new(vec!["x "; 30], Duration::from_millis(100));
    let app = TestApp::start_with(slow, &[]).await;
    let other = app.another_gateway(&[]).await;

    let mut first = app.ws("alice").await;
    for i in 1..=8 {
        send(&mut first, &format!("r{i}")).await;
    }
    drop(first);
    // Reconnecting, even to another node, gives no place back.
    let mut second = crate::helpers::ws_to(other, "alice").await;
    second
        .send_json(
            json!({"type": "send", "conversation_id": null, "content": "hi", "request_id": "r9"}),
        )
        .await;
    match second.next().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, "too_many_turns"),
        other => panic!("too_many_turns, not {other:?}"),
    }
    // Another user is not affected, and a repeat is no new turn.
    let mut bob = app.ws("bob").await;
    send(&mut bob, "r1").await;
    let mut again = app.ws("alice").await;
    send(&mut again, "r8").await;
    again.until_done().await;
    // Once the turns are done, there is room again.
    let mut later = crate::helpers::ws_to(other, "alice").await;
    send(&mut later, "r9").await;
}
#[tokio::test]
async fn a_frame_the_stream_refused_never_reaches_the_client() {
    let app = GatewayOnly::start(&[]).await;
    let mut ws = app.ws("alice").await;
    let (conversation, turn) = send(&mut ws, "r-fenced").await;
    app.publish(&conversation, &token(&turn, 1, "kept ")).await;
    assert_eq!(ws.next().await, token(&turn, 1, "kept "));
    // A stale writer's frame: refused by the fence, but core NATS still
    // hands it to every subscriber of the subject.
    let stale = async_nats::jetstream::message::PublishMessage::build()
        .payload(
            serde_json::to_vec(&token(&turn, 2, "stale "))
                .unwrap()
                .into(),
        )
        .expected_last_subject_sequence(999_999);
    let refused = app
        .js
        .send_publish(bus::subject::chat_tok(&conversation, &turn).unwrap(), stale)
        .await
        .unwrap()
        .await;
    assert!(refused.is_err(), "the fence refused it");
    app.publish(&conversation, &token(&turn, 2, "real ")).await;
    app.publish(&conversation, &done(&turn, 3)).await;
    assert_eq!(ws.next().await, token(&turn, 2, "real "));
    assert_eq!(ws.next().await, done(&turn, 3));
}

// Found by the chaos run: a gateway SIGKILLed after writing a turn's index
// and before publishing its request left an index behind; the client's
// resend of the same request id, within seconds, on the other gateway got
// `accepted` (a repeat) but was not published again (the first accept might
// still have been under way), and every later resume followed a turn that
// never ran.
#[tokio::test]
async fn a_repeat_of_a_request_whose_gateway_died_before_publishing_still_runs_it() {
    use futures::StreamExt as _;

    let app = GatewayOnly::start(&[]).await;
    let (turn, conversation) = gateway::derive_ids("alice", "r-orphan", None);
    // What the dead gateway left: the index, written 5 s ago (a repeat
    // waits until 10 s after it for the first accept to show an outcome).
    let index = bus::wire::TurnIndex {
        user_id: "alice".into(),
        conversation_id: conversation.clone(),
        request_id: "r-orphan".into(),
        created_at: chrono::Utc::now() - chrono::Duration::seconds(5),
    };
    app.js
        .get_key_value(bus::streams::KV_TURNS)
        .await
        .unwrap()
        .put(&turn, serde_json::to_vec(&index).unwrap().into())
        .await
        .unwrap();
    let client = async_nats::connect(app.nats_url()).await.unwrap();
    let mut requests = client
        .subscribe(bus::subject::chat_req(&conversation).unwrap())
        .await
        .unwrap();

    let mut ws = app.ws("alice").await;
    ws.send_json(
        json!({"type": "send", "conversation_id": null, "content": "hi", "request_id": "r-orphan"}),
    )
    .await;
    match ws.next().await {
        ServerFrame::Accepted { turn_id, .. } => assert_eq!(turn_id, turn),
        other => panic!("accepted, not {other:?}"),
    }
    let published = tokio::time::timeout(Duration::from_secs(20), requests.next())
        .await
        .expect("the request is published after all")
        .unwrap();
    let request: bus::wire::ChatRequest = serde_json::from_slice(&published.payload).unwrap();
    assert_eq!(request.turn_id, turn);
    assert_eq!(request.content, "hi");
}
