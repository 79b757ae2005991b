//! The erasure register (KV bucket `erasures`): an erasure holds for what
//! was out of its reach while it ran: a persister that was stopped, a
//! grant still waiting for its batch, a turn still being generated. What
//! the user does afterwards is stored as usual.

use std::time::Duration;

use async_nats::jetstream;
use bus::wire::RewardGrant;
use testkit::Script;
use tokio_util::sync::CancellationToken;

use crate::{
    erase::{
        TempDir, WAIT, delete_me, live_persisters, persister, persister_with, persisters_until,
        pg_count, turn,
    },
    helpers::{TestApp, send},
};

/// Waits until exactly `n` persisters announce themselves.
async fn persisters_exactly(js: &jetstream::Context, n: usize) {
    persisters_until(js, |live| live == n).await;
}

async fn pg_scalar(database_url: &str, sql: &'static str) -> Option<i64> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(database_url).await.ok()?;
    sqlx::query_scalar(sql).fetch_one(&mut conn).await.ok()
}

#[tokio::test]
async fn a_persister_stopped_during_an_erasure_never_syncs_the_users_older_rows() {
    let app = TestApp::start(crate::answer()).await;
    let js = app.js().await;
    let mut pg = testkit::Postgres::start()
        .await
        .expect("postgres (run scripts/setup.sh)");
    let database_url = pg.create_database("register_restart").unwrap();
    let dir = TempDir::new();
    let nats_url = app.nats().url();
    let stays = CancellationToken::new();
    let _stays_wal = persister(&nats_url, &database_url, dir.path(), "stays", &stays).await;
    let first_run = CancellationToken::new();
    let wal = persister(&nats_url, &database_url, dir.path(), "restarts", &first_run).await;
    live_persisters(&js, 2).await;

    // Rows that only reach one persister's SQLite file (Postgres is down
    // while they arrive), then that persister stops.
    pg.stop().unwrap();
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let erin = turn("erin", before);
    let olga = turn("olga", before);
    wal.insert_turns(vec![erin.clone(), olga.clone()])
        .await
        .unwrap();
    first_run.cancel();
    drop(wal);
    persisters_exactly(&js, 1).await;
    pg.start_again().await.unwrap();

    // Erin is erased while it is stopped: the live persister erases
    // Postgres; the stopped one's file cannot be asked.
    let (status, body) = delete_me(&app, "erin").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sqlite"]["persisters"], 1, "{body}");
    testkit::wait_for("the Postgres erasure", WAIT, || async {
        (pg_scalar(&database_url, "SELECT count(*) FROM erasures").await? == 1).then_some(())
    })
    .await
    .unwrap();

    // It starts again on its file: olga's row syncs, erin's never does.
    let second_run = CancellationToken::new();
    let wal = persister(
        &nats_url,
        &database_url,
        dir.path(),
        "restarts",
        &second_run,
    )
    .await;
    testkit::wait_for("olga's row in Postgres", WAIT, || async {
        (pg_count(&database_url, "turns", "olga").await? == 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(pg_count(&database_url, "turns", "erin").await, Some(0));
    assert!(wal.turn(&erin.turn_id).await.unwrap().is_none());
    assert!(wal.turn(&olga.turn_id).await.unwrap().is_some());
    // A late record of hers from before the erasure is dropped on arrival;
    // what she does afterwards is hers, kept and synced.
    let late = turn("erin", before);
    wal.insert_turns(vec![late.clone()]).await.unwrap();
    assert!(wal.turn(&late.turn_id).await.unwrap().is_none());
    let after = turn("erin", chrono::Utc::now());
    wal.insert_turns(vec![after.clone()]).await.unwrap();
    testkit::wait_for("erin's new row in Postgres", WAIT, || async {
        (pg_count(&database_url, "turns", "erin").await? == 1).then_some(())
    })
    .await
    .unwrap();
    stays.cancel();
    second_run.cancel();
}

async fn publish_grant(js: &jetstream::Context, user: &str) -> String {
    let scan_id = uuid::Uuid::new_v4().to_string();
    let grant = RewardGrant {
        scan_id: scan_id.clone(),
        user_id: user.into(),
        character_id: "petty".into(),
        category: "plastic".into(),
        new: true,
        granted_at: chrono::Utc::now(),
    };
    let message = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&grant).unwrap().into())
        .message_id(&scan_id);
    js.send_publish(bus::subject::reward_grant(&scan_id).unwrap(), message)
        .await
        .unwrap()
        .await
        .unwrap();
    scan_id
}

#[tokio::test]
async fn a_grant_waiting_during_an_erasure_never_reaches_postgres() {
    let app = TestApp::start(crate::answer()).await;
    let js = app.js().await;
    let pg = testkit::Postgres::start()
        .await
        .expect("postgres (run scripts/setup.sh)");
    let database_url = pg.create_database("register_grant").unwrap();
    let dir = TempDir::new();
    let stop = CancellationToken::new();
    // Grants wait 5 s for their batch: the erasure runs meanwhile.
    persister_with(
        &app.nats().url(),
        &database_url,
        dir.path(),
        "p",
        &stop,
        "5000",
    )
    .await;
    live_persisters(&js, 1).await;

    publish_grant(&js, "erin").await;
    publish_grant(&js, "olga").await;
    let (status, body) = delete_me(&app, "erin").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["postgres"]["reward_grants"], 0,
        "the grant was still waiting: {body}"
    );

    testkit::wait_for("olga's grant in Postgres", WAIT, || async {
        (pg_count(&database_url, "reward_grants", "olga").await? == 1).then_some(())
    })
    .await
    .unwrap();
    for table in ["reward_grants", "character_ownership", "my_characters"] {
        assert_eq!(
            pg_count(&database_url, table, "erin").await,
            Some(0),
            "{table}"
        );
    }
    // A grant after the erasure is hers as usual.
    publish_grant(&js, "erin").await;
    testkit::wait_for("erin's new grant in Postgres", WAIT, || async {
        (pg_count(&database_url, "reward_grants", "erin").await? == 1).then_some(())
    })
    .await
    .unwrap();
    stop.cancel();
}

