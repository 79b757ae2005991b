//! The Markdown the tool prints and writes to `BENCHMARKS.md`: the machine,
//! the conditions, the targets and whether each is met, and one table per
//! phase. Everything below [`NOTES_MARKER`] in an existing file is kept, so
//! hand-written analysis survives a re-run.

use std::{fmt::Write as _, path::Path};

use crate::{
    idle::IdleResult,
    load::PhaseResult,
    procfs::Machine,
    stats::{PhaseStats, median, percentile},
};

/// Prints a tool's `section` and, unless `no_write`, has `write` put it in
/// `out` (by default the repository's `BENCHMARKS.md`), telling `say` where.
///
/// # Errors
/// When the file cannot be written.
pub fn publish(
    section: &str,
    out: Option<&Path>,
    no_write: bool,
    write: impl FnOnce(&Path, &str) -> std::io::Result<()>,
    say: impl FnOnce(&str),
) -> anyhow::Result<()> {
    use anyhow::Context as _;

    println!("{section}");
    if no_write {
        return Ok(());
    }
    let path = out.map_or_else(
        || testkit::project_root().join("BENCHMARKS.md"),
        Path::to_path_buf,
    );
    write(&path, section).with_context(|| format!("cannot write {}", path.display()))?;
    say(&format!("Wrote {}.", path.display()));
    Ok(())
}

/// Everything below this line in `BENCHMARKS.md` is kept across runs.
pub const NOTES_MARKER: &str =
    "<!-- loadgen: everything below this line is kept when the tool rewrites the file -->";

/// A baseline phase and its gateway twin, run under the same load.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Clients reading the stand-in upstream directly.
    pub direct: PhaseResult,
    /// Clients going through the gateway.
    pub gateway: PhaseResult,
}

/// One highest-rate measurement.
#[derive(Debug, Clone)]
pub struct MaxRate {
    /// The stand-in's pause before each token.
    pub interval_ms: u64,
    /// Tokens per turn.
    pub tokens: usize,
    /// The measurement.
    pub pair: Pair,
}

/// How the run was set up.
#[derive(Debug, Clone)]
pub struct Conditions {
    /// `release` or `debug`.
    pub profile: &'static str,
    /// Concurrent turns (clients).
    pub turns: usize,
    /// Tokens per turn in the latency phases.
    pub tokens: usize,
    /// The stand-in's pause before each token in the latency phases.
    pub interval_ms: u64,
    /// Measured turns per client (steady phase).
    pub rounds: usize,
    /// Warm-up turns per client.
    pub warmup: usize,
    /// Client start spread in the steady phase, ms.
    pub stagger_ms: u64,
    /// Tokens per turn in the highest-rate phases.
    pub max_rate_tokens: usize,
    /// Turns per client in the highest-rate phases.
    pub max_rate_rounds: usize,
    /// Streamers sharing the chat consumer.
    pub streamers: usize,
    /// Each streamer's `--concurrency`.
    pub streamer_concurrency: usize,
    /// The streamers' token linger, ms.
    pub token_linger_ms: u64,
    /// Worker threads per runtime.
    pub workers: usize,
    /// `nats-server --version`.
    pub nats_version: String,
    /// When the run started (UTC).
    pub started: String,
    /// `git describe`-like id of the tree measured.
    pub commit: String,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// The setup.
    pub conditions: Conditions,
    /// Steady load at the target rate.
    pub steady: Option<Pair>,
    /// All turns sent at once.
    pub burst: Option<Pair>,
    /// Highest token rates.
    pub max_rate: Vec<MaxRate>,
    /// Idle memory, or why it could not be measured.
    pub idle: Option<Result<IdleResult, String>>,
    /// Counters the in-process gateway and streamer exported.
    pub diagnostics: Vec<String>,
}

pub(crate) fn ms(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0} ms")
    } else {
        format!("{x:.2} ms")
    }
}

pub(crate) fn rate(x: f64) -> String {
    let whole = x.round() as i64;
    let digits = whole.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if whole < 0 { format!("-{out}") } else { out }
}

pub(crate) fn yes(met: bool) -> &'static str {
    if met { "**yes**" } else { "**no**" }
}

