//! Completed scans: `scan.done.<scan>` -> SQLite -> Postgres, the
//! later-record rule, dead letters, outages, history and scale-out.

use std::time::Duration;

use bus::{
    streams::PERSISTER_SCANS,
    wire::{
        DisposalRule, HistoryReply, HistoryScanRequest, HistoryScansRequest, Localized, ScanLabel,
        ScanList, ScanRecord, ScanStatus,
    },
};
use chrono::{DateTime, Utc};
use sqlx::Row as _;

use crate::helpers::{Servers, TestPersister, WAIT};

/// A done scan whose text must survive byte for byte.
fn scan(user_id: &str) -> ScanRecord {
    let created_at = Utc::now();
    let text = |en: &str, ko: &str| Localized {
        ko: ko.into(),
        en: en.into(),
    };
    ScanRecord {
        scan_id: uuid::Uuid::now_v7().to_string(),
        user_id: user_id.into(),
        status: ScanStatus::Done,
        category: Some("plastic".into()),
        confidence: Some(0.8731),
        labels: vec![
            ScanLabel {
                label: "water bottle".into(),
                score: 0.8731,
            },
            ScanLabel {
                label: "pop bottle, soda bottle".into(),
                score: 0.0625,
            },
        ],
        vision_model: Some("local/mobilenet-v3".into()),
        phash: Some("c3c3e1e1f0f07878".into()),
        sha256: Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()),
        rule: Some(DisposalRule {
            category: "plastic".into(),
            items: Default::default(),
            name: text("Plastic", "플라스틱"),
            bin: text("Plastics bin", "플라스틱 수거함"),
            steps: vec![
                text("Empty and rinse it", "내용물을 비우고 헹구기"),
                text("Take the label off \"fully\"", "라벨 떼기"),
            ],
            why: text(
                "Clean PET is recycled;\ndirty PET is not.",
                "깨끗한 PET만 재활용",
            ),
        }),
        answer: Some("  Rinse it,\tpeel the label;\r\nplastics bin. 🙂 \\ ' \" % _".into()),
        cached: false,
        reward: Some(bus::wire::Reward {
            character_id: "plasty".into(),
            name: text("Plasty", "플라스티"),
            new: true,
        }),
        error: None,
        created_at,
        completed_at: Some(created_at + chrono::Duration::seconds(7)),
    }
}

/// The same scan, failed `seconds` after it was created.
fn failed(of: &ScanRecord, seconds: i64) -> ScanRecord {
    ScanRecord {
        status: ScanStatus::Failed,
        category: None,
        confidence: None,
        labels: Vec::new(),
        vision_model: None,
        rule: None,
        answer: None,
        reward: None,
        error: Some("vision: upstream timed out after 3 retries".into()),
        completed_at: Some(of.created_at + chrono::Duration::seconds(seconds)),
        ..of.clone()
    }
}

/// The record as Postgres keeps it: timestamps to the microsecond.
fn in_postgres(record: &ScanRecord) -> ScanRecord {
    let micros = |t: DateTime<Utc>| DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap();
    ScanRecord {
        created_at: micros(record.created_at),
        completed_at: record.completed_at.map(micros),
        ..record.clone()
    }
}

