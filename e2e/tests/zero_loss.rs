//! The zero-loss proof: thousands of turns through the real pipeline
//! (gateway -> streamer with a stand-in upstream -> persister -> Postgres)
//! while the persister is SIGKILLed twice, Postgres is stopped for 20 s, the
//! streamer is SIGKILLed once and nats-server is restarted. Every accepted turn must end up in
//! Postgres exactly once with its full text.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bus::wire::ServerFrame;
use e2e::{Bed, token_for};
use futures::{SinkExt as _, StreamExt as _};
use testkit::Script;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};

const TURNS: usize = 2000;
const CLIENTS: usize = 40;

fn words() -> Vec<String> {
    (1..=8).map(|i| format!("w{i} ")).collect()
}

/// One client: sends its share of turns one after another, reconnecting
/// and resuming when its socket drops. Returns the accepted turn ids.
async fn client(gateway: String, user: String, turns: usize, accepted: Arc<Mutex<Vec<String>>>) {
    let mut sent = 0;
    let mut socket = None;
    while sent < turns {
        let ws = match &mut socket {
            Some(ws) => ws,
            None => {
                let mut request = format!("ws://{gateway}/v1/chat/ws")
                    .into_client_request()
                    .unwrap();
                request.headers_mut().insert(
                    "authorization",
                    format!("Bearer {}", token_for(&user)).parse().unwrap(),
                );
                match tokio_tungstenite::connect_async(request).await {
                    Ok((ws, _)) => socket.insert(ws),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        let request_id = format!("{user}-{sent}");
        let frame = serde_json::json!({"type": "send", "conversation_id": null, "content": "count", "request_id": request_id});
        if ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            socket = None;
            continue;
        }
        // Read until this turn's done (a repeated request_id after a drop
        // maps to the same turn, so resending is safe).
        let mut turn_id = None;
        let finished = loop {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    match serde_json::from_str::<ServerFrame>(&text) {
                        Ok(ServerFrame::Accepted { turn_id: id, .. }) => turn_id = Some(id),
                        Ok(ServerFrame::Done { .. }) => break true,
                        // Refused, not accepted (the bus was away, or this
                        // user's earlier turns are still being counted):
                        // send the same request again shortly.
                        Ok(ServerFrame::Error { code, .. })
                            if code == "unavailable" || code == "too_many_turns" =>
                        {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break false;
                        }
                        _ => {}
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break false,
            }
        };
        if let Some(id) = turn_id {
            let mut list = accepted.lock().unwrap();
            if !list.contains(&id) {
                list.push(id);
            }
        }
        if finished {
            sent += 1;
        } else {
            socket = None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_turn_reaches_postgres_exactly_once_through_kills_and_an_outage() {
    testkit::init_logs();
    let mut bed = Bed::start("zero_loss", Script::new(words(), Duration::from_millis(15))).await;

    let mut gateway = bed.gateway(&[("GATEWAY_MAX_TURNS_PER_USER", "4".into())]);
    let gateway_addr = gateway.addr.clone();
    let mut streamer = bed.streamer(
        "streamer", // A killed worker's turns come back after 2 s, not 30.
        &[("STREAMER_ACK_WAIT_MS", "2000".into())],
    );
    let mut persister = bed.persister();
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                gateway_addr.clone(),
                format!("user{i}"),
                TURNS / CLIENTS,
                accepted.clone(),
            ))
        })
        .collect();
    let progress = |accepted: &Arc<Mutex<Vec<String>>>| accepted.lock().unwrap().len();

    // The chaos, spread over the run.
    let wait_until = |n: usize| {
        let accepted = accepted.clone();
        async move {
            while progress(&accepted) < n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_until(TURNS / 10).await;
    persister.kill();
    eprintln!(
        "chaos: persister SIGKILLed at {} accepted",
        progress(&accepted)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    persister.start().await.unwrap();

    wait_until(TURNS / 5).await;
    bed.pg.stop().unwrap();
    eprintln!(
        "chaos: Postgres stopped at {} accepted",
        progress(&accepted)
    );
    let outage = tokio::time::Instant::now();

    wait_until(TURNS * 3 / 10).await;
    streamer.kill();
    eprintln!(
        "chaos: streamer SIGKILLed at {} accepted",
        progress(&accepted)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    streamer.start().await.unwrap();

    wait_until(TURNS * 2 / 5).await;
    persister.kill();
    eprintln!(
        "chaos: persister SIGKILLed again at {} accepted",
        progress(&accepted)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    persister.start().await.unwrap();

    wait_until(TURNS / 2).await;
    bed.nats.stop();
    eprintln!(
        "chaos: nats-server stopped at {} accepted",
        progress(&accepted)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    bed.nats.start_again().await.unwrap();
    eprintln!("chaos: nats-server started again");

    let remaining = Duration::from_secs(20).saturating_sub(outage.elapsed());
    tokio::time::sleep(remaining).await;
    bed.pg.start_again().await.unwrap();
    eprintln!(
        "chaos: Postgres started again at {} accepted",
        progress(&accepted)
    );

    for client in clients {
        tokio::time::timeout(Duration::from_secs(300), client)
            .await
            .expect("clients finish")
            .unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), TURNS, "every turn was accepted once");

    let expected: String = words().concat();
    let count_sql = "select count(*) from turns";
    let synced = testkit::wait_for("every turn in Postgres", Duration::from_secs(120), || {
        let got = bed
            .pg
            .psql("zero_loss", count_sql)
            .ok()
            .and_then(|c| c.parse::<usize>().ok());
        async move { got.filter(|n| *n >= TURNS) }
    })
    .await;
    if let Err(error) = synced {
        panic!(
            "{error}\npersister log:\n{}\nstreamer log:\n{}",
            persister.log_tail(),
            streamer.log_tail()
        );
    }
    let rows = bed
        .pg
        .psql(
            "zero_loss",
            "select turn_id, finish_reason, assistant_text from turns",
        )
        .unwrap();
    let mut stored: HashMap<String, (String, String)> = HashMap::new();
    for line in rows.lines() {
        let mut parts = line.splitn(3, '|');
        let (id, reason, text) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap_or(""),
        );
        assert!(
            stored
                .insert(id.to_owned(), (reason.to_owned(), text.to_owned()))
                .is_none()
        );
    }
    assert_eq!(stored.len(), TURNS, "exactly the accepted turns, once each");
    for id in &accepted {
        let (reason, text) = stored
            .get(id)
            .unwrap_or_else(|| panic!("turn {id} is missing"));
        assert_eq!(reason, "stop", "turn {id}");
        assert_eq!(text.trim_end(), expected.trim_end(), "turn {id} text");
    }
}