pub(crate) fn cpu(result: &PhaseResult) -> String {
    use crate::procfs::{IRQ, OTHERS};
    let ours = |label: &str| label != OTHERS && label != IRQ;
    let total: f64 = result
        .cpu
        .iter()
        .filter(|(l, _)| ours(l))
        .map(|(_, p)| p)
        .sum();
    let parts: Vec<String> = result
        .cpu
        .iter()
        .filter(|(l, _)| ours(l))
        .map(|(label, pct)| format!("{label} {pct:.0}%"))
        .collect();
    let of = |name: &str| {
        result
            .cpu
            .iter()
            .find(|(l, _)| l == name)
            .map_or(0.0, |(_, p)| *p)
    };
    format!(
        "{} (total {total:.0}%; machine softirq {:.0}%, other processes {:.0}%)",
        parts.join(", "),
        of(IRQ),
        of(OTHERS)
    )
}

pub(crate) fn plateau_rate(s: &PhaseStats) -> f64 {
    s.rate_plateau.unwrap_or(s.rate_whole)
}

pub(crate) fn clean(s: &PhaseStats) -> bool {
    s.turns > 0
        && s.verified == s.turns
        && s.missing == 0
        && s.duplicates == 0
        && s.out_of_order == 0
}

pub(crate) fn verified(r: &PhaseResult) -> String {
    let s = &r.stats;
    let mut out = format!("{}/{}", s.verified, s.turns);
    if r.connect_failures > 0 {
        write!(out, " ({} clients failed to connect)", r.connect_failures).ok();
    }
    for (problem, count) in &s.problems {
        write!(out, "; {count}× {problem}").ok();
    }
    out
}

impl Report {
    /// Added TTFT (gateway minus baseline) at p50 and p99, steady phase.
    pub fn added_ttft(&self) -> Option<(f64, f64)> {
        let pair = self.steady.as_ref()?;
        let (d, g) = (&pair.direct.stats.ttft_ms, &pair.gateway.stats.ttft_ms);
        Some((
            median(g) - median(d),
            percentile(g, 99.0) - percentile(d, 99.0),
        ))
    }

