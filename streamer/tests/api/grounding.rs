//! Chat answers grounded in the disposal rules: the prompt the LLM receives
//! carries the rules the question is about, in the question's language,
//! and the turn's `done` frame and record name them as `sources`.

use std::time::Duration;

use bus::wire::ServerFrame;
use testkit::{Script, StandInLlm};

use crate::helpers::TestStreamer;

fn sources(frames: &[ServerFrame]) -> Vec<String> {
    match frames.last() {
        Some(ServerFrame::Done { sources, .. }) => sources.clone(),
        other => panic!("last frame is not done: {other:?}"),
    }
}

fn system_prompt(request: &serde_json::Value) -> String {
    assert_eq!(request["messages"][0]["role"], "system");
    request["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_question_gets_its_rule_in_the_prompt_and_as_sources() {
    let llm = StandInLlm::start(Script::new(
        ["유리병 ", "수거함."],
        Duration::from_millis(1),
    ))
    .await
    .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;

    let turn = app.send("conv-ko", "소주병은 어디에 버려요?").await;
    let frames = app.frames_until_done(&turn).await;
    let found = sources(&frames);
    assert_eq!(
        found.first().map(String::as_str),
        Some("glass"),
        "{found:?}"
    );

    let system = system_prompt(&llm.requests()[0]);
    // The rule, in Korean, with the instruction to answer from it in Korean.
    assert!(system.contains("유리병 수거함"), "{system}");
    assert!(system.contains("신문지에 싸서"), "{system}");
    assert!(system.contains("Answer in Korean"), "{system}");
    assert!(
        system.contains("Answer only from the disposal rules"),
        "{system}"
    );

    let record = app.turn_record("conv-ko", &turn).await;
    assert_eq!(record.sources, found);

    // An English question about another item, in another conversation.
    let turn = app.send("conv-en", "How do I recycle a pizza box?").await;
    let frames = app.frames_until_done(&turn).await;
    assert_eq!(sources(&frames).first().map(String::as_str), Some("paper"));
    let system = system_prompt(&llm.requests()[1]);
    assert!(system.contains("Paper collection"), "{system}");
    assert!(system.contains("Answer in English."), "{system}");
}

#[tokio::test]
async fn an_off_topic_question_gets_no_sources_and_is_told_to_say_so() {
    let llm = StandInLlm::start(Script::new(["Sorry."], Duration::from_millis(1)))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;

    let turn = app
        .send("conv-weather", "What's the weather like today?")
        .await;
    let frames = app.frames_until_done(&turn).await;
    assert!(sources(&frames).is_empty());
    let done = serde_json::to_value(frames.last().unwrap()).unwrap();
    assert!(done.get("sources").is_none(), "absent, as in v1: {done}");

    let system = system_prompt(&llm.requests()[0]);
    assert!(system.contains("outside what you know"), "{system}");
    assert!(!system.contains("Rule 1"), "{system}");
    assert!(
        app.turn_record("conv-weather", &turn)
            .await
            .sources
            .is_empty()
    );
}

#[tokio::test]
async fn a_follow_up_keeps_the_rule_of_the_conversation() {
    let llm = StandInLlm::start(Script::new(["OK."], Duration::from_millis(1)))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;

    // A new conversation: its context entry starts with this turn, and the
    // next turn's prompt (and query) reads it from there.
    let mut first = crate::helpers::request("conv-follow", "생수병은 어떻게 버려요?");
    first.new_conversation = true;
    app.publish(&first).await;
    let first = first.turn_id;
    app.frames_until_done(&first).await;
    app.turn_record("conv-follow", &first).await;
    let second = app.send("conv-follow", "라벨은요?").await;
    let frames = app.frames_until_done(&second).await;
    assert_eq!(
        sources(&frames).first().map(String::as_str),
        Some("pet_bottle")
    );
}
