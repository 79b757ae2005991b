//! Character grants into Postgres: batches by size and by time, one grant
//! per scan however often it arrives, a Postgres outage that loses nothing,
//! poison grants in `dlq.rewards`, and `history.characters`.

use std::time::{Duration, Instant};

use bus::{
    streams::PERSISTER_REWARDS,
    wire::{DeadLetter, HistoryCharactersRequest, HistoryReply, OwnedCharacters, RewardGrant},
};
use chrono::{DateTime, Utc};

use crate::helpers::{Servers, TestPersister, WAIT};

fn grant(scan_id: &str, user_id: &str, character_id: &str, seconds: i64) -> RewardGrant {
    RewardGrant {
        scan_id: scan_id.into(),
        user_id: user_id.into(),
        character_id: character_id.into(),
        category: "glass".into(),
        new: true,
        granted_at: DateTime::from_timestamp(1_780_000_000 + seconds, 0).unwrap(),
    }
}

impl TestPersister {
    /// Publishes a grant with `msg_id` as its `Nats-Msg-Id`; its stream sequence.
    async fn publish_grant(&self, grant: &RewardGrant, msg_id: &str) -> u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        self.servers
            .js
            .publish_with_headers(
                bus::subject::reward_grant(&grant.scan_id).unwrap(),
                headers,
                serde_json::to_vec(grant).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// `(first_earned_at, scan_id, times_earned, last_earned_at)` of a user's character.
    async fn owned(
        &self,
        user_id: &str,
        character_id: &str,
    ) -> Option<(DateTime<Utc>, String, i32, DateTime<Utc>)> {
        let mut conn = self.pg().await?;
        sqlx::query_as(
            "SELECT o.first_earned_at, o.scan_id, m.times_earned, m.last_earned_at
             FROM character_ownership o JOIN my_characters m USING (user_id, character_id)
             WHERE user_id = $1 AND character_id = $2",
        )
        .bind(user_id)
        .bind(character_id)
        .fetch_optional(&mut conn)
        .await
        .ok()?
    }

    async fn grants_stored(&self) -> i64 {
        self.pg_scalar("SELECT count(*) FROM reward_grants WHERE $1 = $1", "")
            .await
            .unwrap_or(-1)
    }

    async fn wait_grants_stored(&self, n: i64) {
        testkit::wait_for("grants in Postgres", WAIT, || async {
            (self.grants_stored().await == n).then_some(())
        })
        .await
        .unwrap();
    }

    async fn collection(&self, user_id: &str) -> HistoryReply<OwnedCharacters> {
        let request = HistoryCharactersRequest {
            user_id: user_id.into(),
        };
        let reply = self
            .servers
            .client
            .request(
                bus::subject::HISTORY_CHARACTERS,
                serde_json::to_vec(&request).unwrap().into(),
            )
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    }
}

fn with(servers: &Servers, batch: usize, flush_ms: u64) -> persister::Config {
    let mut config = servers.config();
    config.reward_batch = batch;
    config.reward_flush_ms = flush_ms;
    config
}

#[tokio::test]
async fn a_scan_counts_once_however_often_its_grant_arrives_and_ownership_keeps_the_first() {
    let servers = Servers::start().await;
    let config = with(&servers, 50, 300);
    let app = TestPersister::with_config(servers, config).await;
    // Two scans earn Glassy; the first one's grant arrives three times
    // (a redelivery, and a republish past the duplicate window).
    let first = grant("s1", "auth0|amy", "glassy", 0);
    let second = grant("s2", "auth0|amy", "glassy", 60);
    app.publish_grant(&second, "s2").await;
    app.publish_grant(&first, "s1").await;
    app.publish_grant(&first, "s1-again").await;
    let last = app.publish_grant(&first, "s1-once-more").await;
    app.wait_acked_on(PERSISTER_REWARDS, last).await;
    app.wait_grants_stored(2).await;
    let (first_at, scan, times, last_at) = app.owned("auth0|amy", "glassy").await.unwrap();
    assert_eq!((first_at, scan.as_str()), (first.granted_at, "s1"));
    assert_eq!((times, last_at), (2, second.granted_at));

    // Another batch repeating both changes nothing.
    app.publish_grant(&first, "s1-later").await;
    let last = app.publish_grant(&second, "s2-later").await;
    app.wait_acked_on(PERSISTER_REWARDS, last).await;
    assert_eq!(app.grants_stored().await, 2);
    assert_eq!(app.owned("auth0|amy", "glassy").await.unwrap().2, 2);

    // The collection, as the gateway asks for it.
    let HistoryReply::Ok(collection) = app.collection("auth0|amy").await else {
        panic!("no collection");
    };
    assert_eq!(collection.characters.len(), 1);
    let owned = &collection.characters[0];
    assert_eq!(
        (
            owned.character_id.as_str(),
            owned.scan_id.as_str(),
            owned.times_earned
        ),
        ("glassy", "s1", 2)
    );
    assert_eq!(owned.first_earned_at, first.granted_at);
    let HistoryReply::Ok(nobody) = app.collection("someone-else").await else {
        panic!("no collection");
    };
    assert!(nobody.characters.is_empty());
}

#[tokio::test]
async fn a_full_batch_is_written_at_once_and_a_partial_one_after_the_flush_interval() {
    let servers = Servers::start().await;
    let config = with(&servers, 5, 3_000);
    let app = TestPersister::with_config(servers, config).await;
    app.wait_ready_status("ok").await;

    let started = Instant::now();
    for i in 0..5 {
        app.publish_grant(
            &grant(&format!("full{i}"), "bo", "petty", i),
            &format!("full{i}"),
        )
        .await;
    }
    app.wait_grants_stored(5).await;
    let full = started.elapsed();
    assert!(
        full < Duration::from_millis(2_500),
        "a full batch waited {full:?}"
    );

    let started = Instant::now();
    for i in 0..2 {
        app.publish_grant(
            &grant(&format!("part{i}"), "bo", "canny", i),
            &format!("part{i}"),
        )
        .await;
    }
    app.wait_grants_stored(7).await;
    let partial = started.elapsed();
    assert!(
        partial >= Duration::from_millis(2_900) && partial < Duration::from_secs(6),
        "a partial batch was written after {partial:?}"
    );
}

#[tokio::test]
async fn grants_wait_in_jetstream_through_a_postgres_outage_and_all_arrive() {
    let servers = Servers::start().await;
    let config = with(&servers, 4, 200);
    let mut app = TestPersister::with_config(servers, config).await;
    app.wait_ready_status("ok").await;
    app.servers.pg.stop().unwrap();

    let grants: Vec<RewardGrant> = (0..10)
        .map(|i| {
            grant(
                &format!("out{i}"),
                "cy",
                if i % 2 == 0 { "vinny" } else { "foamy" },
                i,
            )
        })
        .collect();
    for g in &grants {
        app.publish_grant(g, &g.scan_id).await;
    }
    // Nothing is acked while Postgres is down.
    let consumer = app.consumer(PERSISTER_REWARDS).await;
    testkit::wait_for("the writer to hold grants", WAIT, || async {
        let info = consumer.get_info().await.ok()?;
        (info.num_ack_pending > 0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        consumer.get_info().await.unwrap().ack_floor.stream_sequence,
        0
    );

    app.servers.pg.start_again().await.unwrap();
    app.wait_grants_stored(10).await;
    app.wait_acked_on(PERSISTER_REWARDS, 10).await;
    for character in ["vinny", "foamy"] {
        assert_eq!(
            app.owned("cy", character).await.unwrap().2,
            5,
            "{character}"
        );
    }
}

#[tokio::test]
async fn poison_grants_go_to_dlq_rewards_and_the_rest_are_written() {
    let servers = Servers::start().await;
    let config = with(&servers, 10, 300);
    let app = TestPersister::with_config(servers, config).await;
    app.wait_ready_status("ok").await;
    app.publish_raw("reward.grant.bad1", "{not json").await;
    // Valid JSON that Postgres refuses for good: a NUL byte in a text.
    let nul = grant("bad2", "nul\u{0}user", "petty", 0);
    app.publish_grant(&nul, "bad2").await;
    let good = grant("good1", "di", "petty", 1);
    let last = app.publish_grant(&good, "good1").await;
    app.wait_acked_on(PERSISTER_REWARDS, last).await;
    app.wait_grants_stored(1).await;
    assert!(app.owned("di", "petty").await.is_some());

    let dlq = bus::replay::payloads(&app.servers.js, bus::streams::DLQ, "dlq.rewards")
        .await
        .unwrap();
    let letters: Vec<DeadLetter> = dlq
        .iter()
        .map(|p| serde_json::from_slice(p).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].subject, "reward.grant.bad1");
    assert!(letters[0].error.contains("undecodable"));
    assert_eq!(letters[1].subject, "reward.grant.bad2");
    assert!(
        letters[1].error.contains("Postgres refused"),
        "{}",
        letters[1].error
    );
}
