//! The reward chain end to end in-process: the real gateway and streamer on
//! a real nats-server, a vision stand-in that says which category each
//! photo is, and the character catalogue seeded from the repo's file.

use std::time::Duration;

use bus::wire::{DeadLetter, RewardGrant, ScanRequest};
use serde_json::Value;
use testkit::{Script, StandInLlm};
use tokio_util::sync::CancellationToken;

use crate::{
    helpers::TestApp,
    scans::{answer, fixture, progress},
};

/// A vision stand-in that calls every photo `category`.
pub(crate) async fn vision_saying(category: &str) -> StandInLlm {
    StandInLlm::start(Script::new(
        [format!(
            "{{\"category\":\"{category}\",\"confidence\":0.9,\"labels\":[{{\"label\":\"{category}\",\"score\":0.9}}]}}"
        )],
        Duration::ZERO,
    ))
    .await
    .unwrap()
}

pub(crate) async fn app_with_vision(vision: &StandInLlm, extra: &[&str]) -> TestApp {
    let mut streamer = vec!["--vision-base-url", vision.base_url()];
    streamer.extend_from_slice(extra);
    TestApp::start_full(answer(), &[], &streamer).await
}

/// The grants stored for one scan, in order.
pub(crate) async fn grants(js: &async_nats::jetstream::Context, scan_id: &str) -> Vec<RewardGrant> {
    let subject = bus::subject::reward_grant(scan_id).unwrap();
    bus::replay::payloads(js, bus::streams::REWARDS, &subject)
        .await
        .unwrap()
        .iter()
        .map(|p| serde_json::from_slice(p).unwrap())
        .collect()
}

/// The scan's final record, from its `result` event.
pub(crate) async fn result_of(app: &TestApp, user: &str, id: &str) -> Value {
    let events = app.events(user, id, None).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "result", "{events:?}");
    last.data.clone()
}

#[tokio::test]
async fn a_scan_earns_the_best_character_once_and_a_cache_hit_earns_it_again_not_new() {
    let vision = vision_saying("pet_bottle").await;
    let app = app_with_vision(&vision, &[]).await;
    let js = app.js().await;

    let first = app.scan("alice", fixture("coffee.jpg")).await;
    let events = app.events("alice", &first, None).await;
    let stages = progress(&events);
    let answer_at = stages.iter().position(|s| s.0 == "answer").unwrap();
    assert_eq!(
        stages[answer_at + 1..],
        [("answer", 90), ("reward", 95), ("done", 100)].map(|(s, p)| (s.to_owned(), p))
    );
    let record = &events.last().unwrap().data;
    // Petty (priority 30) beats Plasty (20), which also takes PET bottles.
    assert_eq!(
        record["reward"],
        serde_json::json!({"character_id": "petty", "name": {"ko": "페티", "en": "Petty"}, "new": true})
    );
    let granted = grants(&js, &first).await;
    assert_eq!(granted.len(), 1);
    assert_eq!(
        (
            granted[0].user_id.as_str(),
            granted[0].character_id.as_str(),
            granted[0].new
        ),
        ("alice", "petty", true)
    );

    // The same photo again: a cache hit, which rewards too, not new.
    let again = app.scan("alice", fixture("coffee.jpg")).await;
    let events = app.events("alice", &again, None).await;
    assert_eq!(
        progress(&events),
        [
            ("stored", 10),
            ("hashed", 20),
            ("cache_hit", 90),
            ("reward", 95),
            ("done", 100)
        ]
        .map(|(s, p)| (s.to_owned(), p))
    );
    let record = &events.last().unwrap().data;
    assert_eq!(record["cached"], true);
    assert_eq!(record["reward"]["character_id"], "petty");
    assert_eq!(record["reward"]["new"], false);
    assert_eq!(grants(&js, &again).await.len(), 1);

    // Bob's cache hit on Alice's photo is Bob's first Petty.
    let bobs = app.scan("bob", fixture("coffee.jpg")).await;
    let record = result_of(&app, "bob", &bobs).await;
    assert_eq!(
        (
            record["reward"]["character_id"].as_str(),
            record["reward"]["new"].as_bool()
        ),
        (Some("petty"), Some(true))
    );
}

