//! The chaos run: the production topology (2 of each service, the bus
//! secured, on one nats-server or a 3-node R3 cluster) under a mixed
//! workload while a schedule of faults runs, then a check of every promise
//! the README makes at the edges, printed as a table of counts.
//!
//! `CHAOS_SECS` (default 180) sets how long the workload runs; the fault
//! schedule repeats every 180 s. `CHAOS_SEED` replays a run's random choices.

mod clients;
mod topology;
mod verdict;

pub use clients::{Clients, End, ScanSeen, Seen, TurnSeen, Via};
pub use topology::{ACK_WAIT, Bus, Kind, Topology};
pub use verdict::Verdict;

use std::time::Duration;

use testkit::{Quirks, Script};
use tokio::time::Instant;

/// One fault as it ran.
#[derive(Debug, Clone)]
pub struct Fault {
    /// What it was.
    pub name: String,
    /// When it began.
    pub from: Instant,
    /// When the system was whole again.
    pub to: Instant,
}

/// One step of the schedule.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// SIGKILL one service, start it again a second later.
    Kill(Kind, usize),
    /// SIGKILL the node leading `CHAT_TOK`, restart it 5 s later.
    CrashLeader,
    /// SIGTERM and restart every node, one after the other.
    Rolling,
    /// Postgres stopped for 20 s.
    PostgresOutage,
    /// SIGSTOP a streamer for three ack waits, then SIGCONT.
    Freeze(usize),
}

/// Seconds into each 180 s cycle, and what happens then.
const CYCLE: [(u64, Step); 10] = [
    (10, Step::Kill(Kind::Gateway, 0)),
    (22, Step::Kill(Kind::Streamer, 0)),
    (34, Step::Kill(Kind::Persister, 0)),
    (46, Step::CrashLeader),
    (70, Step::Rolling),
    (100, Step::PostgresOutage),
    (130, Step::Freeze(1)),
    (145, Step::Kill(Kind::Gateway, 1)),
    (152, Step::Kill(Kind::Streamer, 1)),
    (159, Step::Kill(Kind::Persister, 1)),
];
const CYCLE_SECS: u64 = 180;

/// The answer every turn gets: 20 tokens, 25 ms apart.
pub fn words() -> Vec<String> {
    (1..=20).map(|i| format!("w{i} ")).collect()
}

/// The stand-in's first-token delay, subtracted to report what we add.
pub const UPSTREAM_TTFT: Duration = Duration::from_millis(25);

/// Runs the chaos run on a cluster (`clustered`) or a single node, and
/// panics with the table when a promise was broken.
pub async fn run(clustered: bool) {
    testkit::init_logs();
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CYCLE_SECS);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros() as u64);
    let what = if clustered {
        "3-node cluster, R3"
    } else {
        "single node, R1"
    };
    eprintln!("chaos: {what}, {secs} s, CHAOS_SEED={seed}");
    let script = Script::new(words(), UPSTREAM_TTFT).with_quirks(Quirks {
        reject_containing: Some(clients::REJECT_MARKER.to_owned()),
        ..Quirks::default()
    });
    let mut topology = Topology::start(clustered, "chaos", script)
        .await
        .expect("the topology starts");
    let clients = Clients::new(topology.gateway_addrs());
    let started = Instant::now();
    let workload = tokio::spawn(clients.clone().run(seed, 6, 2, 2));
    let faults = schedule(&mut topology, started, secs).await;
    let load_ended = Instant::now();
    clients.stop.cancel();
    tokio::time::timeout(clients::HANG + Duration::from_secs(60), workload)
        .await
        .expect("every client finishes its last stream")
        .expect("no client panicked");
    let verdict = Verdict::check(&topology, &clients.seen, &faults, started, load_ended).await;
    eprintln!("{}", verdict.table(what, secs, seed));
    if !verdict.failures.is_empty() {
        topology.dir.disable_cleanup(true);
        eprintln!("chaos: logs kept in {}", topology.dir.path().display());
    }
    assert!(
        verdict.failures.is_empty(),
        "chaos ({what}, CHAOS_SEED={seed}) broke promises:\n{}\n{}",
        verdict.failures.join("\n"),
        topology.log_tails()
    );
}

/// Runs the fault schedule for `secs` from `started`; returns what ran.
async fn schedule(topology: &mut Topology, started: Instant, secs: u64) -> Vec<Fault> {
    let mut faults = Vec::new();
    let cycles = (secs / CYCLE_SECS).max(1);
    for cycle in 0..cycles {
        let base = started + Duration::from_secs(cycle * CYCLE_SECS);
        for (at, step) in CYCLE {
            tokio::time::sleep_until(base + Duration::from_secs(at)).await;
            let from = Instant::now();
            let name = perform(topology, step).await;
            eprintln!(
                "chaos: {name} at {:.1} s, whole again after {:.1} s",
                (from - started).as_secs_f64(),
                from.elapsed().as_secs_f64()
            );
            faults.push(Fault {
                name,
                from,
                to: Instant::now(),
            });
        }
    }
    tokio::time::sleep_until(started + Duration::from_secs(secs)).await;
    faults
}

async fn perform(topology: &mut Topology, step: Step) -> String {
    match step {
        Step::Kill(kind, i) => {
            let service = &mut topology.services(kind)[i];
            service.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            service.start().await.expect("the service restarts");
            format!("SIGKILL {kind:?} {}", i + 1)
        }
        Step::CrashLeader => {
            let leader = topology
                .bus
                .leader_of(bus::streams::CHAT_TOK)
                .await
                .expect("CHAT_TOK has a leader");
            topology
                .bus
                .crash_node(leader, Duration::from_secs(5))
                .await
                .expect("the node comes back");
            format!("SIGKILL nats node {} (CHAT_TOK leader)", leader + 1)
        }
        Step::Rolling => {
            for i in 0..topology.bus.nodes() {
                topology
                    .bus
                    .restart_node(i)
                    .await
                    .expect("the node comes back");
            }
            "rolling restart of the nats nodes".to_owned()
        }
        Step::PostgresOutage => {
            topology.pg.stop().expect("Postgres stops");
            tokio::time::sleep(Duration::from_secs(20)).await;
            topology.pg.start_again().await.expect("Postgres starts");
            "Postgres down 20 s".to_owned()
        }
        Step::Freeze(i) => {
            let streamer = &topology.streamers[i];
            streamer.pause();
            tokio::time::sleep(ACK_WAIT * 3).await;
            streamer.resume();
            format!("SIGSTOP streamer {} for 3 ack waits", i + 1)
        }
    }
}
