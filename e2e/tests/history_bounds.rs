//! A conversation larger than a NATS message (60 turns of 30 KB questions,
//! about 1.8 MB): the next turn's prompt still carries the newest earlier
//! turns within the streamer's history budget, and
//! `GET /v1/conversations/{id}` pages through every turn with its cursor,
//! from Postgres and, with Postgres stopped, from the persister's SQLite file.

use std::{collections::HashSet, time::Duration};

use bus::wire::ServerFrame;
use e2e::{Bed, token_for};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use testkit::Script;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};

/// `streamer::chat::HISTORY_BUDGET_BYTES`: earlier text a prompt may carry.
const HISTORY_BUDGET_BYTES: usize = 32 * 1024;
const TURNS: usize = 60;
const ANSWER: &str = "Noted.";

fn question(n: usize) -> String {
    let marker = format!("question {n:02}: ");
    format!("{marker}{}", "y".repeat(30_000 - marker.len()))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut Socket) -> ServerFrame {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame within 30 s")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).expect("a server frame");
        }
    }
}

/// Sends one turn and waits for its `done`; returns the conversation id.
async fn turn(ws: &mut Socket, conversation_id: Option<&str>, content: &str, n: usize) -> String {
    let send = json!({"type": "send", "conversation_id": conversation_id,
                      "content": content, "request_id": format!("r-{n}")});
    ws.send(Message::Text(send.to_string().into()))
        .await
        .unwrap();
    let conversation = match next_frame(ws).await {
        ServerFrame::Accepted {
            conversation_id, ..
        } => conversation_id,
        other => panic!("turn {n} not accepted: {other:?}"),
    };
    while !matches!(next_frame(ws).await, ServerFrame::Done { .. }) {}
    conversation
}

/// Every page of the conversation, newest page first, following `next_cursor`.
async fn pages(http: &reqwest::Client, url: &str, limit: Option<u32>) -> Vec<Value> {
    let mut pages: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query: Vec<String> = Vec::new();
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        // Cursors are URL-safe as they come.
        if let Some(cursor) = cursor.take() {
            query.push(format!("cursor={cursor}"));
        }
        let response = http
            .get(format!("{url}?{}", query.join("&")))
            .bearer_auth(token_for("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "page {}", pages.len() + 1);
        let page: Value = response.json().await.unwrap();
        assert!(pages.len() < 100, "the cursor does not advance");
        let more = page["has_more"].as_bool().expect("has_more");
        match page["next_cursor"].as_str() {
            Some(next) if more => cursor = Some(next.to_owned()),
            None if !more => {}
            other => panic!("has_more {more} with next_cursor {other:?}"),
        }
        pages.push(page);
        if !more {
            return pages;
        }
    }
}

/// The user texts of every page, oldest first, after checking each turn
/// comes exactly once.
/// Compares questions by their first words: the texts are 30 KB each, too
/// long for a readable failure.
fn assert_same_questions(got: &[String], want: &[String], pages: usize) {
    let short =
        |v: &[String]| -> Vec<String> { v.iter().map(|q| q.chars().take(12).collect()).collect() };
    assert!(
        got == want,
        "over {pages} pages, got {:?}, want {:?}",
        short(got),
        short(want)
    );
}

fn questions(pages: &[Value]) -> Vec<String> {
    let turns: Vec<&Value> = pages
        .iter()
        .rev()
        .flat_map(|p| p["turns"].as_array().unwrap())
        .collect();
    let ids: HashSet<&str> = turns
        .iter()
        .map(|t| t["turn_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), turns.len(), "a turn came twice");
    turns
        .iter()
        .map(|t| t["user_text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_past_the_bus_message_size_keeps_its_context_and_pages() {
    testkit::init_logs();
    let mut bed = Bed::start("history", Script::new([ANSWER], Duration::ZERO)).await;
    let mut persister = bed.persister();
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[]);
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let gateway_addr = gateway.addr.clone();

    let mut request = format!("ws://{gateway_addr}/v1/chat/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token_for("alice")).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let conversation = turn(&mut ws, None, &question(0), 0).await;
    for n in 1..TURNS {
        turn(&mut ws, Some(&conversation), &question(n), n).await;
    }
    // Every turn stored before the next one asks for context.
    let http = reqwest::Client::new();
    let url = format!("http://{gateway_addr}/v1/conversations/{conversation}");
    let list = format!("http://{gateway_addr}/v1/conversations");
    let stored = |n: usize| {
        let (http, list) = (http.clone(), list.clone());
        async move {
            testkit::wait_for(
                &format!("{n} turns in history"),
                Duration::from_secs(60),
                || async {
                    let listed: Value = http
                        .get(&list)
                        .bearer_auth(token_for("alice"))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    (listed["conversations"][0]["turns"] == n).then_some(())
                },
            )
            .await
            .unwrap();
        }
    };
    stored(TURNS).await;

    // The next turn's prompt: the newest earlier turns, whole, within budget.
    turn(&mut ws, Some(&conversation), "And the first one?", TURNS).await;
    let sent = bed.llm.requests().last().cloned().unwrap();
    let messages = sent["messages"].as_array().unwrap();
    let texts: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(texts.first().map(|m| m.0), Some("system"));
    assert_eq!(texts.last(), Some(&("user", "And the first one?")));
    let earlier = &texts[1..texts.len() - 1];
    assert!(
        earlier.len() >= 2,
        "the prompt lost its context: {} messages\n{}",
        texts.len(),
        streamer.log_tail()
    );
    assert_eq!(
        earlier[earlier.len() - 2..],
        [
            ("user", question(TURNS - 1).as_str()),
            ("assistant", ANSWER)
        ],
        "the newest earlier turn comes last, whole"
    );
    let bytes: usize = earlier.iter().map(|m| m.1.len()).sum();
    assert!(
        bytes <= HISTORY_BUDGET_BYTES,
        "{bytes} bytes of history in one prompt"
    );

    // The history endpoint pages (once the persister has the last turn,
    // which it ingests a moment after `done`): default 50 (fewer when a page would pass
    // the bus's message size), then older pages by cursor; each turn once.
    stored(TURNS + 1).await;
    let mut want: Vec<String> = (0..TURNS).map(question).collect();
    want.push("And the first one?".into());
    let default = pages(&http, &url, None).await;
    assert!(default.len() > 1);
    assert!(default[0]["turns"].as_array().unwrap().len() <= 50);
    assert_eq!(default[0]["conversation_id"], conversation.as_str());
    assert_same_questions(&questions(&default), &want, default.len());
    let small = pages(&http, &url, Some(7)).await;
    assert_eq!(small.len(), 9, "61 turns in pages of 7");
    assert_same_questions(&questions(&small), &want, small.len());

    // Postgres stopped: the persister's SQLite file answers the same pages.
    bed.pg.stop().unwrap();
    for limit in [Some(7), None] {
        let paged = pages(&http, &url, limit).await;
        assert_same_questions(&questions(&paged), &want, paged.len());
    }

    // Bad paging parameters get a 400 that names them.
    for (query, code) in [
        ("limit=201", "invalid_limit"),
        ("limit=0", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("cursor=not-a-cursor", "invalid_cursor"),
    ] {
        let response = http
            .get(format!("{url}?{query}"))
            .bearer_auth(token_for("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
    drop(persister);
}
