//! Streamer integration tests against a real nats-server and an LLM server.

mod helpers;

use std::time::Duration;

use bus::wire::{FinishReason, ServerFrame, TurnRecord};
use helpers::TestStreamer;
use testkit::{LocalLlm, Script, StandInLlm};

#[tokio::test]
async fn chat_request_is_answered_with_token_frames_done_and_a_turn_record() {
    let llm = StandInLlm::start(Script::new(
        ["Rinse ", "the ", "bottle", "."],
        Duration::from_millis(2),
    ))
    .await
    .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;

    let turn = app.send("conv-1", "How do I recycle a PET bottle?").await;
    let frames = app.frames_until_done(&turn).await;

    let tokens: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Token { seq, delta, .. } => Some((*seq, delta.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        tokens,
        vec![(1, "Rinse "), (2, "the "), (3, "bottle"), (4, ".")]
    );
    match frames.last().unwrap() {
        ServerFrame::Done {
            seq,
            finish_reason,
            usage,
            ..
        } => {
            assert_eq!(*seq, 5);
            assert_eq!(*finish_reason, FinishReason::Stop);
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 4));
        }
        other => panic!("last frame is not done: {other:?}"),
    }

    let record: TurnRecord = app.turn_record("conv-1", &turn).await;
    assert_eq!(record.assistant_text, "Rinse the bottle.");
    assert_eq!(record.user_text, "How do I recycle a PET bottle?");
    assert_eq!(record.user_id, "user-1");
    assert_eq!(record.model, "stand-in-1");
    assert!(record.first_token_at.is_some());
    assert!(record.completed_at >= record.created_at);

    // The prompt carries the system prompt and the user's message.
    let request = &llm.requests()[0];
    assert_eq!(request["stream"], true);
    assert_eq!(request["stream_options"]["include_usage"], true);
    assert_eq!(request["messages"][0]["role"], "system");
    assert_eq!(
        request["messages"][1]["content"],
        "How do I recycle a PET bottle?"
    );
}

#[tokio::test]
async fn undecodable_request_is_terminated_into_the_dead_letter_stream() {
    let llm = StandInLlm::start(Script::new(["ok"], Duration::ZERO))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    app.js
        .publish("chat.req.conv-x", "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let letter = app.dead_letter().await;
    assert_eq!(letter.subject, "chat.req.conv-x");
    assert!(letter.error.contains("undecodable"), "{}", letter.error);
    assert_eq!(letter.payload, "{not json");
    assert!(
        llm.requests().is_empty(),
        "a poison message reached the LLM"
    );
}

#[tokio::test]
async fn the_real_local_model_answers_through_the_bus() {
    let llm = LocalLlm::start()
        .await
        .expect("local LLM (run scripts/setup.sh)");
    let app = TestStreamer::start(&llm.base_url()).await;
    let turn = app
        .send(
            "conv-local",
            "Where does a glass bottle go? Answer in one sentence.",
        )
        .await;
    let frames = app.frames_until_done(&turn).await;
    let text: String = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Token { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert!(!text.trim().is_empty(), "the model said nothing");
    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq is not contiguous"
    );
    let ServerFrame::Done {
        finish_reason,
        usage,
        ..
    } = frames.last().unwrap()
    else {
        panic!("no done frame");
    };
    assert!(matches!(
        finish_reason,
        FinishReason::Stop | FinishReason::Length
    ));
    assert!(
        usage.prompt_tokens > 0,
        "llama.cpp reports usage when asked"
    );
    let record = app.turn_record("conv-local", &turn).await;
    assert_eq!(record.assistant_text, text);
}