    /// The highest gateway token rate with nothing lost, and its interval.
    pub fn best_rate(&self) -> Option<(f64, u64, bool)> {
        self.max_rate
            .iter()
            .map(|m| {
                (
                    plateau_rate(&m.pair.gateway.stats),
                    m.interval_ms,
                    clean(&m.pair.gateway.stats),
                )
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }

    /// Whether every gateway turn of every phase was delivered exactly.
    pub fn nothing_lost(&self) -> bool {
        let mut phases: Vec<&PhaseResult> = Vec::new();
        phases.extend(self.steady.iter().map(|p| &p.gateway));
        phases.extend(self.burst.iter().map(|p| &p.gateway));
        phases.extend(self.max_rate.iter().map(|m| &m.pair.gateway));
        !phases.is_empty() && phases.iter().all(|p| clean(&p.stats))
    }

    /// The machine and conditions, as Markdown.
    pub fn setup_markdown(&self) -> String {
        let (m, c) = (&self.machine, &self.conditions);
        let mut out = String::new();
        writeln!(out, "## Machine\n").ok();
        writeln!(out, "- CPUs: {} (`nproc`), model: {}", m.cpus, m.cpu_model).ok();
        writeln!(out, "- memory: {:.1} GiB, kernel {}", m.mem_gib, m.kernel).ok();
        writeln!(out, "- {} (`nats-server --version`)", c.nats_version).ok();
        writeln!(out, "- run started {} on commit {}\n", c.started, c.commit).ok();
        writeln!(out, "## Conditions\n").ok();
        writeln!(out, "- build: **{}** (`cargo run --release -p loadgen -- chat`; the streamer and gateway are compiled into the tool with the same profile)", c.profile).ok();
        writeln!(out, "- everything on loopback on this one machine, the load tool included: a testkit nats-server (JetStream, file store in a temp dir), a stand-in OpenAI-compatible upstream (testkit `StandInLlm`), the streamer and the gateway in-process, each on its own Tokio runtime with {} worker threads (as if each were its own process); the idle-memory phase runs the gateway as a separate process", c.workers).ok();
        writeln!(out, "- {} concurrent turns, one per WebSocket client, each client a distinct user (the gateway allows 8 turns per user at once)", c.turns).ok();
        writeln!(out, "- latency phases: {} tokens per turn, the stand-in pausing {} ms before each token (ideal rate {} tokens/s at {} turns)", c.tokens, c.interval_ms, rate(c.turns as f64 * 1000.0 / c.interval_ms.max(1) as f64), c.turns).ok();
        writeln!(out, "- steady phase: client starts spread over {} ms, then turns back to back; {} warm-up + {} measured turns per client; burst phase: all {} turns sent at the same instant after a warm-up turn", c.stagger_ms, c.warmup, c.rounds, c.turns).ok();
        writeln!(out, "- highest-rate phases: {} clients start together, then run {} turns of {} tokens each back to back", c.turns, c.max_rate_rounds, c.max_rate_tokens).ok();
        writeln!(out, "- {} streamers in-process sharing the durable chat consumer (as replicas would), each with `--concurrency {}` and `STREAMER_TOKEN_LINGER_MS={}`; `--ack-wait-ms` left at its default", c.streamers, c.streamer_concurrency, c.token_linger_ms).ok();
        writeln!(out, "- baseline: the same number of clients read the stand-in directly (HTTP SSE via reqwest, `POST /v1/chat/completions` with `stream: true`, pooled keep-alive connections); gateway clients: tokio-tungstenite, one socket each, opened before the phase; both parse every frame and verify the exact text").ok();
        writeln!(out, "- TTFT is measured from just before the request is written to the arrival of the first token; \"added\" compares the percentiles of the two distributions (gateway p50 − baseline p50, gateway p99 − baseline p99)").ok();
        writeln!(out, "- tokens/s counts the script's tokens as they arrive (one WebSocket frame each: deltas that queue behind a publish travel batched on the bus, and still reach the client one frame per delta); \"all turns streaming\" counts them between the last client's first token and the first client's last token; \"whole phase\" from the first token to the last").ok();
        out
    }

    /// The targets and every table, as Markdown.
    pub fn results_markdown(&self) -> String {
        let mut out = String::new();
        writeln!(out, "## Results\n").ok();
        self.targets(&mut out);
        if let Some(pair) = &self.steady {
            writeln!(
                out,
                "\n### Steady load: {} concurrent turns at {} ms per token\n",
                self.conditions.turns, self.conditions.interval_ms
            )
            .ok();
            pair_table(&mut out, pair);
        }
        if let Some(pair) = &self.burst {
            writeln!(
                out,
                "\n### Burst: {} turns sent at the same instant, {} ms per token\n",
                self.conditions.turns, self.conditions.interval_ms
            )
            .ok();
            pair_table(&mut out, pair);
        }
        if !self.max_rate.is_empty() {
            writeln!(
                out,
                "\n### Highest token rate ({} concurrent turns, {} back to back per client)\n",
                self.conditions.turns, self.conditions.max_rate_rounds
            )
            .ok();
            writeln!(out, "| stand-in interval | tokens per turn | direct: tokens/s | gateway: tokens/s | gateway / direct | gateway TTFT p50 / p99 | gateway turns verified | CPU during the gateway phase (% of one core) |").ok();
            writeln!(out, "|---|---|---|---|---|---|---|---|").ok();
            for m in &self.max_rate {
                let (d, g) = (&m.pair.direct.stats, &m.pair.gateway.stats);
                writeln!(
                    out,
                    "| {} ms | {} | {} | {} | {:.2} | {} / {} | {} | {} |",
                    m.interval_ms,
                    m.tokens,
                    rate(plateau_rate(d)),
                    rate(plateau_rate(g)),
                    plateau_rate(g) / plateau_rate(d),
                    ms(median(&g.ttft_ms)),
                    ms(percentile(&g.ttft_ms, 99.0)),
                    verified(&m.pair.gateway),
                    cpu(&m.pair.gateway),
                )
                .ok();
            }
        }
        match &self.idle {
            Some(Ok(idle)) => idle_table(&mut out, idle),
            Some(Err(why)) => {
                writeln!(out, "\n### Idle WebSockets\n\nNot measured: {why}").ok();
            }
            None => {}
        }
        if !self.diagnostics.is_empty() {
            writeln!(out, "\n### Counters and histogram means from the in-process gateway and streamers (whole run)\n").ok();
            writeln!(out, "```").ok();
            for line in &self.diagnostics {
                writeln!(out, "{line}").ok();
            }
            writeln!(out, "```").ok();
        }
        out
    }

    fn targets(&self, out: &mut String) {
        writeln!(out, "### Targets (from the issue)\n").ok();
        writeln!(out, "| target | measured | met |").ok();
        writeln!(out, "|---|---|---|").ok();
        match self.added_ttft() {
            Some((p50, p99)) => {
                writeln!(
                    out,
                    "| added TTFT p50 <= 1 ms at {} concurrent turns | {} | {} |",
                    self.conditions.turns,
                    ms(p50),
                    yes(p50 <= 1.0)
                )
                .ok();
                writeln!(
                    out,
                    "| added TTFT p99 <= 3 ms at {} concurrent turns | {} | {} |",
                    self.conditions.turns,
                    ms(p99),
                    yes(p99 <= 3.0)
                )
                .ok();
            }
            None => {
                writeln!(
                    out,
                    "| added TTFT p50 <= 1 ms, p99 <= 3 ms | not measured | - |"
                )
                .ok();
            }
        }
        match self.best_rate() {
            Some((best, interval, clean)) => {
                let note = if clean {
                    ""
                } else {
                    " (with losses: see below)"
                };
                writeln!(out, "| >= 50,000 tokens/s delivered to WebSocket clients, load tool included | {} tokens/s (interval {interval} ms){note} | {} |", rate(best), yes(best >= 50_000.0 && clean)).ok();
            }
            None => {
                writeln!(out, "| >= 50,000 tokens/s | not measured | - |").ok();
            }
        }
        match &self.idle {
            Some(Ok(idle)) => {
                let per = idle.kb_per_connection().unwrap_or(f64::NAN);
                let at = if idle.held < idle.requested {
                    format!(
                        " at {} connections (asked {}: see below)",
                        rate(idle.held as f64),
                        rate(idle.requested as f64)
                    )
                } else {
                    format!(" at {} connections", rate(idle.held as f64))
                };
                writeln!(out, "| <= 16 KB per idle authenticated WebSocket at 20,000 connections | {per:.1} KiB per connection{at} | {} |", yes(per <= 16.0)).ok();
            }
            _ => {
                writeln!(
                    out,
                    "| <= 16 KB per idle authenticated WebSocket | not measured | - |"
                )
                .ok();
            }
        }
        writeln!(out, "| no token frame lost, duplicated or reordered (every gateway turn: seq 1..=N, done at N+1, exact text) | {} | {} |", if self.nothing_lost() { "none in any phase" } else { "see the tables" }, yes(self.nothing_lost())).ok();
    }

    /// The whole file: title, setup, results, then the kept notes.
    pub fn document(&self, kept_notes: Option<&str>) -> String {
        let mut out = String::new();
        writeln!(out, "# Benchmarks: the chat path\n").ok();
        writeln!(out, "Written by `scripts/bench.sh` (`cargo run --release -p loadgen -- chat`), which starts everything it measures itself. Re-running it rewrites this file above the notes.\n").ok();
        out.push_str(&self.setup_markdown());
        out.push('\n');
        out.push_str(&self.results_markdown());
        out.push('\n');
        out.push_str(NOTES_MARKER);
        out.push('\n');
        match kept_notes {
            Some(notes) => out.push_str(notes),
            None => out.push_str("\n## Notes\n\n(Analysis of the numbers above goes here; the tool keeps it across runs.)\n"),
        }
        out
    }
}

fn pair_table(out: &mut String, pair: &Pair) {
    let (d, g) = (&pair.direct.stats, &pair.gateway.stats);
    writeln!(
        out,
        "| | direct to the upstream (baseline) | through the gateway | gateway − baseline |"
    )
    .ok();
    writeln!(out, "|---|---|---|---|").ok();
    for (name, p) in [
        ("TTFT p50", 50.0),
        ("TTFT p90", 90.0),
        ("TTFT p99", 99.0),
        ("TTFT max", 100.0),
    ] {
        let (a, b) = (percentile(&d.ttft_ms, p), percentile(&g.ttft_ms, p));
        writeln!(
            out,
            "| {name} | {} | {} | **+{}** |",
            ms(a),
            ms(b),
            ms(b - a)
        )
        .ok();
    }
    writeln!(
        out,
        "| gap between tokens p50 / p99 | {} / {} | {} / {} | +{} / +{} |",
        ms(median(&d.gap_ms)),
        ms(percentile(&d.gap_ms, 99.0)),
        ms(median(&g.gap_ms)),
        ms(percentile(&g.gap_ms, 99.0)),
        ms(median(&g.gap_ms) - median(&d.gap_ms)),
        ms(percentile(&g.gap_ms, 99.0) - percentile(&d.gap_ms, 99.0)),
    )
    .ok();
    let (pd, pg) = (plateau_rate(d), plateau_rate(g));
    writeln!(
        out,
        "| tokens/s, all turns streaming | {} | {} | × {:.3} |",
        rate(pd),
        rate(pg),
        pg / pd
    )
    .ok();
    writeln!(
        out,
        "| tokens/s, whole phase ({} / {} tokens) | {} | {} | × {:.3} |",
        d.tokens,
        g.tokens,
        rate(d.rate_whole),
        rate(g.rate_whole),
        g.rate_whole / d.rate_whole
    )
    .ok();
    writeln!(
        out,
        "| turns verified | {} | {} | |",
        verified(&pair.direct),
        verified(&pair.gateway)
    )
    .ok();
    writeln!(
        out,
        "| frames missing / duplicated / out of order | {} / {} / {} | {} / {} / {} | |",
        d.missing, d.duplicates, d.out_of_order, g.missing, g.duplicates, g.out_of_order
    )
    .ok();
    writeln!(
        out,
        "| phase wall time | {:.2} s | {:.2} s | |",
        pair.direct.wall.as_secs_f64(),
        pair.gateway.wall.as_secs_f64()
    )
    .ok();
    writeln!(
        out,
        "| CPU, % of one core | {} | {} | |",
        cpu(&pair.direct),
        cpu(&pair.gateway)
    )
    .ok();
}

pub(crate) fn idle_table(out: &mut String, idle: &IdleResult) {
    writeln!(
        out,
        "\n### Idle authenticated WebSockets (gateway in its own process)\n"
    )
    .ok();
    writeln!(out, "Gateway process: `{}`. Each connection is upgraded with a valid HS256 token and answers one `ping` with `pong` before it counts; the gateway's `VmRSS` is read from `/proc/<pid>/status` after each step (the client sockets live in the load tool, not in the gateway). Opening all {} took {:.1} s; {} failed.\n", idle.program, idle.held, idle.open_time.as_secs_f64(), idle.failures).ok();
    if let Some(why) = &idle.limited_by {
        writeln!(
            out,
            "Held {} of the {} asked for: {why}.\n",
            idle.held, idle.requested
        )
        .ok();
    }
    writeln!(
        out,
        "| connections | gateway VmRSS | of which anonymous | growth since 0 |"
    )
    .ok();
    writeln!(out, "|---|---|---|---|").ok();
    let base = idle.steps.first().map_or(0, |s| s.1.total_kb);
    for (count, rss) in &idle.steps {
        writeln!(
            out,
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            rate(*count as f64),
            rss.total_kb as f64 / 1024.0,
            rss.anon_kb as f64 / 1024.0,
            (rss.total_kb as f64 - base as f64) / 1024.0
        )
        .ok();
    }
    writeln!(
        out,
        "\nPer connection: **{:.1} KiB** (growth / connections), slope of a least-squares fit {:.1} KiB, anonymous memory {:.1} KiB. The load tool's own RSS grew {:.1} MiB holding the client ends (not counted above).",
        idle.kb_per_connection().unwrap_or(f64::NAN),
        idle.slope_kb().unwrap_or(f64::NAN),
        idle.anon_kb_per_connection().unwrap_or(f64::NAN),
        idle.client_growth_kb as f64 / 1024.0
    )
    .ok();
}

/// Writes `report` to `path`, keeping whatever followed [`NOTES_MARKER`].
///
/// # Errors
/// When the file cannot be written.
pub fn write(path: &Path, report: &Report) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let kept = existing
        .split_once(NOTES_MARKER)
        .map(|(_, notes)| notes.trim_start_matches('\n'))
        .map(|notes| format!("\n{notes}"));
    std::fs::write(path, report.document(kept.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_get_thousands_separators() {
        assert_eq!(rate(1234567.4), "1,234,567");
        assert_eq!(rate(999.0), "999");
        assert_eq!(rate(40000.0), "40,000");
    }
}
