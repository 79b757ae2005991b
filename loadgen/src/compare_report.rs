//! The Markdown of `loadgen compare`: machine and conditions, the targets of
//! issue 11 and whether each is met, a summary across concurrency levels and
//! one table per level, then the highest rate and idle memory.

use std::fmt::Write as _;

use crate::{
    compare::PathKind,
    idle::IdleResult,
    load::PhaseResult,
    procfs::{IRQ, Machine, OTHERS},
    report::{MaxRate, clean, idle_table, ms, plateau_rate, rate, verified, yes},
    stats::{median, percentile},
};

/// Our processes, whose CPU per token the issue's target adds up.
const OURS: [&str; 4] = ["gateway", "streamer", "persister", "nats-server"];

/// Every path at one concurrency level.
#[derive(Debug, Clone)]
pub struct LevelResult {
    /// Concurrent streams.
    pub level: usize,
    /// Measured turns asked of each client.
    pub rounds: usize,
    /// Each path's phases, one per repeat, in run order.
    pub runs: Vec<(PathKind, Vec<PhaseResult>)>,
}

impl LevelResult {
    fn of(&self, kind: PathKind) -> Option<&[PhaseResult]> {
        self.runs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, r)| r.as_slice())
            .filter(|r| !r.is_empty())
    }

    /// Median over repeats of `figure`.
    fn median(&self, kind: PathKind, figure: impl Fn(&PhaseResult) -> f64) -> f64 {
        self.of(kind)
            .map_or(f64::NAN, |runs| med(runs.iter().map(figure)))
    }

    /// Median over repeats of (path − direct) for `figure`, each repeat
    /// against the baseline run just before it.
    fn added(&self, kind: PathKind, figure: impl Fn(&PhaseResult) -> f64) -> f64 {
        match (self.of(kind), self.of(PathKind::Direct)) {
            (Some(runs), Some(direct)) => {
                med(runs.iter().zip(direct).map(|(r, d)| figure(r) - figure(d)))
            }
            _ => f64::NAN,
        }
    }
}

/// How the run was set up.
#[derive(Debug, Clone)]
pub struct CompareConditions {
    /// `release` or `debug`.
    pub profile: &'static str,
    /// Concurrency levels.
    pub levels: Vec<usize>,
    /// Tokens per turn.
    pub tokens: usize,
    /// The stand-in's pause before each token.
    pub interval_ms: u64,
    /// Measured turns per client.
    pub rounds: usize,
    /// Least measured turns per path and level.
    pub min_turns: usize,
    /// Warm-up turns per client.
    pub warmup: usize,
    /// Seconds after which clients start no further measured turn.
    pub budget_s: u64,
    /// Interleaved cycles per level.
    pub repeats: usize,
    /// Client start spread, ms.
    pub stagger_ms: u64,
    /// CPU counted after the last turn, ms.
    pub settle_ms: u64,
    /// Longest turn.
    pub turn_timeout_s: u64,
    /// The streamer's `--concurrency`.
    pub streamer_concurrency: usize,
    /// The streamer's token linger, ms.
    pub token_linger_ms: u64,
    /// Worker threads per runtime.
    pub workers: usize,
    /// Clients of the highest-rate phases.
    pub max_rate_clients: usize,
    /// Turns per client in the highest-rate phases.
    pub max_rate_rounds: usize,
    /// `nats-server --version`.
    pub nats_version: String,
    /// When the run started (UTC).
    pub started: String,
    /// The commit measured.
    pub commit: String,
    /// What ran as the persister and where its rows went.
    pub persister: String,
    /// How LiteLLM ran, or why it was not measured.
    pub litellm: Result<String, String>,
}

/// The whole comparison.
#[derive(Debug, Clone)]
pub struct CompareReport {
    /// The machine.
    pub machine: Machine,
    /// The setup.
    pub conditions: CompareConditions,
    /// One entry per concurrency level.
    pub levels: Vec<LevelResult>,
    /// Highest WebSocket token rates.
    pub max_rate: Vec<MaxRate>,
    /// Idle memory, or why it could not be measured.
    pub idle: Option<Result<IdleResult, String>>,
    /// Counters the in-process gateway and streamer exported.
    pub diagnostics: Vec<String>,
}

/// The median of `values` (NaN when empty).
fn med(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    median(&v)
}