#[tokio::test]
async fn an_unknown_item_earns_nothing_and_the_result_says_null() {
    let vision = vision_saying("unknown").await;
    let app = app_with_vision(&vision, &[]).await;
    let id = app.scan("alice", fixture("rocket.jpg")).await;
    let record = result_of(&app, "alice", &id).await;
    assert_eq!(record["category"], "unknown");
    assert!(record.as_object().unwrap().contains_key("reward"));
    assert_eq!(record["reward"], Value::Null);
    assert!(grants(&app.js().await, &id).await.is_empty());
}

#[tokio::test]
async fn two_scans_racing_for_the_same_character_make_exactly_one_new() {
    let vision = vision_saying("glass").await;
    let app = app_with_vision(&vision, &[]).await;
    let photos = ["coffee.jpg", "rocket.jpg", "astronaut.jpg", "chelsea.png"];
    let mut ids = Vec::new();
    for photo in photos {
        ids.push(app.scan("carol", fixture(photo)).await);
    }
    let mut news = 0;
    for id in &ids {
        let record = result_of(&app, "carol", id).await;
        assert_eq!(record["reward"]["character_id"], "glassy");
        news += usize::from(record["reward"]["new"] == true);
    }
    assert_eq!(news, 1, "one of the racing scans earned Glassy first");
    let js = app.js().await;
    for id in &ids {
        assert_eq!(grants(&js, id).await.len(), 1);
    }
}

