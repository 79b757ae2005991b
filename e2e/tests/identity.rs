//! Real identity providers issue subs such as `auth0|alice@example.com`.
//! With the real three binaries, such a user chats over the WebSocket and
//! scans a photo; both are stored in Postgres with `user_id` equal to the sub
//! byte for byte, listed for that user, and neither listed for nor readable
//! by another user whose sub differs only after the `|`.

use std::time::Duration;

use bus::wire::ServerFrame;
use e2e::{Bed, token_for};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use testkit::{Postgres, Script};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};

const ALICE: &str = "auth0|alice@example.com";
const BOB: &str = "auth0|bob@example.com";

/// One turn over the WebSocket as `user`: the ids it was given and the text.
async fn chat_turn(gateway: &str, user: &str, content: &str) -> (String, String, String) {
    let mut request = format!("ws://{gateway}/v1/chat/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token_for(user)).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the WebSocket upgrade accepts the token");
    let frame =
        json!({"type": "send", "conversation_id": null, "content": content, "request_id": "r1"});
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let (mut conversation, mut turn, mut text) = (None, None, String::new());
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame within 30 s")
            .expect("socket open")
            .expect("no socket error");
        let Message::Text(body) = message else {
            continue;
        };
        match serde_json::from_str::<ServerFrame>(&body).unwrap() {
            ServerFrame::Accepted {
                conversation_id,
                turn_id,
                ..
            } => {
                conversation = Some(conversation_id);
                turn = Some(turn_id);
            }
            ServerFrame::Token { delta, .. } => text.push_str(&delta),
            ServerFrame::Done { .. } => break,
            other => panic!("unexpected frame {other:?}"),
        }
    }
    (conversation.unwrap(), turn.unwrap(), text)
}

/// One SQL value, once the row is there.
async fn row(pg: &Postgres, sql: String) -> String {
    testkit::wait_for(&sql.clone(), Duration::from_secs(30), || {
        let value = pg.psql("identity", &sql).ok().filter(|v| !v.is_empty());
        async move { value }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_with_pipe_at_and_dots_chats_and_scans_and_is_stored_verbatim() {
    testkit::init_logs();
    let words = ["Glass ", "goes ", "to ", "glass."];
    let bed = Bed::start("identity", Script::new(words, Duration::from_millis(5))).await;
    let mut persister = bed.persister();
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[]);
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let addr = gateway.addr.clone();
    let http = reqwest::Client::new();
    let get = |path: String, user: &str| {
        http.get(format!("http://{addr}{path}"))
            .bearer_auth(token_for(user))
            .send()
    };

    let (conversation, turn, text) = chat_turn(&addr, ALICE, "Where does a bottle go?").await;
    assert_eq!(text, words.concat());

    let photo = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../streamer/tests/fixtures/images/coffee.jpg"
    ))
    .unwrap();
    let accepted = http
        .post(format!("http://{addr}/v1/scans"))
        .bearer_auth(token_for(ALICE))
        .header("content-type", "image/jpeg")
        .body(photo)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let scan = accepted.json::<Value>().await.unwrap()["scan_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = testkit::wait_for("the scan to finish", Duration::from_secs(60), || {
        let response = get(format!("/v1/scans/{scan}"), ALICE);
        async move {
            let status: Value = response.await.ok()?.json().await.ok()?;
            (status["status"] == "done" || status["status"] == "failed").then_some(status)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", streamer.log_tail()));
    assert_eq!(status["status"], "done", "{status}");

    // Stored verbatim: the sub, not a mapped form of it.
    let stored = |table: &str, key: &str, id: &str| {
        row(
            &bed.pg,
            format!("select user_id from {table} where {key} = '{id}'"),
        )
    };
    assert_eq!(stored("turns", "turn_id", &turn).await, ALICE);
    assert_eq!(
        stored("conversations", "conversation_id", &conversation).await,
        ALICE
    );
    assert_eq!(stored("scans", "scan_id", &scan).await, ALICE);

    // Listed for Alice.
    let list: Value = get("/v1/conversations".into(), ALICE)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [conversation.as_str()], "{list}");
    let detail = get(format!("/v1/conversations/{conversation}"), ALICE)
        .await
        .unwrap();
    assert_eq!(detail.status(), 200);
    let detail: Value = detail.json().await.unwrap();
    assert_eq!(detail["turns"][0]["turn_id"], turn.as_str(), "{detail}");
    assert_eq!(detail["turns"][0]["assistant_text"], words.concat());
    let scans: Value = get("/v1/scans".into(), ALICE)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(scans["scans"][0]["scan_id"], scan.as_str(), "{scans}");
    assert_eq!(scans["scans"][0]["user_id"], ALICE);

    // Not for Bob, whose sub shares the provider and the domain.
    let list: Value = get("/v1/conversations".into(), BOB)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["conversations"], json!([]), "{list}");
    let scans: Value = get("/v1/scans".into(), BOB)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(scans["scans"], json!([]), "{scans}");
    let foreign = get(format!("/v1/conversations/{conversation}"), BOB)
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let foreign = get(format!("/v1/scans/{scan}"), BOB).await.unwrap();
    assert!(
        [403, 404].contains(&foreign.status().as_u16()),
        "{}",
        foreign.status()
    );
    let foreign = get(format!("/v1/scans/{scan}/events"), BOB).await.unwrap();
    assert!([403, 404].contains(&foreign.status().as_u16()));
    drop(gateway);
}
