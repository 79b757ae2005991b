//! Gateway integration tests: real nats-server, real streamer, stand-in LLM.

mod accept;
mod batches;
mod characters;
mod edge;
mod erase;
mod grounding;
mod guarantees;
mod helpers;
mod openapi;
mod refused_uploads;
mod register;
mod rewards;
mod scan_providers;
mod scans;
mod uploads;

use std::time::Duration;

use bus::wire::{FinishReason, ServerFrame};
use helpers::{TestApp, gateway_config, text_of, token_for};
use serde_json::{Value, json};
use testkit::{NatsServer, Script};
use tokio_tungstenite::tungstenite::Message;

/// The streamer's default `LLM_MODEL`, which the gateway allows by default.
const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

fn answer() -> Script {
    Script::new(
        ["Glass ", "goes ", "in ", "the ", "glass ", "bin."],
        Duration::from_millis(5),
    )
}

#[tokio::test]
async fn health_readiness_metrics_and_unknown_routes() {
    let app = TestApp::start(answer()).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["nats"], "connected");
    assert_eq!(body["checks"]["streams"], "present");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let missing = app.http.get(app.url("/v1/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn bad_missing_expired_and_forged_tokens_get_401_json() {
    let app = TestApp::start(answer()).await;
    let ws_url = app.url("/v1/chat/ws");
    let check = |request: reqwest::RequestBuilder, code: &'static str| async move {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 5);
    };
    check(app.http.get(&ws_url), "missing_token").await;
    check(
        app.http.get(&ws_url).bearer_auth("not.a.jwt"),
        "invalid_token",
    )
    .await;
    check(
        app.http.get(&ws_url).bearer_auth(token_for("u1", -120)),
        "token_expired",
    )
    .await;
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "u1", "exp": chrono::Utc::now().timestamp() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-some-other-secret!!"),
    )
    .unwrap();
    check(app.http.get(&ws_url).bearer_auth(&forged), "invalid_token").await;
    // alg: none, with the claims intact and no signature.
    let b64 = |v: Value| {
        use base64_url_encode as enc;
        enc(v.to_string().as_bytes())
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "u1", "exp": chrono::Utc::now().timestamp() + 600}))
    );
    check(app.http.get(&ws_url).bearer_auth(&none), "invalid_token").await;
    // The query parameter works for the streaming endpoints (here: not an
    // upgrade request, so a valid token gets past auth to a non-401 error).
    let with_query = app
        .http
        .get(format!("{ws_url}?access_token={}", token_for("u1", 600)))
        .send()
        .await
        .unwrap();
    assert_ne!(with_query.status(), 401);
    check(
        app.http.get(format!("{ws_url}?access_token=garbage")),
        "invalid_token",
    )
    .await;
}

