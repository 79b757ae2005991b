//! `loadgen compare`: one run that compares four paths to the same stand-in
//! upstream at several concurrency levels, interleaved (for each level the
//! four run back to back, so machine noise touches all alike): the upstream
//! directly (the baseline), the gateway's WebSocket, the gateway's OpenAI
//! endpoint (`POST /v1/chat/completions`, SSE) and the LiteLLM proxy. The
//! measured stack includes a persister in its own process, so CPU per token
//! covers gateway, streamer, persister and nats-server. Then the highest
//! WebSocket token rate and the memory per idle WebSocket. It owns the
//! order of phases and where its section goes in `BENCHMARKS.md` (between
//! two markers, replaced in place); the clients are [`load`]'s, the
//! Markdown [`compare_report`]'s.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use testkit::{NatsServer, Script};

use crate::{
    command_line,
    compare_report::{CompareConditions, CompareReport, LevelResult},
    idle,
    litellm::{self, LiteLlmProcess},
    load::{self, LoadSpec, PhaseResult, Target},
    nats_binary, procfs,
    report::{MaxRate, Pair},
    say, stack,
};

/// Opens the generated section in BENCHMARKS.md.
const BEGIN: &str = "<!-- loadgen compare: generated section begins -->";
/// Closes it.
const END: &str = "<!-- loadgen compare: generated section ends -->";
/// The scan section's opening marker, which this section goes before.
const SCAN_BEGIN: &str = "<!-- loadgen scan: generated section begins -->";

/// One of the compared paths to the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// The stand-in upstream directly (the baseline).
    Direct,
    /// The gateway's WebSocket.
    WebSocket,
    /// The gateway's `POST /v1/chat/completions` with `stream: true`.
    OpenAi,
    /// The LiteLLM proxy.
    LiteLlm,
}

impl PathKind {
    /// Every path, in the order each level runs them.
    pub const ALL: [Self; 4] = [Self::Direct, Self::WebSocket, Self::OpenAi, Self::LiteLlm];

    /// The column heading.
    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to the upstream",
            Self::WebSocket => "gateway WebSocket",
            Self::OpenAi => "gateway OpenAI endpoint (SSE)",
            Self::LiteLlm => "LiteLLM proxy (SSE)",
        }
    }

    /// A short id for request ids.
    pub fn slug(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::WebSocket => "ws",
            Self::OpenAi => "openai",
            Self::LiteLlm => "litellm",
        }
    }
}

/// Options of `loadgen compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Concurrent streams, one level after another (one client and one user each).
    #[arg(long, value_delimiter = ',', default_value = "1,50,200,1000")]
    levels: Vec<usize>,
    /// Tokens per turn.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// The stand-in's pause before each token, ms.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Measured turns per client (more at low levels: see --min-turns).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// At least this many measured turns per path and level: at low
    /// concurrency each client runs ceil(min-turns / level) rounds.
    #[arg(long, default_value_t = 20)]
    min_turns: usize,
    /// Unmeasured turns per client before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Past this many seconds into a phase, clients start no further
    /// measured turn (each runs at least one): bounds the slow paths.
    #[arg(long, default_value_t = 30)]
    budget_s: u64,
    /// Run the interleaved cycle this many times per level; the report
    /// quotes the median of each figure.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Levels at which LiteLLM is measured (default: all of --levels).
    #[arg(long, value_delimiter = ',')]
    litellm_levels: Option<Vec<usize>>,
    /// The `litellm` script of a venv with `litellm[proxy]` (scripts/bench.sh installs it).
    #[arg(long)]
    litellm_bin: Option<PathBuf>,
    /// Why LiteLLM is not available (scripts/bench.sh passes this when it could not install it).
    #[arg(long)]
    litellm_missing: Option<String>,
    /// The persister binary (default: `persister` next to this executable,
    /// else this executable's `serve-persister`).
    #[arg(long)]
    persister_bin: Option<PathBuf>,
    /// Run the persister without Postgres (SQLite only, degraded).
    #[arg(long)]
    no_postgres: bool,
    /// Stand-in intervals (ms) of the highest-rate WebSocket phases.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    max_rate_intervals_ms: Vec<u64>,
    /// Clients of the highest-rate phases.
    #[arg(long, default_value_t = 200)]
    max_rate_clients: usize,
    /// Turns per client, back to back, in the highest-rate phases.
    #[arg(long, default_value_t = 3)]
    max_rate_rounds: usize,
    /// Skip the highest-rate phases.
    #[arg(long)]
    no_max_rate: bool,
    /// Idle authenticated WebSockets for the memory phase (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    idle: usize,
    /// Steps in which the idle connections are opened.
    #[arg(long, default_value_t = 4)]
    idle_steps: usize,
    /// The gateway binary for the memory phase.
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Worker threads of each in-process runtime; default: the number of CPUs.
    #[arg(long)]
    workers: Option<usize>,
    /// Longest a single turn may take, seconds.
    #[arg(long, default_value_t = 300)]
    turn_timeout_s: u64,
    /// Longest any phase may take, seconds (a phase that runs out loses its figures).
    #[arg(long, default_value_t = 900)]
    phase_timeout_s: u64,
    /// CPU is still counted this long after a phase's last turn, ms (trailing work: persisting).
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Where to write the report (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report only.
    #[arg(long)]
    no_write: bool,
}

