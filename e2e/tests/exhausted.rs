//! Never silent: a turn and a scan whose streamer is SIGKILLed at every
//! delivery (the consumers' `max_deliver` is 5) still end, for the client
//! that follows them, with a terminal frame or event, in Postgres as a
//! failed record holding what the client was shown, and on `dlq.*`.

use std::time::Duration;

use bus::wire::{FinishReason, ServerFrame};
use e2e::{Bed, Service, sse_until_terminal, start_scan, ws_connect, ws_send, ws_until_done};
use futures::StreamExt as _;
use serde_json::{Value, json};
use testkit::Script;

const MAX_DELIVER: usize = 5;
/// How long after the last delivery's lease lapses a healthy streamer must
/// have closed the work: the advisory comes on its next pull.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

/// Runs the streamer once per delivery and SIGKILLs it as soon as that
/// delivery has written a token to `subject`.
async fn kill_at_every_delivery(
    streamer: &mut Service,
    client: &async_nats::Client,
    subject: String,
    is_token: impl Fn(&[u8]) -> bool,
) {
    let mut live = client.subscribe(subject).await.unwrap();
    for delivery in 1..=MAX_DELIVER {
        streamer.start().await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(message) = live.next().await {
                if is_token(&message.payload) {
                    break;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("delivery {delivery} wrote a token\n{}", streamer.log_tail()));
        streamer.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_and_a_scan_killed_at_every_delivery_end_failed_recorded_and_dead_lettered() {
    let words: Vec<String> = (0..300).map(|i| format!("w{i} ")).collect();
    let bed = Bed::start(
        "exhausted",
        Script::new(words.clone(), Duration::from_millis(50)),
    )
    .await;
    let mut gateway = bed.gateway(&[]);
    let mut streamer = bed.streamer("streamer", &[("STREAMER_ACK_WAIT_MS", "1000".into())]);
    let mut persister = bed.persister();
    persister.start().await.unwrap();
    gateway.start().await.unwrap();
    let addr = gateway.addr.clone();
    let client = bed.nats.client().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());

    // --- a chat turn ---
    let mut ws = ws_connect(&addr, "alice").await.unwrap();
    ws_send(&mut ws, json!({"type": "send", "conversation_id": null, "content": "count", "request_id": "r-exhausted"}))
        .await
        .unwrap();
    let accepted = ws_until_done(&mut ws, Duration::from_millis(500)).await;
    let Some(ServerFrame::Accepted { turn_id, .. }) = accepted.first().cloned() else {
        panic!("accepted first: {accepted:?}")
    };
    let follower = tokio::spawn(async move {
        let mut frames = accepted;
        frames.extend(ws_until_done(&mut ws, Duration::from_secs(120)).await);
        frames
    });
    kill_at_every_delivery(
        &mut streamer,
        &client,
        format!("chat.tok.*.{turn_id}"),
        |p| {
            bus::batch::decode(p)
                .iter()
                .any(|f| matches!(f, ServerFrame::Token { .. }))
        },
    )
    .await;
    let healthy_at = tokio::time::Instant::now();
    streamer.start().await.unwrap();
    let frames = follower.await.unwrap();
    assert!(
        healthy_at.elapsed() < CLOSE_BOUND,
        "closed within {CLOSE_BOUND:?}"
    );
    let n = frames.len();
    assert!(
        matches!(&frames[n - 2], ServerFrame::Error { turn_id: Some(t), code, .. } if *t == turn_id && code == "delivery_exhausted"),
        "{:?}\n{}",
        &frames[n.saturating_sub(3)..],
        streamer.log_tail()
    );
    assert!(matches!(
        &frames[n - 1],
        ServerFrame::Done {
            finish_reason: FinishReason::Error,
            ..
        }
    ));
    let (shown, _) = bus::wire::shown_text(&frames);
    assert!(!shown.is_empty());
    let row = bed
        .pg_value(&format!(
            "select finish_reason || '|' || assistant_text from turns where turn_id = '{turn_id}'"
        ))
        .await;
    assert_eq!(row.trim(), format!("error|{}", shown).trim());
    let dlq = js.get_stream(bus::streams::DLQ).await.unwrap();
    let letter = dlq
        .get_last_raw_message_by_subject("dlq.chat")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&letter.payload).contains(&turn_id));

    // --- a scan ---
    streamer.kill();
    let (scan_id, events) = start_scan(&addr, "alice").await;
    let follower = tokio::spawn(sse_until_terminal(events, Duration::from_secs(150)));
    kill_at_every_delivery(&mut streamer, &client, format!("scan.evt.{scan_id}"), |p| {
        serde_json::from_slice::<Value>(p).is_ok_and(|v| v["event"] == "token")
    })
    .await;
    let healthy_at = tokio::time::Instant::now();
    streamer.start().await.unwrap();
    let seen = follower.await.unwrap();
    assert!(
        healthy_at.elapsed() < CLOSE_BOUND,
        "closed within {CLOSE_BOUND:?}"
    );
    let last = seen.last().expect("events");
    assert_eq!(last.event, "error", "{seen:?}");
    assert_eq!(last.data["code"], "delivery_exhausted");
    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=seen.len() as u64).collect::<Vec<_>>());
    let row = bed
        .pg_value(&format!(
            "select status from scans where scan_id = '{scan_id}'"
        ))
        .await;
    assert_eq!(row.trim(), "failed");
    let letter = dlq
        .get_last_raw_message_by_subject("dlq.scan")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&letter.payload).contains(&scan_id));
    drop(persister);
}
