//! Streamer integration tests against a real nats-server and an LLM server.

mod context;
mod grounding;
mod guarantees;
mod helpers;

/// The text of a turn's token frames, in order.
fn text_of(frames: &[ServerFrame]) -> String {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Token { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}

use std::time::Duration;

use bus::wire::{FinishReason, ServerFrame, TurnRecord};
use futures::StreamExt as _;
use helpers::TestStreamer;
use testkit::{LocalLlm, Quirks, Script, StandInLlm};

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
    let text: String = text_of(&frames);
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

/// The tokens every quirk scenario streams: multi-byte characters included,
/// so a split network read lands inside one.
fn korean_answer() -> Vec<&'static str> {
    vec![
        "페트병은 ",
        "헹궈서 ",
        "라벨을 ",
        "떼고 ",
        "é ",
        "배출하세요.",
    ]
}

async fn run_quirk(quirks: Quirks) -> (Vec<ServerFrame>, TurnRecord, StandInLlm, TestStreamer) {
    let llm = StandInLlm::start(
        Script::new(korean_answer(), Duration::from_millis(1)).with_quirks(quirks),
    )
    .await
    .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    let turn = app.send("conv-q", "PET?").await;
    let frames = app.frames_until_done(&turn).await;
    let record = app.turn_record("conv-q", &turn).await;
    (frames, record, llm, app)
}

fn assert_complete(frames: &[ServerFrame], record: &TurnRecord) {
    let full: String = korean_answer().concat();
    assert_eq!(record.assistant_text, full);
    assert_eq!(record.finish_reason, FinishReason::Stop);
    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
}

