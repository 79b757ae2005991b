//! After the run: every promise checked against Postgres, the dead letters
//! and what the clients saw, counted in a table; throughput and added
//! latency during and between faults.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    time::Duration,
};

use async_nats::jetstream;
use serde_json::Value;
use tokio::time::Instant;

use super::{End, Fault, Seen, Topology, UPSTREAM_TTFT, Via};

/// How long after its first send a client stream must have ended: five
/// ack waits for exhausted work, plus the time a fault takes to heal (a
/// node restart, a rolling restart of three) and the clients' own idle
/// timeouts before they resume.
pub const BOUND: Duration = Duration::from_secs(90);

/// A window counts as "during a fault" until this long after it healed.
const SETTLE: Duration = Duration::from_secs(5);

/// The outcome: counts, broken promises, and timing per phase.
pub struct Verdict {
    /// (what, count) rows.
    pub rows: Vec<(String, String)>,
    /// Each broken promise, specifically.
    pub failures: Vec<String>,
    /// (phase, seconds, turns ended, TTFT samples in ms).
    phases: Vec<(String, f64, usize, Vec<f64>)>,
}

impl Verdict {
    /// Checks everything the clients saw against the system's records.
    pub async fn check(
        topology: &Topology,
        seen: &Seen,
        faults: &[Fault],
        started: Instant,
        load_ended: Instant,
    ) -> Self {
        let turns = seen.turns.lock().expect("turns lock").clone();
        let scans = seen.scans.lock().expect("scans lock").clone();
        let mut verdict = Self {
            rows: Vec::new(),
            failures: Vec::new(),
            phases: Vec::new(),
        };
        verdict.streams_ended(seen, &turns, &scans);
        verdict.in_postgres(topology, &turns, &scans).await;
        verdict.dead_letters(topology, &turns, &scans).await;
        verdict.rewards(topology, &scans).await;
        verdict.timing(&turns, faults, started, load_ended);
        verdict
    }

    fn row(&mut self, what: &str, count: impl ToString) {
        self.rows.push((what.to_owned(), count.to_string()));
    }

    fn fail(&mut self, failure: String) {
        if self.failures.len() < 40 {
            self.failures.push(failure);
        }
    }

