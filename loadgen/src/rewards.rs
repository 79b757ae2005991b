//! `loadgen rewards`: character grants into Postgres on this machine.
//!
//! It starts a testkit nats-server and Postgres (restarted with `fsync` on)
//! and the real persister in-process with the given batch settings, then:
//! publishes a burst of grants as fast as JetStream takes them and times
//! the drain until every row is committed (grants per second); and
//! publishes grants at a steady rate and reads, per grant, the time from
//! its publish (`granted_at`, stamped just before the publish, which is
//! what the streamer does right before the scan's `result`) to its
//! `reward_grants` row being written (`stored_at`, the writing
//! transaction's clock, committed right after). The section goes into
//! `BENCHMARKS.md`, before the persister's own section, replacing its
//! previous copy.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bus::wire::RewardGrant;
use clap::Parser as _;
use testkit::NatsServer;
use tokio_util::sync::CancellationToken;

use crate::{procfs, stats};

/// The heading of the section this tool owns in BENCHMARKS.md.
const HEADING: &str = "# Benchmarks: character grants";
/// The persister tool's section, which must stay last.
const PERSISTER_HEADING: &str = "# Benchmarks: the persister";

/// Options of `loadgen rewards`.
#[derive(Debug, Clone, clap::Args)]
pub struct RewardsArgs {
    /// Grants in the burst phase.
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    /// Grants per second in the steady phases, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5,50,500")]
    rates: Vec<u32>,
    /// Seconds each steady phase publishes for.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// PERSISTER_REWARD_BATCH of the persister under test.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// PERSISTER_REWARD_FLUSH_MS of the persister under test.
    #[arg(long, default_value_t = 5_000)]
    flush_ms: u64,
    /// Where to write the report (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report only.
    #[arg(long)]
    no_write: bool,
}

fn say(message: &str) {
    eprintln!("[loadgen rewards] {message}");
}

/// Runs the phases, prints the section and writes it.
///
/// # Errors
/// When a server does not start or a phase times out.
pub fn run(args: RewardsArgs) -> anyhow::Result<()> {
    bus::telemetry::init("warn", false);
    let runtime = tokio::runtime::Runtime::new()?;
    let section = runtime.block_on(measure(&args))?;
    crate::report::publish(
        &section,
        args.out.as_deref(),
        args.no_write,
        write_section,
        say,
    )?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Puts `section` in place of its previous copy, before the persister's
/// section (whose tool keeps only what precedes it), or at the end.
fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let mine = format!("\n---\n\n{HEADING}\n");
    let theirs = format!("\n---\n\n{PERSISTER_HEADING}\n");
    let mut text = existing.clone();
    if let Some(start) = text.find(&mine) {
        let rest = &text[start + mine.len()..];
        let end = rest
            .find("\n---\n\n# ")
            .map_or(text.len(), |i| start + mine.len() + i);
        text.replace_range(start..end, "");
    }
    let block = format!("\n---\n\n{}\n", section.trim_end());
    match text.find(&theirs) {
        Some(at) => text.insert_str(at, &block),
        None => {
            text = format!("{}\n{block}", text.trim_end());
        }
    }
    std::fs::write(path, text)
}

fn grant(i: usize, nonce: &str) -> RewardGrant {
    RewardGrant {
        scan_id: format!("{nonce}-scan-{i:08}"),
        user_id: format!("user-{:04}", i % 2_000),
        character_id: ["petty", "glassy", "canny", "papyrus", "vinny"][i % 5].into(),
        category: "glass".into(),
        new: i < 2_000,
        granted_at: chrono::Utc::now(),
    }
}

async fn publish(js: &async_nats::jetstream::Context, grant: &RewardGrant) -> anyhow::Result<()> {
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(grant)?.into())
        .message_id(grant.scan_id.clone());
    js.send_publish(bus::subject::reward_grant(&grant.scan_id)?, message)
        .await?
        .await?;
    Ok(())
}

fn count(pg: &testkit::Postgres, db: &str, nonce: &str) -> anyhow::Result<usize> {
    Ok(pg
        .psql(
            db,
            &format!("SELECT count(*) FROM reward_grants WHERE scan_id LIKE '{nonce}-%'"),
        )?
        .parse()?)
}