#[tokio::test]
async fn a_turn_in_flight_during_an_erasure_leaves_no_context_behind() {
    // 30 tokens 200 ms apart: the erasure runs while the turn is generated.
    let slow = Script::new(std::iter::repeat_n("word ", 30), Duration::from_millis(200));
    let app = TestApp::start(slow).await;
    let js = app.js().await;
    // A persister to answer the erasure (none live counts as one missing).
    let pg = testkit::Postgres::start()
        .await
        .expect("postgres (run scripts/setup.sh)");
    let database_url = pg.create_database("register_context").unwrap();
    let dir = TempDir::new();
    let stop = CancellationToken::new();
    persister(&app.nats().url(), &database_url, dir.path(), "p", &stop).await;
    live_persisters(&js, 1).await;
    let contexts = js.get_key_value(bus::streams::KV_CONTEXT).await.unwrap();
    let records = js.get_stream(bus::streams::CHAT_DONE).await.unwrap();

    let mut ws = app.ws("erin").await;
    let (conversation, _) = send(&mut ws, &uuid::Uuid::new_v4().to_string()).await;
    let (status, body) = delete_me(&app, "erin").await;
    assert_eq!(status, 200, "{body}");

    // The turn's record goes out after its context was written.
    let done = bus::subject::chat_done(&conversation).unwrap();
    testkit::wait_for("the turn's record", WAIT, || async {
        records.get_last_raw_message_by_subject(&done).await.ok()
    })
    .await
    .unwrap();
    assert!(
        contexts.get(&conversation).await.unwrap().is_none(),
        "the erased user's conversation context came back"
    );

    // A turn she starts afterwards keeps its context as usual.
    app.llm.set_script(crate::answer());
    let mut ws = app.ws("erin").await;
    let (conversation, _) = send(&mut ws, &uuid::Uuid::new_v4().to_string()).await;
    ws.until_done().await;
    let done = bus::subject::chat_done(&conversation).unwrap();
    testkit::wait_for("the new turn's record", WAIT, || async {
        records.get_last_raw_message_by_subject(&done).await.ok()
    })
    .await
    .unwrap();
    assert!(contexts.get(&conversation).await.unwrap().is_some());
    stop.cancel();
}
