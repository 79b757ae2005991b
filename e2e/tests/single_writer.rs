//! Single writer: a streamer frozen (SIGSTOP) past its lease while a second
//! one takes the turn over, then thawed (SIGCONT), must not write into the
//! turn again. The client sees contiguous `seq`, at most one `reset`, and
//! ends with exactly the text stored in Postgres.

use std::time::Duration;

use bus::wire::ServerFrame;
use e2e::{Bed, ws_connect, ws_send, ws_until_done};
use serde_json::json;
use testkit::Script;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_streamer_that_comes_back_is_fenced_and_the_client_ends_with_the_stored_answer() {
    let words: Vec<String> = (0..80).map(|i| format!("w{i} ")).collect();
    let bed = Bed::start(
        "fence",
        Script::new(words.clone(), Duration::from_millis(60)),
    )
    .await;
    let lease = [("STREAMER_ACK_WAIT_MS", "1500".to_owned())];
    let mut first = bed.streamer("a", &lease);
    let mut second = bed.streamer("b", &lease);
    let mut gateway = bed.gateway(&[]);
    let mut persister = bed.persister();
    persister.start().await.unwrap();
    gateway.start().await.unwrap();
    first.start().await.unwrap();

    let mut ws = ws_connect(&gateway.addr, "alice").await.unwrap();
    ws_send(&mut ws, json!({"type": "send", "conversation_id": null, "content": "count", "request_id": "r-fence"}))
        .await
        .unwrap();
    let mut frames = Vec::new();
    let tokens = |frames: &[ServerFrame]| {
        frames
            .iter()
            .filter(|f| matches!(f, ServerFrame::Token { .. }))
            .count()
    };
    while tokens(&frames) < 5 {
        frames.extend(ws_until_done(&mut ws, Duration::from_millis(100)).await);
    }
    first.pause();
    second.start().await.unwrap();
    // The second streamer takes over once the frozen one's lease lapses.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        frames.extend(ws_until_done(&mut ws, Duration::from_millis(100)).await);
        if let Some(reset) = frames
            .iter()
            .position(|f| matches!(f, ServerFrame::Reset { .. }))
            && tokens(&frames[reset..]) >= 5
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no takeover: {frames:?}"
        );
    }
    first.resume();
    frames.extend(ws_until_done(&mut ws, Duration::from_secs(60)).await);
    assert!(
        matches!(frames.last(), Some(ServerFrame::Done { .. })),
        "{frames:?}"
    );
    let ServerFrame::Accepted { turn_id, .. } = &frames[0] else {
        panic!("accepted first")
    };

    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "contiguous seq: {frames:?}"
    );
    let resets = frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Reset { .. }))
        .count();
    assert_eq!(
        resets,
        1,
        "first:\n{}\nsecond:\n{}",
        first.log_tail(),
        second.log_tail()
    );
    let (shown, _) = bus::wire::shown_text(&frames);
    assert_eq!(shown, words.concat());
    let stored = bed
        .pg_value(&format!(
            "select assistant_text from turns where turn_id = '{turn_id}'"
        ))
        .await;
    assert_eq!(stored.trim(), shown.trim());
    let count = bed.pg.psql("fence", "select count(*) from turns").unwrap();
    assert_eq!(count.trim(), "1");
    // The thawed streamer noticed and stopped.
    testkit::wait_for(
        "the thawed streamer to stop writing",
        Duration::from_secs(10),
        || {
            let fenced = first
                .log_tail()
                .contains("Another worker is writing this turn");
            async move { fenced.then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|_| panic!("{}", first.log_tail()));
}