async fn wait_rows(
    pg: &testkit::Postgres,
    db: &str,
    nonce: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while count(pg, db, nonce)? < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {n} grants"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn measure(args: &RewardsArgs) -> anyhow::Result<String> {
    let machine = procfs::machine();
    // Other work on the machine shows in the figures: say how busy it was.
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    say("Starting nats-server and Postgres (fsync on).");
    let nats = NatsServer::start()
        .await
        .context("nats-server did not start (run scripts/setup.sh)")?;
    let mut pg = testkit::Postgres::start().await?;
    pg.stop()?;
    pg.set_fsync(true);
    pg.start_again().await?;
    let fsync = pg.psql("postgres", "SHOW fsync")?;
    let url = pg.create_database("rewards")?;
    let dir = std::env::temp_dir().join(format!("loadgen-rewards-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    let batch = args.batch.to_string();
    let flush = args.flush_ms.to_string();
    let config = persister::Config::parse_from([
        "persister",
        "--nats-url",
        &nats.url(),
        "--database-url",
        &url,
        "--listen",
        "127.0.0.1:0",
        "--sqlite-path",
        dir.join("persister.db")
            .to_str()
            .context("temp path is UTF-8")?,
        "--reward-batch",
        &batch,
        "--reward-flush-ms",
        &flush,
    ]);
    let persister = persister::Persister::build(config).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(persister.run(shutdown.clone()));
    let js = async_nats::jetstream::new(nats.client().await?);

    // Burst: everything published first (pipelined), then the drain timed
    // from the first publish to the last row.
    let nonce = format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    say(&format!("Burst of {} grants.", args.burst));
    let started = Instant::now();
    let mut acks = Vec::with_capacity(1_000);
    for i in 0..args.burst {
        let g = grant(i, &nonce);
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&g)?.into())
            .message_id(g.scan_id.clone());
        acks.push(
            js.send_publish(bus::subject::reward_grant(&g.scan_id)?, message)
                .await?,
        );
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await?;
    }
    let published = started.elapsed();
    wait_rows(&pg, "rewards", &nonce, args.burst, Duration::from_secs(600)).await?;
    let drained = started.elapsed();
    let burst_rate = args.burst as f64 / drained.as_secs_f64();
    let owners: usize = pg
        .psql("rewards", "SELECT count(*) FROM character_ownership")?
        .parse()?;

    // Steady rates: latency from publish to the committed row.
    let mut rows = Vec::new();
    for &rate in &args.rates {
        let nonce = format!(
            "r{rate}x{}",
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let n = (u64::from(rate.max(1)) * args.seconds) as usize;
        say(&format!("{rate} grants/s for {} s.", args.seconds));
        let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let mut next = tokio::time::Instant::now();
        let mut inflight = tokio::task::JoinSet::new();
        for i in 0..n {
            tokio::time::sleep_until(next).await;
            next += every;
            let g = grant(i, &nonce);
            let js = js.clone();
            inflight.spawn(async move { publish(&js, &g).await });
        }
        while let Some(result) = inflight.join_next().await {
            result??;
        }
        wait_rows(
            &pg,
            "rewards",
            &nonce,
            n,
            Duration::from_secs(60) + Duration::from_millis(args.flush_ms),
        )
        .await?;
        let text = pg.psql(
            "rewards",
            &format!(
                "SELECT string_agg((extract(epoch FROM stored_at - granted_at) * 1000)::text, ',') \
                 FROM reward_grants WHERE scan_id LIKE '{nonce}-%'"
            ),
        )?;
        let mut latencies: Vec<f64> = text.split(',').filter_map(|v| v.parse().ok()).collect();
        latencies.sort_by(f64::total_cmp);
        rows.push((
            rate,
            n,
            stats::median(&latencies),
            stats::percentile(&latencies, 99.0),
            latencies.last().copied().unwrap_or(f64::NAN),
        ));
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    let _ = std::fs::remove_dir_all(&dir);

    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg = |text: &str| text.split(' ').next().unwrap_or("?").to_owned();
    let mut out = String::new();
    writeln!(out, "{HEADING}\n")?;
    writeln!(
        out,
        "Written by `loadgen rewards` ({}, {} build). {} CPUs ({}), {:.1} GiB, kernel {}; nats-server and Postgres \
         (fsync {fsync}) from testkit on the same machine, the real persister in-process with \
         `PERSISTER_REWARD_BATCH={}` and `PERSISTER_REWARD_FLUSH_MS={}`. Grants come from the \
         tool, not from scans: `granted_at` is stamped just before the publish, as the \
         streamer does right before a scan's `result`, so \"publish to row\" is \"scan done \
         to ownership row committed\" (`stored_at` is the writing transaction's clock; it \
         commits right after). Load average (1 min) {} before the run, {} after: other \
         work shared the 2 CPUs.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        machine.cpus,
        machine.cpu_model,
        machine.mem_gib,
        machine.kernel,
        args.batch,
        args.flush_ms,
        loadavg(&load_before),
        loadavg(&load_after),
    )?;
    writeln!(out, "| phase | grants | result |")?;
    writeln!(out, "|---|---:|---|")?;
    writeln!(
        out,
        "| burst: all published at once, then drained | {} | **{:.0} grants/s** into Postgres ({:.1} s from the first publish to the last row; publishing alone {:.1} s; {owners} ownership rows) |",
        args.burst,
        burst_rate,
        drained.as_secs_f64(),
        published.as_secs_f64(),
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| steady rate | grants | publish to row p50 | p99 | max |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|")?;
    for (rate, n, p50, p99, max) in rows {
        writeln!(
            out,
            "| {rate}/s | {n} | {p50:.0} ms | **{p99:.0} ms** | {max:.0} ms |"
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "A batch is written when it holds {} grants or {} ms after its first grant. Below \
         {:.0} grants/s a batch does not fill before the flush interval, so the latency is \
         about the interval (the seeds' trade: fewer commits for a few seconds' delay; \
         `new` in the scan's result does not wait for it). Above that, batches fill and \
         the latency is the commit's.",
        args.batch,
        args.flush_ms,
        args.batch as f64 / (args.flush_ms as f64 / 1000.0)
    )?;
    Ok(out)
}