fn ttft(p: f64) -> impl Fn(&PhaseResult) -> f64 {
    move |r| percentile(&r.stats.ttft_ms, p)
}

fn gap99(r: &PhaseResult) -> f64 {
    percentile(&r.stats.gap_ms, 99.0)
}

fn tokens_per_s(r: &PhaseResult) -> f64 {
    plateau_rate(&r.stats)
}

/// CPU microseconds per delivered token of the components named `labels`.
fn us_per_token<'a>(labels: &'a [&'a str]) -> impl Fn(&PhaseResult) -> f64 + 'a {
    move |r| {
        let used: f64 = r
            .cpu_time
            .iter()
            .filter(|(l, _)| labels.contains(&l.as_str()))
            .map(|(_, t)| t.as_secs_f64())
            .fold(0.0, |a, b| a + b);
        1e6 * used / r.stats.tokens.max(1) as f64
    }
}

/// Share of one core the machine spent on softirq or on other processes.
fn machine_pct(label: &'static str) -> impl Fn(&PhaseResult) -> f64 {
    move |r| {
        r.cpu
            .iter()
            .find(|(l, _)| l == label)
            .map_or(0.0, |(_, p)| *p)
    }
}

fn us(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x >= 100.0 {
        format!("{} µs", rate(x))
    } else {
        format!("{x:.1} µs")
    }
}

/// Milliseconds, or seconds from 10 s up.
fn time(x: f64) -> String {
    if x.abs() >= 10_000.0 {
        format!("{:.1} s", x / 1e3)
    } else {
        ms(x)
    }
}

fn signed(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x >= 0.0 {
        format!("+{}", time(x))
    } else {
        format!("−{}", time(-x))
    }
}

pub(crate) fn turns(n: usize) -> String {
    format!("{n} measured turn{}", if n == 1 { "" } else { "s" })
}

impl CompareReport {
    fn level(&self, level: usize) -> Option<&LevelResult> {
        self.levels.iter().find(|l| l.level == level)
    }

    /// The section, from its heading to the idle table.
    pub fn section(&self) -> String {
        let mut out = String::new();
        writeln!(
            out,
            "# Benchmarks: the gateway against LiteLLM (issue 11)\n"
        )
        .ok();
        writeln!(out, "Written by `scripts/bench.sh compare` (`loadgen compare`), which starts everything it measures itself (LiteLLM from its own venv); a re-run replaces the part between the markers.\n").ok();
        self.setup(&mut out);
        self.targets(&mut out);
        self.summary(&mut out);
        for level in &self.levels {
            self.level_table(&mut out, level);
        }
        if !self.max_rate.is_empty() {
            writeln!(out, "\n### Highest WebSocket token rate ({} clients start together, {} turns of {} tokens back to back each)\n", self.conditions.max_rate_clients, self.conditions.max_rate_rounds, self.conditions.tokens).ok();
            writeln!(out, "| stand-in interval | direct: tokens/s | WebSocket: tokens/s | WebSocket / direct | WebSocket turns verified | ours, µs CPU per token | CPU (% of one core) |").ok();
            writeln!(out, "|---|---|---|---|---|---|---|").ok();
            for m in &self.max_rate {
                let (d, g) = (&m.pair.direct, &m.pair.gateway);
                writeln!(
                    out,
                    "| {} ms | {} | {} | {:.2} | {} | {} | {} |",
                    m.interval_ms,
                    rate(tokens_per_s(d)),
                    rate(tokens_per_s(g)),
                    tokens_per_s(g) / tokens_per_s(d),
                    verified(g),
                    us(us_per_token(&OURS)(g)),
                    crate::report::cpu(g),
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
        // Counters that stayed at zero say nothing here.
        let diagnostics: Vec<&String> = self
            .diagnostics
            .iter()
            .filter(|l| !l.ends_with(" 0"))
            .collect();
        if !diagnostics.is_empty() {
            writeln!(out, "\n### Counters (other than zero) and histogram means from the in-process gateway and streamer (whole run)\n\n```").ok();
            for line in diagnostics {
                writeln!(out, "{line}").ok();
            }
            writeln!(out, "```").ok();
        }
        out
    }

    fn setup(&self, out: &mut String) {
        let (m, c) = (&self.machine, &self.conditions);
        let levels: Vec<String> = c.levels.iter().map(|l| rate(*l as f64)).collect();
        writeln!(out, "## Machine and conditions\n").ok();
        writeln!(
            out,
            "- {} CPUs ({}), {:.1} GiB, kernel {}; {}; run started {} on commit {}; build **{}**",
            m.cpus,
            m.cpu_model,
            m.mem_gib,
            m.kernel,
            c.nats_version,
            c.started,
            c.commit,
            c.profile
        )
        .ok();
        writeln!(out, "- everything on loopback on this one machine, the load tool included: a testkit nats-server (JetStream, file store in a temp dir), the stand-in upstream (testkit `StandInLlm`: {} tokens per turn, {} ms before each), the streamer (`--concurrency {}`, `STREAMER_TOKEN_LINGER_MS={}`) and the gateway in-process on their own Tokio runtimes ({} worker threads each; CPU told apart by thread name), the persister in its own process ({}){}", c.tokens, c.interval_ms, c.streamer_concurrency, c.token_linger_ms, c.workers, c.persister, if c.litellm.is_ok() { ", LiteLLM in its own process" } else { "" }).ok();
        match &c.litellm {
            Ok(how) => writeln!(out, "- LiteLLM: {how}").ok(),
            Err(why) => writeln!(out, "- **LiteLLM was not measured**: {why}").ok(),
        };
        writeln!(out, "- levels: {} concurrent streams, one client and one user each (the gateway allows 8 turns per user); **interleaved**: at each level the paths run back to back in the order direct, WebSocket, OpenAI endpoint, LiteLLM{}, so machine noise touches all alike", levels.join(", "), if c.repeats > 1 { format!(", and that cycle {} times; every figure is the median over the cycles", c.repeats) } else { String::new() }).ok();
        writeln!(out, "- each phase: client starts spread over {} ms, then turns back to back: {} warm-up turn(s) and {} measured turns per client (at least {} measured turns per path: ceil({} / level) at low levels); past {} s into a phase clients start no further measured turn (each runs at least one); a turn may take {} s", c.stagger_ms, c.warmup, c.rounds, c.min_turns, c.min_turns, c.budget_s, c.turn_timeout_s).ok();
        writeln!(out, "- clients: the same reqwest SSE client for the three HTTP paths (one pooled keep-alive connection per client, opened before the phase; `stream: true`), tokio-tungstenite for the WebSocket (one socket per client); all verify every answer (each token once, in order, the exact text)").ok();
        writeln!(out, "- TTFT: from just before the request is written to the first token; **added** = path percentile − direct percentile at the same level; gap: between consecutive tokens of a turn; tokens/s: while all clients were streaming (else the whole phase); **CPU per token**: CPU time of a process during the phase (plus {} ms after its last turn, for trailing work) divided by the tokens delivered in the phase, warm-up turns included (from `/proc`, 10 ms ticks); \"ours\" = gateway + streamer + persister + nats-server (Postgres's own CPU counts among \"other processes\")", c.settle_ms).ok();
    }

    fn targets(&self, out: &mut String) {
        writeln!(out, "\n## Targets (issue 11)\n").ok();
        writeln!(out, "| target | measured | met |").ok();
        writeln!(out, "|---|---|---|").ok();
        let at200 = self.level(200);
        for (kind, name) in [
            (PathKind::WebSocket, "over WebSocket"),
            (PathKind::OpenAi, "over the OpenAI endpoint"),
        ] {
            for (p, limit) in [(50.0, 1.0), (99.0, 3.0)] {
                let added = at200.map_or(f64::NAN, |l| l.added(kind, ttft(p)));
                let measured = if added.is_nan() {
                    "not measured".to_owned()
                } else {
                    signed(added)
                };
                writeln!(
                    out,
                    "| added TTFT p{p:.0} <= {limit:.0} ms at 200 concurrent streams {name} | {measured} | {} |",
                    if added.is_nan() { "-" } else { yes(added <= limit) }
                )
                .ok();
            }
        }
        // The highest WebSocket rate of any phase, and whether every WebSocket turn was exact.
        let ws_phases: Vec<&PhaseResult> = self
            .levels
            .iter()
            .filter_map(|l| l.of(PathKind::WebSocket))
            .flatten()
            .chain(self.max_rate.iter().map(|m| &m.pair.gateway))
            .collect();
        let best = ws_phases
            .iter()
            .map(|r| tokens_per_s(r))
            .fold(f64::NAN, f64::max);
        let exact = !ws_phases.is_empty() && ws_phases.iter().all(|r| clean(&r.stats));
        writeln!(out, "| >= 120,000 token frames/s delivered to WebSocket clients, none lost, duplicated or reordered | {} token frames/s at best (one frame per token); {} | {} |", rate(best), if exact { "every WebSocket turn exact" } else { "some WebSocket turns failed: see the tables" }, yes(best >= 120_000.0 && exact)).ok();
        for (kind, name) in [
            (PathKind::WebSocket, "WebSocket"),
            (PathKind::OpenAi, "OpenAI endpoint"),
        ] {
            let cpu = at200.map_or(f64::NAN, |l| l.median(kind, us_per_token(&OURS)));
            writeln!(out, "| <= 10 µs CPU per streamed token, gateway + streamer + persister + nats-server, 200 streams, {name} | {} | {} |", us(cpu), if cpu.is_nan() { "-" } else { yes(cpu <= 10.0) }).ok();
        }
        match self.level(1000) {
            Some(l) => {
                let mut parts = Vec::new();
                let mut all_clean = true;
                for kind in [PathKind::WebSocket, PathKind::OpenAi] {
                    let Some(runs) = l.of(kind) else { continue };
                    all_clean &= runs
                        .iter()
                        .all(|r| clean(&r.stats) && r.connect_failures == 0);
                    parts.push(format!(
                        "{}: {}, added TTFT p50 {} / p99 {}",
                        kind.label(),
                        runs.iter().map(verified).collect::<Vec<_>>().join(" + "),
                        signed(l.added(kind, ttft(50.0))),
                        signed(l.added(kind, ttft(99.0)))
                    ));
                }
                writeln!(
                    out,
                    "| 1,000 concurrent streams complete with no error | {} | {} |",
                    parts.join("; "),
                    yes(all_clean && !parts.is_empty())
                )
                .ok();
            }
            None => {
                writeln!(
                    out,
                    "| 1,000 concurrent streams complete with no error | not measured | - |"
                )
                .ok();
            }
        }
        match &self.idle {
            Some(Ok(idle)) => {
                let per = idle.kb_per_connection().unwrap_or(f64::NAN);
                writeln!(out, "| <= 8 KiB per idle authenticated WebSocket | {per:.1} KiB per connection at {} connections | {} |", rate(idle.held as f64), yes(per <= 8.0)).ok();
            }
            _ => {
                writeln!(
                    out,
                    "| <= 8 KiB per idle authenticated WebSocket | not measured | - |"
                )
                .ok();
            }
        }
    }

    fn summary(&self, out: &mut String) {
        let paths = [PathKind::WebSocket, PathKind::OpenAi, PathKind::LiteLlm];
        writeln!(out, "\n## Summary by concurrency\n").ok();
        writeln!(out, "Added TTFT p50 / p99 (path − direct), tokens delivered per second, and CPU per token: ours (gateway + streamer + persister + nats-server) for the gateway's paths, the LiteLLM process for LiteLLM.\n").ok();
        writeln!(
            out,
            "| streams | direct TTFT p50 / p99 | {} | LiteLLM ÷ OpenAI endpoint, added p50 |",
            paths
                .map(|k| format!(
                    "{}: added TTFT p50 / p99, tokens/s, CPU per token",
                    k.label()
                ))
                .join(" | ")
        )
        .ok();
        writeln!(out, "|---|---|---|---|---|---|").ok();
        for l in &self.levels {
            let mut cells = vec![
                rate(l.level as f64),
                format!(
                    "{} / {}",
                    time(l.median(PathKind::Direct, ttft(50.0))),
                    time(l.median(PathKind::Direct, ttft(99.0)))
                ),
            ];
            for kind in paths {
                if l.of(kind).is_none() {
                    cells.push("not run".into());
                    continue;
                }
                let cpu = if kind == PathKind::LiteLlm {
                    l.median(kind, us_per_token(&["LiteLLM"]))
                } else {
                    l.median(kind, us_per_token(&OURS))
                };
                cells.push(format!(
                    "{} / {}, {}, {}",
                    signed(l.added(kind, ttft(50.0))),
                    signed(l.added(kind, ttft(99.0))),
                    rate(l.median(kind, tokens_per_s)),
                    us(cpu)
                ));
            }
            let ratio =
                l.added(PathKind::LiteLlm, ttft(50.0)) / l.added(PathKind::OpenAi, ttft(50.0));
            cells.push(if ratio.is_finite() {
                format!("× {ratio:.1}")
            } else {
                "-".into()
            });
            writeln!(out, "| {} |", cells.join(" | ")).ok();
        }
    }

    fn level_table(&self, out: &mut String, l: &LevelResult) {
        let kinds: Vec<PathKind> = PathKind::ALL
            .into_iter()
            .filter(|k| l.of(*k).is_some())
            .collect();
        writeln!(
            out,
            "\n### {} concurrent stream{} ({} per client{})\n",
            rate(l.level as f64),
            if l.level == 1 { "" } else { "s" },
            turns(l.rounds),
            if self.conditions.repeats > 1 {
                format!("; median of {} cycles", self.conditions.repeats)
            } else {
                String::new()
            }
        )
        .ok();
        writeln!(
            out,
            "| | {} |",
            kinds
                .iter()
                .map(|k| k.label())
                .collect::<Vec<_>>()
                .join(" | ")
        )
        .ok();
        writeln!(out, "|---|{}", "---|".repeat(kinds.len())).ok();
        let row = |out: &mut String, name: &str, cell: &dyn Fn(PathKind) -> String| {
            let cells: Vec<String> = kinds.iter().map(|k| cell(*k)).collect();
            writeln!(out, "| {name} | {} |", cells.join(" | ")).ok();
        };
        row(out, "turns verified", &|k| {
            l.of(k)
                .map(|runs| runs.iter().map(verified).collect::<Vec<_>>().join(" + "))
                .unwrap_or_default()
        });
        row(out, "TTFT p50 / p99", &|k| {
            format!(
                "{} / {}",
                time(l.median(k, ttft(50.0))),
                time(l.median(k, ttft(99.0)))
            )
        });
        row(out, "**added TTFT p50 / p99**", &|k| {
            if k == PathKind::Direct {
                "(baseline)".into()
            } else {
                format!(
                    "**{} / {}**",
                    signed(l.added(k, ttft(50.0))),
                    signed(l.added(k, ttft(99.0)))
                )
            }
        });
        row(out, "inter-token gap p99 (added)", &|k| {
            if k == PathKind::Direct {
                ms(l.median(k, gap99))
            } else {
                format!("{} ({})", ms(l.median(k, gap99)), signed(l.added(k, gap99)))
            }
        });
        row(out, "tokens delivered per second", &|k| {
            rate(l.median(k, tokens_per_s))
        });
        for label in ["gateway", "streamer", "persister", "nats-server", "LiteLLM"] {
            if label == "LiteLLM" && self.conditions.litellm.is_err() {
                continue;
            }
            row(out, &format!("CPU per token: {label}"), &|k| {
                us(l.median(k, us_per_token(&[label])))
            });
        }
        row(out, "**CPU per token: ours together**", &|k| {
            format!("**{}**", us(l.median(k, us_per_token(&OURS))))
        });
        row(out, "CPU per token: stand-in, load clients", &|k| {
            format!(
                "{}, {}",
                us(l.median(k, us_per_token(&["stand-in upstream"]))),
                us(l.median(k, us_per_token(&["load clients"])))
            )
        });
        row(
            out,
            "machine: softirq, other processes (% of one core)",
            &|k| {
                format!(
                    "{:.0}%, {:.0}%",
                    l.median(k, machine_pct(IRQ)),
                    l.median(k, machine_pct(OTHERS))
                )
            },
        );
        row(out, "phase wall time", &|k| {
            format!("{:.1} s", l.median(k, |r| r.wall.as_secs_f64()))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_signs_read_well() {
        assert_eq!(med([3.0, 1.0, 2.0]), 2.0);
        assert!(med([]).is_nan());
        assert_eq!(signed(1.5), "+1.50 ms");
        assert_eq!(signed(-0.25), "−0.25 ms");
        assert_eq!(signed(12792.0), "+12.8 s");
        assert_eq!(us(9.94), "9.9 µs");
        assert_eq!(us(12125.0), "12,125 µs");
    }
}