    fn streams_ended(&mut self, seen: &Seen, turns: &[super::TurnSeen], scans: &[super::ScanSeen]) {
        let ws = turns.iter().filter(|t| t.via == Via::WebSocket).count();
        self.row(
            "turns accepted (WebSocket / OpenAI)",
            format!("{ws} / {}", turns.len() - ws),
        );
        let refused = seen.refused.lock().expect("refused lock").clone();
        self.row(
            "requests refused that should have been served",
            refused.len(),
        );
        for refusal in refused.iter().take(10) {
            self.fail(format!("refused: {refusal}"));
        }
        let finished = |reason: &str| {
            turns
                .iter()
                .filter(|t| t.end == End::Finished(reason.to_owned()))
                .count()
        };
        self.row("turns ended `stop`", finished("stop"));
        let mut codes: std::collections::BTreeMap<&str, usize> = Default::default();
        for turn in turns
            .iter()
            .filter(|t| t.end == End::Finished("error".into()))
        {
            *codes
                .entry(turn.error.as_deref().unwrap_or("(none)"))
                .or_default() += 1;
        }
        let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        self.row(
            "turns ended `error`, by code",
            format!("{} ({})", finished("error"), codes.join(", ")),
        );
        self.row(
            "turns resumed on a new connection",
            turns.iter().filter(|t| t.connections > 1).count(),
        );
        for turn in turns {
            match &turn.end {
                End::Finished(_) => {}
                other => self.fail(format!("turn {} ended {other:?}", turn.turn_id)),
            }
            if turn.took > BOUND {
                self.fail(format!(
                    "turn {} took {:.1} s (bound {} s)",
                    turn.turn_id,
                    turn.took.as_secs_f64(),
                    BOUND.as_secs()
                ));
            }
            if let Err(error) = &turn.order {
                self.fail(format!("turn {}: {error}", turn.turn_id));
            }
        }
        let silent: Vec<String> = turns
            .iter()
            .filter(|t| t.silences > 0)
            .map(|t| format!("{} ({:?})", t.turn_id, t.via))
            .collect();
        self.row(
            "turns whose client heard nothing for 20 s and reconnected",
            silent.len(),
        );
        if !silent.is_empty() {
            self.fail(format!(
                "silent relays (the gateway rechecks every second): {}",
                silent.join(", ")
            ));
        }
        let contiguous = turns.iter().filter(|t| t.order.is_ok()).count();
        self.row("turns with contiguous `seq`, no repeats", contiguous);
        let longest = turns.iter().map(|t| t.took).max().unwrap_or_default();
        self.row(
            "longest turn, first send to end",
            format!("{:.1} s", longest.as_secs_f64()),
        );

        let ended = |end: &str| scans.iter().filter(|s| s.end == end).count();
        self.row("scans accepted", scans.len());
        self.row("scans ended `result`", ended("result"));
        self.row("scans ended `error`", ended("error"));
        self.row(
            "scans reconnected with Last-Event-ID",
            scans.iter().filter(|s| s.connections > 1).count(),
        );
        for scan in scans {
            if scan.end != "result" && scan.end != "error" {
                self.fail(format!("scan {} ended {}", scan.scan_id, scan.end));
            }
            if scan.took > BOUND {
                self.fail(format!(
                    "scan {} took {:.1} s (bound {} s)",
                    scan.scan_id,
                    scan.took.as_secs_f64(),
                    BOUND.as_secs()
                ));
            }
            if let Err(error) = &scan.order {
                self.fail(format!("scan {}: {error}", scan.scan_id));
            }
        }
        let silent = scans.iter().filter(|s| s.silences > 0).count();
        self.row(
            "scans whose client heard nothing for 20 s and reconnected",
            silent,
        );
        let contiguous = scans.iter().filter(|s| s.order.is_ok()).count();
        self.row("scans with contiguous SSE ids, no repeats", contiguous);
        let longest = scans.iter().map(|s| s.took).max().unwrap_or_default();
        self.row(
            "longest scan, upload to last event",
            format!("{:.1} s", longest.as_secs_f64()),
        );
    }

