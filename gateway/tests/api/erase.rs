//! `DELETE /v1/me`: the caller's data goes from every store (two
//! persisters' SQLite files, Postgres, the KV buckets, the image store),
//! another user's stays, every gateway forgets the erased owners, and an
//! erasure during a Postgres outage completes when Postgres returns.

use std::time::Duration;

use bus::wire::{FinishReason, ServerFrame, TurnRecord, Usage};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    helpers::{TestApp, send, token_for, ws_to},
    rewards::{app_with_vision, result_of, vision_saying},
    scans::fixture,
};

pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A directory for the persisters' SQLite files, removed on drop.
pub(crate) struct TempDir(std::path::PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("gateway-erase-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A persister in-process with its own SQLite file under `dir`.
pub(crate) async fn persister(
    nats_url: &str,
    database_url: &str,
    dir: &std::path::Path,
    name: &str,
    stop: &CancellationToken,
) -> persister::Wal {
    persister_with(nats_url, database_url, dir, name, stop, "100").await
}

/// [`persister`] whose grants wait `reward_flush_ms` for their batch.
pub(crate) async fn persister_with(
    nats_url: &str,
    database_url: &str,
    dir: &std::path::Path,
    name: &str,
    stop: &CancellationToken,
    reward_flush_ms: &str,
) -> persister::Wal {
    let app = persister::Persister::build(<persister::Config as clap::Parser>::parse_from([
        "persister".to_owned(),
        "--nats-url".into(),
        nats_url.into(),
        "--database-url".into(),
        database_url.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--sqlite-path".into(),
        dir.join(format!("{name}.db"))
            .to_string_lossy()
            .into_owned(),
        "--sync-interval-ms".into(),
        "100".into(),
        "--reward-flush-ms".into(),
        reward_flush_ms.into(),
    ]))
    .await
    .unwrap();
    let wal = app.wal();
    tokio::spawn(app.run(stop.clone()));
    wal
}

pub(crate) async fn live_persisters(js: &async_nats::jetstream::Context, n: usize) {
    persisters_until(js, |live| live >= n).await;
}

/// Waits until the number of persisters announcing themselves satisfies `enough`.
pub(crate) async fn persisters_until(
    js: &async_nats::jetstream::Context,
    enough: impl Fn(usize) -> bool,
) {
    let kv = js.get_key_value(bus::streams::KV_PERSISTERS).await.unwrap();
    testkit::wait_for("the persisters' heartbeats", WAIT, || async {
        let keys: Vec<String> = kv
            .keys()
            .await
            .ok()?
            .filter_map(|k| async { k.ok() })
            .collect()
            .await;
        enough(keys.len()).then_some(())
    })
    .await
    .unwrap();
}

/// A turn record of `user` as a streamer would publish it.
pub(crate) fn turn(user: &str, created_at: chrono::DateTime<chrono::Utc>) -> TurnRecord {
    let id = uuid::Uuid::now_v7().to_string();
    TurnRecord {
        turn_id: id.clone(),
        conversation_id: format!("conv-{id}"),
        user_id: user.into(),
        request_id: format!("req-{id}"),
        model: "m".into(),
        finish_reason: FinishReason::Stop,
        user_text: "q".into(),
        assistant_text: "a".into(),
        usage: Usage::default(),
        sources: Vec::new(),
        error: None,
        created_at,
        first_token_at: None,
        completed_at: created_at,
    }
}

pub(crate) async fn pg_count(database_url: &str, table: &str, user: &str) -> Option<i64> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(database_url).await.ok()?;
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE user_id = $1"
    )))
    .bind(user)
    .fetch_one(&mut conn)
    .await
    .ok()
}

