//! Memory per idle authenticated WebSocket: a gateway in its own process (so
//! its resident memory holds only server-side sockets), `K` connections
//! opened in steps, each proven live by a `ping`/`pong` round trip, and the
//! gateway's `VmRSS` read from `/proc/<pid>/status` after each step.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::{load, procfs, stack};

/// What the memory phase measured.
#[derive(Debug, Clone)]
pub struct IdleResult {
    /// Connections asked for.
    pub requested: usize,
    /// Connections held at the end (after the descriptor limit was applied).
    pub held: usize,
    /// Why fewer than requested were opened, if so.
    pub limited_by: Option<String>,
    /// What ran as the gateway process.
    pub program: String,
    /// `(connections, gateway RSS)` after each step, starting at 0.
    pub steps: Vec<(usize, procfs::Rss)>,
    /// This process's (the clients') RSS growth over the phase, KiB.
    pub client_growth_kb: i64,
    /// Time to open all of them.
    pub open_time: Duration,
    /// Connections that failed to open or to answer.
    pub failures: usize,
}

impl IdleResult {
    /// Gateway RSS growth per connection, KiB: (last - first) / held.
    pub fn kb_per_connection(&self) -> Option<f64> {
        let (first, last) = (self.steps.first()?, self.steps.last()?);
        (last.0 > first.0)
            .then(|| (last.1.total_kb as f64 - first.1.total_kb as f64) / (last.0 - first.0) as f64)
    }

    /// Least-squares slope of RSS over connections, KiB per connection.
    pub fn slope_kb(&self) -> Option<f64> {
        let n = self.steps.len() as f64;
        if self.steps.len() < 3 {
            return None;
        }
        let mean_x = self.steps.iter().map(|s| s.0 as f64).sum::<f64>() / n;
        let mean_y = self.steps.iter().map(|s| s.1.total_kb as f64).sum::<f64>() / n;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (x, y) in &self.steps {
            let dx = *x as f64 - mean_x;
            sxy += dx * (y.total_kb as f64 - mean_y);
            sxx += dx * dx;
        }
        (sxx > 0.0).then(|| sxy / sxx)
    }

    /// Growth of anonymous memory (heap, stacks) per connection, KiB.
    pub fn anon_kb_per_connection(&self) -> Option<f64> {
        let (first, last) = (self.steps.first()?, self.steps.last()?);
        (last.0 > first.0)
            .then(|| (last.1.anon_kb as f64 - first.1.anon_kb as f64) / (last.0 - first.0) as f64)
    }
}

/// The memory phase of a run: skipped when `requested` is 0, its failure
/// kept for the report rather than ending the run.
pub fn phase(
    runtime: &tokio::runtime::Runtime,
    requested: usize,
    steps: usize,
    gateway_bin: Option<PathBuf>,
    nats_url: &str,
) -> Option<Result<IdleResult, String>> {
    if requested == 0 {
        return None;
    }
    crate::say(&format!(
        "Idle phase: up to {requested} authenticated WebSockets."
    ));
    let idle = runtime.block_on(run(requested, steps, gateway_bin, nats_url));
    Some(idle.map_err(|e| format!("{e:#}")))
}

/// Opens up to `requested` idle connections in `steps` steps and reads the
/// gateway process's RSS after each.
///
/// # Errors
/// When the gateway process cannot start.
pub async fn run(
    requested: usize,
    steps: usize,
    gateway_bin: Option<PathBuf>,
    nats_url: &str,
) -> anyhow::Result<IdleResult> {
    let secret = stack::run_secret();
    let mut gateway = stack::GatewayProcess::start(gateway_bin, nats_url, &secret).await?;
    let pid = gateway.pid().to_string();

    // Both ends need a descriptor per connection: leave room for what each
    // process already has open plus some slack.
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).context("reading RLIMIT_NOFILE")?;
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    let busiest = procfs::open_fds("self").max(procfs::open_fds(&pid));
    let room = soft.saturating_sub(busiest + 64);
    let target = requested.min(room);
    let limited_by = (target < requested).then(|| {
        format!(
            "RLIMIT_NOFILE is {soft} (the hard limit; raising it needs CAP_SYS_RESOURCE), \
             and the gateway and this tool each need one descriptor per connection"
        )
    });

    let token = stack::token_for(&secret, "idle-user")?;
    let stop = CancellationToken::new();
    let addr = gateway.addr;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);

    // Warm the gateway's allocator and runtime with a round of short-lived
    // connections, so the first step does not pay one-off costs.
    let warm_stop = CancellationToken::new();
    let (warm, _) = open(addr, &token, config, 200.min(target.max(1)), &warm_stop).await;
    warm_stop.cancel();
    for task in warm {
        let _ = task.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let client_before = procfs::rss("self")?;
    let mut result = IdleResult {
        requested,
        held: 0,
        limited_by,
        program: gateway.program.clone(),
        steps: vec![(0, procfs::rss(&pid)?)],
        client_growth_kb: 0,
        open_time: Duration::ZERO,
        failures: 0,
    };
    let started = std::time::Instant::now();
    let mut held = Vec::with_capacity(target);
    let steps = steps.max(1);
    for step in 1..=steps {
        let goal = target * step / steps;
        let (opened, failures) = open(addr, &token, config, goal - held.len(), &stop).await;
        held.extend(opened);
        result.failures += failures;
        result.open_time = started.elapsed();
        // Let the sessions settle before reading.
        tokio::time::sleep(Duration::from_millis(700)).await;
        result.steps.push((held.len(), procfs::rss(&pid)?));
        eprintln!(
            "[loadgen] idle: {} connections, gateway RSS {} KiB",
            held.len(),
            result.steps.last().map_or(0, |s| s.1.total_kb)
        );
    }
    result.held = held.len();
    result.client_growth_kb = procfs::rss("self")?.total_kb as i64 - client_before.total_kb as i64;

    // Kill the server first, so the TIME_WAIT states land on its side.
    gateway.kill();
    stop.cancel();
    for task in held {
        let _ = task.await;
    }
    Ok(result)
}

/// Opens `count` connections (at most 256 handshakes at once); each answers
/// a `ping` with `pong` before it counts, then idles in a task that keeps
/// answering the server's pings until `stop`.
async fn open(
    addr: std::net::SocketAddr,
    token: &str,
    config: WebSocketConfig,
    count: usize,
    stop: &CancellationToken,
) -> (Vec<tokio::task::JoinHandle<()>>, usize) {
    let results = futures::stream::iter(0..count)
        .map(|_| async move {
            let mut socket = load::connect_ws(addr, token, Some(config)).await?;
            socket
                .send(Message::Text(r#"{"type":"ping"}"#.into()))
                .await?;
            loop {
                let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
                    .await
                    .context("no pong within 30 s")?
                    .context("closed before pong")??;
                if let Message::Text(text) = message
                    && text.contains("\"pong\"")
                {
                    return anyhow::Ok(socket);
                }
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let mut tasks = Vec::with_capacity(count);
    let mut failures = 0;
    for result in results {
        match result {
            Ok(mut socket) => {
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            message = socket.next() => if !matches!(message, Some(Ok(_))) { break },
                        }
                    }
                }));
            }
            Err(_) => failures += 1,
        }
    }
    (tasks, failures)
}
