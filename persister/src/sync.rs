//! Copying the SQLite outbox to Postgres, the system of record.
//!
//! It owns the Postgres pool, the migrations, and the loop that takes
//! unsynced rows from [`Wal`], writes them in one Postgres transaction
//! (idempotent: a turn already there is skipped), and only after that commit
//! marks them synced in SQLite. A crash anywhere in between copies the rows
//! again, which changes nothing. While Postgres is unreachable the loop backs
//! off (exponentially, with jitter, capped at [`MAX_BACKOFF`]) and ingest goes
//! on filling SQLite; readiness says `degraded`.
//!
//! Startup policy: a malformed `DATABASE_URL`, a refused login, a missing
//! database or a failed migration ends the process with one line (an operator
//! must act). Postgres being merely unreachable at startup does not: the
//! persister starts degraded, runs the migrations when Postgres first answers,
//! and then syncs what piled up, so a persister restarted during an outage
//! still accepts turns.

use std::{
    collections::BTreeMap,
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bus::wire::TurnRecord;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::{
    Connection as _, PgPool, QueryBuilder,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgConnection, PgPoolOptions},
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    error::WalError,
    wal::{PendingScan, Wal},
};

/// The migrations under `persister/migrations`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Longest wait between two attempts while Postgres is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long one attempt may wait for a connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long startup waits for Postgres before starting degraded.
const STARTUP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often synced rows older than the retention are purged from SQLite.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// What the rest of the process may know about Postgres; shared with readiness.
#[derive(Debug, Default)]
pub struct SyncStatus {
    reachable: AtomicBool,
}

impl SyncStatus {
    /// True when the last attempt to reach Postgres succeeded.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
    }
}

/// The Postgres side: a lazily connecting pool and whether migrations ran.
#[derive(Debug, Clone)]
pub struct Postgres {
    /// Connections for the sync loop; reconnects by itself after an outage.
    pub pool: PgPool,
    /// Set once the migrations have run in this process.
    migrated: bool,
    /// Shared with readiness.
    pub status: Arc<SyncStatus>,
}

impl Postgres {
    /// Parses `DATABASE_URL`, tries Postgres once and runs the migrations.
    /// See the module docs for which failures end startup.
    ///
    /// # Errors
    /// One actionable line for a malformed URL, a refused login, a missing
    /// database or a failed migration.
    pub async fn connect(database_url: &SecretString) -> anyhow::Result<Self> {
        let url = database_url.expose_secret();
        let shown = bus::connect::redact(url);
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            anyhow::anyhow!(
                "DATABASE_URL is not a valid Postgres URL ({e}); \
                 set it like postgres://user@127.0.0.1:5432/gateway"
            )
        })?;
        let status = Arc::new(SyncStatus::default());
        let probe = tokio::time::timeout(
            STARTUP_CONNECT_TIMEOUT,
            PgConnection::connect_with(&options),
        )
        .await;
        let migrated = match probe {
            Ok(Ok(mut conn)) => {
                MIGRATOR.run(&mut conn).await.with_context(|| {
                    format!("cannot run the Postgres migrations on {shown} (check DATABASE_URL)")
                })?;
                let _ = conn.close().await;
                status.set_reachable(true);
                true
            }
            Ok(Err(error)) if !is_unreachable(&error) => {
                return Err(error).with_context(|| {
                    format!("cannot connect to Postgres at {shown} (check DATABASE_URL)")
                });
            }
            Ok(Err(error)) => {
                tracing::warn!(url = %shown, %error, "Postgres is unreachable at startup; accepting into SQLite and retrying.");
                false
            }
            Err(_) => {
                tracing::warn!(url = %shown, timeout = ?STARTUP_CONNECT_TIMEOUT, "Postgres did not answer at startup; accepting into SQLite and retrying.");
                false
            }
        };
        let pool = PgPoolOptions::new()
            // Sync uses one at a time; history reads use the rest.
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            migrated,
            status,
        })
    }
}