impl TestPersister {
    /// Publishes a record on `scan.done.<scan>` under `msg_id`, returning its
    /// stream sequence.
    async fn publish_scan(&self, record: &ScanRecord, msg_id: &str) -> u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let subject = bus::subject::scan_done(&record.scan_id).unwrap();
        self.servers
            .js
            .publish_with_headers(subject, headers, serde_json::to_vec(record).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    /// The scan as the `scans` table holds it, if it is there.
    async fn pg_scan(&self, scan_id: &str) -> Option<ScanRecord> {
        let mut conn = self.pg().await?;
        let row = sqlx::query(
            "SELECT scan_id, user_id, status, category, confidence, labels, vision_model, \
             phash, sha256, rule, answer, cached, error, created_at, completed_at, reward \
             FROM scans WHERE scan_id = $1",
        )
        .bind(scan_id)
        .fetch_optional(&mut conn)
        .await
        .ok()??;
        let status: String = row.get("status");
        let labels: serde_json::Value = row.get("labels");
        let rule: Option<serde_json::Value> = row.get("rule");
        let reward: Option<serde_json::Value> = row.get("reward");
        Some(ScanRecord {
            scan_id: row.get("scan_id"),
            user_id: row.get("user_id"),
            status: serde_json::from_value(serde_json::Value::String(status)).unwrap(),
            category: row.get("category"),
            confidence: row.get("confidence"),
            labels: serde_json::from_value(labels).unwrap(),
            vision_model: row.get("vision_model"),
            phash: row.get("phash"),
            sha256: row.get("sha256"),
            rule: rule.map(|r| serde_json::from_value(r).unwrap()),
            answer: row.get("answer"),
            cached: row.get("cached"),
            reward: reward.map(|r| serde_json::from_value(r).unwrap()),
            error: row.get("error"),
            created_at: row.get("created_at"),
            completed_at: row.get("completed_at"),
        })
    }

    /// Waits until Postgres holds exactly `record` for its scan.
    async fn wait_pg_scan(&self, record: &ScanRecord) {
        let expected = in_postgres(record);
        let result = testkit::wait_for("the scan in Postgres", WAIT, || async {
            (self.pg_scan(&record.scan_id).await.as_ref() == Some(&expected)).then_some(())
        })
        .await;
        if result.is_err() {
            panic!(
                "Postgres holds {:?}, expected {expected:?}",
                self.pg_scan(&record.scan_id).await
            );
        }
    }

    /// Waits until no scan waits for Postgres.
    async fn wait_scans_synced(&self) {
        testkit::wait_for("the scan outbox to drain", WAIT, || async {
            let backlog = self.wal.backlogs().await.ok()?.scans;
            (backlog.pending == 0 && backlog.rejected == 0).then_some(())
        })
        .await
        .unwrap();
    }

    async fn history_scans(&self, user_id: &str, limit: Option<u32>) -> ScanList {
        let query = HistoryScansRequest {
            user_id: user_id.into(),
            limit,
        };
        match self.ask(bus::subject::HISTORY_SCANS, &query).await {
            HistoryReply::Ok(list) => list,
            HistoryReply::Err(error) => panic!("history.scans failed: {error:?}"),
        }
    }

    async fn history_scan(&self, user_id: &str, scan_id: &str) -> HistoryReply<ScanRecord> {
        let query = HistoryScanRequest {
            user_id: user_id.into(),
            scan_id: scan_id.into(),
        };
        self.ask(bus::subject::HISTORY_SCAN, &query).await
    }
}

fn is_not_found(reply: &HistoryReply<ScanRecord>) -> bool {
    matches!(reply, HistoryReply::Err(e) if e.error.code == "not_found")
}

#[tokio::test]
async fn a_scan_lands_in_sqlite_then_postgres_with_every_field_and_only_once() {
    let app = TestPersister::start().await;
    let record = scan("user-1");
    let seq = app.publish_scan(&record, &record.scan_id).await;

    app.wait_acked_on(PERSISTER_SCANS, seq).await;
    // Acked only after the commit: SQLite has it exactly.
    assert_eq!(
        app.wal.scan(&record.scan_id).await.unwrap(),
        Some(record.clone())
    );
    app.wait_pg_scan(&record).await;

    // The rule and labels are jsonb documents, queryable as such.
    let mut conn = app.pg().await.unwrap();
    let (bin, second_label, steps, kind): (String, String, i32, String) = sqlx::query_as(
        "SELECT rule->'bin'->>'ko', labels->1->>'label', jsonb_array_length(rule->'steps'), \
         pg_typeof(labels)::text FROM scans WHERE scan_id = $1",
    )
    .bind(&record.scan_id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(bin, "플라스틱 수거함");
    assert_eq!(second_label, "pop bottle, soda bottle");
    assert_eq!(steps, 2);
    assert_eq!(kind, "jsonb");

    // The same record again, under another message id so JetStream's own
    // dedupe does not hide it: one row, unchanged, and acked.
    let again = app
        .publish_scan(&record, &format!("{}-again", record.scan_id))
        .await;
    assert!(again > seq, "the second publish was not stored");
    app.wait_acked_on(PERSISTER_SCANS, again).await;
    let (_, ready) = app.wait_ready_status("ok").await;
    assert_eq!(ready["checks"]["pending_sync"], 0);
    assert_eq!(
        app.pg_scalar(
            "SELECT count(*) FROM scans WHERE scan_id = $1",
            &record.scan_id
        )
        .await,
        Some(1)
    );
    app.wait_pg_scan(&record).await;

    let metrics = app.get_text("/metrics").await;
    for name in [
        "persister_scan_commits_total",
        "persister_scan_rows_ingested_total",
        "persister_scan_duplicates_total",
        "persister_scan_rows_synced_total",
        "persister_scan_rows_pending_sync",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn a_failed_scan_completed_later_is_replaced_and_a_stale_failure_changes_nothing() {
    let app = TestPersister::start().await;
    let done = scan("user-1");
    let first_failure = failed(&done, 3);

    // Failed, then reprocessed from the DLQ and done.
    app.publish_scan(&first_failure, "f1").await;
    app.wait_pg_scan(&first_failure).await;
    app.publish_scan(&done, "d1").await;
    app.wait_pg_scan(&done).await;

    // A failure that completed before the done record arrives late (a
    // redelivered job): acked, stored nowhere.
    let seq = app.publish_scan(&failed(&done, 5), "f2").await;
    app.wait_acked_on(PERSISTER_SCANS, seq).await;
    app.wait_scans_synced().await;
    assert_eq!(
        app.wal.scan(&done.scan_id).await.unwrap(),
        Some(done.clone())
    );
    app.wait_pg_scan(&done).await;

    // At the same instant, done beats failed, whichever comes first.
    let tie = scan("user-1");
    let tie_failed = ScanRecord {
        completed_at: tie.completed_at,
        ..failed(&tie, 0)
    };
    app.publish_scan(&tie, "t1").await;
    app.wait_pg_scan(&tie).await;
    let seq = app.publish_scan(&tie_failed, "t2").await;
    app.wait_acked_on(PERSISTER_SCANS, seq).await;
    app.wait_scans_synced().await;
    app.wait_pg_scan(&tie).await;

    // Postgres already holds the later record when SQLite no longer has the
    // row (purged after retention): the stale one is stored locally, but the
    // upsert leaves Postgres alone and history still answers the later one.
    let purged = app
        .wal
        .purge_synced(Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert!(purged >= 2, "purge removed {purged} synced rows");
    assert_eq!(app.wal.scan(&done.scan_id).await.unwrap(), None);
    let stale = failed(&done, 4);
    let seq = app.publish_scan(&stale, "f3").await;
    app.wait_acked_on(PERSISTER_SCANS, seq).await;
    assert_eq!(app.wal.scan(&done.scan_id).await.unwrap(), Some(stale));
    app.wait_scans_synced().await;
    app.wait_pg_scan(&done).await;
    let HistoryReply::Ok(answer) = app.history_scan("user-1", &done.scan_id).await else {
        panic!("history.scan refused the owner");
    };
    assert_eq!(answer, in_postgres(&done));
    let list = app.history_scans("user-1", None).await;
    assert_eq!(
        list.scans
            .iter()
            .filter(|s| s.scan_id == done.scan_id)
            .collect::<Vec<_>>(),
        [&in_postgres(&done)]
    );
}

#[tokio::test]
async fn a_poison_scan_is_dead_lettered_once_and_does_not_block_the_next() {
    let app = TestPersister::start().await;
    let first = app.publish_raw("scan.done.s-poison", "{not json").await;
    let mut bad_id = scan("user-1");
    bad_id.scan_id = "two words".into();
    app.servers
        .js
        .publish(
            "scan.done.s-bad-id",
            serde_json::to_vec(&bad_id).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let good = scan("user-1");
    let good_seq = app.publish_scan(&good, &good.scan_id).await;
    assert!(good_seq > first);

    app.wait_pg_scan(&good).await;
    let letters = app.dead_letters_on("dlq.scans", 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].subject, "scan.done.s-poison");
    assert_eq!(letters[0].payload, "{not json");
    assert!(
        letters[0].error.contains("undecodable"),
        "{}",
        letters[0].error
    );
    assert_eq!(letters[1].subject, "scan.done.s-bad-id");
    assert!(
        letters[1].error.contains("two words"),
        "{}",
        letters[1].error
    );
    assert!(app.wal.scan("two words").await.unwrap().is_none());

    // Terminated, not handed back: nothing pending, nothing redelivered, and
    // no second dead letter after a while.
    app.wait_acked_on(PERSISTER_SCANS, good_seq).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = app
        .consumer(PERSISTER_SCANS)
        .await
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_pending, 0);
    assert_eq!(app.dead_letters_on("dlq.scans", 2).await.len(), 2);
    let turn_letters = bus::replay::payloads(&app.servers.js, bus::streams::DLQ, "dlq.turns")
        .await
        .unwrap();
    assert!(turn_letters.is_empty(), "scan poison went to dlq.turns");
}

#[tokio::test]
async fn scans_are_accepted_while_postgres_is_down_and_synced_when_it_returns() {
    let mut app = TestPersister::start().await;
    app.wait_ready_status("ok").await;
    app.servers.pg.stop().unwrap();

    let scans: Vec<_> = (0..3).map(|_| scan("user-1")).collect();
    let replaced = failed(&scans[0], 2);
    app.publish_scan(&replaced, "early-failure").await;
    let mut last = 0;
    for s in &scans {
        last = app.publish_scan(s, &s.scan_id).await;
    }
    app.wait_acked_on(PERSISTER_SCANS, last).await;
    for s in &scans {
        assert_eq!(app.wal.scan(&s.scan_id).await.unwrap().as_ref(), Some(s));
    }

    let (code, ready) = app.wait_ready_status("degraded").await;
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["checks"]["pending_sync"], 3);
    // History answers from SQLite alone meanwhile.
    assert_eq!(
        app.history_scan("user-1", &scans[0].scan_id).await,
        HistoryReply::Ok(scans[0].clone())
    );
    assert_eq!(app.history_scans("user-1", None).await.scans.len(), 3);

    app.servers.pg.start_again().await.unwrap();
    for s in &scans {
        app.wait_pg_scan(s).await;
    }
    let (_, ready) = app.wait_ready_status("ok").await;
    assert_eq!(ready["checks"]["pending_sync"], 0);
}

#[tokio::test]
async fn a_restarted_persister_first_syncs_the_scans_the_previous_run_left_in_sqlite() {
    let mut app = TestPersister::start().await;
    app.wait_ready_status("ok").await;
    app.servers.pg.stop().unwrap();
    let record = scan("user-1");
    let seq = app.publish_scan(&record, &record.scan_id).await;
    // Acked: JetStream will not deliver it again, SQLite is the only copy.
    app.wait_acked_on(PERSISTER_SCANS, seq).await;

    let mut servers = app.stop().await;
    servers.pg.start_again().await.unwrap();
    let app = TestPersister::on(servers).await;
    app.wait_pg_scan(&record).await;
}

#[tokio::test]
async fn history_lists_a_users_scans_newest_first_and_hides_other_users_scans() {
    let mut app = TestPersister::start().await;
    let mut mine: Vec<ScanRecord> = Vec::new();
    for n in 0..5 {
        let mut s = scan("user-1");
        s.created_at += chrono::Duration::seconds(n);
        mine.push(s);
    }
    let theirs = scan("user-2");
    for s in mine.iter().chain([&theirs]) {
        app.publish_scan(s, &s.scan_id).await;
    }
    for s in mine.iter().chain([&theirs]) {
        app.wait_pg_scan(s).await;
    }

    let newest_first: Vec<ScanRecord> = mine.iter().rev().map(in_postgres).collect();
    let list = app.history_scans("user-1", None).await;
    assert_eq!(list.scans, newest_first);
    assert!(!list.truncated);
    let list = app.history_scans("user-1", Some(2)).await;
    assert_eq!(list.scans, newest_first[..2]);
    // Limits are capped, not refused.
    assert_eq!(
        app.history_scans("user-1", Some(100_000)).await.scans.len(),
        5
    );
    assert_eq!(
        app.history_scans("user-2", None).await.scans,
        [in_postgres(&theirs)]
    );
    assert!(app.history_scans("nobody", None).await.scans.is_empty());

    assert_eq!(
        app.history_scan("user-1", &mine[0].scan_id).await,
        HistoryReply::Ok(in_postgres(&mine[0]))
    );
    // Another user's scan is answered like one that does not exist.
    let foreign = app.history_scan("user-1", &theirs.scan_id).await;
    let absent = app.history_scan("user-1", "no-such-scan").await;
    assert!(is_not_found(&foreign), "{foreign:?}");
    assert_eq!(foreign, absent);

    // The client API over the same persister.
    let client = bus::history::HistoryClient::start(app.servers.client.clone(), &app.servers.js)
        .await
        .unwrap();
    assert_eq!(client.scans("user-1", 3).await.unwrap(), newest_first[..3]);
    assert_eq!(
        client.scan("user-1", &mine[4].scan_id).await.unwrap(),
        Some(in_postgres(&mine[4]))
    );
    assert_eq!(client.scan("user-1", &theirs.scan_id).await.unwrap(), None);
    assert_eq!(client.scan("user-2", &mine[4].scan_id).await.unwrap(), None);
    assert_eq!(client.scan("user-1", "no-such-scan").await.unwrap(), None);

    // Postgres down: an unsynced scan is listed with the synced ones, from SQLite.
    app.servers.pg.stop().unwrap();
    let mut newest = scan("user-1");
    newest.created_at += chrono::Duration::seconds(60);
    let seq = app.publish_scan(&newest, &newest.scan_id).await;
    app.wait_acked_on(PERSISTER_SCANS, seq).await;
    let listed = client.scans("user-1", 10).await.unwrap();
    assert_eq!(listed.len(), 6);
    assert_eq!(listed[0], newest, "SQLite keeps the exact record");
    assert_eq!(
        client.scan("user-1", &newest.scan_id).await.unwrap(),
        Some(newest)
    );
}

#[tokio::test]
async fn two_persisters_merge_scans_by_the_later_record() {
    let mut first = TestPersister::start().await;
    let mut second_config = first.servers.config();
    second_config.sqlite_path = first.servers.dir.0.join("second.db");
    let second = persister::Persister::build(second_config).await.unwrap();
    let second_wal = second.wal();
    let stop_second = tokio_util::sync::CancellationToken::new();
    let second_task = tokio::spawn(second.run(stop_second.clone()));
    let history =
        bus::history::HistoryClient::start(first.servers.client.clone(), &first.servers.js)
            .await
            .unwrap();
    first.wait_ready_status("ok").await;

    // Postgres down: scans pile up in two SQLite files.
    first.servers.pg.stop().unwrap();
    let scans: Vec<_> = (0..80).map(|_| scan("user-m")).collect();
    let mut last = 0;
    for s in &scans {
        last = first.publish_scan(s, &s.scan_id).await;
    }
    first.wait_acked_on(PERSISTER_SCANS, last).await;
    let in_first = first.wal.backlogs().await.unwrap().scans.pending;
    let in_second = second_wal.backlogs().await.unwrap().scans.pending;
    assert_eq!(in_first + in_second, 80, "no scan was stored twice");
    assert!(
        in_first > 0 && in_second > 0,
        "one persister did all the work: {in_first}/{in_second}"
    );

    // One scan failed and was stored by one persister; its done record sits
    // in the other one's file.
    let done = scan("user-m");
    let failure = failed(&done, 2);
    let seq = first.publish_scan(&failure, "failure").await;
    first.wait_acked_on(PERSISTER_SCANS, seq).await;
    let failure_in_first = first.wal.scan(&done.scan_id).await.unwrap().is_some();
    let other = if failure_in_first {
        &second_wal
    } else {
        &first.wal
    };
    other.insert_scans(vec![done.clone()]).await.unwrap();

    let merged = testkit::wait_for("every persister's scans", WAIT, || {
        let history = &history;
        async move {
            let listed = history.scans("user-m", 100).await.ok()?;
            (listed.len() == 81).then_some(listed)
        }
    })
    .await
    .unwrap();
    let mut expected: Vec<ScanRecord> = scans.iter().chain([&done]).cloned().collect();
    bus::history::sort_newest_first(&mut expected);
    assert_eq!(merged, expected);
    assert_eq!(
        history.scan("user-m", &done.scan_id).await.unwrap(),
        Some(done.clone())
    );
    assert_eq!(history.scan("user-x", &done.scan_id).await.unwrap(), None);

    // Both sync when Postgres returns; whichever goes first, it keeps done.
    first.servers.pg.start_again().await.unwrap();
    first.wait_pg_scan(&done).await;
    for s in &scans {
        first.wait_pg_scan(s).await;
    }
    testkit::wait_for("both outboxes empty", WAIT, || async {
        let a = first.wal.backlogs().await.ok()?.scans.pending;
        let b = second_wal.backlogs().await.ok()?.scans.pending;
        (a + b == 0).then_some(())
    })
    .await
    .unwrap();
    first.wait_pg_scan(&done).await;
    assert_eq!(
        history.scan("user-m", &done.scan_id).await.unwrap(),
        Some(in_postgres(&done))
    );
    stop_second.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), second_task).await;
}

#[tokio::test]
async fn operator_commands_cover_scans() {
    use persister::admin::{Command, run};
    let servers = Servers::start().await;
    let config = servers.config();
    let scans: Vec<_> = (0..3).map(|_| scan("user-1")).collect();
    let wal = persister::Wal::open(&servers.sqlite_path()).await.unwrap();
    wal.insert_scans(scans.clone()).await.unwrap();
    drop(wal);

    let backlog = run(&Command::Backlog, &config).await.unwrap();
    assert_eq!(backlog["pending"], 3);
    assert_eq!(backlog["scans"]["pending"], 3);
    assert_eq!(backlog["turns"]["pending"], 0);
    let compare = run(&Command::Compare, &config).await.unwrap();
    assert_eq!(compare["scans"]["missing_in_postgres"], 3);
    assert_eq!(compare["consistent"], true);

    let synced = run(&Command::Sync, &config).await.unwrap();
    assert_eq!(synced["copied_scans"], 3);
    assert_eq!(synced["pending"], 0);
    let compare = run(&Command::Compare, &config).await.unwrap();
    assert_eq!(compare["scans"]["postgres_rows"], 3);
    assert_eq!(compare["scans"]["missing_in_postgres"], 0);
    assert_eq!(compare["consistent"], true);

    // Postgres holding an older record than the one marked synced is a lost
    // update, reported by id; so is a synced scan gone from Postgres.
    let database = servers.database_url.rsplit('/').next().unwrap();
    let (older, gone) = (&scans[0].scan_id, &scans[1].scan_id);
    servers
        .pg
        .psql(
            database,
            &format!(
                "update scans set status = 'failed', completed_at = completed_at - interval '1 hour' \
                 where scan_id = '{older}'; delete from scans where scan_id = '{gone}'"
            ),
        )
        .unwrap();
    let compare = run(&Command::Compare, &config).await.unwrap();
    assert_eq!(compare["consistent"], false);
    assert_eq!(
        compare["scans"]["older_in_postgres_but_marked_synced"],
        serde_json::json!([older])
    );
    assert_eq!(
        compare["scans"]["missing_but_marked_synced"],
        serde_json::json!([gone])
    );
}