pub(crate) async fn delete_me(app: &TestApp, user: &str) -> (u16, Value) {
    let response = app
        .http
        .delete(app.url("/v1/me"))
        .bearer_auth(token_for(user, 3600))
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn get(app: &TestApp, user: &str, path: &str) -> (u16, Value) {
    let response = app
        .http
        .get(app.url(path))
        .bearer_auth(token_for(user, 3600))
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

/// One chat turn on a new conversation, answered; its ids.
async fn chat(addr: std::net::SocketAddr, user: &str) -> (String, String) {
    let mut ws = ws_to(addr, user).await;
    let (conversation, turn) = send(&mut ws, &uuid::Uuid::new_v4().to_string()).await;
    let frames = ws.until_done().await;
    assert!(
        matches!(frames.last(), Some(ServerFrame::Done { .. })),
        "{frames:?}"
    );
    (conversation, turn)
}

const TABLES: [&str; 6] = [
    "conversations",
    "turns",
    "scans",
    "reward_grants",
    "character_ownership",
    "my_characters",
];

#[tokio::test]
async fn delete_me_erases_every_store_on_two_persisters_and_leaves_others_alone() {
    let vision = vision_saying("pet_bottle").await;
    let app = app_with_vision(&vision, &[]).await;
    let js = app.js().await;
    let pg = testkit::Postgres::start()
        .await
        .expect("postgres (run scripts/setup.sh)");
    let database_url = pg.create_database("erase_all").unwrap();
    let dir = TempDir::new();
    let stop = CancellationToken::new();
    let first = persister(&app.nats().url(), &database_url, dir.path(), "p1", &stop).await;
    let second = persister(&app.nats().url(), &database_url, dir.path(), "p2", &stop).await;
    live_persisters(&js, 2).await;
    let other_node = app.another_gateway(&[]).await;

    // Erin's data everywhere: a turn through the other node (which then
    // remembers her conversation's owner), a scan with its reward, and a
    // row in each persister's own SQLite file.
    let erin = "auth0|erin@example.com";
    let (conversation, turn_id) = chat(other_node, erin).await;
    let scan = app.scan(erin, fixture("coffee.jpg")).await;
    assert!(!result_of(&app, erin, &scan).await["reward"].is_null());
    for wal in [&first, &second] {
        wal.insert_turns(vec![turn(erin, chrono::Utc::now())])
            .await
            .unwrap();
    }
    // Olga's, which must stay.
    let (olga_conversation, _) = chat(app.addr, "olga").await;
    let olga_scan = app.scan("olga", fixture("coffee.jpg")).await;
    result_of(&app, "olga", &olga_scan).await;
    for table in TABLES {
        testkit::wait_for(
            &format!("erin's and olga's rows in {table}"),
            WAIT,
            || async {
                let erin = pg_count(&database_url, table, erin).await?;
                let olga = pg_count(&database_url, table, "olga").await?;
                (erin > 0 && olga > 0).then_some(())
            },
        )
        .await
        .unwrap();
    }
    let mut olga_before = Vec::new();
    for table in TABLES {
        olga_before.push(pg_count(&database_url, table, "olga").await.unwrap());
    }

    // Without a token: 401, like every endpoint.
    let response = app.http.delete(app.url("/v1/me")).send().await.unwrap();
    assert_eq!(response.status(), 401);

    let (status, body) = delete_me(&app, erin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sqlite"]["persisters"], 2, "{body}");
    assert_eq!(
        body["sqlite"]["turns"], 3,
        "the chat turn and one row in each file: {body}"
    );
    assert_eq!(body["sqlite"]["scans"], 1, "{body}");
    assert_eq!(body["postgres"]["turns"], 3, "{body}");
    assert_eq!(body["postgres"]["conversations"], 3, "{body}");
    for table in [
        "scans",
        "reward_grants",
        "character_ownership",
        "my_characters",
    ] {
        assert_eq!(body["postgres"][table], 1, "{table}: {body}");
    }
    assert_eq!(body["kv"]["conversations"], 1, "{body}");
    assert_eq!(body["kv"]["chat_turns"], 1, "{body}");
    assert_eq!(body["kv"]["scans"], 1, "{body}");
    assert_eq!(body["kv"]["character_owners"], 1, "{body}");
    assert_eq!(body["object_store"]["scan_images"], 1, "{body}");

    // Gone from both SQLite files, Postgres, the buckets and the images.
    for wal in [&first, &second] {
        assert!(wal.user_turns(erin, false).await.unwrap().is_empty());
        assert!(wal.user_scans(erin, 10).await.unwrap().is_empty());
    }
    for table in TABLES {
        assert_eq!(
            pg_count(&database_url, table, erin).await,
            Some(0),
            "{table}"
        );
    }
    let kv = |name: &'static str| {
        let js = js.clone();
        async move { js.get_key_value(name).await.unwrap() }
    };
    assert!(
        kv(bus::streams::KV_CONVERSATIONS)
            .await
            .get(&conversation)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        kv(bus::streams::KV_TURNS)
            .await
            .get(&turn_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        kv(bus::streams::KV_SCANS)
            .await
            .get(&scan)
            .await
            .unwrap()
            .is_none()
    );
    let images = js
        .get_object_store(bus::streams::OBJ_SCAN_IMAGES)
        .await
        .unwrap();
    assert!(images.get(&scan).await.is_err(), "the image is gone");
    assert!(images.get(&olga_scan).await.is_ok(), "olga's image stays");

    // History, scan status and resume find nothing.
    let (status, list) = get(&app, erin, "/v1/conversations").await;
    assert_eq!(
        (status, &list["conversations"]),
        (200, &json!([])),
        "{list}"
    );
    let (status, _) = get(&app, erin, &format!("/v1/conversations/{conversation}")).await;
    assert_eq!(status, 404);
    let (status, _) = get(&app, erin, &format!("/v1/scans/{scan}")).await;
    assert_eq!(status, 404);
    let mut ws = app.ws(erin).await;
    ws.send_json(json!({"type": "resume", "turn_id": turn_id, "after_seq": 0}))
        .await;
    match ws.next().await {
        // What any unknown turn gets.
        ServerFrame::Error { code, .. } => assert_eq!(code, "resume_expired"),
        other => panic!("resume of an erased turn: {other:?}"),
    }

    // The other node forgot the erased owner: the conversation id is free
    // there too, as on a node that never saw it.
    let mut ws = ws_to(other_node, "olga").await;
    ws.send_json(json!({"type": "send", "conversation_id": conversation, "content": "hi", "request_id": "r-olga"})).await;
    assert!(
        matches!(ws.next().await, ServerFrame::Accepted { .. }),
        "a remembered owner would refuse this"
    );
    ws.until_done().await;

    // Olga's data is untouched.
    let (status, list) = get(&app, "olga", "/v1/conversations").await;
    assert_eq!(status, 200);
    assert!(
        list["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["conversation_id"] == olga_conversation.as_str()),
        "{list}"
    );
    let (status, _) = get(&app, "olga", &format!("/v1/scans/{olga_scan}")).await;
    assert_eq!(status, 200);
    for (table, before) in TABLES.iter().zip(olga_before) {
        let now = pg_count(&database_url, table, "olga").await.unwrap();
        assert!(now >= before, "{table}: {before} -> {now}");
    }

    // Twice is fine: nothing left to erase.
    let (status, again) = delete_me(&app, erin).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["sqlite"]["turns"], 0, "{again}");
    assert_eq!(again["kv"]["conversations"], 0, "{again}");
    assert_eq!(again["object_store"]["scan_images"], 0, "{again}");
    if again["postgres"].is_object() {
        assert_eq!(again["postgres"]["turns"], 0, "{again}");
    }
    stop.cancel();
}

#[tokio::test]
async fn an_erasure_while_postgres_is_down_completes_when_it_returns() {
    let app = TestApp::start(crate::answer()).await;
    let js = app.js().await;
    let mut pg = testkit::Postgres::start()
        .await
        .expect("postgres (run scripts/setup.sh)");
    let database_url = pg.create_database("erase_outage").unwrap();
    let dir = TempDir::new();
    let stop = CancellationToken::new();
    let wal = persister(&app.nats().url(), &database_url, dir.path(), "p", &stop).await;
    live_persisters(&js, 1).await;

    let (_, synced_turn) = chat(app.addr, "nina").await;
    testkit::wait_for("nina's turn in Postgres", WAIT, || async {
        (pg_count(&database_url, "turns", "nina").await? == 1).then_some(())
    })
    .await
    .unwrap();

    pg.stop().unwrap();
    // A turn that only reaches SQLite: queued for a sync that must never copy it.
    let (_, queued_turn) = chat(app.addr, "nina").await;
    testkit::wait_for("the queued turn in SQLite", WAIT, || async {
        wal.turn(&queued_turn).await.ok().flatten()
    })
    .await
    .unwrap();

    let (status, body) = delete_me(&app, "nina").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["postgres"], "pending", "{body}");
    assert_eq!(body["sqlite"]["turns"], 2, "{body}");
    assert!(wal.user_turns("nina", false).await.unwrap().is_empty());
    // A record of a turn nina started before the erasure, arriving late
    // (it was still in CHAT_DONE): dropped on arrival.
    let late = turn("nina", chrono::Utc::now() - chrono::Duration::seconds(60));
    wal.insert_turns(vec![late.clone()]).await.unwrap();
    assert!(wal.turn(&late.turn_id).await.unwrap().is_none());
    // One she starts afterwards is stored as usual.
    let after = turn("nina", chrono::Utc::now());
    wal.insert_turns(vec![after.clone()]).await.unwrap();
    assert!(wal.turn(&after.turn_id).await.unwrap().is_some());
    // And olga's turn during the outage, to know when the backlog synced.
    let (_, olga_turn) = chat(app.addr, "olga").await;

    pg.start_again().await.unwrap();
    use sqlx::Connection as _;
    testkit::wait_for("the erasure and the backlog in Postgres", WAIT, || async {
        let mut conn = sqlx::PgConnection::connect(&database_url).await.ok()?;
        let erased: i64 = sqlx::query_scalar("SELECT count(*) FROM erasures")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        let synced: i64 =
            sqlx::query_scalar("SELECT count(*) FROM turns WHERE turn_id = $1 OR turn_id = $2")
                .bind(&olga_turn)
                .bind(&after.turn_id)
                .fetch_one(&mut conn)
                .await
                .ok()?;
        (erased == 1 && synced == 2).then_some(())
    })
    .await
    .unwrap();
    let mut conn = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let audit: Vec<(String, Value)> = sqlx::query_as("SELECT erase_id, rows FROM erasures")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0, body["erase_id"].as_str().unwrap());
    assert_eq!(
        audit[0].1["turns"], 1,
        "the synced turn; the queued one never got there"
    );
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM turns WHERE turn_id = $1")
        .bind(&after.turn_id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the turn after the erasure is hers, kept");
    for id in [&synced_turn, &queued_turn, &late.turn_id] {
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM turns WHERE turn_id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(found, 0, "{id}");
    }
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM turns WHERE turn_id = $1")
        .bind(&olga_turn)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(found, 1);
    // The work queue is empty: nothing is left holding nina's id.
    let mut stream = js.get_stream(bus::streams::ERASE).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    stop.cancel();
}
