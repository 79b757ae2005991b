//! Retention: Postgres rows older than the retention lose their user id to
//! a keyed hash, once, with an audit row per run; young rows keep theirs.

use chrono::{DateTime, Duration, Utc};
use persister::retention::{TABLES, keyed_hash, run_once};
use secrecy::SecretString;
use sqlx::{PgPool, Row as _};

use crate::helpers::{Servers, TestPersister, WAIT};

/// One row in every table that holds a user id, for `user`, dated `at`;
/// ids carry `tag` so each call's rows are distinct.
async fn insert_everywhere(pool: &PgPool, user: &str, tag: &str, at: DateTime<Utc>) {
    let conversation = format!("conv-{tag}");
    sqlx::query(
        "INSERT INTO conversations (conversation_id, user_id, created_at, updated_at)
         VALUES ($1, $2, $3, $3)",
    )
    .bind(&conversation)
    .bind(user)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO turns (turn_id, conversation_id, user_id, request_id, model, finish_reason,
                            user_text, assistant_text, prompt_tokens, completion_tokens,
                            created_at, completed_at)
         VALUES ($1, $2, $3, 'r', 'm', 'stop', 'q', 'a', 1, 1, $4, $4)",
    )
    .bind(format!("turn-{tag}"))
    .bind(&conversation)
    .bind(user)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO scans (scan_id, user_id, status, created_at) VALUES ($1, $2, 'done', $3)",
    )
    .bind(format!("scan-{tag}"))
    .bind(user)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reward_grants (scan_id, user_id, character_id, category, new, granted_at)
         VALUES ($1, $2, $3, 'glass', true, $4)",
    )
    .bind(format!("scan-{tag}"))
    .bind(user)
    .bind(format!("char-{tag}"))
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO character_ownership (user_id, character_id, first_earned_at, scan_id)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(user)
    .bind(format!("char-{tag}"))
    .bind(at)
    .bind(format!("scan-{tag}"))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO my_characters (user_id, character_id, times_earned, last_earned_at)
         VALUES ($1, $2, 1, $3)",
    )
    .bind(user)
    .bind(format!("char-{tag}"))
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

/// (user_id, anonymised) of every row per table whose id ends in `tag`.
async fn owners(pool: &PgPool, tag: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for (table, _) in TABLES {
        let key = match *table {
            "conversations" => "conversation_id",
            "turns" => "turn_id",
            "scans" | "reward_grants" => "scan_id",
            _ => "character_id",
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT user_id, anonymised_at IS NOT NULL AS anon FROM {table} WHERE {key} LIKE '%-' || $1"
        )))
        .bind(tag)
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{table} {tag}");
        out.push((
            (*table).to_owned(),
            rows[0].get::<String, _>("user_id"),
            rows[0].get::<bool, _>("anon"),
        ));
    }
    out
}

#[tokio::test]
async fn old_rows_lose_their_user_id_to_a_keyed_hash_once_and_young_rows_keep_it() {
    let app = TestPersister::start().await;
    let pool = PgPool::connect(&app.servers.database_url).await.unwrap();
    let key = SecretString::from("retention-test-key");
    let now = Utc::now();
    insert_everywhere(
        &pool,
        "auth0|alice@example.com",
        "old",
        now - Duration::days(400),
    )
    .await;
    insert_everywhere(
        &pool,
        "auth0|alice@example.com",
        "young",
        now - Duration::days(10),
    )
    .await;
    insert_everywhere(&pool, "bob", "bobold", now - Duration::days(366)).await;

    let cutoff = now - Duration::days(365);
    let report = run_once(&pool, &key, cutoff)
        .await
        .unwrap()
        .expect("lock taken");
    for (table, _) in TABLES {
        assert_eq!(
            report.rows[*table], 2,
            "{table}: alice's and bob's old rows"
        );
    }
    let alice = keyed_hash(&key, "auth0|alice@example.com");
    assert_eq!(alice.len(), 64);
    for (table, user, anon) in owners(&pool, "old").await {
        assert_eq!((user.as_str(), anon), (alice.as_str(), true), "{table}");
    }
    for (table, user, anon) in owners(&pool, "bobold").await {
        assert_eq!((user, anon), (keyed_hash(&key, "bob"), true), "{table}");
    }
    for (table, user, anon) in owners(&pool, "young").await {
        assert_eq!(
            (user.as_str(), anon),
            ("auth0|alice@example.com", false),
            "{table}"
        );
    }
    let audit: Vec<(DateTime<Utc>, serde_json::Value)> =
        sqlx::query_as("SELECT cutoff, rows FROM retention_runs ORDER BY run_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0.timestamp_micros(), cutoff.timestamp_micros());
    assert_eq!(audit[0].1["turns"], 2);
    assert_eq!(audit[0].1["my_characters"], 2);

    // Again, even with a later cutoff reaching nothing new: an anonymised
    // row is never hashed a second time.
    let again = run_once(&pool, &key, cutoff + Duration::days(1))
        .await
        .unwrap()
        .unwrap();
    assert!(again.rows.values().all(|n| *n == 0), "{again:?}");
    for (table, user, _) in owners(&pool, "old").await {
        assert_eq!(user, alice, "{table}");
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM retention_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 2, "one audit row per run");

    // A character earned again after its first row was anonymised, then
    // old itself: folded into the anonymised row, not a key conflict.
    sqlx::query(
        "INSERT INTO my_characters (user_id, character_id, times_earned, last_earned_at)
         VALUES ('auth0|alice@example.com', 'char-old', 2, $1)",
    )
    .bind(now - Duration::days(380))
    .execute(&pool)
    .await
    .unwrap();
    let folded = run_once(&pool, &key, cutoff).await.unwrap().unwrap();
    assert_eq!(folded.rows["my_characters"], 1);
    let times: i32 = sqlx::query_scalar(
        "SELECT times_earned FROM my_characters WHERE user_id = $1 AND character_id = 'char-old'",
    )
    .bind(&alice)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(times, 3);

    // Another persister in the middle of a run holds the lock: this one skips.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(persister::retention::LOCK_KEY)
        .execute(&mut *holder)
        .await
        .unwrap();
    assert_eq!(run_once(&pool, &key, cutoff).await.unwrap(), None);
    holder.rollback().await.unwrap();
}

#[tokio::test]
async fn a_persister_with_a_key_anonymises_old_rows_periodically() {
    let servers = Servers::start().await;
    let mut config = servers.config();
    config.anon_key = Some(SecretString::from("periodic-key"));
    config.pg_retention_days = 30;
    config.pg_retention_interval_s = 1;
    let app = TestPersister::with_config(servers, config).await;
    let pool = PgPool::connect(&app.servers.database_url).await.unwrap();
    insert_everywhere(&pool, "carol", "periodic", Utc::now() - Duration::days(31)).await;
    let hashed = keyed_hash(&SecretString::from("periodic-key"), "carol");
    testkit::wait_for("the old turn anonymised", WAIT, || {
        let pool = pool.clone();
        let hashed = hashed.clone();
        async move {
            let user: String =
                sqlx::query_scalar("SELECT user_id FROM turns WHERE turn_id = 'turn-periodic'")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (user == hashed).then_some(())
        }
    })
    .await
    .unwrap();
    let metrics = app.get_text("/metrics").await;
    let anonymised = metrics
        .lines()
        .find_map(|l| l.strip_prefix("persister_anonymised_rows_total{table=\"turns\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(anonymised.is_some_and(|n| n >= 1.0), "{metrics}");
}