#[tokio::test]
async fn a_redelivered_or_reprocessed_scan_never_grants_twice() {
    let vision = vision_saying("metal_can").await;
    let app = app_with_vision(&vision, &["--dlq-reprocess-every-s", "0"]).await;
    let js = app.js().await;
    let id = app.scan("dave", fixture("rocket.jpg")).await;
    let first = result_of(&app, "dave", &id).await;
    assert_eq!(first["reward"]["new"], true);
    let stream = js.get_stream(bus::streams::SCAN_REQ).await.unwrap();
    let request: ScanRequest = serde_json::from_slice(
        &stream
            .get_last_raw_message_by_subject(&format!("scan.req.{id}"))
            .await
            .unwrap()
            .payload,
    )
    .unwrap();

    // A redelivery of the finished job (as if its ack was lost).
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&request).unwrap().into())
        .message_id(format!("{id}:again"));
    js.send_publish(format!("scan.req.{id}"), publish)
        .await
        .unwrap()
        .await
        .unwrap();
    // And the same scan sent back from the DLQ: it runs the pipeline again.
    let letter = DeadLetter {
        subject: format!("scan.req.{id}"),
        error: "reward_timeout: test".into(),
        deliveries: 1,
        payload: serde_json::to_string(&request).unwrap(),
        failed_at: chrono::Utc::now(),
    };
    js.publish("dlq.scan", serde_json::to_vec(&letter).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let report = streamer::scan::reprocess_dead_letters(&js, 10)
        .await
        .unwrap();
    assert_eq!(report.requeued, std::slice::from_ref(&id));
    let events = js.get_stream(bus::streams::SCAN_EVT).await.unwrap();
    testkit::wait_for(
        "the reprocessed run's result",
        Duration::from_secs(30),
        || async {
            let payloads =
                bus::replay::payloads(&js, bus::streams::SCAN_EVT, &format!("scan.evt.{id}"))
                    .await
                    .unwrap();
            let results = payloads
                .iter()
                .filter(|p| serde_json::from_slice::<Value>(p).unwrap()["event"] == "result")
                .count();
            (results == 2).then_some(())
        },
    )
    .await
    .unwrap();
    drop(events);
    let (_, status) = app.status("dave", &id).await;
    // The rerun is still the scan that earned Canny first: the same answer.
    assert_eq!(status["result"]["reward"], first["reward"]);
    let consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("streamer-scan")
        .await
        .unwrap();
    testkit::wait_for("every delivery acked", Duration::from_secs(30), || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.unwrap();
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(grants(&js, &id).await.len(), 1, "one grant for the scan");
}

#[tokio::test]
async fn a_reward_stage_that_times_out_completes_the_scan_and_reprocessing_grants_it() {
    let vision = vision_saying("battery").await;
    let app = TestApp::without_streamer(answer()).await;
    let common = [
        "--vision-base-url",
        vision.base_url(),
        "--dlq-reprocess-every-s",
        "0",
    ];
    // A slow bus (100 ms each way) for the first streamer: its ownership
    // write alone takes 200 ms, past the reward stage's 150 ms.
    let proxy = testkit::DelayProxy::start(
        format!("127.0.0.1:{}", app.nats().port()).parse().unwrap(),
        Duration::from_millis(100),
    )
    .await
    .unwrap();
    let slow_stop = CancellationToken::new();
    let mut slow = common.to_vec();
    slow.extend([
        "--reward-soft-timeout-ms",
        "50",
        "--reward-hard-timeout-ms",
        "150",
    ]);
    let slow = app
        .add_streamer(
            app.streamer_config(&format!("nats://{}", proxy.addr()), &slow),
            &slow_stop,
        )
        .await;

    let id = app.scan("erin", fixture("astronaut.jpg")).await;
    let events = app.events("erin", &id, None).await;
    let record = &events.last().unwrap().data;
    assert_eq!(record["status"], "done", "the scan still completes");
    assert_eq!(record["reward"], Value::Null);
    assert!(
        events.iter().any(|e| e.event == "progress"
            && e.data["stage"] == "reward"
            && e.data["message"].as_str().unwrap().contains("longer")),
        "the soft timeout told the client"
    );
    let js = app.js().await;
    let dlq = js.get_stream(bus::streams::DLQ).await.unwrap();
    let letter: DeadLetter = serde_json::from_slice(
        &dlq.get_last_raw_message_by_subject("dlq.scan")
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert!(
        letter.error.starts_with("reward_timeout"),
        "{}",
        letter.error
    );

    // A healthy streamer takes over; the reprocess pass grants the reward.
    slow_stop.cancel();
    slow.await.unwrap().unwrap();
    let healthy_stop = CancellationToken::new();
    app.add_streamer(
        app.streamer_config(&app.nats().url(), &common),
        &healthy_stop,
    )
    .await;
    let report = streamer::scan::reprocess_dead_letters(&js, 10)
        .await
        .unwrap();
    assert_eq!(report.requeued, std::slice::from_ref(&id));
    let status = testkit::wait_for("the granted rerun", Duration::from_secs(30), || async {
        let (_, status) = app.status("erin", &id).await;
        (status["status"] == "done" && !status["result"]["reward"].is_null()).then_some(status)
    })
    .await
    .unwrap();
    assert_eq!(status["result"]["reward"]["character_id"], "volty");
    assert_eq!(status["result"]["reward"]["new"], true);
    assert_eq!(grants(&js, &id).await.len(), 1);
    healthy_stop.cancel();
}

#[tokio::test]
async fn my_characters_lists_what_the_persister_stored_with_times_earned() {
    let vision = vision_saying("pet_bottle").await;
    let app = app_with_vision(&vision, &[]).await;
    let mut pg = testkit::Postgres::start()
        .await
        .expect("postgres (run scripts/setup.sh)");
    let database_url = pg.create_database("rewards_mine").unwrap();
    let dir = std::env::temp_dir().join(format!("gateway-rewards-{}", uuid::Uuid::new_v4()));
    let stop = CancellationToken::new();
    let persister = persister::Persister::build(<persister::Config as clap::Parser>::parse_from([
        "persister".to_owned(),
        "--nats-url".into(),
        app.nats().url(),
        "--database-url".into(),
        database_url,
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--sqlite-path".into(),
        dir.join("p.db").to_string_lossy().into_owned(),
        "--reward-flush-ms".into(),
        "200".into(),
    ]))
    .await
    .unwrap();
    tokio::spawn(persister.run(stop.clone()));

    let first = app.scan("auth0|hana", fixture("coffee.jpg")).await;
    result_of(&app, "auth0|hana", &first).await;
    let again = app.scan("auth0|hana", fixture("coffee.jpg")).await;
    result_of(&app, "auth0|hana", &again).await;
    let token = crate::helpers::token_for("auth0|hana", 3600);
    let body = testkit::wait_for(
        "both grants in the collection",
        Duration::from_secs(30),
        || {
            let request = app
                .http
                .get(app.url("/v1/me/characters"))
                .bearer_auth(&token)
                .send();
            async move {
                let response = request.await.ok()?;
                if response.status() != 200 {
                    return None;
                }
                let body: Value = response.json().await.ok()?;
                (body["characters"][0]["times_earned"] == 2).then_some(body)
            }
        },
    )
    .await
    .unwrap();
    let characters = body["characters"].as_array().unwrap();
    assert_eq!(characters.len(), 1);
    let petty = &characters[0];
    assert_eq!(petty["character_id"], "petty");
    assert_eq!(
        petty["name"],
        serde_json::json!({"ko": "페티", "en": "Petty"})
    );
    assert_eq!(petty["scan_id"], first.as_str());
    assert!(petty["first_earned_at"].as_str().unwrap().starts_with("20"));
    let mut keys: Vec<&str> = petty
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "character_id",
            "first_earned_at",
            "name",
            "scan_id",
            "times_earned"
        ]
    );
    // The persisted scan records keep their rewards (GET /v1/scans).
    let listed: Value = app
        .http
        .get(app.url("/v1/scans"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rewards: Vec<(&str, bool)> = listed["scans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["reward"]["character_id"].as_str().unwrap(),
                s["reward"]["new"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(rewards, [("petty", false), ("petty", true)], "newest first");
    // Someone else's collection is theirs alone.
    let other = crate::helpers::token_for("auth0|ivan", 3600);
    let response = app
        .http
        .get(app.url("/v1/me/characters"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["characters"], serde_json::json!([]));

    // Postgres down: the collection is unavailable, plainly (the grants wait).
    pg.stop().unwrap();
    let response = app
        .http
        .get(app.url("/v1/me/characters"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    stop.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_scan_redelivered_after_its_worker_granted_and_died_answers_the_same_and_grants_once() {
    let vision = vision_saying("clothing").await;
    let app = TestApp::without_streamer(answer()).await;
    let js = app.js().await;
    // The job waits in SCAN_REQ while no streamer runs.
    let id = app.scan("yuna", fixture("chelsea.png")).await;
    // What a worker that died between the grant and the result left behind:
    // the ownership entry and the grant.
    let owners = js
        .get_key_value(bus::streams::KV_CHARACTER_OWNERS)
        .await
        .unwrap();
    let key = format!("{}.threadle", bus::subject::user_key("yuna"));
    owners.create(&key, id.clone().into()).await.unwrap();
    let left = RewardGrant {
        scan_id: id.clone(),
        user_id: "yuna".into(),
        character_id: "threadle".into(),
        category: "clothing".into(),
        new: true,
        granted_at: chrono::Utc::now(),
    };
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&left).unwrap().into())
        .message_id(id.clone());
    js.send_publish(bus::subject::reward_grant(&id).unwrap(), publish)
        .await
        .unwrap()
        .await
        .unwrap();

    let stop = CancellationToken::new();
    app.add_streamer(
        app.streamer_config(&app.nats().url(), &["--vision-base-url", vision.base_url()]),
        &stop,
    )
    .await;
    let record = result_of(&app, "yuna", &id).await;
    assert_eq!(
        (
            record["reward"]["character_id"].as_str(),
            record["reward"]["new"].as_bool()
        ),
        (Some("threadle"), Some(true)),
        "the scan that created the entry is still the one that earned it"
    );
    let granted = grants(&js, &id).await;
    assert_eq!(granted, [left], "the grant is not published twice");
    stop.cancel();
}
