//! How many bus round trips a `send` costs before `accepted`. The gateway
//! reaches NATS through a proxy that delays each direction, so a round trip
//! costs a known time and the wait for `accepted` counts them.

use std::time::{Duration, Instant};

use bus::wire::ServerFrame;
use serde_json::json;

use crate::helpers::{GatewayOnly, Ws};

const ONE_WAY: Duration = Duration::from_millis(100);
const ROUND_TRIP: Duration = Duration::from_millis(200);

/// Sends a turn and times it to `accepted`; returns its conversation.
async fn timed_send(
    ws: &mut Ws,
    conversation: Option<&str>,
    request_id: &str,
) -> (Duration, String) {
    let started = Instant::now();
    ws.send_json(json!({
        "type": "send", "conversation_id": conversation, "content": "hi", "request_id": request_id
    }))
    .await;
    match ws.next().await {
        ServerFrame::Accepted {
            conversation_id, ..
        } => (started.elapsed(), conversation_id),
        other => panic!("accepted: {other:?}"),
    }
}

#[tokio::test]
async fn accepted_takes_two_round_trips_to_the_bus() {
    let app = GatewayOnly::start_delayed(&[], Some(ONE_WAY)).await;
    let mut ws = app.ws("dana").await;
    // Two round trips and a margin, less than three (it was five or six).
    let bound = ROUND_TRIP * 2 + ROUND_TRIP * 3 / 4;

    // A new conversation by a new user.
    let (took, conversation) = timed_send(&mut ws, None, "a-1").await;
    assert!(took < bound, "a new conversation took {took:?}");
    // Its next turns, on the node that saw it.
    for i in 2..=4 {
        let (took, _) = timed_send(&mut ws, Some(&conversation), &format!("a-{i}")).await;
        assert!(took < bound, "a known conversation took {took:?}");
    }
}
