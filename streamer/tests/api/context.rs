//! A prompt's context comes from one read of the conversation's
//! `chat_context` entry, which the streamer keeps bounded as it concludes
//! turns; no persister runs in these tests, so a prompt with context proves
//! the entry gave it.

use std::time::Duration;

use bus::wire::{FinishReason, TurnRecord, Usage};
use futures::StreamExt as _;
use serde_json::Value;
use streamer::{
    chat::HISTORY_BUDGET_BYTES,
    context::{Added, Contexts},
};
use testkit::{Script, StandInLlm};

use crate::helpers::{self, TestStreamer};

/// The (role, content) pairs of the prompt the provider got.
fn messages(prompt: &Value) -> Vec<(String, String)> {
    prompt["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(role: &str, content: &str) -> (String, String) {
    (role.to_owned(), content.to_owned())
}

/// Sends a turn, waits for its `done` and for it in the context entry;
/// returns the entry's size in bytes.
async fn turn(app: &TestStreamer, request: &bus::wire::ChatRequest) -> usize {
    app.publish(request).await;
    app.frames_until_done(&request.turn_id).await;
    app.context_with(&request.conversation_id, &request.turn_id)
        .await
        .1
}

/// Fails when anyone asked the persisters for history.
async fn assert_no_history_asked(client: &async_nats::Client, asked: &mut async_nats::Subscriber) {
    client.flush().await.unwrap();
    if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), asked.next()).await
    {
        panic!(
            "history.get was asked: {}",
            String::from_utf8_lossy(&message.payload)
        );
    }
}

#[tokio::test]
async fn a_second_turn_gets_the_first_from_the_context_entry_with_no_persister_running() {
    let llm = StandInLlm::start(Script::new(["Rinse ", "it."], Duration::ZERO))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    let mut asked = app
        .client
        .subscribe(bus::subject::HISTORY_GET)
        .await
        .unwrap();

    let mut first = helpers::request("conv-ctx", "Where does a PET bottle go?");
    first.new_conversation = true;
    turn(&app, &first).await;
    let second = helpers::request("conv-ctx", "And the cap?");
    turn(&app, &second).await;

    assert_eq!(
        messages(&llm.requests()[1])[1..],
        [
            pair("user", "Where does a PET bottle go?"),
            pair("assistant", "Rinse it."),
            pair("user", "And the cap?"),
        ]
    );
    assert_no_history_asked(&app.client, &mut asked).await;
}

#[tokio::test]
async fn many_long_turns_keep_the_entry_bounded_and_the_prompt_holds_the_newest() {
    const TURNS: usize = 12;
    let question = |n: usize| format!("question {n:02}: {}", "y".repeat(10_000));
    let llm = StandInLlm::start(Script::new(["Noted."], Duration::ZERO))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    let mut asked = app
        .client
        .subscribe(bus::subject::HISTORY_GET)
        .await
        .unwrap();

    let mut sizes = Vec::new();
    for n in 0..TURNS {
        let mut request = helpers::request("conv-long", &question(n));
        request.new_conversation = n == 0;
        sizes.push(turn(&app, &request).await);
    }
    // 120 KB of questions so far; the entry holds what one prompt may carry.
    let bound = HISTORY_BUDGET_BYTES + 2048;
    assert!(sizes.iter().all(|&s| s <= bound), "entry sizes {sizes:?}");
    assert!(
        sizes[TURNS - 1].abs_diff(sizes[3]) < 64,
        "the entry stopped growing: {sizes:?}"
    );

    let last = helpers::request("conv-long", "And the first one?");
    turn(&app, &last).await;
    let prompt = messages(llm.requests().last().unwrap());
    // Three 10 KB turns fit in 32 KiB, a fourth does not.
    let mut want = vec![pair("system", &prompt[0].1)];
    for n in TURNS - 3..TURNS {
        want.push(pair("user", &question(n)));
        want.push(pair("assistant", "Noted."));
    }
    want.push(pair("user", "And the first one?"));
    assert_eq!(prompt, want);
    assert_no_history_asked(&app.client, &mut asked).await;
}