#[tokio::test]
async fn quirk_keepalive_comment_lines_are_ignored() {
    let (frames, record, ..) = run_quirk(Quirks {
        keepalive_comments: true,
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
}

#[tokio::test]
async fn quirk_crlf_line_endings_are_read() {
    let (frames, record, ..) = run_quirk(Quirks {
        crlf: true,
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
}

#[tokio::test]
async fn quirk_data_without_a_space_is_read() {
    let (frames, record, ..) = run_quirk(Quirks {
        no_space: true,
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
}

#[tokio::test]
async fn quirk_utf8_character_split_across_reads_is_reassembled() {
    let (frames, record, ..) = run_quirk(Quirks {
        split_writes: true,
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
}

#[tokio::test]
async fn quirk_chunks_with_empty_choices_are_skipped() {
    let (frames, record, ..) = run_quirk(Quirks {
        empty_choices_chunk: true,
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
}

#[tokio::test]
async fn quirk_no_usage_chunk_falls_back_to_counted_tokens() {
    let (frames, record, ..) = run_quirk(Quirks {
        no_usage: true,
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
    assert_eq!(record.usage.completion_tokens, 6);
    assert_eq!(record.usage.prompt_tokens, 0);
}

#[tokio::test]
async fn quirk_error_object_mid_stream_ends_the_turn_with_error_and_keeps_the_partial_answer() {
    let (frames, record, llm, app) = run_quirk(Quirks {
        error_after: Some(2),
        ..Quirks::default()
    })
    .await;
    assert_eq!(record.assistant_text, "페트병은 헹궈서 ");
    assert_eq!(record.finish_reason, FinishReason::Error);
    // The provider's own words ("overloaded") stay in the logs.
    assert_eq!(
        record.error.as_deref(),
        Some("the language model provider's answer broke off")
    );
    assert!(
        frames.iter().any(
            |f| matches!(f, ServerFrame::Error { code, .. } if code == "upstream_interrupted")
        )
    );
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::Done {
            seq: 3,
            finish_reason: FinishReason::Error,
            ..
        })
    ));
    assert_eq!(llm.requests().len(), 1, "no retry after tokens were sent");
    let letter = app.dead_letter().await;
    assert!(!letter.error.contains("overloaded"));
    assert!(letter.error.contains("broke off"));
}

#[tokio::test]
async fn quirk_connection_dropped_without_done_ends_the_turn_with_error() {
    let (frames, record, ..) = run_quirk(Quirks {
        drop_after: Some(3),
        ..Quirks::default()
    })
    .await;
    assert_eq!(record.assistant_text, "페트병은 헹궈서 라벨을 ");
    assert_eq!(record.finish_reason, FinishReason::Error);
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::Done {
            seq: 4,
            finish_reason: FinishReason::Error,
            ..
        })
    ));
}

#[tokio::test]
async fn rate_limits_and_server_errors_before_the_first_token_are_retried_honouring_retry_after() {
    let started = std::time::Instant::now();
    let (frames, record, llm, _app) = run_quirk(Quirks {
        fail_first: vec![(429, Some(1)), (503, None)],
        ..Quirks::default()
    })
    .await;
    assert_complete(&frames, &record);
    assert_eq!(llm.requests().len(), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_fails_the_turn_cleanly() {
    let (frames, record, llm, app) = run_quirk(Quirks {
        fail_first: vec![(400, None)],
        ..Quirks::default()
    })
    .await;
    assert_eq!(llm.requests().len(), 1);
    assert_eq!(record.finish_reason, FinishReason::Error);
    assert_eq!(record.assistant_text, "");
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::Done { seq: 1, .. })
    ));
    assert!(
        app.dead_letter()
            .await
            .error
            .contains("refused the request")
    );
}

#[tokio::test]
async fn cancel_closes_the_upstream_request_and_records_the_partial_answer() {
    let llm = StandInLlm::start(Script::new(vec!["word "; 400], Duration::from_millis(10)))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    let turn = app.send("conv-c", "talk a lot").await;
    let subject = format!("chat.tok.conv-c.{turn}");
    let mut live = app.client.subscribe(subject).await.unwrap();
    // Wait for a few tokens, then cancel.
    for _ in 0..3 {
        live.next().await.unwrap();
    }
    let cancelled_at = std::time::Instant::now();
    app.client
        .publish(format!("chat.cancel.{turn}"), "".into())
        .await
        .unwrap();
    testkit::wait_for(
        "the upstream connection to close",
        Duration::from_secs(5),
        || {
            let dropped = llm.streams_dropped_early();
            async move { (dropped == 1).then_some(()) }
        },
    )
    .await
    .unwrap();
    let closed_after = cancelled_at.elapsed();
    eprintln!("upstream closed {closed_after:?} after cancel");
    assert!(
        closed_after < Duration::from_secs(1),
        "took {closed_after:?}"
    );
    let record = app.turn_record("conv-c", &turn).await;
    assert_eq!(record.finish_reason, FinishReason::Cancelled);
    assert!(record.assistant_text.starts_with("word word word "));
    assert!(record.assistant_text.len() < 400 * 5);
    assert_eq!(llm.streams_completed(), 0);
}

#[tokio::test]
async fn a_streamer_killed_mid_generation_is_replaced_and_the_client_sees_a_reset_then_the_whole_answer()
 {
    let words: Vec<String> = (1..=30).map(|i| format!("w{i} ")).collect();
    let full: String = words.concat();
    let llm = StandInLlm::start(Script::new(words, Duration::from_millis(30)))
        .await
        .unwrap();
    let app = TestStreamer::without_streamer().await;
    let fast_redelivery = ["--ack-wait-ms", "1500"];
    let mut first = helpers::Killable::spawn(helpers::config(
        &app.nats_url(),
        llm.base_url(),
        &fast_redelivery,
    ));
    let turn = app.send("conv-k", "count").await;
    let mut live = app
        .client
        .subscribe(format!("chat.tok.conv-k.{turn}"))
        .await
        .unwrap();
    for _ in 0..4 {
        live.next().await.unwrap();
    }
    first.kill();
    assert_eq!(llm.streams_completed(), 0);

    let second = streamer::Streamer::build(helpers::config(
        &app.nats_url(),
        llm.base_url(),
        &fast_redelivery,
    ))
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(second.run(stop.clone()));
    let frames = app.frames_until_done(&turn).await;
    stop.cancel();

    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq space continues"
    );
    let resets: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f, ServerFrame::Reset { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(resets.len(), 1, "exactly one reset: {frames:?}");
    let before: String = text_of(&frames[..resets[0]]);
    assert!(full.starts_with(&before) && before.len() >= 4 * 3);
    let after: String = text_of(&frames[resets[0]..]);
    assert_eq!(after, full, "the answer after the reset is whole");
    let record = app.turn_record("conv-k", &turn).await;
    assert_eq!(record.assistant_text, full);
    assert_eq!(record.finish_reason, FinishReason::Stop);
    assert_eq!(record.usage.completion_tokens, 30);
}

#[tokio::test]
async fn an_answer_too_big_for_one_bus_message_is_recorded_truncated_not_redelivered_forever() {
    let words: Vec<String> = (0..600)
        .map(|i| format!("{i}{} ", "y".repeat(2000)))
        .collect();
    let llm = StandInLlm::start(Script::new(words.clone(), Duration::ZERO))
        .await
        .unwrap();
    let app = TestStreamer::start(llm.base_url()).await;
    let turn = app.send("conv-big", "long").await;
    let frames = app.frames_until_done(&turn).await;
    let text: String = text_of(&frames);
    assert_eq!(text, words.concat(), "every token is on the bus");
    let record = app.turn_record("conv-big", &turn).await;
    assert!(words.concat().starts_with(&record.assistant_text));
    assert!(record.assistant_text.len() < text.len());
    assert!(record.error.unwrap().contains("truncated"));
    assert_eq!(llm.requests().len(), 1);
}

/// The bus messages that carried a turn's frames, each as its frames' seqs.
async fn messages_of(app: &TestStreamer, conversation: &str, turn: &str) -> Vec<Vec<u64>> {
    seqs_of(&stored_of(app, conversation, turn).await)
}

/// The bus messages that carried a turn's frames, as stored.
async fn stored_of(app: &TestStreamer, conversation: &str, turn: &str) -> Vec<bus::replay::Stored> {
    let subject = bus::subject::chat_tok(conversation, turn).unwrap();
    bus::replay::messages(&app.js, bus::streams::CHAT_TOK, &subject)
        .await
        .unwrap()
}

/// Each message as its frames' seqs.
fn seqs_of(stored: &[bus::replay::Stored]) -> Vec<Vec<u64>> {
    stored
        .iter()
        .map(|m| {
            bus::batch::decode(&m.payload)
                .iter()
                .filter_map(ServerFrame::seq)
                .collect()
        })
        .collect()
}

/// One turn of `words`, `interval` apart, through a streamer with a
/// `linger_ms` linger: its text checked, its messages returned as stored.
async fn lingered_turn(
    conversation: &str,
    words: &[String],
    interval: Duration,
    linger_ms: &str,
) -> Vec<bus::replay::Stored> {
    let llm = StandInLlm::start(Script::new(words.to_vec(), interval))
        .await
        .unwrap();
    let app = TestStreamer::start_with(llm.base_url(), &["--token-linger-ms", linger_ms]).await;
    let turn = app.send(conversation, "count").await;
    let frames = app.frames_until_done(&turn).await;
    assert_eq!(text_of(&frames), words.concat());
    stored_of(&app, conversation, &turn).await
}

#[tokio::test]
async fn deltas_that_queue_behind_a_publish_travel_batched_each_its_own_frame() {
    // Many fast turns at once, so deltas queue behind their turn's publish.
    let words: Vec<String> = (0..300).map(|i| format!("w{i} ")).collect();
    let fast = StandInLlm::start(Script::new(words.clone(), Duration::ZERO))
        .await
        .unwrap();
    let app = TestStreamer::start_with(fast.base_url(), &["--concurrency", "40"]).await;
    let mut turns = Vec::new();
    for i in 0..40 {
        let conversation = format!("conv-fast{i}");
        turns.push((conversation.clone(), app.send(&conversation, "count").await));
    }
    let (mut frames_total, mut messages_total) = (0, 0);
    for (conversation, turn) in &turns {
        let frames = app.frames_until_done(turn).await;
        // One token frame per upstream delta, seq 1..=300, then done.
        let deltas: Vec<&str> = frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Token { delta, .. } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deltas, words.iter().map(String::as_str).collect::<Vec<_>>());
        let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
        assert_eq!(seqs, (1..=301).collect::<Vec<_>>());
        // Each message holds a contiguous run of them.
        let messages = messages_of(&app, conversation, turn).await;
        assert_eq!(messages.concat(), seqs);
        frames_total += seqs.len();
        messages_total += messages.len();
    }
    assert!(
        messages_total < frames_total,
        "{messages_total} messages for {frames_total} frames: nothing was batched"
    );

    // At a human pace nothing waits: every frame is its own message.
    let paced = StandInLlm::start(Script::new(["a ", "b ", "c"], Duration::from_millis(30)))
        .await
        .unwrap();
    let app = TestStreamer::start(paced.base_url()).await;
    let turn = app.send("conv-paced", "count").await;
    app.frames_until_done(&turn).await;
    assert_eq!(
        messages_of(&app, "conv-paced", &turn).await,
        vec![vec![1], vec![2], vec![3], vec![4]]
    );
}

#[tokio::test]
async fn with_a_linger_the_first_token_goes_alone_and_at_once_and_later_ones_travel_together() {
    // 20 tokens 5 ms apart: without a linger each would be its own message.
    let words: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
    let stored = lingered_turn("conv-linger", &words, Duration::from_millis(5), "40").await;
    let messages = seqs_of(&stored);
    assert_eq!(messages[0], vec![1], "the first token travels alone");
    assert_eq!(
        messages.concat(),
        (1..=21).collect::<Vec<_>>(),
        "contiguous, each its own frame"
    );
    // About 95 ms of tokens after the first, in 40 ms waits: a handful of
    // messages, not 20 (the end of the turn ends the last wait).
    assert!(
        messages.len() <= 8,
        "{} messages for 21 frames: the linger did not gather deltas",
        messages.len()
    );
}

#[tokio::test]
async fn a_model_slower_than_the_linger_is_not_delayed_by_it() {
    // Tokens 400 ms apart with a 300 ms linger: each comes after the linger
    // since the previous message ended, so each goes at once and alone.
    // (Waiting a linger from each delta's arrival instead would put 700 ms
    // between the stored messages.)
    let words: Vec<String> = (0..4).map(|i| format!("w{i} ")).collect();
    let stored = lingered_turn(
        "conv-slow-linger",
        &words,
        Duration::from_millis(400),
        "300",
    )
    .await;
    assert_eq!(
        seqs_of(&stored)[..4],
        [vec![1], vec![2], vec![3], vec![4]],
        "each token alone"
    );
    for pair in stored[..4].windows(2) {
        let gap = pair[1].stored_at.duration_since(pair[0].stored_at).unwrap();
        assert!(
            gap < Duration::from_millis(600),
            "{gap:?} between two tokens the model sent 400 ms apart: the linger delayed them"
        );
    }
}

#[tokio::test]
async fn many_long_turns_at_once_do_not_exhaust_the_publish_ack_window() {
    // 200 turns x 200 tokens in flight at once: far more publishes than the
    // 5,000 un-awaited ones a JetStream context allows.
    let words: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
    let llm = StandInLlm::start(Script::new(words.clone(), Duration::from_millis(1)))
        .await
        .unwrap();
    let app = TestStreamer::start_with(llm.base_url(), &["--concurrency", "200"]).await;
    let mut turns = Vec::new();
    for i in 0..200 {
        turns.push((
            format!("conv-w{i}"),
            app.send(&format!("conv-w{i}"), "count").await,
        ));
    }
    for (conversation, turn) in &turns {
        let record =
            tokio::time::timeout(Duration::from_secs(60), app.turn_record(conversation, turn))
                .await
                .expect("every turn finishes");
        assert_eq!(record.assistant_text, words.concat());
    }
}

#[tokio::test]
async fn a_failing_primary_falls_back_to_the_next_provider_before_the_first_token() {
    let primary = StandInLlm::start(Script::new(["never"], Duration::ZERO).with_quirks(Quirks {
        fail_first: vec![(503, None); 10],
        ..Quirks::default()
    }))
    .await
    .unwrap();
    let mut backup_script = Script::new(["from ", "the ", "backup"], Duration::ZERO);
    backup_script.model = "backup-model".into();
    let backup = StandInLlm::start(backup_script).await.unwrap();
    let fallbacks = format!("{}|backup-model", backup.base_url());
    let app = TestStreamer::start_with(
        primary.base_url(),
        &["--llm-fallbacks", &fallbacks, "--max-retries", "1"],
    )
    .await;
    let turn = app.send("conv-fb", "hi").await;
    let record = app.turn_record("conv-fb", &turn).await;
    assert_eq!(record.assistant_text, "from the backup");
    assert_eq!(record.model, "backup-model");
    assert_eq!(
        primary.requests().len(),
        2,
        "the primary was tried with its retries"
    );
    assert_eq!(backup.requests()[0]["model"], "backup-model");
}