/// Runs the comparison, prints its section and writes it.
///
/// # Errors
/// When the system cannot start or a phase cannot be set up.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.levels.is_empty() && args.levels.iter().all(|&l| l > 0),
        "--levels must list positive numbers"
    );
    anyhow::ensure!(
        args.tokens > 0 && args.rounds > 0 && args.repeats > 0,
        "--tokens, --rounds and --repeats must be positive"
    );
    bus::telemetry::init("warn", false);
    if let Ok(limit) = rlimit::increase_nofile_limit(u64::MAX) {
        say(&format!("RLIMIT_NOFILE is {limit}."));
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let max_level = args.levels.iter().copied().max().unwrap_or(1);
    // One streamer takes every turn of the largest level at once.
    let streamer_concurrency = max_level.max(if args.no_max_rate {
        1
    } else {
        args.max_rate_clients
    });
    let stagger_ms = args.tokens as u64 * args.interval_ms;
    let mut report = CompareReport {
        machine: procfs::machine(),
        conditions: CompareConditions {
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            levels: args.levels.clone(),
            tokens: args.tokens,
            interval_ms: args.interval_ms,
            rounds: args.rounds,
            min_turns: args.min_turns,
            warmup: args.warmup,
            budget_s: args.budget_s,
            repeats: args.repeats,
            stagger_ms,
            settle_ms: args.settle_ms,
            turn_timeout_s: args.turn_timeout_s,
            streamer_concurrency,
            token_linger_ms: 0,
            workers,
            max_rate_clients: args.max_rate_clients,
            max_rate_rounds: args.max_rate_rounds,
            nats_version: command_line(&nats_binary(), &["--version"]),
            started: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            commit: command_line(
                std::path::Path::new("git"),
                &["rev-parse", "--short", "HEAD"],
            ),
            persister: String::new(),
            litellm: Err("not started".into()),
        },
        levels: Vec::new(),
        max_rate: Vec::new(),
        idle: None,
        diagnostics: Vec::new(),
    };
    if report.conditions.profile == "debug" {
        say("This is a debug build: numbers will be far from release ones (use --release).");
    }
    let client_rt = stack::runtime("lg-client", workers)?;
    let nats = client_rt
        .block_on(NatsServer::start())
        .context("nats-server did not start (run scripts/setup.sh)")?;
    let nats_pid = procfs::child_named("nats-server");
    let nonce = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

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
        1,
        streamer_concurrency,
    )?;
    report.conditions.token_linger_ms = stack.token_linger_ms;
    let persister = client_rt
        .block_on(stack::PersisterProcess::start(
            args.persister_bin.clone(),
            &nats.url(),
            !args.no_postgres,
        ))
        .context("the persister did not start")?;
    report.conditions.persister = format!("`{}`, {}", persister.program, persister.postgres_note);
    let litellm = match (&args.litellm_bin, &args.litellm_missing) {
        (Some(bin), _) => {
            say("Starting LiteLLM.");
            client_rt
                .block_on(LiteLlmProcess::start(bin, stack.llm.base_url()))
                .map_err(|e| format!("it did not start: {e:#}"))
        }
        (None, Some(why)) => Err(why.clone()),
        (None, None) => Err("no `--litellm-bin` was given (`scripts/bench.sh compare` installs LiteLLM and passes it)".into()),
    };
    report.conditions.litellm = match &litellm {
        Ok(l) => Ok(format!(
            "LiteLLM {} (`litellm[proxy]`, its own venv), one worker, no database, `LITELLM_LOCAL_MODEL_COST_MAP=True`, a master key; the stand-in is its only model (`openai/{}` at the stand-in's base URL); ready {:.1} s after spawn",
            l.version,
            litellm::MODEL,
            l.startup.as_secs_f64()
        )),
        Err(why) => Err(why.clone()),
    };
    if let Err(why) = &report.conditions.litellm {
        say(&format!("LiteLLM is not measured: {why}"));
    }

    let mut processes: Vec<(&'static str, u32)> = vec![("persister", persister.pid())];
    processes.extend(nats_pid.map(|pid| ("nats-server", pid)));
    if let Ok(l) = &litellm {
        processes.push(("LiteLLM", l.pid()));
    }
    let expected: Arc<[String]> = Arc::from(stack::tokens(args.tokens));
    let spec_for = |clients: usize, rounds: usize, nonce: String| LoadSpec {
        clients,
        warmup: args.warmup,
        rounds,
        stagger: Duration::from_millis(stagger_ms),
        burst: false,
        expected: expected.clone(),
        turn_timeout: Duration::from_secs(args.turn_timeout_s),
        phase_timeout: Duration::from_secs(args.phase_timeout_s),
        nonce,
        budget: Some(Duration::from_secs(args.budget_s)),
        settle: Duration::from_millis(args.settle_ms),
    };
    let target = |kind: PathKind| -> Option<Target> {
        Some(match kind {
            PathKind::Direct => Target::Direct {
                url: stack.upstream_url(),
            },
            PathKind::WebSocket => Target::Gateway {
                addr: stack.gateway_addr,
                secret: stack.secret.clone(),
            },
            PathKind::OpenAi => Target::OpenAi {
                addr: stack.gateway_addr,
                secret: stack.secret.clone(),
            },
            PathKind::LiteLlm => {
                let l = litellm.as_ref().ok()?;
                Target::LiteLlm {
                    base_url: l.base_url.clone(),
                    key: l.key.clone(),
                    model: litellm::MODEL.into(),
                }
            }
        })
    };

    for &level in &args.levels {
        let rounds = args.rounds.max(args.min_turns.div_ceil(level));
        let mut runs: Vec<(PathKind, Vec<PhaseResult>)> = PathKind::ALL
            .into_iter()
            .filter(|&kind| {
                kind != PathKind::LiteLlm
                    || args
                        .litellm_levels
                        .as_ref()
                        .is_none_or(|levels| levels.contains(&level))
            })
            .filter(|&kind| target(kind).is_some())
            .map(|kind| (kind, Vec::new()))
            .collect();
        for repeat in 0..args.repeats {
            for (kind, results) in &mut runs {
                let Some(target) = target(*kind) else {
                    continue;
                };
                say(&format!(
                    "{level} streams, {}{}: {} per client.",
                    kind.label(),
                    if args.repeats > 1 {
                        format!(" (repeat {})", repeat + 1)
                    } else {
                        String::new()
                    },
                    crate::compare_report::turns(rounds)
                ));
                let spec = spec_for(
                    level,
                    rounds,
                    format!("{nonce}-{level}-{repeat}-{}", kind.slug()),
                );
                let result = client_rt.block_on(load::run_phase(&target, &spec, &processes))?;
                say(&format!(
                    "  {}/{} turns verified, {} tokens in {:.1} s.",
                    result.stats.verified,
                    result.stats.turns,
                    result.stats.tokens,
                    result.wall.as_secs_f64()
                ));
                results.push(result);
            }
        }
        report.levels.push(LevelResult {
            level,
            rounds,
            runs,
        });
    }

    if !args.no_max_rate {
        let direct = target(PathKind::Direct).context("direct target")?;
        let through = target(PathKind::WebSocket).context("gateway target")?;
        for &interval_ms in &args.max_rate_intervals_ms {
            stack.llm.set_script(script(args.tokens, interval_ms));
            let spec = LoadSpec {
                warmup: 0,
                stagger: Duration::ZERO,
                budget: None,
                ..spec_for(
                    args.max_rate_clients,
                    args.max_rate_rounds,
                    format!("{nonce}-max-{interval_ms}"),
                )
            };
            say(&format!(
                "Highest rate, {interval_ms} ms: direct, then WebSocket."
            ));
            let direct = client_rt.block_on(load::run_phase(&direct, &spec, &processes))?;
            let spec = LoadSpec {
                nonce: format!("{}-ws", spec.nonce),
                ..spec
            };
            let gateway = client_rt.block_on(load::run_phase(&through, &spec, &processes))?;
            report.max_rate.push(MaxRate {
                interval_ms,
                tokens: args.tokens,
                pair: Pair { direct, gateway },
            });
        }
    }
    report.diagnostics = crate::diagnostics(&bus::ops::metrics_handle().render());
    say("Stopping.");
    drop(litellm);
    drop(persister);
    stack.stop();
    drop(nats);

    let section = report.section();
    println!("{section}");
    if !args.no_write {
        let path = args
            .out
            .unwrap_or_else(|| testkit::project_root().join("BENCHMARKS.md"));
        write_section(&path, &section)
            .with_context(|| format!("cannot write {}", path.display()))?;
        say(&format!("Wrote {}.", path.display()));
    }
    client_rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// Writes `section` between the markers in `path`: in place of the previous
/// copy, else before the scan section, else at the end.
///
/// # Errors
/// When the file cannot be written.
pub fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, placed(&existing, section))
}