fn record(conversation_id: &str, n: i64) -> TurnRecord {
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp(1_700_000_000 + n, 0).unwrap();
    TurnRecord {
        turn_id: format!("turn-{n:02}"),
        conversation_id: conversation_id.into(),
        user_id: "user-1".into(),
        request_id: format!("req-{n}"),
        model: "m".into(),
        user_text: format!("question {n}"),
        assistant_text: format!("answer {n}"),
        finish_reason: FinishReason::Stop,
        usage: Usage::default(),
        sources: Vec::new(),
        error: None,
        created_at: at,
        first_token_at: None,
        completed_at: at,
    }
}

#[tokio::test]
async fn concurrent_conclusions_of_one_conversation_all_land_once_in_turn_order() {
    let app = TestStreamer::without_streamer().await;
    let contexts = Contexts::open(&app.js).await.unwrap();
    let conversation = "conv-race";
    // Without an entry or a seed, nothing is started: the entry would hide
    // whatever the persisters hold.
    assert_eq!(
        contexts.add(&record(conversation, 0), None).await.unwrap(),
        Added::NoEntry
    );
    assert_eq!(
        contexts
            .add(&record(conversation, 0), Some(&[]))
            .await
            .unwrap(),
        Added::Stored
    );
    // Sixteen streamers conclude turns of it at once, newest first, and one
    // of the turns twice (a redelivery).
    let mut tasks = Vec::new();
    for n in (1..=16).rev().chain([8]) {
        let contexts = contexts.clone();
        tasks.push(tokio::spawn(async move {
            contexts.add(&record(conversation, n), None).await.unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| **o == Added::Stored).count(),
        16,
        "{outcomes:?}"
    );
    let (entry, _) = app.context_with(conversation, "turn-16").await;
    let ids: Vec<String> = entry.turns.iter().map(|t| t.turn_id.clone()).collect();
    let want: Vec<String> = (0..=16).map(|n| format!("turn-{n:02}")).collect();
    assert_eq!(ids, want);
    assert_eq!(
        contexts.add(&record(conversation, 8), None).await.unwrap(),
        Added::AlreadyThere
    );

    // A request older than turns in the entry (a redelivery, a late one)
    // cannot take its context from it; a newer one gets every older turn.
    let at = |n: i64| {
        bus::history::TurnCursor::at(record(conversation, n).created_at, &format!("turn-{n:02}"))
    };
    assert!(
        contexts
            .read(conversation, "user-1", &at(16))
            .await
            .unwrap()
            .is_none()
    );
    let read = contexts
        .read(conversation, "user-1", &at(17))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.len(), 17);
    assert!(
        contexts
            .read(conversation, "someone-else", &at(17))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn two_streamers_answering_one_conversation_at_once_both_add_their_turns() {
    let llm = StandInLlm::start(Script::new(["ok"], Duration::from_millis(5)))
        .await
        .unwrap();
    let app = TestStreamer::start_with(llm.base_url(), &["--concurrency", "4"]).await;
    let other = streamer::Streamer::build(helpers::config(
        &app.nats_url(),
        llm.base_url(),
        &["--concurrency", "4"],
    ))
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(other.run(stop.clone()));

    let mut first = helpers::request("conv-two", "start");
    first.new_conversation = true;
    turn(&app, &first).await;
    let requests: Vec<_> = (0..8)
        .map(|n| helpers::request("conv-two", &format!("message {n}")))
        .collect();
    for request in &requests {
        app.publish(request).await;
    }
    // A turn in the entry stays there: once the last one shows up, all have.
    let mut entry = None;
    for request in &requests {
        entry = Some(app.context_with("conv-two", &request.turn_id).await.0);
    }
    let entry = entry.unwrap();
    stop.cancel();
    let mut want: Vec<&str> = vec![first.turn_id.as_str()];
    want.extend(requests.iter().map(|r| r.turn_id.as_str()));
    let ids: Vec<&str> = entry.turns.iter().map(|t| t.turn_id.as_str()).collect();
    assert_eq!(ids, want);
}
