//! Rewards across real processes on the secured bus: two streamer
//! binaries, a gateway and a persister. An admin's catalogue change reaches
//! both streamers' match caches within a second (each process's own
//! `/metrics` counts the upsert it applied), every scan after it earns the
//! new character, and the persister's Postgres rows count each scan once.

use std::time::{Duration, Instant};

use e2e::{Bed, admin_token_for, sse_until_terminal, start_scan, token_for};
use serde_json::{Value, json};
use testkit::Script;

async fn metric(addr: &str, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scan_reward(gateway: &str, user: &str) -> Value {
    let (_, events) = start_scan(gateway, user).await;
    let events = sse_until_terminal(events, Duration::from_secs(120)).await;
    let last = events.last().expect("events");
    assert_eq!(last.event, "result", "{events:?}");
    last.data["reward"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_reaches_two_streamer_processes_within_a_second_and_every_next_scan() {
    let bed = Bed::start(
        "rewards",
        Script::new(["Rinse ", "it."], Duration::from_millis(5)),
    )
    .await;
    let mut persister = bed.persister();
    let mut first = bed.streamer("streamer-1", &[]);
    let mut second = bed.streamer("streamer-2", &[]);
    let mut gateway = bed.gateway(&[]);
    persister.start().await.unwrap();
    first.start().await.unwrap();
    second.start().await.unwrap();
    gateway.start().await.unwrap();

    // The coffee photo earns the catalogue's best character for whatever
    // category the local model gives it.
    let before = scan_reward(&gateway.addr, "zoe").await;
    let category_character = before["character_id"]
        .as_str()
        .expect("a character")
        .to_owned();
    assert_eq!(before["new"], true);
    let catalogue: Value = reqwest::Client::new()
        .get(format!("http://{}/v1/characters", gateway.addr))
        .bearer_auth(token_for("zoe"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let earned = catalogue["characters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["character_id"] == category_character.as_str())
        .unwrap()
        .clone();

    // An admin adds a character for the same categories that outranks it.
    // A streamer whose watch began before the seed landed counted the seed
    // as upserts: compare with what each counted so far.
    let upsert = "streamer_character_cache_events_total{kind=\"upsert\"}";
    let mut counted = Vec::new();
    for streamer in [&first, &second] {
        counted.push(
            metric(&streamer.addr, upsert)
                .await
                .expect("the series is listed"),
        );
    }
    let star = json!({
        "name": {"ko": "별", "en": "Star"},
        "description": {"ko": "가장 빛나는 캐릭터.", "en": "The brightest one."},
        "categories": earned["categories"],
        "priority": 1000
    });
    let response = reqwest::Client::new()
        .put(format!("http://{}/v1/admin/characters/star", gateway.addr))
        .bearer_auth(admin_token_for("ops"))
        .json(&star)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let changed = Instant::now();
    for (streamer, before) in [&first, &second].into_iter().zip(counted) {
        testkit::wait_for(
            "the upsert in the streamer's cache",
            Duration::from_secs(1),
            || async { (metric(&streamer.addr, upsert).await == Some(before + 1.0)).then_some(()) },
        )
        .await
        .unwrap();
    }
    let reached = changed.elapsed();
    assert!(reached < Duration::from_secs(1), "{reached:?}");

    // Every scan after it earns Star, whichever streamer runs it.
    let mut news = Vec::new();
    for _ in 0..4 {
        let reward = scan_reward(&gateway.addr, "zoe").await;
        assert_eq!(reward["character_id"], "star", "{reward}");
        news.push(reward["new"].as_bool().unwrap());
    }
    assert_eq!(news, [true, false, false, false]);

    // Postgres: one row per scan, Zoe owns both, Star earned four times.
    let times = bed
        .pg_value("SELECT times_earned FROM my_characters WHERE user_id = 'zoe' AND character_id = 'star' AND times_earned = 4")
        .await;
    assert_eq!(times, "4");
    let owned = bed
        .pg_value(
            "SELECT count(*) FROM character_ownership WHERE user_id = 'zoe' HAVING count(*) = 2",
        )
        .await;
    assert_eq!(owned, "2");
    assert_eq!(
        bed.pg_value("SELECT count(*) FROM reward_grants").await,
        "5"
    );
}