fn placed(existing: &str, section: &str) -> String {
    let block = format!("{BEGIN}\n{}\n{END}", section.trim_end());
    if let (Some(b), Some(e)) = (existing.find(BEGIN), existing.find(END)) {
        format!("{}{block}{}", &existing[..b], &existing[e + END.len()..])
    } else if let Some(at) = existing.find(SCAN_BEGIN) {
        let before = existing[..at].trim_end();
        let before = before.strip_suffix("---").unwrap_or(before).trim_end();
        format!("{before}\n\n---\n\n{block}\n\n---\n\n{}", &existing[at..])
    } else {
        format!("{}\n\n---\n\n{block}\n", existing.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_goes_before_the_scan_section_and_is_replaced_in_place() {
        let file = format!("# Chat\n\nnotes\n\n---\n\n{SCAN_BEGIN}\n# Scan\n");
        let once = placed(&file, "# Compare\n\nv1\n");
        assert_eq!(
            once,
            format!(
                "# Chat\n\nnotes\n\n---\n\n{BEGIN}\n# Compare\n\nv1\n{END}\n\n---\n\n{SCAN_BEGIN}\n# Scan\n"
            )
        );
        let twice = placed(&once, "# Compare\n\nv2");
        assert_eq!(twice, once.replace("v1", "v2"));
        assert_eq!(
            placed("# Chat\n", "# C"),
            format!("# Chat\n\n---\n\n{BEGIN}\n# C\n{END}\n")
        );
    }
}
