//! Persister integration tests against a real nats-server, a real Postgres
//! cluster and a fresh SQLite file each.

mod helpers;
mod retention;
mod rewards;
mod scans;

use bus::wire::{HistoryReply, TurnRecord};
use chrono::{DateTime, Utc};
use helpers::{Servers, TestPersister, record};

/// The record as Postgres keeps it: timestamps to the microsecond.
fn in_postgres(record: &TurnRecord) -> TurnRecord {
    let micros = |t: DateTime<Utc>| DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap();
    TurnRecord {
        created_at: micros(record.created_at),
        first_token_at: record.first_token_at.map(micros),
        completed_at: micros(record.completed_at),
        ..record.clone()
    }
}

fn sqlite_count(app: &TestPersister, turn_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(app.servers.sqlite_path()).unwrap();
    conn.query_row(
        "SELECT count(*) FROM turns WHERE turn_id = ?1",
        [turn_id],
        |row| row.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn a_turn_lands_in_sqlite_then_postgres_verbatim_and_only_once() {
    let app = TestPersister::start().await;
    let turn = record("conv-a");
    let seq = app.publish(&turn, &turn.turn_id).await;

    // SQLite keeps the record exactly, and only then is the message acked.
    assert_eq!(app.wait_sqlite(&turn.turn_id).await, turn);
    app.wait_acked(seq).await;

    let stored = app.wait_pg(&turn.turn_id).await;
    assert_eq!(stored, in_postgres(&turn));
    let (owner, created_at, updated_at) = app.pg_conversation("conv-a").await.unwrap();
    assert_eq!(owner, "user-1");
    assert_eq!(created_at, in_postgres(&turn).created_at);
    assert_eq!(updated_at, in_postgres(&turn).completed_at);

    // The same record again, under another message id so JetStream's own
    // dedupe does not hide it: still one row everywhere.
    let again = app.publish(&turn, &format!("{}-again", turn.turn_id)).await;
    assert!(again > seq, "the second publish was not stored");
    app.wait_acked(again).await;
    let (_, ready) = app.wait_ready_status("ok").await;
    assert_eq!(ready["checks"]["pending_sync"], 0);
    assert_eq!(sqlite_count(&app, &turn.turn_id), 1);
    let rows = app
        .pg_scalar(
            "SELECT count(*) FROM turns WHERE turn_id = $1",
            &turn.turn_id,
        )
        .await;
    assert_eq!(rows, Some(1));

    let metrics = app.get_text("/metrics").await;
    for name in [
        "persister_commits_total",
        "persister_rows_ingested_total",
        "persister_commit_seconds",
        "persister_rows_pending_sync",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn an_undecodable_record_is_dead_lettered_and_does_not_block_the_next() {
    let app = TestPersister::start().await;
    app.publish_raw("chat.done.conv-b", "{not json").await;
    let good = record("conv-b");
    let good_seq = app.publish(&good, &good.turn_id).await;

    assert_eq!(app.wait_pg(&good.turn_id).await, in_postgres(&good));
    let letters = app.dead_letters(1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].subject, "chat.done.conv-b");
    assert_eq!(letters[0].payload, "{not json");
    assert!(
        letters[0].error.contains("undecodable"),
        "{}",
        letters[0].error
    );
    // The poison message was terminated, not left pending.
    app.wait_acked(good_seq).await;
}

#[tokio::test]
async fn postgres_outage_keeps_accepting_into_sqlite_and_catches_up() {
    let mut app = TestPersister::start().await;
    app.wait_ready_status("ok").await;
    app.servers.pg.stop().unwrap();

    let turns: Vec<_> = (0..3).map(|_| record("conv-c")).collect();
    let mut last = 0;
    for turn in &turns {
        last = app.publish(turn, &turn.turn_id).await;
    }
    for turn in &turns {
        app.wait_sqlite(&turn.turn_id).await;
    }
    app.wait_acked(last).await;

    let (code, ready) = app.wait_ready_status("degraded").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["checks"]["postgres"], "unreachable");
    assert_eq!(ready["checks"]["sqlite"], "open");
    assert_eq!(ready["checks"]["pending_sync"], 3);

    app.servers.pg.start_again().await.unwrap();
    for turn in &turns {
        assert_eq!(app.wait_pg(&turn.turn_id).await, in_postgres(turn));
    }
    let (code, ready) = app.wait_ready_status("ok").await;
    assert_eq!(code, 200);
    assert_eq!(ready["checks"]["postgres"], "connected");
    assert_eq!(ready["checks"]["pending_sync"], 0);
}

#[tokio::test]
async fn a_failed_sqlite_commit_acks_nothing_and_fails_readiness_until_it_recovers() {
    let app = TestPersister::start().await;
    app.wait_ready_status("ok").await;
    // Another writer holds the lock past busy_timeout: the commit fails, as
    // it would on a full disk.
    let blocker = rusqlite::Connection::open(app.servers.sqlite_path()).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let turn = record("conv-g");
    let seq = app.publish(&turn, &turn.turn_id).await;
    let (code, ready) = app
        .wait_ready("the failed write", |ready| {
            ready["checks"]["sqlite"]
                .as_str()
                .is_some_and(|s| s.starts_with("write failed"))
        })
        .await;
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["status"], "unavailable");
    assert!(app.ack_floor().await < seq, "acked before it was written");
    assert!(app.wal.turn(&turn.turn_id).await.unwrap().is_none());

    blocker.execute_batch("ROLLBACK").unwrap();
    app.wait_acked(seq).await;
    assert_eq!(app.wait_sqlite(&turn.turn_id).await, turn);
    assert_eq!(app.wait_pg(&turn.turn_id).await, in_postgres(&turn));
    app.wait_ready_status("ok").await;
}

#[tokio::test]
async fn the_sqlite_buffer_is_in_wal_mode() {
    let app = TestPersister::start().await;
    assert_eq!(app.wal.journal_mode().await.unwrap(), "wal");
    // WAL is a property of the file: another connection sees it too.
    let conn = rusqlite::Connection::open(app.servers.sqlite_path()).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn starts_while_postgres_is_down_and_migrates_when_it_returns() {
    let mut servers = Servers::start().await;
    servers.pg.stop().unwrap();
    let mut app = TestPersister::on(servers).await;

    let turn = record("conv-e");
    let seq = app.publish(&turn, &turn.turn_id).await;
    app.wait_sqlite(&turn.turn_id).await;
    app.wait_acked(seq).await;
    let (code, _) = app.wait_ready_status("degraded").await;
    assert_eq!(code, 200);

    app.servers.pg.start_again().await.unwrap();
    assert_eq!(app.wait_pg(&turn.turn_id).await, in_postgres(&turn));
    assert!(app.pg_conversation("conv-e").await.is_some());
}

#[tokio::test]
async fn a_restarted_persister_first_syncs_what_the_previous_run_left_in_sqlite() {
    let mut app = TestPersister::start().await;
    app.servers.pg.stop().unwrap();
    let turn = record("conv-f");
    let seq = app.publish(&turn, &turn.turn_id).await;
    app.wait_sqlite(&turn.turn_id).await;
    // Acked: JetStream will not deliver it again, SQLite is the only copy.
    app.wait_acked(seq).await;

    let mut servers = app.stop().await;
    servers.pg.start_again().await.unwrap();
    let app = TestPersister::on(servers).await;
    assert_eq!(app.wait_pg(&turn.turn_id).await, in_postgres(&turn));
}

#[tokio::test]
async fn a_malformed_database_url_fails_startup_with_one_actionable_line() {
    let dir = std::env::temp_dir().join(format!("persister-test-{}", uuid::Uuid::new_v4()));
    let config = <persister::Config as clap::Parser>::parse_from([
        "persister".to_owned(),
        "--database-url".into(),
        "postgres://user:secret@host:notaport/db".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--sqlite-path".into(),
        dir.join("persister.db").to_string_lossy().into_owned(),
    ]);
    let result = persister::Persister::build(config).await;
    let _ = std::fs::remove_dir_all(&dir);
    let Err(error) = result else {
        panic!("a malformed DATABASE_URL was accepted");
    };
    let message = format!("{error:#}");
    assert!(message.contains("DATABASE_URL"), "{message}");
    assert!(
        !message.contains("secret"),
        "the password leaked: {message}"
    );
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test]
async fn history_lists_and_returns_a_users_conversations_from_postgres_and_sqlite() {
    let mut app = TestPersister::start().await;
    let mut first = record("conv-h1");
    first.user_text = "  What goes\nin the blue bin?  ".into();
    let second = record("conv-h1");
    let other = record("conv-h2");
    let mut foreign = record("conv-h3");
    foreign.user_id = "user-2".into();
    for turn in [&first, &second, &other, &foreign] {
        app.publish(turn, &turn.turn_id).await;
    }
    app.wait_pg(&foreign.turn_id).await;

    let list = app.history_list("user-1").await;
    let ids: Vec<_> = list
        .conversations
        .iter()
        .map(|c| c.conversation_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["conv-h2", "conv-h1"],
        "newest first, only the caller's"
    );
    let h1 = &list.conversations[1];
    assert_eq!(h1.turns, 2);
    assert_eq!(h1.title, "What goes in the blue bin?");

    let HistoryReply::Ok(detail) = app.history_get("user-1", "conv-h1").await else {
        panic!("history.get refused the owner");
    };
    assert_eq!(
        detail.turns,
        vec![in_postgres(&first), in_postgres(&second)]
    );
    assert!(matches!(
        app.history_get("user-2", "conv-h1").await,
        HistoryReply::Err(e) if e.error.code == "forbidden"
    ));
    assert!(matches!(
        app.history_get("user-1", "conv-none").await,
        HistoryReply::Err(e) if e.error.code == "not_found"
    ));

    // With Postgres down, a new turn is readable from SQLite at once.
    app.servers.pg.stop().unwrap();
    let third = record("conv-h1");
    let seq = app.publish(&third, &third.turn_id).await;
    app.wait_acked(seq).await;
    let HistoryReply::Ok(detail) = app.history_get("user-1", "conv-h1").await else {
        panic!("history.get failed while Postgres is down");
    };
    assert_eq!(
        detail
            .turns
            .iter()
            .map(|t| t.turn_id.as_str())
            .collect::<Vec<_>>(),
        [&first.turn_id, &second.turn_id, &third.turn_id]
    );
    assert_eq!(detail.turns[2], third, "SQLite keeps the exact record");
    let list = app.history_list("user-1").await;
    assert_eq!(list.conversations[0].conversation_id, "conv-h1");
    assert_eq!(list.conversations[0].turns, 3);
}

#[tokio::test]
async fn operator_commands_show_the_backlog_force_a_sync_and_find_missing_ids() {
    use persister::admin::{Command, run};
    let servers = Servers::start().await;
    let config = servers.config();
    let records: Vec<_> = (0..3).map(|_| record("conv-admin")).collect();
    let wal = persister::Wal::open(&servers.sqlite_path()).await.unwrap();
    wal.insert_turns(records.clone()).await.unwrap();
    drop(wal);

    let backlog = run(&Command::Backlog, &config).await.unwrap();
    assert_eq!(backlog["pending"], 3);
    let compare = run(&Command::Compare, &config).await.unwrap();
    assert_eq!(compare["missing_in_postgres"], 3);
    assert_eq!(
        compare["consistent"], true,
        "pending rows are not an inconsistency"
    );

    let synced = run(&Command::Sync, &config).await.unwrap();
    assert_eq!(synced["copied"], 3);
    assert_eq!(synced["pending"], 0);
    let compare = run(&Command::Compare, &config).await.unwrap();
    assert_eq!(compare["postgres_rows"], 3);
    assert_eq!(compare["missing_in_postgres"], 0);

    // A row marked synced but gone from Postgres is reported by id.
    let gone = &records[1].turn_id;
    servers
        .pg
        .psql(
            servers.database_url.rsplit('/').next().unwrap(),
            &format!("delete from turns where turn_id = '{gone}'"),
        )
        .unwrap();
    let compare = run(&Command::Compare, &config).await.unwrap();
    assert_eq!(compare["consistent"], false);
    assert_eq!(
        compare["missing_but_marked_synced"],
        serde_json::json!([gone])
    );

    // Postgres down: sync and compare say so in one line.
    let mut servers = servers;
    servers.pg.stop().unwrap();
    let error = run(&Command::Sync, &config).await.unwrap_err();
    assert!(format!("{error:#}").contains("unreachable"), "{error:#}");
}

#[tokio::test]
async fn two_persisters_share_the_work_and_history_stays_complete_across_their_sqlite_files() {
    let first = TestPersister::start().await;
    let mut second_config = first.servers.config();
    second_config.sqlite_path = first.servers.dir.0.join("second.db");
    let second = persister::Persister::build(second_config).await.unwrap();
    let second_wal = second.wal();
    let stop_second = tokio_util::sync::CancellationToken::new();
    tokio::spawn(second.run(stop_second.clone()));
    let history =
        bus::history::HistoryClient::start(first.servers.client.clone(), &first.servers.js)
            .await
            .unwrap();

    // Work is shared: both files get rows, Postgres gets each once.
    let records: Vec<_> = (0..200).map(|_| record("conv-scale")).collect();
    for r in &records {
        first.publish(r, &r.turn_id).await;
    }
    for r in &records {
        first.wait_pg(&r.turn_id).await;
    }
    let in_first = first.wal.all_turn_ids().await.unwrap().len();
    let in_second = second_wal.all_turn_ids().await.unwrap().len();
    assert_eq!(in_first + in_second, 200, "no record was written twice");
    assert!(
        in_first > 0 && in_second > 0,
        "one persister did all the work: {in_first}/{in_second}"
    );
    assert_eq!(
        first
            .pg_scalar(
                "select count(*) from turns where conversation_id = $1",
                "conv-scale"
            )
            .await,
        Some(200)
    );

    // Postgres down: new turns land in two different SQLite files, and the
    // merged history still has every one of them.
    let mut first = first;
    first.servers.pg.stop().unwrap();
    let late: Vec<_> = (0..40).map(|_| record("conv-scale")).collect();
    for r in &late {
        first.publish(r, &r.turn_id).await;
    }
    for r in &late {
        let (a, b) = (&first.wal, &second_wal);
        testkit::wait_for(
            "a late turn in either SQLite file",
            helpers::WAIT,
            || async {
                let here = a.turn(&r.turn_id).await.ok().flatten();
                let there = b.turn(&r.turn_id).await.ok().flatten();
                here.or(there)
            },
        )
        .await
        .unwrap();
    }
    // Pages of 30 from two persisters, each answering from its own SQLite
    // file: every turn exactly once, in order.
    let (turns, _) = helpers::all_pages(&history, "user-1", "conv-scale", 30).await;
    let ids: Vec<&str> = turns.iter().map(|t| t.turn_id.as_str()).collect();
    let mut want: Vec<&TurnRecord> = records.iter().chain(&late).collect();
    want.sort_by_key(|r| (r.created_at.timestamp_micros(), r.turn_id.clone()));
    let want: Vec<&str> = want.iter().map(|r| r.turn_id.as_str()).collect();
    assert_eq!(ids, want);
    let unsynced_first = first.wal.unsynced(1000).await.unwrap().len();
    let unsynced_second = second_wal.unsynced(1000).await.unwrap().len();
    assert_eq!(unsynced_first + unsynced_second, 40);
    stop_second.cancel();
}

/// A turn of about 60 KB (30 KB asked, 30 KB answered) created `n` seconds
/// after `base`, its number at the start of both texts.
fn big_turn(conversation_id: &str, base: DateTime<Utc>, n: i64) -> TurnRecord {
    let mut turn = record(conversation_id);
    turn.created_at = base + chrono::Duration::seconds(n);
    turn.first_token_at = Some(turn.created_at);
    turn.completed_at = turn.created_at + chrono::Duration::milliseconds(500);
    turn.user_text = format!("question {n:02} {}", "가나다\"\n".repeat(3_750));
    turn.assistant_text = format!("answer {n:02} {}", "x".repeat(30_000));
    turn
}

#[tokio::test]
async fn history_get_pages_a_conversation_larger_than_a_nats_message_from_postgres_and_sqlite() {
    let mut app = TestPersister::start().await;
    let history = bus::history::HistoryClient::start(app.servers.client.clone(), &app.servers.js)
        .await
        .unwrap();
    let max_payload = app.servers.client.server_info().max_payload;
    let base = Utc::now() - chrono::Duration::hours(1);
    let turns: Vec<_> = (0..60).map(|n| big_turn("conv-big", base, n)).collect();
    assert!(
        turns
            .iter()
            .map(|t| serde_json::to_vec(t).unwrap().len())
            .sum::<usize>()
            > 3 * max_payload,
        "the conversation must not fit in one message"
    );
    for turn in &turns {
        app.publish(turn, &turn.turn_id).await;
    }
    for turn in &turns {
        app.wait_pg(&turn.turn_id).await;
    }
    let ids = |turns: &[TurnRecord]| turns.iter().map(|t| t.turn_id.clone()).collect::<Vec<_>>();

    // Unbounded, the reply would exceed max_payload and never arrive.
    let (reply, bytes) = app
        .history_page(&bus::wire::HistoryGetRequest {
            user_id: "user-1".into(),
            conversation_id: "conv-big".into(),
            limit: Some(200),
            ..Default::default()
        })
        .await;
    let HistoryReply::Ok(page) = reply else {
        panic!("history.get refused: {reply:?}")
    };
    assert!(bytes <= max_payload, "{bytes} > {max_payload}");
    assert!(page.has_more && page.next_cursor.is_some());
    assert!(!page.turns.is_empty() && page.turns.len() < 60);
    assert_eq!(
        ids(&page.turns),
        ids(&turns[60 - page.turns.len()..]),
        "the newest, oldest first"
    );
    // Without a limit: the newest 50 at most, bytes permitting.
    let HistoryReply::Ok(default) = app.history_get("user-1", "conv-big").await else {
        panic!("history.get without a limit failed")
    };
    assert!(default.has_more && default.turns.len() <= 50);

    // Whole pages from Postgres (and whatever SQLite keeps): each turn once, in order.
    let want = ids(&turns);
    let (all, sizes) = helpers::all_pages(&history, "user-1", "conv-big", 7).await;
    assert_eq!(ids(&all), want);
    assert_eq!(sizes[..8], [7; 8], "{sizes:?}");
    assert_eq!(all[0], in_postgres(&turns[0]), "records come back verbatim");
    let (all, _) = helpers::all_pages(&history, "user-1", "conv-big", 200).await;
    assert_eq!(ids(&all), want);

    // Postgres down: SQLite alone answers the same pages, new turns included.
    app.servers.pg.stop().unwrap();
    let late: Vec<_> = (60..63).map(|n| big_turn("conv-big", base, n)).collect();
    for turn in &late {
        app.publish(turn, &turn.turn_id).await;
        app.wait_sqlite(&turn.turn_id).await;
    }
    let want: Vec<_> = want.into_iter().chain(ids(&late)).collect();
    let (all, _) = helpers::all_pages(&history, "user-1", "conv-big", 11).await;
    assert_eq!(ids(&all), want);
    assert_eq!(all[62], late[2], "SQLite keeps the exact record");

    // Postgres back: what SQLite alone holds and what Postgres holds, merged.
    app.servers.pg.start_again().await.unwrap();
    app.wait_ready_status("ok").await;
    let (all, _) = helpers::all_pages(&history, "user-1", "conv-big", 50).await;
    assert_eq!(ids(&all), want);

    // A cursor that is not one gets a clear refusal; another user gets none.
    let (reply, _) = app
        .history_page(&bus::wire::HistoryGetRequest {
            user_id: "user-1".into(),
            conversation_id: "conv-big".into(),
            before: Some("yesterday".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(reply, HistoryReply::Err(e) if e.error.code == "invalid_request"));
    let (reply, _) = app
        .history_page(&bus::wire::HistoryGetRequest {
            user_id: "user-2".into(),
            conversation_id: "conv-big".into(),
            limit: Some(1),
            ..Default::default()
        })
        .await;
    assert!(matches!(reply, HistoryReply::Err(e) if e.error.code == "forbidden"));
}