    async fn in_postgres(
        &mut self,
        topology: &Topology,
        turns: &[super::TurnSeen],
        scans: &[super::ScanSeen],
    ) {
        let pg = &topology.pg;
        let database = topology.database.as_str();
        let count = |sql: &'static str| {
            pg.psql(database, sql)
                .ok()
                .and_then(|c| c.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        let caught_up = testkit::wait_for("Postgres to catch up", Duration::from_secs(120), || {
            let done = count("select count(*) from turns") >= turns.len()
                && count("select count(*) from scans where status in ('done', 'failed')")
                    >= scans.len();
            async move { done.then_some(()) }
        })
        .await;
        if let Err(error) = caught_up {
            self.fail(error.to_string());
        }
        let rows = pg
            .psql(
                database,
                "select turn_id, finish_reason, replace(assistant_text, E'\\n', ' ') from turns",
            )
            .unwrap_or_default();
        let mut stored: HashMap<&str, (&str, &str)> = HashMap::new();
        let mut repeated = 0;
        for line in rows.lines() {
            let mut parts = line.splitn(3, '|');
            let (Some(id), Some(reason)) = (parts.next(), parts.next()) else {
                continue;
            };
            if stored
                .insert(id, (reason, parts.next().unwrap_or("")))
                .is_some()
            {
                repeated += 1;
            }
        }
        let accepted: HashSet<&str> = turns.iter().map(|t| t.turn_id.as_str()).collect();
        let (mut once, mut same_text) = (0, 0);
        for turn in turns {
            let Some((reason, text)) = stored.get(turn.turn_id.as_str()) else {
                let frames = stored_frames(topology, &turn.turn_id).await;
                self.fail(format!(
                    "turn {} ({:?}, {} connections) is not in Postgres; stored frames: {frames}",
                    turn.turn_id, turn.via, turn.connections
                ));
                continue;
            };
            once += 1;
            if End::Finished((*reason).to_owned()) != turn.end {
                self.fail(format!(
                    "turn {}: Postgres says {reason}, its client saw {:?}",
                    turn.turn_id, turn.end
                ));
            } else if text.trim_end() != turn.text.trim_end() {
                let frames = stored_frames(topology, &turn.turn_id).await;
                self.fail(format!(
                    "turn {} ({:?}, {} connections, error {:?}): Postgres has {text:?}, its client ended with {:?}; stored frames: {frames}",
                    turn.turn_id, turn.via, turn.connections, turn.error, turn.text
                ));
            } else {
                same_text += 1;
            }
        }
        let unknown = stored.keys().filter(|id| !accepted.contains(*id)).count();
        if unknown > 0 || repeated > 0 {
            self.fail(format!(
                "Postgres has {unknown} turns no client was given and {repeated} repeated rows"
            ));
        }
        self.row("turns in Postgres exactly once", once);
        self.row(
            "turns whose stored text is what the client ended with",
            same_text,
        );
        self.row("turns in Postgres no client was given", unknown);

        let rows = pg
            .psql(
                database,
                "select scan_id, status, replace(coalesce(answer, ''), E'\\n', ' ') from scans",
            )
            .unwrap_or_default();
        let mut stored: HashMap<&str, (&str, &str)> = HashMap::new();
        for line in rows.lines() {
            let mut parts = line.splitn(3, '|');
            if let (Some(id), Some(status)) = (parts.next(), parts.next()) {
                stored.insert(id, (status, parts.next().unwrap_or("")));
            }
        }
        let (mut once, mut same) = (0, 0);
        for scan in scans {
            let Some((status, answer)) = stored.get(scan.scan_id.as_str()) else {
                self.fail(format!("scan {} is not in Postgres", scan.scan_id));
                continue;
            };
            once += 1;
            let expected = if scan.end == "result" {
                "done"
            } else {
                "failed"
            };
            let client_answer = scan.answer.clone().unwrap_or_default().replace('\n', " ");
            if *status != expected || answer.trim_end() != client_answer.trim_end() {
                self.fail(format!(
                    "scan {}: Postgres has {status} {answer:?}, its client saw {} {:?}",
                    scan.scan_id, scan.end, scan.answer
                ));
            } else {
                same += 1;
            }
        }
        self.row("scans in Postgres exactly once", once);
        self.row(
            "scans whose stored status and answer are what the client saw",
            same,
        );
        let given: HashSet<&str> = scans.iter().map(|s| s.scan_id.as_str()).collect();
        let unknown = stored.keys().filter(|id| !given.contains(*id)).count();
        self.row(
            "scans in Postgres whose upload answer was lost (connection cut)",
            unknown,
        );
    }

    async fn dead_letters(
        &mut self,
        topology: &Topology,
        turns: &[super::TurnSeen],
        scans: &[super::ScanSeen],
    ) {
        let letters = match read_dead_letters(topology).await {
            Ok(letters) => letters,
            Err(error) => {
                self.fail(format!("cannot read the dead letters: {error:#}"));
                return;
            }
        };
        let ids = |subject: &str, field: &str| -> HashSet<String> {
            letters
                .iter()
                .filter(|(s, _)| s == subject)
                .filter_map(|(_, payload)| payload[field].as_str().map(str::to_owned))
                .collect()
        };
        let chat = ids("dlq.chat", "turn_id");
        let scan = ids("dlq.scan", "scan_id");
        let failed: Vec<&str> = turns
            .iter()
            .filter(|t| t.end == End::Finished("error".into()))
            .map(|t| t.turn_id.as_str())
            .collect();
        let mut with_letter = 0;
        for id in &failed {
            if chat.contains(*id) {
                with_letter += 1;
            } else {
                self.fail(format!("failed turn {id} has no dead letter on dlq.chat"));
            }
        }
        self.row(
            "failed turns with their dead letter",
            format!("{with_letter} / {}", failed.len()),
        );
        let stray = chat
            .iter()
            .filter(|id| !failed.contains(&id.as_str()))
            .count();
        if stray > 0 {
            self.fail(format!(
                "{stray} dead letters on dlq.chat for turns their clients saw succeed"
            ));
        }
        let failed_scans: Vec<&str> = scans
            .iter()
            .filter(|s| s.end == "error")
            .map(|s| s.scan_id.as_str())
            .collect();
        let lettered = failed_scans.iter().filter(|id| scan.contains(**id)).count();
        if lettered < failed_scans.len() {
            self.fail(format!(
                "{} failed scans have no dead letter on dlq.scan",
                failed_scans.len() - lettered
            ));
        }
        self.row(
            "failed scans with their dead letter",
            format!("{lettered} / {}", failed_scans.len()),
        );
        let poison = letters
            .iter()
            .filter(|(s, _)| s == "dlq.turns" || s == "dlq.scans")
            .count();
        if poison > 0 {
            self.fail(format!(
                "{poison} records the persisters could not store (dlq.turns, dlq.scans)"
            ));
        }
        self.row("records dead-lettered by the persisters", poison);
    }

    /// Every reward a client was shown is granted in Postgres once, at most
    /// one scan per user and character was told `new`, and each user's
    /// collection counts what its scans earned.
    async fn rewards(&mut self, topology: &Topology, scans: &[super::ScanSeen]) {
        let pg = &topology.pg;
        let database = topology.database.as_str();
        let rewarded: Vec<&super::ScanSeen> = scans.iter().filter(|s| s.reward.is_some()).collect();
        let expected = rewarded.len();
        let caught_up = testkit::wait_for("grants in Postgres", Duration::from_secs(60), || {
            let n = pg
                .psql(database, "select count(*) from reward_grants")
                .ok()
                .and_then(|c| c.trim().parse::<usize>().ok())
                .unwrap_or(0);
            async move { (n >= expected).then_some(()) }
        })
        .await;
        if let Err(error) = caught_up {
            self.fail(error.to_string());
        }
        let rows = pg
            .psql(database, "select scan_id, character_id from reward_grants")
            .unwrap_or_default();
        let granted: HashMap<&str, &str> = rows.lines().filter_map(|l| l.split_once('|')).collect();
        let mut once = 0;
        let mut earned: HashMap<(&str, &str), (usize, usize)> = HashMap::new();
        for scan in &rewarded {
            let (character, new) = scan.reward.as_ref().expect("filtered");
            let entry = earned
                .entry((scan.user.as_str(), character.as_str()))
                .or_default();
            entry.0 += 1;
            entry.1 += usize::from(*new);
            match granted.get(scan.scan_id.as_str()) {
                Some(c) if c == character => once += 1,
                other => self.fail(format!(
                    "scan {} showed {character}, Postgres granted {other:?}",
                    scan.scan_id
                )),
            }
        }
        self.row("rewards shown", expected);
        self.row(
            "rewards granted in Postgres once, the character shown",
            once,
        );
        let strays = granted.len().saturating_sub(expected);
        if strays > 0 {
            self.fail(format!(
                "{strays} grants for scans whose clients were shown no reward"
            ));
        }
        let collection = pg
            .psql(
                database,
                "select user_id, character_id, times_earned from my_characters",
            )
            .unwrap_or_default();
        let mut counted = 0;
        for line in collection.lines() {
            let parts: Vec<&str> = line.split('|').collect();
            let [user, character, times] = parts[..] else {
                continue;
            };
            if user.starts_with("scan")
                && let Some((shown, _)) = earned.get(&(user, character))
                && times.trim().parse::<usize>().ok() == Some(*shown)
            {
                counted += 1;
            }
        }
        let told_new_twice = earned.values().filter(|(_, new)| *new > 1).count();
        if told_new_twice > 0 {
            self.fail(format!(
                "{told_new_twice} characters were `new` to one user twice"
            ));
        }
        if counted != earned.len() {
            self.fail(format!(
                "{} of {} collections count what their scans earned",
                counted,
                earned.len()
            ));
        }
        self.row(
            "collections counting exactly the rewards shown",
            format!("{counted} / {}", earned.len()),
        );
    }

    fn timing(
        &mut self,
        turns: &[super::TurnSeen],
        faults: &[Fault],
        started: Instant,
        ended: Instant,
    ) {
        let during = |at: Instant| faults.iter().any(|f| at >= f.from && at <= f.to + SETTLE);
        let total = (ended - started).as_secs_f64();
        let faulty: f64 = faults
            .iter()
            .map(|f| ((f.to + SETTLE).min(ended) - f.from).as_secs_f64())
            .sum::<f64>()
            .min(total);
        for (phase, in_phase, secs) in [
            ("between faults", false, total - faulty),
            ("during faults (until 5 s after healing)", true, faulty),
        ] {
            let mine: Vec<&super::TurnSeen> = turns
                .iter()
                .filter(|t| t.sent_at <= ended && during(t.sent_at) == in_phase)
                .collect();
            let ttfts = mine
                .iter()
                .filter_map(|t| t.ttft)
                .map(|d| d.saturating_sub(UPSTREAM_TTFT).as_secs_f64() * 1000.0)
                .collect();
            self.phases
                .push((phase.to_owned(), secs, mine.len(), ttfts));
        }
    }

    /// The report: counts, then throughput and added TTFT per phase.
    pub fn table(&self, what: &str, secs: u64, seed: u64) -> String {
        let mut out = format!(
            "\nchaos run: {what}, {secs} s of load, CHAOS_SEED={seed}\n\n| check | count |\n|---|---|\n"
        );
        for (check, count) in &self.rows {
            let _ = writeln!(out, "| {check} | {count} |");
        }
        out.push_str("\n| phase | seconds | turns started | turns/s | added TTFT p50 / p99 (ms) |\n|---|---|---|---|---|\n");
        for (phase, secs, count, ttfts) in &self.phases {
            let mut sorted = ttfts.clone();
            sorted.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                sorted
                    .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            let _ = writeln!(
                out,
                "| {phase} | {secs:.0} | {count} | {:.1} | {:.1} / {:.1} |",
                *count as f64 / secs.max(1.0),
                pct(0.5),
                pct(0.99)
            );
        }
        out.push_str(&format!("\nbroken promises: {}\n", self.failures.len()));
        out
    }
}

/// A turn's stored frames in `CHAT_TOK`, as `kind seq` (for a failure).
async fn stored_frames(topology: &Topology, turn_id: &str) -> String {
    let frames = async {
        let js = jetstream::new(topology.bus.admin().await?);
        let stored = bus::replay::messages(
            &js,
            bus::streams::CHAT_TOK,
            &format!("chat.tok.*.{turn_id}"),
        )
        .await?;
        let mut out = Vec::new();
        for message in stored {
            let parts: Vec<String> = bus::batch::split(&message.payload)
                .map(|f| format!("{:?} {:?}", f.kind, f.seq))
                .collect();
            out.push(format!("#{} [{}]", message.sequence, parts.join(", ")));
        }
        anyhow::Ok(out.join(" "))
    };
    frames
        .await
        .unwrap_or_else(|e| format!("unreadable: {e:#}"))
}

/// Every dead letter: its subject and the payload it carries, parsed.
async fn read_dead_letters(topology: &Topology) -> anyhow::Result<Vec<(String, Value)>> {
    let js = jetstream::new(topology.bus.admin().await?);
    let mut stream = js.get_stream(bus::streams::DLQ).await?;
    let state = stream.info().await?.state.clone();
    let mut letters = Vec::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let letter: Value = serde_json::from_slice(&message.payload)?;
        let payload = letter["payload"]
            .as_str()
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(Value::Null);
        letters.push((message.subject.to_string(), payload));
    }
    Ok(letters)
}
