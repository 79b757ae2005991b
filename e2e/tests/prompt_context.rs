//! A conversation without a `chat_context` entry (begun before the bucket
//! existed, or idle past its retention) gets its prompt context from the
//! persisters, and from then on from the entry again, persister or not.

use std::time::Duration;

use bus::wire::{ConversationContext, ServerFrame};
use e2e::{Bed, ws_connect, ws_send, ws_until_done};
use serde_json::{Value, json};
use testkit::Script;

const ANSWER: &str = "Noted.";

/// Sends one turn and waits for its `done`; returns the conversation id.
async fn turn(ws: &mut e2e::Ws, conversation_id: Option<&str>, content: &str) -> String {
    ws_send(
        ws,
        json!({"type": "send", "conversation_id": conversation_id, "content": content,
               "request_id": uuid_like(content)}),
    )
    .await
    .unwrap();
    let frames = ws_until_done(ws, Duration::from_secs(30)).await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Done { .. })),
        "{frames:?}"
    );
    match &frames[0] {
        ServerFrame::Accepted {
            conversation_id, ..
        } => conversation_id.clone(),
        other => panic!("not accepted: {other:?}"),
    }
}

fn uuid_like(content: &str) -> String {
    content.replace(' ', "-")
}

/// The (role, content) pairs of the newest prompt the provider got, after
/// the system prompt.
fn last_prompt(bed: &Bed) -> Vec<(String, String)> {
    let sent: Value = bed.llm.requests().last().cloned().unwrap();
    sent["messages"].as_array().unwrap()[1..]
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn turns(texts: &[&str]) -> Vec<(String, String)> {
    texts
        .iter()
        .flat_map(|t| [("user", *t), ("assistant", ANSWER)])
        .map(|(r, c)| (r.to_owned(), c.to_owned()))
        .collect()
}

/// The value of `streamer_context_reads_total{source="<source>"}`.
async fn reads(addr: &str, source: &str) -> String {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("streamer_context_reads_total{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_without_a_context_entry_reads_the_persisters_then_the_entry_again() {
    let bed = Bed::start("context", Script::new([ANSWER], Duration::ZERO)).await;
    let mut persister = bed.persister();
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[]);
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let js = async_nats::jetstream::new(bed.nats.client().await.unwrap());
    let kv = js
        .get_key_value(bus::streams::KV_CONTEXT)
        .await
        .expect("the streamer created the bucket");

    let mut ws = ws_connect(&gateway.addr, "alice").await.unwrap();
    let conversation = turn(&mut ws, None, "first question").await;
    // The conversation as it was before the bucket existed: its turn is
    // stored by the persister, and there is no entry.
    bed.pg_value(&format!(
        "SELECT turn_id FROM turns WHERE conversation_id = '{conversation}'"
    ))
    .await;
    testkit::wait_for(
        "the entry of the first turn",
        Duration::from_secs(10),
        || {
            let kv = &kv;
            let conversation = &conversation;
            async move { kv.get(conversation).await.ok()?.map(|_| ()) }
        },
    )
    .await
    .unwrap();
    kv.purge(&conversation).await.unwrap();

    turn(&mut ws, Some(&conversation), "second question").await;
    assert_eq!(
        last_prompt(&bed),
        [
            turns(&["first question"]),
            vec![("user".into(), "second question".into())]
        ]
        .concat(),
        "the persisters gave the first turn"
    );
    assert_eq!(reads(&streamer.addr, "persisters").await, "1");

    // The second turn started the entry again with what the persisters
    // gave, so the third needs no persister at all.
    let entry = testkit::wait_for("the entry again", Duration::from_secs(10), || {
        let kv = &kv;
        let conversation = &conversation;
        async move {
            let value = kv.get(conversation).await.ok()??;
            let entry: ConversationContext = serde_json::from_slice(&value).ok()?;
            (entry.turns.len() == 2).then_some(entry)
        }
    })
    .await
    .unwrap();
    assert_eq!(entry.user_id, "alice");
    drop(persister);
    turn(&mut ws, Some(&conversation), "third question").await;
    assert_eq!(
        last_prompt(&bed),
        [
            turns(&["first question", "second question"]),
            vec![("user".into(), "third question".into())]
        ]
        .concat(),
        "the entry gave both earlier turns\n{}",
        streamer.log_tail()
    );
    assert_eq!(reads(&streamer.addr, "kv").await, "1");
    assert_eq!(reads(&streamer.addr, "persisters").await, "1");
}
