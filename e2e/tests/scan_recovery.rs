//! A scan whose streamer is SIGKILLed in the middle of the explanation: the
//! job comes back to a new streamer, the SSE client (still connected to the
//! gateway) sees the explanation restart with a `reset` progress event and
//! ids that stay contiguous, and the scan lands in Postgres once, complete,
//! and in `GET /v1/scans`.

use std::time::Duration;

use e2e::{Bed, start_scan, token_for};
use futures::StreamExt as _;
use serde_json::Value;
use testkit::Script;

fn words() -> Vec<String> {
    (0..40).map(|i| format!("w{i} ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_survives_its_streamer_being_killed_mid_answer() {
    testkit::init_logs();
    let bed = Bed::start("scans", Script::new(words(), Duration::from_millis(100))).await;
    let mut gateway = bed.gateway(&[]);
    let mut streamer = bed.streamer("streamer", &[("STREAMER_ACK_WAIT_MS", "2000".into())]);
    let mut persister = bed.persister();
    persister.start().await.unwrap();
    streamer.start().await.unwrap();
    gateway.start().await.unwrap();
    let gateway_addr = gateway.addr.clone();

    let http = reqwest::Client::new();
    let token = token_for("alice");
    let (scan_id, events) = start_scan(&gateway_addr, "alice").await;

    let mut body = events.bytes_stream();
    let mut buffer = String::new();
    let mut seen: Vec<(u64, String, Value)> = Vec::new();
    let mut killed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    'read: while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            let (Some(id), Some(event), Some(data)) =
                (field("id:"), field("event:"), field("data:"))
            else {
                continue;
            };
            seen.push((
                id.parse().unwrap(),
                event.clone(),
                serde_json::from_str(&data).unwrap(),
            ));
            let tokens = seen.iter().filter(|(_, e, _)| e == "token").count();
            if !killed && tokens >= 5 {
                streamer.kill();
                killed = true;
                streamer.start().await.unwrap();
            }
            if event == "result" || event == "error" {
                break 'read;
            }
        }
    }
    assert!(
        killed,
        "the answer never reached five tokens: {seen:?}\n{}",
        streamer.log_tail()
    );
    let (_, last_event, record) = seen.last().unwrap().clone();
    assert_eq!(last_event, "result", "{}", streamer.log_tail());
    let ids: Vec<u64> = seen.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        ids,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "contiguous ids"
    );
    let reset_at = seen
        .iter()
        .rposition(|(_, e, d)| e == "progress" && d["reset"] == true)
        .expect("the explanation restarted with a reset");
    let after_reset: String = seen[reset_at..]
        .iter()
        .filter(|(_, e, _)| e == "token")
        .map(|(_, _, d)| d["delta"].as_str().unwrap())
        .collect();
    let full: String = words().concat();
    assert_eq!(
        after_reset, full,
        "the text after the reset is the whole answer"
    );
    assert_eq!(record["answer"], full.as_str());
    // Progress never went backwards within the new run (stages already
    // reported were not reported again).
    let percents: Vec<u64> = seen[..reset_at]
        .iter()
        .filter(|(_, e, _)| e == "progress")
        .map(|(_, _, d)| d["percent"].as_u64().unwrap())
        .collect();
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");

    // Persisted once, complete, and listed.
    let listed = testkit::wait_for("the scan in GET /v1/scans", Duration::from_secs(30), || {
        let http = http.clone();
        let token = token.clone();
        let url = format!("http://{gateway_addr}/v1/scans");
        async move {
            let list: Value = http
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            list["scans"].as_array()?.first().cloned()
        }
    })
    .await
    .unwrap();
    assert_eq!(listed["scan_id"], scan_id.as_str());
    assert_eq!(listed["answer"], full.as_str());
    let row = bed
        .pg_value(&format!(
            "select status || '|' || answer || '|' || cached from scans where scan_id = '{scan_id}'"
        ))
        .await;
    assert_eq!(row.trim(), format!("done|{full}|false"));
    let count = bed.pg.psql("scans", "select count(*) from scans").unwrap();
    assert_eq!(count.trim(), "1");
    drop(persister);
    drop(gateway);
}