fn base64_url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn dev_login_issues_tokens_only_when_enabled() {
    let app = TestApp::start(answer()).await;
    let response = app
        .http
        .post(app.url("/v1/dev/token"))
        .json(&json!({"user_id": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user_id"], "alice");
    let token = body["access_token"].as_str().unwrap();
    let ws = app
        .http
        .get(app.url("/v1/chat/ws"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_ne!(ws.status(), 401, "a dev token authenticates");
    // Any non-empty id, as identity providers issue them.
    let email = app
        .http
        .post(app.url("/v1/dev/token"))
        .json(&json!({"user_id": "auth0|a.b@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(email.status(), 200);
    let body: Value = email.json().await.unwrap();
    assert_eq!(body["user_id"], "auth0|a.b@example.com");
    let bad = app
        .http
        .post(app.url("/v1/dev/token"))
        .json(&json!({"user_id": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let off = TestApp::start_with(answer(), &[]).await;
    let response = off
        .http
        .post(off.url("/v1/dev/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_turn_streams_over_the_websocket_and_a_repeated_request_id_is_not_a_second_turn() {
    let app = TestApp::start(answer()).await;
    let mut ws = app.ws("alice").await;
    ws.send_json(json!({"type": "send", "conversation_id": null, "content": "Where does glass go?", "request_id": "r-1"}))
        .await;
    let ServerFrame::Accepted {
        request_id,
        conversation_id,
        turn_id,
    } = ws.next().await
    else {
        panic!("first frame is not accepted");
    };
    assert_eq!(request_id, "r-1");
    let frames = ws.until_done().await;
    assert_eq!(text_of(&frames), "Glass goes in the glass bin.");
    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::Done {
            finish_reason: FinishReason::Stop,
            ..
        })
    ));

    // The same request_id again: same ids, the same frames replayed, no new generation.
    ws.send_json(json!({"type": "send", "conversation_id": null, "content": "Where does glass go?", "request_id": "r-1"}))
        .await;
    let ServerFrame::Accepted {
        conversation_id: again_conv,
        turn_id: again_turn,
        ..
    } = ws.next().await
    else {
        panic!("not accepted");
    };
    assert_eq!(
        (again_conv, again_turn.clone()),
        (conversation_id.clone(), turn_id.clone())
    );
    assert_eq!(ws.until_done().await, frames);
    assert_eq!(
        app.llm.requests().len(),
        1,
        "a repeated request_id reached the LLM twice"
    );

    // Another user cannot continue, resume or cancel it.
    let mut mallory = app.ws("mallory").await;
    mallory
        .send_json(json!({"type": "send", "conversation_id": conversation_id, "content": "hi", "request_id": "m-1"}))
        .await;
    assert!(matches!(mallory.next().await, ServerFrame::Error { code, .. } if code == "forbidden"));
    mallory
        .send_json(json!({"type": "resume", "turn_id": turn_id, "after_seq": 0}))
        .await;
    assert!(matches!(mallory.next().await, ServerFrame::Error { code, .. } if code == "forbidden"));
    mallory
        .send_json(json!({"type": "cancel", "turn_id": turn_id}))
        .await;
    assert!(matches!(mallory.next().await, ServerFrame::Error { code, .. } if code == "forbidden"));
    assert_eq!(app.llm.requests().len(), 1);
}

#[tokio::test]
async fn resume_replays_exactly_the_frames_after_the_clients_seq() {
    let app = TestApp::start(answer()).await;
    let mut ws = app.ws("bob").await;
    ws.send_json(json!({"type": "send", "content": "glass?", "request_id": "r-2"}))
        .await;
    let ServerFrame::Accepted { turn_id, .. } = ws.next().await else {
        panic!("not accepted")
    };
    // Read two tokens, then drop the socket mid-answer.
    let first: Vec<ServerFrame> = vec![ws.next().await, ws.next().await];
    drop(ws);

    let mut again = app.ws("bob").await;
    again
        .send_json(json!({"type": "resume", "turn_id": turn_id, "after_seq": 2}))
        .await;
    let rest = again.until_done().await;
    let all: Vec<ServerFrame> = first.into_iter().chain(rest).collect();
    let seqs: Vec<u64> = all.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>(), "every seq exactly once");
    assert_eq!(text_of(&all), "Glass goes in the glass bin.");

    let mut unknown = app.ws("bob").await;
    unknown
        .send_json(json!({"type": "resume", "turn_id": "0198f1d2-0000-7000-8000-000000000000", "after_seq": 0}))
        .await;
    assert!(
        matches!(unknown.next().await, ServerFrame::Error { code, .. } if code == "resume_expired")
    );

    // A turn whose frames have aged out of CHAT_TOK (its index lives longer).
    let old = bus::wire::TurnIndex {
        user_id: "bob".into(),
        conversation_id: "conv-old".into(),
        request_id: "r-old".into(),
        created_at: chrono::Utc::now() - chrono::Duration::hours(2),
    };
    let turns = app
        .js()
        .await
        .get_key_value(bus::streams::KV_TURNS)
        .await
        .unwrap();
    turns
        .put("old-turn", serde_json::to_vec(&old).unwrap().into())
        .await
        .unwrap();
    unknown
        .send_json(json!({"type": "resume", "turn_id": "old-turn", "after_seq": 3}))
        .await;
    assert!(
        matches!(unknown.next().await, ServerFrame::Error { code, .. } if code == "resume_expired")
    );
}

#[tokio::test]
async fn bad_frames_get_specific_errors_and_the_socket_stays_usable() {
    let app = TestApp::start(answer()).await;
    let mut ws = app.ws("carol").await;
    let expect = |frame: ServerFrame, want: &str| match frame {
        ServerFrame::Error { code, .. } => assert_eq!(code, want),
        other => panic!("expected error {want}, got {other:?}"),
    };
    ws.send_raw(Message::Text("not json".into())).await;
    expect(ws.next().await, "invalid_json");
    ws.send_json(json!({"type": "fly"})).await;
    expect(ws.next().await, "unknown_type");
    ws.send_json(json!({"type": "send", "content": "x"})).await;
    expect(ws.next().await, "invalid_frame");
    ws.send_json(json!({"type": "send", "content": 5, "request_id": "r"}))
        .await;
    expect(ws.next().await, "invalid_frame");
    ws.send_json(
        json!({"type": "send", "content": "x".repeat(64 * 1024 + 1), "request_id": "big"}),
    )
    .await;
    expect(ws.next().await, "too_large");
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    expect(ws.next().await, "binary_not_supported");
    ws.send_json(
        json!({"type": "send", "conversation_id": "a.b", "content": "x", "request_id": "r"}),
    )
    .await;
    expect(ws.next().await, "invalid_conversation_id");
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await, ServerFrame::Pong);
    assert!(app.llm.requests().is_empty(), "bad input reached the LLM");
}

#[tokio::test]
async fn misconfiguration_fails_fast_with_an_actionable_message() {
    let nats = NatsServer::start().await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let no_key = gateway::Config {
        auth_jwt_secret: None,
        ..gateway_config(&nats.url(), &[])
    };
    let error = gateway::Gateway::build(no_key, shutdown.clone())
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("AUTH_JWT_SECRET"), "{error:#}");

    let unreachable = gateway_config("nats://127.0.0.1:1", &[]);
    let error = gateway::Gateway::build(unreachable, shutdown.clone())
        .await
        .err()
        .unwrap();
    assert!(format!("{error:#}").contains("NATS_URL"), "{error:#}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let in_use = gateway::Config {
        listen: addr,
        ..gateway_config(&nats.url(), &[])
    };
    let error = gateway::Gateway::build(in_use, shutdown)
        .await
        .err()
        .unwrap();
    assert!(format!("{error:#}").contains("GATEWAY_LISTEN"), "{error:#}");
}

#[tokio::test]
async fn openai_compatible_endpoint_streams_and_completes_through_the_bus() {
    let app = TestApp::start(answer()).await;
    let token = token_for("dana", 600);
    // Non-stream.
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&json!({"model": DEFAULT_MODEL, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "glass?"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-turn-id"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Glass goes in the glass bin."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    // The caller's earlier messages reach the model after the system prompt.
    let sent = &app.llm.requests()[0];
    assert_eq!(sent["messages"][1]["content"], "Be brief.");
    assert_eq!(sent["messages"][2]["content"], "glass?");

    // Stream.
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(
            &json!({"messages": [{"role": "user", "content": "glass?"}], "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let chunks: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(chunks.last(), Some(&"[DONE]"));
    let values: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let content: String = values
        .iter()
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Glass goes in the glass bin.");
    assert_eq!(values.last().unwrap()["usage"]["prompt_tokens"], 7);

    // Bad input gets a specific 4xx and reaches nothing.
    let before = app.llm.requests().len();
    for (body, status, code) in [
        ("{nope", 400, "invalid_json"),
        (r#"{"messages": "x"}"#, 400, "invalid_request"),
        (
            r#"{"messages": [{"role": "assistant", "content": "x"}]}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            400,
            "invalid_request",
        ),
    ] {
        let response = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}");
    }
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let response = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let unauthenticated = app
        .http
        .post(app.url("/v1/chat/completions"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(app.llm.requests().len(), before);
}

#[tokio::test]
async fn the_official_openai_python_client_works_against_the_gateway() {
    let app = TestApp::start(answer()).await;
    let output = tokio::process::Command::new(testkit::venv_bin("python3"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/openai_client.py"
        ))
        .arg(app.url("/v1"))
        .arg(token_for("erin", 600))
        .arg("Glass goes in the glass bin.")
        .arg(DEFAULT_MODEL)
        .output()
        .await
        .expect("the venv's python (run scripts/setup.sh)");
    assert!(
        output.status.success(),
        "openai client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_client_that_cannot_keep_up_is_closed_with_4008_and_resumes_without_loss() {
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    // Long tokens, so kernel socket buffers cannot absorb the whole answer.
    let words: Vec<String> = (0..3000)
        .map(|i| format!("t{i}-{} ", "x".repeat(2000)))
        .collect();
    let full = words.concat();
    let app = TestApp::start_with(
        Script::new(words, Duration::ZERO),
        &["--ws-outbox-frames", "32"],
    )
    .await;
    // A client with a tiny receive buffer that stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let mut request = format!("ws://{}/v1/chat/ws", app.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token_for("slow", 600))
            .parse()
            .unwrap(),
    );
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let mut ws = helpers::Ws { socket };
    ws.send_json(json!({"type": "send", "content": "count", "request_id": "slow-1"}))
        .await;
    let ServerFrame::Accepted { turn_id, .. } = ws.next().await else {
        panic!("not accepted")
    };
    // Longer than the relay waits for room (2 s), so the client counts as slow.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Now read: frames in order, then a close saying "too slow".
    let mut seen = Vec::new();
    let close_code = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.socket.next()).await;
        let Ok(next) = next else {
            panic!(
                "no close after {} frames, last {:?}",
                seen.len(),
                seen.last().map(|f: &ServerFrame| f.seq())
            );
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                seen.push(serde_json::from_str::<ServerFrame>(&text).unwrap())
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close_code, Some(4008));
    let last_seq = seen.iter().filter_map(ServerFrame::seq).max().unwrap_or(0);
    assert!(
        !seen.iter().any(|f| matches!(f, ServerFrame::Done { .. })),
        "the whole answer fit; the test did not exercise slowness"
    );

    let mut again = app.ws("slow").await;
    again
        .send_json(json!({"type": "resume", "turn_id": turn_id, "after_seq": last_seq}))
        .await;
    let rest = again.until_done().await;
    let all: Vec<ServerFrame> = seen.into_iter().chain(rest).collect();
    // Deltas that queue behind a publish travel batched on the bus, but the
    // client gets one frame per token, and the seq space is contiguous.
    let seqs: Vec<u64> = all.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(seqs, (1..=3001).collect::<Vec<_>>());
    assert_eq!(text_of(&all), full);
}

#[tokio::test]
async fn the_official_openai_python_client_lists_the_allowed_models_and_is_refused_others() {
    let app = TestApp::start_with(
        answer(),
        &["--llm-models", "alpha, beta", "--llm-max-tokens", "300"],
    )
    .await;
    let output = tokio::process::Command::new(testkit::venv_bin("python3"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/models_client.py"
        ))
        .arg(app.url("/v1"))
        .arg(token_for("erin", 600))
        .arg("alpha,beta")
        .arg("300")
        .output()
        .await
        .expect("the venv's python (run scripts/setup.sh)");
    assert!(
        output.status.success(),
        "openai client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Only the one allowed call reached the provider, with what it asked for.
    let sent = app.llm.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["model"], "beta");
    assert_eq!(sent[0]["max_tokens"], 300);

    let unauthenticated = app.http.get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
}

#[tokio::test]
async fn models_default_to_the_streamers_model_and_errors_carry_openai_fields() {
    let app = TestApp::start(answer()).await;
    let token = token_for("frank", 600);
    let list: Value = app
        .http
        .get(app.url("/v1/models"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], DEFAULT_MODEL, "{list}");
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");

    let refused = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    // The cap's default is the streamer's default, LLM_MAX_TOKENS=512.
    for (max_tokens, code) in [(513, "max_tokens_too_large"), (0, "invalid_max_tokens")] {
        let refused = app
            .http
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&token)
            .json(
                &json!({"max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 400);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    }
    assert!(
        app.llm.requests().is_empty(),
        "a refused request reached the LLM"
    );
}

#[tokio::test]
async fn a_websocket_send_may_name_an_allowed_model_and_a_token_cap() {
    let app = TestApp::start_with(
        answer(),
        &["--llm-models", "alpha,beta", "--llm-max-tokens", "300"],
    )
    .await;
    let mut ws = app.ws("gina").await;
    let expect_error = |frame: ServerFrame, want: &str| match frame {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, want, "{message}");
            message
        }
        other => panic!("expected error {want}, got {other:?}"),
    };
    ws.send_json(json!({"type": "send", "content": "hi", "request_id": "w-1", "model": "gpt-4o"}))
        .await;
    let message = expect_error(ws.next().await, "model_not_found");
    assert!(message.contains("gpt-4o"), "{message}");
    ws.send_json(json!({"type": "send", "content": "hi", "request_id": "w-2", "max_tokens": 301}))
        .await;
    let message = expect_error(ws.next().await, "max_tokens_too_large");
    assert!(message.contains("300"), "{message}");
    assert!(
        app.llm.requests().is_empty(),
        "a refused send reached the LLM"
    );

    ws.send_json(json!({"type": "send", "content": "hi", "request_id": "w-3", "model": "beta", "max_tokens": 300}))
        .await;
    assert!(matches!(ws.next().await, ServerFrame::Accepted { .. }));
    ws.until_done().await;
    ws.send_json(json!({"type": "send", "content": "hi", "request_id": "w-4"}))
        .await;
    assert!(matches!(ws.next().await, ServerFrame::Accepted { .. }));
    ws.until_done().await;
    let sent = app.llm.requests();
    assert_eq!(sent[0]["model"], "beta");
    assert_eq!(sent[0]["max_tokens"], 300);
    // Without the fields a send is what it always was: the streamer's defaults.
    assert_eq!(sent[1]["max_tokens"], 512);
}
