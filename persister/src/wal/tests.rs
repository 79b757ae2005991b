use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("persister-wal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn record(turn_id: &str) -> TurnRecord {
    let at = Utc::now();
    TurnRecord {
        turn_id: turn_id.into(),
        conversation_id: "c1".into(),
        user_id: "u1".into(),
        request_id: "r1".into(),
        model: "m".into(),
        user_text: "héllo\n\"quoted\" \u{1F642}".into(),
        assistant_text: "  spaced  ".into(),
        finish_reason: FinishReason::Cancelled,
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: u32::MAX,
        },
        sources: Vec::new(),
        error: Some("boom".into()),
        created_at: at,
        first_token_at: None,
        completed_at: at + chrono::Duration::nanoseconds(1),
    }
}

#[tokio::test]
async fn records_round_trip_exactly_and_repeats_are_ignored() {
    let dir = TempDir::new();
    let wal = Wal::open(&dir.0.join("nested/buffer.db")).await.unwrap();
    assert_eq!(wal.journal_mode().await.unwrap(), "wal");

    let (a, b) = (record("t1"), record("t2"));
    let stored = wal.insert_turns(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        stored,
        Inserted {
            inserted: 2,
            duplicates: 0
        }
    );
    let again = wal.insert_turns(vec![a.clone()]).await.unwrap();
    assert_eq!(
        again,
        Inserted {
            inserted: 0,
            duplicates: 1
        }
    );

    assert_eq!(wal.unsynced(10).await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(wal.turn("t1").await.unwrap(), Some(a));
    wal.mark_synced(vec!["t1".into()]).await.unwrap();
    wal.reject("t2".into(), "refused".into()).await.unwrap();
    assert!(wal.unsynced(10).await.unwrap().is_empty());
    assert_eq!(
        wal.backlog().await.unwrap(),
        Backlog {
            pending: 0,
            rejected: 1
        }
    );
    assert_eq!(
        wal.purge_synced(Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn a_buffer_from_before_sources_gets_the_column_and_keeps_its_rows() {
    let dir = TempDir::new();
    let path = dir.0.join("old.db");
    {
        // Schema 3: `turns` without `sources`, one row in it.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE turns (turn_id TEXT PRIMARY KEY NOT NULL, \
             conversation_id TEXT NOT NULL, user_id TEXT NOT NULL, request_id TEXT NOT NULL, \
             model TEXT NOT NULL, finish_reason TEXT NOT NULL, user_text TEXT NOT NULL, \
             assistant_text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, \
             completion_tokens INTEGER NOT NULL, error TEXT, created_at TEXT NOT NULL, \
             first_token_at TEXT, completed_at TEXT NOT NULL, ingested_at INTEGER NOT NULL, \
             synced_at INTEGER, sync_error TEXT)",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO turns (turn_id, conversation_id, user_id, request_id, model, \
             finish_reason, user_text, assistant_text, prompt_tokens, completion_tokens, \
             created_at, completed_at, ingested_at) VALUES ('old', 'c1', 'u1', 'r1', 'm', \
             'stop', 'q', 'a', 1, 1, '2026-01-01T00:00:00Z', '2026-01-01T00:00:01Z', 0)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
    }
    let wal = Wal::open(&path).await.unwrap();
    assert!(wal.turn("old").await.unwrap().unwrap().sources.is_empty());
    let mut grounded = record("new");
    grounded.sources = vec!["glass".into(), "general".into()];
    wal.insert_turns(vec![grounded.clone()]).await.unwrap();
    assert_eq!(wal.turn("new").await.unwrap(), Some(grounded));
}

#[tokio::test]
async fn the_oldest_pending_row_is_the_oldest_neither_synced_nor_refused() {
    let dir = TempDir::new();
    let wal = Wal::open(&dir.0.join("buffer.db")).await.unwrap();
    assert_eq!(wal.oldest_pending_ms().await.unwrap(), None);

    let before = Utc::now().timestamp_millis();
    wal.insert_turns(vec![record("t1")]).await.unwrap();
    let first = wal.oldest_pending_ms().await.unwrap().unwrap();
    assert!(first >= before, "{first} < {before}");
    // Ingested later: the oldest stays the first.
    std::thread::sleep(std::time::Duration::from_millis(5));
    wal.insert_turns(vec![record("t2"), record("t3")])
        .await
        .unwrap();
    assert_eq!(wal.oldest_pending_ms().await.unwrap(), Some(first));

    wal.mark_synced(vec!["t1".into()]).await.unwrap();
    let second = wal.oldest_pending_ms().await.unwrap().unwrap();
    assert!(second > first, "{second} <= {first}");
    // A refused row waits for an operator, not for the sync.
    wal.reject("t2".into(), "refused".into()).await.unwrap();
    wal.mark_synced(vec!["t3".into()]).await.unwrap();
    assert_eq!(wal.oldest_pending_ms().await.unwrap(), None);
}

#[tokio::test]
async fn a_database_that_cannot_be_in_wal_mode_is_refused() {
    // An in-memory database answers `journal_mode=WAL` with "memory" and no error.
    let error = Wal::open(Path::new(":memory:")).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("\"memory\""), "{message}");
    assert!(message.contains("PERSISTER_SQLITE_PATH"), "{message}");
}

#[tokio::test]
async fn an_unusable_path_gives_one_line_naming_it_and_the_variable() {
    let dir = TempDir::new();
    // A regular file where a directory should be: fails even as root.
    let blocker = dir.0.join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let path = blocker.join("persister.db");
    let error = Wal::open(&path).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("PERSISTER_SQLITE_PATH"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}
