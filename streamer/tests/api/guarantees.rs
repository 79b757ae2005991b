//! The edges of the guarantees: a turn whose deliveries run out still ends
//! (terminal frames, a failed record, a dead letter), and a turn has one
//! writer at a time.

use std::time::Duration;

use bus::wire::{FinishReason, ServerFrame};
use futures::StreamExt as _;
use testkit::{Script, StandInLlm};

use crate::helpers::{self, Killable, TestStreamer};

/// The consumer's `max_deliver` (nats/consumers/CHAT_REQ.streamer-chat.json).
const MAX_DELIVER: usize = 5;

#[tokio::test]
async fn a_turn_whose_worker_is_killed_at_every_delivery_ends_failed_with_a_record_and_a_dead_letter()
 {
    let words: Vec<String> = (1..=200).map(|i| format!("w{i} ")).collect();
    let llm = StandInLlm::start(Script::new(words, Duration::from_millis(40)))
        .await
        .unwrap();
    let app = TestStreamer::without_streamer().await;
    let fast = ["--ack-wait-ms", "1000"];
    let turn = app.send("conv-x", "count").await;
    let mut live = app
        .client
        .subscribe(format!("chat.tok.conv-x.{turn}"))
        .await
        .unwrap();
    for delivery in 1..=MAX_DELIVER {
        let mut worker = Killable::spawn(helpers::config(&app.nats_url(), llm.base_url(), &fast));
        // This delivery has produced a token: kill it mid-answer.
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(message) = live.next().await {
                let frames = bus::batch::decode(&message.payload);
                if frames
                    .iter()
                    .any(|f| matches!(f, ServerFrame::Token { .. }))
                {
                    break;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("delivery {delivery} produced a token"));
        worker.kill();
    }

    // A healthy worker comes back: the turn is out of deliveries, so it must
    // be closed as failed, not left hanging or answered a sixth time.
    let started = tokio::time::Instant::now();
    let _healthy = Killable::spawn(helpers::config(&app.nats_url(), llm.base_url(), &fast));
    let frames = app.frames_until_done(&turn).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed within the bound"
    );
    let n = frames.len();
    assert!(
        matches!(&frames[n - 2], ServerFrame::Error { turn_id: Some(t), code, .. } if *t == turn && code == "delivery_exhausted"),
        "an error frame with the turn id before done: {:?}",
        &frames[n.saturating_sub(3)..]
    );
    let ServerFrame::Done { finish_reason, .. } = &frames[n - 1] else {
        panic!("ends with done")
    };
    assert_eq!(*finish_reason, FinishReason::Error);
    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    let record = app.turn_record("conv-x", &turn).await;
    assert_eq!(record.finish_reason, FinishReason::Error);
    assert_eq!(
        record.assistant_text,
        bus::wire::shown_text(&frames).0,
        "the record keeps what the client was shown"
    );
    assert!(!record.assistant_text.is_empty());
    let letter = app.dead_letter().await;
    assert!(letter.payload.contains(&turn), "{letter:?}");
    assert_eq!(letter.deliveries, MAX_DELIVER as u64);
    assert_eq!(
        llm.requests().len(),
        MAX_DELIVER,
        "never asked a sixth time"
    );
}

#[tokio::test]
async fn a_provider_error_body_and_url_reach_neither_the_client_nor_the_record() {
    let secret = "sk-live-0123456789abcdef";
    let llm = StandInLlm::start(
        Script::new(["never"], Duration::ZERO).with_quirks(testkit::Quirks {
            fail_first: vec![(400, None)],
            fail_body: Some(format!(
                r#"{{"error":{{"message":"key {secret} is not valid for http://internal.example/v1","type":"invalid_request_error"}}}}"#
            )),
            ..testkit::Quirks::default()
        }),
    )
    .await
    .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    let turn = app.send("conv-leak", "hi").await;
    let frames = app.frames_until_done(&turn).await;
    let record = app.turn_record("conv-leak", &turn).await;
    let letter = app.dead_letter().await;
    let n = frames.len();
    let ServerFrame::Error { code, message, .. } = &frames[n - 2] else {
        panic!("an error frame before done: {frames:?}")
    };
    assert_eq!(code, "upstream_rejected");
    for text in [
        message.clone(),
        serde_json::to_string(&record).unwrap(),
        letter.error.clone(),
    ] {
        assert!(!text.contains(secret), "{text}");
        assert!(!text.contains("internal.example"), "{text}");
        assert!(!text.contains(llm.base_url()), "{text}");
    }
    assert_eq!(record.finish_reason, FinishReason::Error);
}
