//! `DELETE /v1/me` across the real binaries on the secured bus: two
//! persister processes (each its own SQLite file), a streamer and a
//! gateway, each with its shipped NATS permissions. The caller's turn,
//! scan, reward and image go from every store; the answer counts them.

use std::time::Duration;

use e2e::{
    Bed, Service, scrape_metrics, sse_until_terminal, start_scan, token_for, ws_connect, ws_send,
    ws_until_done,
};
use serde_json::{Value, json};
use testkit::Script;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_me_erases_a_user_everywhere_on_the_secured_bus() {
    let bed = Bed::start(
        "erase",
        Script::new(["Rinse ", "it."], Duration::from_millis(5)),
    )
    .await;
    let persister_in = |name: &str| {
        let dir = bed.data.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Service::persister(
            &bed.bin,
            bed.logs.path(),
            &bed.nats.url(),
            &bed.database_url,
            &dir,
            &bed.nats.passwords().service_env("persister"),
        )
    };
    let mut first = persister_in("p1");
    let mut second = persister_in("p2");
    let mut streamer = bed.streamer("streamer", &[]);
    let mut gateway = bed.gateway(&[]);
    first.start().await.unwrap();
    second.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let user = "auth0|erin@example.com";

    let mut ws = ws_connect(&gateway.addr, user).await.unwrap();
    ws_send(
        &mut ws,
        json!({"type": "send", "conversation_id": null, "content": "Where?", "request_id": "r1"}),
    )
    .await
    .unwrap();
    ws_until_done(&mut ws, Duration::from_secs(30)).await;
    let (scan, events) = start_scan(&gateway.addr, user).await;
    let events = sse_until_terminal(events, Duration::from_secs(120)).await;
    let result = events.last().expect("events");
    assert_eq!(result.event, "result", "{events:?}");
    let rewarded = !result.data["reward"].is_null();
    let count = |table: &str| format!("select count(*) from {table} where user_id = '{user}'");
    for table in ["turns", "scans"] {
        testkit::wait_for(table, Duration::from_secs(30), || async {
            (bed.pg_value(&count(table)).await == "1").then_some(())
        })
        .await
        .unwrap();
    }
    if rewarded {
        testkit::wait_for("the grant", Duration::from_secs(30), || async {
            (bed.pg_value(&count("reward_grants")).await == "1").then_some(())
        })
        .await
        .unwrap();
    }

    let response = reqwest::Client::new()
        .delete(format!("http://{}/v1/me", gateway.addr))
        .bearer_auth(token_for(user))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["sqlite"]["persisters"], 2, "{body}");
    assert_eq!(body["sqlite"]["turns"], 1, "{body}");
    assert_eq!(body["sqlite"]["scans"], 1, "{body}");
    assert_eq!(body["postgres"]["turns"], 1, "{body}");
    assert_eq!(body["postgres"]["scans"], 1, "{body}");
    assert_eq!(body["kv"]["conversations"], 1, "{body}");
    assert_eq!(body["kv"]["scans"], 1, "{body}");
    assert_eq!(body["kv"]["chat_context"], 1, "{body}");
    assert_eq!(
        body["kv"]["character_owners"],
        u64::from(rewarded),
        "{body}"
    );
    assert_eq!(body["object_store"]["scan_images"], 1, "{body}");
    for table in [
        "conversations",
        "turns",
        "scans",
        "reward_grants",
        "character_ownership",
        "my_characters",
    ] {
        assert_eq!(bed.pg_value(&count(table)).await, "0", "{table}");
    }
    let scan_status = reqwest::Client::new()
        .get(format!("http://{}/v1/scans/{scan}", gateway.addr))
        .bearer_auth(token_for(user))
        .send()
        .await
        .unwrap();
    assert_eq!(scan_status.status(), 404);
    let metrics = scrape_metrics(&gateway.addr).await;
    assert!(
        metrics.contains("gateway_erasures_total{postgres=\"done\"} 1"),
        "{metrics}"
    );
    let mut erasures = 0.0;
    for persister in [&first, &second] {
        let metrics = scrape_metrics(&persister.addr).await;
        erasures += metrics
            .lines()
            .find_map(|l| l.strip_prefix("persister_erasures_total{store=\"sqlite\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_default();
    }
    assert_eq!(erasures, 2.0, "each persister erased its own file");
}
