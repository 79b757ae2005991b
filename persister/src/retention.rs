//! Postgres retention: rows older than `PERSISTER_PG_RETENTION_DAYS` lose
//! their user id. It becomes a keyed hash (HMAC-SHA256 with
//! `PERSISTER_ANON_KEY`, hex), so analytics can still count one person's
//! rows together while the id itself is gone, and `anonymised_at` marks the
//! row, so a later run never hashes a hash.
//!
//! Every persister runs the loop; a transaction-scoped Postgres advisory
//! lock lets one of them do a run at a time (the others skip that run).
//! Each run that held the lock writes one audit row to `retention_runs`:
//! when, the cutoff, and the rows anonymised per table.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac as _};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Sha256;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// The advisory lock's key: any constant no other code of ours takes
/// (`retention` in ASCII).
pub const LOCK_KEY: i64 = 0x7265_7465_6e74_696f;

/// Each table holding a user id and the column that dates its rows.
pub const TABLES: &[(&str, &str)] = &[
    ("conversations", "updated_at"),
    ("turns", "created_at"),
    ("scans", "created_at"),
    ("reward_grants", "granted_at"),
    ("character_ownership", "first_earned_at"),
    ("my_characters", "last_earned_at"),
];

/// The periodic anonymisation; `run` owns it.
pub struct Retention {
    /// The system of record.
    pub pool: PgPool,
    /// The HMAC key.
    pub key: SecretString,
    /// Rows older than this lose their user id.
    pub keep: Duration,
    /// Time between two runs.
    pub every: Duration,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Rows older than this were anonymised.
    pub cutoff: DateTime<Utc>,
    /// Rows anonymised per table (every table of [`TABLES`], zeros included).
    pub rows: BTreeMap<String, u64>,
}

impl Retention {
    /// Runs every `every` (the first run at once) until `shutdown` fires. A
    /// failed run (Postgres down) is logged and tried at the next tick.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let cutoff =
                Utc::now() - chrono::Duration::from_std(self.keep).unwrap_or(chrono::Duration::MAX);
            match run_once(&self.pool, &self.key, cutoff).await {
                Ok(Some(report)) => {
                    tracing::info!(cutoff = %report.cutoff, rows = ?report.rows, "Retention run anonymised old rows.");
                }
                Ok(None) => {
                    tracing::debug!("Another persister holds the retention lock; skipped.");
                }
                Err(error) => {
                    metrics::counter!("persister_retention_failures_total").increment(1);
                    tracing::warn!(%error, "Retention run failed; retrying at the next interval.");
                }
            }
        }
    }
}

/// One run: anonymises every row older than `cutoff` that is not yet, and
/// writes the audit row. `None` when another persister holds the lock.
///
/// # Errors
/// When Postgres fails; the transaction is rolled back, nothing changed.
pub async fn run_once(
    pool: &PgPool,
    key: &SecretString,
    cutoff: DateTime<Utc>,
) -> Result<Option<RunReport>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    let mut rows = BTreeMap::new();
    for &(table, column) in TABLES {
        let count = anonymise(&mut tx, key, table, column, cutoff).await?;
        rows.insert(table.to_owned(), count);
    }
    sqlx::query("INSERT INTO retention_runs (cutoff, rows) VALUES ($1, $2)")
        .bind(cutoff)
        .bind(serde_json::to_value(&rows).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    for (table, count) in &rows {
        metrics::counter!("persister_anonymised_rows_total", "table" => table.clone())
            .increment(*count);
    }
    metrics::counter!("persister_retention_runs_total").increment(1);
    Ok(Some(RunReport { cutoff, rows }))
}

/// Anonymises one table's old rows; returns how many.
async fn anonymise(
    tx: &mut Transaction<'static, Postgres>,
    key: &SecretString,
    table: &str,
    column: &str,
    cutoff: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    // Rows of alias `a` that are old and not anonymised yet.
    let old = |a: &str| format!("{a}.anonymised_at IS NULL AND {a}.{column} < $1");
    let users: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT user_id FROM {table} t WHERE {}",
        old("t")
    )))
    .bind(cutoff)
    .fetch_all(&mut **tx)
    .await?;
    if users.is_empty() {
        return Ok(0);
    }
    let hashed: Vec<String> = users.iter().map(|u| keyed_hash(key, u)).collect();
    let mut merged = 0;
    // The two per-character tables are keyed by (user_id, character_id): a
    // row anonymised in an earlier run may already hold the hash for that
    // character (earned again since). Fold the old row into it first.
    if table == "my_characters" {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE my_characters h
                SET times_earned = h.times_earned + c.times_earned,
                    last_earned_at = greatest(h.last_earned_at, c.last_earned_at)
               FROM my_characters c, unnest($2::text[], $3::text[]) AS m(uid, hashed)
              WHERE c.user_id = m.uid AND h.user_id = m.hashed
                AND h.character_id = c.character_id AND {}",
            old("c")
        )))
        .bind(cutoff)
        .bind(&users)
        .bind(&hashed)
        .execute(&mut **tx)
        .await?;
    }
    if matches!(table, "my_characters" | "character_ownership") {
        merged = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} c USING unnest($2::text[], $3::text[]) AS m(uid, hashed)
              WHERE c.user_id = m.uid AND {}
                AND EXISTS (SELECT 1 FROM {table} h
                             WHERE h.user_id = m.hashed AND h.character_id = c.character_id)",
            old("c")
        )))
        .bind(cutoff)
        .bind(&users)
        .bind(&hashed)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    let updated = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} t SET user_id = m.hashed, anonymised_at = now()
           FROM unnest($2::text[], $3::text[]) AS m(uid, hashed)
          WHERE t.user_id = m.uid AND {}",
        old("t")
    )))
    .bind(cutoff)
    .bind(&users)
    .bind(&hashed)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(updated + merged)
}

/// HMAC-SHA256 of `user_id` under `key`, lower-case hex (64 characters).
pub fn keyed_hash(key: &SecretString, user_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose_secret().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(user_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_hash_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let key = SecretString::from("Jefe");
        assert_eq!(
            keyed_hash(&key, "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