/// The sync loop and what it needs.
#[derive(Debug)]
pub struct Syncer {
    /// The source.
    pub wal: Wal,
    /// The destination.
    pub postgres: Postgres,
    /// Rows per Postgres transaction.
    pub batch: usize,
    /// Idle poll interval (also how often Postgres is checked when idle).
    pub interval: Duration,
    /// How long synced rows stay in SQLite.
    pub retention: Duration,
    /// Woken by ingest after each SQLite commit, so a new row is copied at once.
    pub committed: Arc<Notify>,
}

/// Why one pass of the loop did not finish.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("postgres migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Wal(#[from] WalError),
}

impl Syncer {
    /// Copies rows until `shutdown` fires. It starts with whatever a previous
    /// run left unsynced, and never gives up on Postgres.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = bus::backoff::Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let mut outage: Option<(Instant, u64)> = None;
        let mut next_purge = Instant::now() + self.interval;
        loop {
            let pass = tokio::select! {
                _ = shutdown.cancelled() => break,
                pass = self.pass() => pass,
            };
            self.update_gauges().await;
            let delay = match pass {
                Ok(copied) => {
                    backoff.reset();
                    if let Some((since, failures)) = outage.take() {
                        tracing::info!(down_for = ?since.elapsed(), failures, "Postgres is reachable again; syncing the backlog.");
                    }
                    if Instant::now() >= next_purge {
                        next_purge = Instant::now() + PURGE_EVERY;
                        self.purge().await;
                    }
                    // A full batch means more is waiting: go again at once.
                    if copied == self.batch {
                        continue;
                    }
                    None
                }
                Err(error) => {
                    let postgres_failed = !matches!(error, SyncError::Wal(_));
                    if postgres_failed {
                        self.postgres.status.set_reachable(false);
                        metrics::counter!("persister_sync_failures_total").increment(1);
                        match &mut outage {
                            None => {
                                // Once per outage; the retries are at debug.
                                tracing::warn!(error = %error, "Postgres write failed; turns stay in SQLite and sync retries with backoff.");
                                outage = Some((Instant::now(), 1));
                            }
                            Some((_, failures)) => {
                                *failures += 1;
                                tracing::debug!(error = %error, "Postgres still failing.");
                            }
                        }
                    } else {
                        tracing::error!(error = %error, "Reading the SQLite buffer for sync failed.");
                    }
                    Some(backoff.next_delay())
                }
            };
            let wait = delay.unwrap_or(self.interval);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                // New rows wake an idle loop, not one that is backing off.
                _ = self.committed.notified(), if delay.is_none() => {}
            }
        }
        tracing::debug!("Sync loop stopped.");
    }

    /// One pass: migrate if needed, copy one batch (or check Postgres when
    /// there is nothing to copy). Returns the number of rows handled.
    async fn pass(&mut self) -> Result<usize, SyncError> {
        if !self.postgres.migrated {
            MIGRATOR.run(&self.postgres.pool).await?;
            self.postgres.migrated = true;
            tracing::info!("Postgres migrations applied.");
        }
        // An erasure waits for this pass: rows it read must reach Postgres
        // before the erasure deletes them there, not after.
        let _erasing = self.wal.sync_lock().await;
        let turns = self.sync_turns().await?;
        let scans = self.sync_scans().await?;
        if turns == 0 && scans == 0 {
            sqlx::query("SELECT 1").execute(&self.postgres.pool).await?;
        }
        self.postgres.status.set_reachable(true);
        // The caller goes again at once when either table filled a batch.
        Ok(turns.max(scans))
    }

    /// Copies one batch of turns; returns how many rows it handled.
    async fn sync_turns(&self) -> Result<usize, SyncError> {
        let rows = self.wal.unsynced(self.batch).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        match write_turns(&self.postgres.pool, &rows).await {
            Ok(()) => self.synced(&rows, started).await?,
            Err(error) if is_row_error(&error) => self.one_by_one(&rows).await?,
            Err(error) => return Err(error.into()),
        }
        Ok(rows.len())
    }

    /// Copies one batch of scans; returns how many rows it handled.
    async fn sync_scans(&self) -> Result<usize, SyncError> {
        let pending = self.wal.unsynced_scans(self.batch).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        match write_scans(&self.postgres.pool, &pending).await {
            Ok(()) => self.scans_synced(&pending, started).await?,
            Err(error) if is_row_error(&error) => {
                for scan in &pending {
                    let started = Instant::now();
                    let one = std::slice::from_ref(scan);
                    match write_scans(&self.postgres.pool, one).await {
                        Ok(()) => self.scans_synced(one, started).await?,
                        Err(error) if is_row_error(&error) => {
                            tracing::error!(scan = %scan.record.scan_id, %error, "Postgres refused a scan; it stays in SQLite with the reason.");
                            metrics::counter!("persister_scan_sync_rejected_total").increment(1);
                            self.wal
                                .reject_scan(
                                    scan.record.scan_id.clone(),
                                    scan.revision,
                                    error.to_string(),
                                )
                                .await?;
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            }
            Err(error) => return Err(error.into()),
        }
        Ok(pending.len())
    }

    async fn scans_synced(&self, scans: &[PendingScan], started: Instant) -> Result<(), WalError> {
        self.wal
            .mark_scans_synced(
                scans
                    .iter()
                    .map(|s| (s.record.scan_id.clone(), s.revision))
                    .collect(),
            )
            .await?;
        metrics::counter!("persister_scan_rows_synced_total").increment(scans.len() as u64);
        metrics::histogram!("persister_scan_sync_seconds").record(started.elapsed().as_secs_f64());
        let now = Utc::now();
        for scan in scans {
            if let Some(completed_at) = scan.record.completed_at {
                let lag = (now - completed_at).to_std().unwrap_or_default();
                metrics::histogram!("persister_scan_sync_lag_seconds").record(lag.as_secs_f64());
            }
        }
        Ok(())
    }

    async fn synced(&self, rows: &[TurnRecord], started: Instant) -> Result<(), WalError> {
        self.wal
            .mark_synced(rows.iter().map(|r| r.turn_id.clone()).collect())
            .await?;
        metrics::counter!("persister_rows_synced_total").increment(rows.len() as u64);
        metrics::histogram!("persister_sync_seconds").record(started.elapsed().as_secs_f64());
        // Sync lag: from the turn's completion to its Postgres commit.
        let now = Utc::now();
        for row in rows {
            let lag = (now - row.completed_at).to_std().unwrap_or_default();
            metrics::histogram!("persister_sync_lag_seconds").record(lag.as_secs_f64());
        }
        Ok(())
    }

    /// Postgres refused something in the batch itself (not an outage): find
    /// the rows it refuses, set them aside with the reason, copy the rest.
    async fn one_by_one(&self, rows: &[TurnRecord]) -> Result<(), SyncError> {
        for row in rows {
            let started = Instant::now();
            match write_turns(&self.postgres.pool, std::slice::from_ref(row)).await {
                Ok(()) => self.synced(std::slice::from_ref(row), started).await?,
                Err(error) if is_row_error(&error) => {
                    tracing::error!(turn = %row.turn_id, %error, "Postgres refused a turn; it stays in SQLite with the reason.");
                    metrics::counter!("persister_sync_rejected_total").increment(1);
                    self.wal
                        .reject(row.turn_id.clone(), error.to_string())
                        .await?;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    async fn purge(&self) {
        let before = Utc::now()
            - chrono::Duration::from_std(self.retention).unwrap_or(chrono::Duration::MAX);
        match self.wal.purge_synced(before).await {
            Ok(0) => {}
            Ok(purged) => {
                tracing::info!(
                    purged,
                    "Purged synced turns and scans past retention from SQLite."
                );
                // Give the freed pages back: without a checkpoint the WAL
                // file keeps its high-water size.
                if let Err(error) = self.wal.checkpoint().await {
                    tracing::warn!(%error, "WAL checkpoint after purge failed.");
                }
            }
            Err(error) => tracing::warn!(%error, "Purging synced rows from SQLite failed."),
        }
    }

    async fn update_gauges(&self) {
        let path = self.wal.path();
        let size =
            |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() as f64).unwrap_or(0.0);
        metrics::gauge!("persister_sqlite_bytes").set(size(path));
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        metrics::gauge!("persister_sqlite_wal_bytes").set(size(std::path::Path::new(&wal_path)));
        if let Ok(backlogs) = self.wal.backlogs().await {
            let (turns, scans) = (backlogs.turns, backlogs.scans);
            metrics::gauge!("persister_rows_pending_sync")
                .set((turns.pending + scans.pending) as f64);
            metrics::gauge!("persister_rows_rejected_sync")
                .set((turns.rejected + scans.rejected) as f64);
            metrics::gauge!("persister_scan_rows_pending_sync").set(scans.pending as f64);
            metrics::gauge!("persister_scan_rows_rejected_sync").set(scans.rejected as f64);
        }
        // An age, not the lag histogram: that one is observed only when a row
        // reaches Postgres, so during an outage it goes quiet exactly when
        // the lag grows. This one grows with the outage.
        if let Ok(oldest) = self.wal.oldest_pending_ms().await {
            let age_ms = oldest.map_or(0, |at| (Utc::now().timestamp_millis() - at).max(0));
            metrics::gauge!("persister_sync_oldest_pending_seconds").set(age_ms as f64 / 1000.0);
        }
    }
}

/// Writes `rows` and their conversations in one Postgres transaction.
/// Idempotent: a turn already stored is left as it is.
///
/// # Errors
/// The database error; nothing was written.
pub async fn write_turns(pool: &PgPool, rows: &[TurnRecord]) -> Result<(), sqlx::Error> {
    struct Conversation<'a> {
        user_id: &'a str,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    }
    // One row per conversation: Postgres refuses an upsert that touches the
    // same row twice in one statement.
    let mut conversations: BTreeMap<&str, Conversation<'_>> = BTreeMap::new();
    for r in rows {
        conversations
            .entry(&r.conversation_id)
            .and_modify(|c| {
                c.created_at = c.created_at.min(r.created_at);
                c.updated_at = c.updated_at.max(r.completed_at);
            })
            .or_insert(Conversation {
                user_id: &r.user_id,
                created_at: r.created_at,
                updated_at: r.completed_at,
            });
    }

    let mut tx = pool.begin().await?;
    let mut insert = QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO conversations (conversation_id, user_id, created_at, updated_at) ",
    );
    insert.push_values(conversations, |mut b, (id, c)| {
        b.push_bind(pg_text(id))
            .push_bind(pg_text(c.user_id))
            .push_bind(c.created_at)
            .push_bind(c.updated_at);
    });
    insert.push(
        " ON CONFLICT (conversation_id) DO UPDATE SET \
         created_at = least(conversations.created_at, excluded.created_at), \
         updated_at = greatest(conversations.updated_at, excluded.updated_at)",
    );
    // The statement's text varies with the row count: do not cache it.
    insert.build().persistent(false).execute(&mut *tx).await?;

    let mut insert = QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO turns (turn_id, conversation_id, user_id, request_id, model, finish_reason, \
         user_text, assistant_text, prompt_tokens, completion_tokens, error, \
         created_at, first_token_at, completed_at, sources) ",
    );
    insert.push_values(rows, |mut b, r| {
        b.push_bind(pg_text(&r.turn_id))
            .push_bind(pg_text(&r.conversation_id))
            .push_bind(pg_text(&r.user_id))
            .push_bind(pg_text(&r.request_id))
            .push_bind(pg_text(&r.model))
            .push_bind(r.finish_reason.as_str())
            .push_bind(pg_text(&r.user_text))
            .push_bind(pg_text(&r.assistant_text))
            .push_bind(i64::from(r.usage.prompt_tokens))
            .push_bind(i64::from(r.usage.completion_tokens))
            .push_bind(r.error.as_deref().map(pg_text))
            .push_bind(r.created_at)
            .push_bind(r.first_token_at)
            .push_bind(r.completed_at)
            .push_bind(r.sources.iter().map(|s| pg_text(s)).collect::<Vec<_>>());
    });
    insert.push(" ON CONFLICT (turn_id) DO NOTHING");
    insert.build().persistent(false).execute(&mut *tx).await?;
    tx.commit().await
}

/// Writes `scans` in one Postgres transaction. Idempotent, and an upsert by
/// the later-record rule ([`bus::wire::ScanRecord::supersedes`]): a stored
/// scan is replaced only by a record that completed later (to the
/// microsecond), or at the same instant with a higher status (`done` over
/// `failed` over anything else). The same record again, or an older one,
/// changes nothing.
///
/// # Errors
/// The database error; nothing was written.
pub async fn write_scans(pool: &PgPool, scans: &[PendingScan]) -> Result<(), sqlx::Error> {
    let mut insert = QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO scans (scan_id, user_id, status, category, confidence, labels, \
         vision_model, phash, sha256, rule, answer, cached, error, created_at, completed_at, \
         reward) ",
    );
    insert.push_values(scans, |mut b, s| {
        let r = &s.record;
        b.push_bind(pg_text(&r.scan_id))
            .push_bind(pg_text(&r.user_id))
            .push_bind(r.status.as_str())
            .push_bind(r.category.as_deref().map(pg_text))
            .push_bind(r.confidence)
            .push_bind(sqlx::types::Json(pg_json(&r.labels)))
            .push_bind(r.vision_model.as_deref().map(pg_text))
            .push_bind(r.phash.as_deref().map(pg_text))
            .push_bind(r.sha256.as_deref().map(pg_text))
            .push_bind(r.rule.as_ref().map(|rule| sqlx::types::Json(pg_json(rule))))
            .push_bind(r.answer.as_deref().map(pg_text))
            .push_bind(r.cached)
            .push_bind(r.error.as_deref().map(pg_text))
            .push_bind(r.created_at)
            .push_bind(r.completed_at)
            .push_bind(
                r.reward
                    .as_ref()
                    .map(|reward| sqlx::types::Json(pg_json(reward))),
            );
    });
    // Mirrors bus::wire::scan_order: a missing completed_at is earliest.
    insert.push(
        " ON CONFLICT (scan_id) DO UPDATE SET \
         user_id = excluded.user_id, status = excluded.status, category = excluded.category, \
         confidence = excluded.confidence, labels = excluded.labels, \
         vision_model = excluded.vision_model, phash = excluded.phash, \
         sha256 = excluded.sha256, rule = excluded.rule, answer = excluded.answer, \
         cached = excluded.cached, error = excluded.error, created_at = excluded.created_at, \
         completed_at = excluded.completed_at, reward = excluded.reward \
         WHERE (coalesce(excluded.completed_at, '-infinity'::timestamptz), \
                CASE excluded.status WHEN 'done' THEN 2 WHEN 'failed' THEN 1 ELSE 0 END) \
             > (coalesce(scans.completed_at, '-infinity'::timestamptz), \
                CASE scans.status WHEN 'done' THEN 2 WHEN 'failed' THEN 1 ELSE 0 END)",
    );
    // One statement is its own transaction. Its text varies with the row
    // count: do not cache it.
    insert.build().persistent(false).execute(pool).await?;
    Ok(())
}

/// [`pg_text`] for every string inside a JSON value: `jsonb` refuses `\u0000`
/// just as `text` refuses NUL.
fn pg_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    fn clean(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => *s = pg_text(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(clean),
            serde_json::Value::Object(fields) => fields.values_mut().for_each(clean),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(value).expect("wire types serialize");
    clean(&mut value);
    value
}

/// Postgres `text` cannot hold NUL, which JSON (and so a user's message) can.
/// It becomes U+FFFD in Postgres; SQLite keeps the exact text. Every other
/// character is copied verbatim.
fn pg_text(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_owned()
    }
}

/// A failure caused by the rows themselves (SQLSTATE class 22, data
/// exception, or 23, integrity violation): retrying the same rows will fail
/// again. Anything else (connection, shutdown, a missing table) is treated as
/// an outage and retried, so a misconfiguration never sets rows aside.
fn is_row_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// A connection failure that waiting may cure: nothing listening yet, a
/// timeout, or a server starting up or shutting down.
fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_the_only_character_changed_for_postgres() {
        assert_eq!(pg_text("a\0b"), "a\u{FFFD}b");
        assert_eq!(pg_text(" é\n\u{1F642} "), " é\n\u{1F642} ");
    }

    #[test]
    fn nul_inside_json_strings_is_replaced_at_any_depth() {
        let value = serde_json::json!({"a": ["x\0y", {"b": "\0"}], "n": 0.5, "s": "\\u0000"});
        assert_eq!(
            pg_json(&value),
            serde_json::json!({"a": ["x\u{FFFD}y", {"b": "\u{FFFD}"}], "n": 0.5, "s": "\\u0000"})
        );
    }
}
