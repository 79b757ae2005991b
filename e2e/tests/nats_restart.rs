//! Never stuck across a NATS restart: nats-server is restarted (same port,
//! same store) in the middle of two answers and a scan. A WebSocket client
//! that stays connected and one that reconnects and resumes both end with
//! the exact answer; an SSE client sees the scan to its result; each lands
//! in Postgres once.

use std::time::Duration;

use bus::wire::ServerFrame;
use e2e::{Bed, Ws, sse_until_terminal, start_scan, ws_connect, ws_send, ws_until_done};
use serde_json::json;
use testkit::Script;

fn words() -> Vec<String> {
    (0..60).map(|i| format!("w{i} ")).collect()
}

fn assert_contiguous(frames: &[ServerFrame]) {
    let seqs: Vec<u64> = frames.iter().filter_map(ServerFrame::seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{frames:?}"
    );
}

async fn start_turn(ws: &mut Ws, request_id: &str) -> (String, Vec<ServerFrame>) {
    ws_send(ws, json!({"type": "send", "conversation_id": null, "content": "count", "request_id": request_id}))
        .await
        .unwrap();
    let mut frames = Vec::new();
    while frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Token { .. }))
        .count()
        < 5
    {
        frames.extend(ws_until_done(ws, Duration::from_millis(100)).await);
    }
    let Some(ServerFrame::Accepted { turn_id, .. }) = frames.first().cloned() else {
        panic!("accepted first: {frames:?}")
    };
    (turn_id, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_and_a_scan_in_flight_survive_a_nats_restart() {
    let mut bed = Bed::start("restart", Script::new(words(), Duration::from_millis(80))).await;
    let mut gateway = bed.gateway(&[("GATEWAY_RELAY_RECHECK_MS", "1000".into())]);
    let mut streamer = bed.streamer("streamer", &[("STREAMER_ACK_WAIT_MS", "2000".into())]);
    let mut persister = bed.persister();
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let addr = gateway.addr.clone();
    let full: String = words().concat();

    // A scan whose explanation is being written, followed over SSE.
    let (scan_id, events) = start_scan(&addr, "alice").await;
    let scan_follower = tokio::spawn(sse_until_terminal(events, Duration::from_secs(120)));

    // Two turns mid-answer.
    let mut stays = ws_connect(&addr, "alice").await.unwrap();
    let (stay_turn, mut stay_frames) = start_turn(&mut stays, "r-stay").await;
    let mut leaves = ws_connect(&addr, "bob").await.unwrap();
    let (leave_turn, mut leave_frames) = start_turn(&mut leaves, "r-leave").await;
    drop(leaves);

    bed.nats.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    bed.nats.start_again().await.unwrap();

    let stay = tokio::spawn(async move {
        stay_frames.extend(ws_until_done(&mut stays, Duration::from_secs(90)).await);
        stay_frames
    });
    // The one that left comes back and resumes after its last seq; until the
    // gateway has its NATS connection again it gets `unavailable`.
    let last_seq = leave_frames
        .iter()
        .filter_map(ServerFrame::seq)
        .max()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut ws = ws_connect(&addr, "bob").await.unwrap();
        ws_send(
            &mut ws,
            json!({"type": "resume", "turn_id": leave_turn, "after_seq": last_seq}),
        )
        .await
        .unwrap();
        let rest = ws_until_done(&mut ws, Duration::from_secs(90)).await;
        if matches!(rest.last(), Some(ServerFrame::Done { .. })) {
            leave_frames.extend(rest);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "resume never worked: {rest:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stay_frames = stay.await.unwrap();
    for frames in [&stay_frames, &leave_frames] {
        assert!(
            matches!(frames.last(), Some(ServerFrame::Done { .. })),
            "{frames:?}\n{}",
            streamer.log_tail()
        );
        assert_contiguous(frames);
        assert_eq!(bus::wire::shown_text(frames).0, full);
    }

    let seen = scan_follower.await.unwrap();
    let last = seen.last().expect("scan events");
    assert_eq!(last.event, "result", "{seen:?}\n{}", streamer.log_tail());
    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=seen.len() as u64).collect::<Vec<_>>());
    assert_eq!(last.data["answer"], full.as_str());

    // Each once in Postgres, with the answer the clients ended with.
    for turn in [&stay_turn, &leave_turn] {
        let row = bed
            .pg_value(&format!(
                "select assistant_text from turns where turn_id = '{turn}'"
            ))
            .await;
        assert_eq!(row.trim(), full.trim());
    }
    let scan_row = bed
        .pg_value(&format!(
            "select status from scans where scan_id = '{scan_id}'"
        ))
        .await;
    assert_eq!(scan_row.trim(), "done");
    assert_eq!(
        bed.pg
            .psql("restart", "select count(*) from turns")
            .unwrap()
            .trim(),
        "2"
    );
    assert_eq!(
        bed.pg
            .psql("restart", "select count(*) from scans")
            .unwrap()
            .trim(),
        "1"
    );
    drop(persister);
}
