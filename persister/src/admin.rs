//! Operator subcommands of the persister binary: look at the SQLite backlog,
//! force a sync to Postgres now, and compare SQLite with Postgres. They open
//! the same files and database as a running persister and are safe to run
//! beside it: SQLite serializes writers, and Postgres inserts are idempotent.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{Config, Wal, sync};

/// What an operator asks for.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Run,
    /// Print the SQLite backlog (turns and scans): rows waiting for Postgres,
    /// and rows it refused.
    Backlog,
    /// Copy every unsynced SQLite row (turns and scans) to Postgres now, then exit.
    Sync,
    /// Compare SQLite with Postgres: counts, and turn and scan ids missing
    /// from Postgres (or, for scans, holding an older record there).
    Compare,
}

/// Runs an operator command and returns its report (printed as JSON by `main`).
///
/// # Errors
/// When SQLite or Postgres cannot be opened, or Postgres is unreachable for
/// `sync` and `compare`.
pub async fn run(command: &Command, config: &Config) -> anyhow::Result<Value> {
    let wal = Wal::open(&config.sqlite_path).await?;
    match command {
        Command::Run => anyhow::bail!("`run` is not an operator command"),
        Command::Backlog => {
            let backlogs = wal.backlogs().await?;
            let (turns, scans) = (backlogs.turns, backlogs.scans);
            Ok(json!({
                "sqlite": config.sqlite_path.display().to_string(),
                "pending": turns.pending + scans.pending,
                "rejected": turns.rejected + scans.rejected,
                "turns": {"pending": turns.pending, "rejected": turns.rejected},
                "scans": {"pending": scans.pending, "rejected": scans.rejected},
            }))
        }
        Command::Sync => {
            let postgres = reachable(config).await?;
            let mut copied = 0usize;
            loop {
                let rows = wal
                    .unsynced(config.sync_batch.clamp(1, crate::config::MAX_SYNC_BATCH))
                    .await?;
                if rows.is_empty() {
                    break;
                }
                sync::write_turns(&postgres.pool, &rows).await.context(
                    "Postgres refused a batch (see `persister compare` and the persister log)",
                )?;
                copied += rows.len();
                wal.mark_synced(rows.into_iter().map(|r| r.turn_id).collect())
                    .await?;
            }
            let mut copied_scans = 0usize;
            loop {
                let scans = wal
                    .unsynced_scans(config.sync_batch.clamp(1, crate::config::MAX_SYNC_BATCH))
                    .await?;
                if scans.is_empty() {
                    break;
                }
                sync::write_scans(&postgres.pool, &scans).await.context(
                    "Postgres refused a batch of scans (see `persister compare` and the persister log)",
                )?;
                copied_scans += scans.len();
                wal.mark_scans_synced(
                    scans
                        .into_iter()
                        .map(|s| (s.record.scan_id, s.revision))
                        .collect(),
                )
                .await?;
            }
            let backlog = wal.backlog().await?;
            Ok(json!({
                "copied": copied + copied_scans,
                "copied_turns": copied,
                "copied_scans": copied_scans,
                "pending": backlog.pending,
                "rejected": backlog.rejected,
            }))
        }
        Command::Compare => {
            let postgres = reachable(config).await?;
            let local = wal.all_turn_ids().await?;
            let ids: Vec<String> = local.iter().map(|(id, _)| id.clone()).collect();
            let mut present = HashSet::new();
            for chunk in ids.chunks(10_000) {
                let found: Vec<String> =
                    sqlx::query_scalar("SELECT turn_id FROM turns WHERE turn_id = ANY($1)")
                        .bind(chunk)
                        .fetch_all(&postgres.pool)
                        .await?;
                present.extend(found);
            }
            let postgres_total: i64 = sqlx::query_scalar("SELECT count(*) FROM turns")
                .fetch_one(&postgres.pool)
                .await?;
            // Marked synced but absent: the one thing that must never happen.
            let lost: Vec<&str> = local
                .iter()
                .filter(|(id, synced)| *synced && !present.contains(id))
                .map(|(id, _)| id.as_str())
                .collect();
            let pending: Vec<&str> = local
                .iter()
                .filter(|(id, synced)| !*synced && !present.contains(id))
                .map(|(id, _)| id.as_str())
                .collect();
            let scans = compare_scans(&wal, &postgres.pool).await?;
            let consistent = lost.is_empty() && scans["consistent"] == true;
            Ok(json!({
                "sqlite_rows": local.len(),
                "sqlite_synced": local.iter().filter(|(_, s)| *s).count(),
                "postgres_rows": postgres_total,
                "missing_in_postgres": pending.len() + lost.len(),
                "missing_pending_sync": pending.iter().take(100).collect::<Vec<_>>(),
                "missing_but_marked_synced": lost.iter().take(100).collect::<Vec<_>>(),
                "scans": scans,
                "consistent": consistent,
            }))
        }
    }
}

/// `compare` for scans: besides ids missing from Postgres, a scan whose
/// SQLite row is marked synced while Postgres holds an earlier record of it
/// (by [`bus::wire::scan_order`]) lost an update, which must never happen.
async fn compare_scans(wal: &Wal, pool: &sqlx::PgPool) -> anyhow::Result<Value> {
    let local = wal.all_scan_keys().await?;
    let mut remote = HashMap::new();
    let ids: Vec<String> = local.iter().map(|k| k.scan_id.clone()).collect();
    for chunk in ids.chunks(10_000) {
        let found: Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
            "SELECT scan_id, status, completed_at FROM scans WHERE scan_id = ANY($1)",
        )
        .bind(chunk)
        .fetch_all(pool)
        .await?;
        for (id, status, completed_at) in found {
            remote.insert(id, (status, completed_at));
        }
    }
    let postgres_total: i64 = sqlx::query_scalar("SELECT count(*) FROM scans")
        .fetch_one(pool)
        .await?;
    let (mut pending, mut lost, mut outdated) = (Vec::new(), Vec::new(), Vec::new());
    for key in &local {
        match remote.get(&key.scan_id) {
            None if key.synced => lost.push(key.scan_id.as_str()),
            None => pending.push(key.scan_id.as_str()),
            Some((status, completed_at)) if key.synced => {
                let behind = crate::wal::parse_scan_status(status).is_none_or(|status| {
                    bus::wire::scan_order(key.status, key.completed_at)
                        > bus::wire::scan_order(status, *completed_at)
                });
                if behind {
                    outdated.push(key.scan_id.as_str());
                }
            }
            Some(_) => {}
        }
    }
    Ok(json!({
        "sqlite_rows": local.len(),
        "sqlite_synced": local.iter().filter(|k| k.synced).count(),
        "postgres_rows": postgres_total,
        "missing_in_postgres": pending.len() + lost.len(),
        "missing_pending_sync": pending.iter().take(100).collect::<Vec<_>>(),
        "missing_but_marked_synced": lost.iter().take(100).collect::<Vec<_>>(),
        "older_in_postgres_but_marked_synced": outdated.iter().take(100).collect::<Vec<_>>(),
        "consistent": lost.is_empty() && outdated.is_empty(),
    }))
}

async fn reachable(config: &Config) -> anyhow::Result<sync::Postgres> {
    let postgres = sync::Postgres::connect(&config.database_url).await?;
    anyhow::ensure!(
        postgres.status.reachable(),
        "Postgres is unreachable (check DATABASE_URL and that it is running)"
    );
    Ok(postgres)
}
