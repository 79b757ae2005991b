//! Readings from `/proc`: the machine, a process's resident memory, open
//! descriptors, and CPU time per component (each in-process component runs on
//! its own named Tokio runtime, so its threads' names tell them apart).

use std::{collections::BTreeMap, fs, time::Duration};

/// Thread-name prefixes of the runtimes, and the label each reports as.
pub const COMPONENTS: [(&str, &str); 4] = [
    ("lg-client", "load clients"),
    ("lg-gateway", "gateway"),
    ("lg-streamer", "streamer"),
    ("lg-upstream", "stand-in upstream"),
];

/// What the report says about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// `MemTotal` in GiB.
    pub mem_gib: f64,
    /// `uname -r` equivalent.
    pub kernel: String,
}

/// Reads the machine's description.
pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = field_kb(&meminfo, "MemTotal:").unwrap_or(0);
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        mem_gib: mem_kb as f64 / 1024.0 / 1024.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into()),
    }
}

fn field_kb(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory of a process (`VmRSS` and `RssAnon`), in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    /// All resident pages.
    pub total_kb: u64,
    /// Resident anonymous pages (heap, stacks): what connections cost.
    pub anon_kb: u64,
}

/// Reads `/proc/<pid>/status` (`pid` "self" for this process).
///
/// # Errors
/// When the process is gone.
pub fn rss(pid: &str) -> std::io::Result<Rss> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(Rss {
        total_kb: field_kb(&status, "VmRSS:").unwrap_or(0),
        anon_kb: field_kb(&status, "RssAnon:").unwrap_or(0),
    })
}

/// Open file descriptors of a process.
pub fn open_fds(pid: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The pid of this process's child named `comm` (the testkit nats-server).
pub fn child_named(comm: &str) -> Option<u32> {
    let me = std::process::id();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (name, rest) = parse_stat(&stat)?;
        let ppid: u32 = rest.get(1)?.parse().ok()?;
        (ppid == me && name == comm).then_some(pid)
    })
}

/// Splits a `stat` line into the command name and the fields after it
/// (`rest[0]` is field 3, the state).
fn parse_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((
        &stat[open + 1..close],
        stat[close + 1..].split_whitespace().collect(),
    ))
}

/// CPU time (user + system) from a `stat` line, assuming the usual 100 Hz
/// clock tick.
fn stat_cpu(stat: &str) -> Option<Duration> {
    let (_, rest) = parse_stat(stat)?;
    // Fields 14 and 15 (utime, stime) are rest[11] and rest[12].
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time per component at one instant.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    by_component: BTreeMap<&'static str, Duration>,
    /// Busy time of the whole machine (all CPUs) in process context, from `/proc/stat`.
    machine_busy: Duration,
    /// Interrupt and softirq time of the whole machine (loopback networking
    /// is mostly softirq, and is not charged to any process).
    machine_irq: Duration,
}

/// Label of the CPU that neither this process nor nats-server used.
pub const OTHERS: &str = "other processes";

/// Label of interrupt and softirq time (not charged to any process).
pub const IRQ: &str = "softirq";

/// Time of all CPUs together in the `/proc/stat` columns `fields` (0 user,
/// 1 nice, 2 system, 3 idle, 4 iowait, 5 irq, 6 softirq, 7 steal).
fn machine_time(fields: &[usize]) -> Duration {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .enumerate()
                .filter(|(i, _)| fields.contains(i))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Takes a snapshot: this process's threads grouped by runtime, plus the
/// nats-server child (`nats_pid`).
pub fn cpu_snapshot(nats_pid: Option<u32>) -> CpuSnapshot {
    let processes: Vec<(&'static str, u32)> = nats_pid
        .map(|pid| ("nats-server", pid))
        .into_iter()
        .collect();
    cpu_snapshot_of(&processes)
}

/// Takes a snapshot: this process's threads grouped by runtime, plus each
/// of `processes` (a label and a pid; the process and its descendants).
pub fn cpu_snapshot_of(processes: &[(&'static str, u32)]) -> CpuSnapshot {
    let mut by_component: BTreeMap<&'static str, Duration> = BTreeMap::new();
    if let Ok(tasks) = fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let Some((name, _)) = parse_stat(&stat) else {
                continue;
            };
            let label = COMPONENTS
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))
                .map_or("other threads", |(_, label)| label);
            *by_component.entry(label).or_default() += stat_cpu(&stat).unwrap_or_default();
        }
    }
    if !processes.is_empty() {
        let table = process_table();
        for &(label, pid) in processes {
            *by_component.entry(label).or_default() += tree_cpu(&table, pid);
        }
    }
    CpuSnapshot {
        by_component,
        machine_busy: machine_time(&[0, 1, 2, 7]),
        machine_irq: machine_time(&[5, 6]),
    }
}

/// Every process on the machine: pid, parent pid and CPU time.
fn process_table() -> Vec<(u32, u32, Duration)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = parse_stat(&stat)?.1.get(1)?.parse().ok()?;
            Some((pid, ppid, stat_cpu(&stat)?))
        })
        .collect()
}

/// CPU time of `root` and all its live descendants (a Python server may
/// fork workers).
fn tree_cpu(table: &[(u32, u32, Duration)], root: u32) -> Duration {
    let mut total = Duration::ZERO;
    let mut frontier = vec![root];
    while let Some(pid) = frontier.pop() {
        for &(p, ppid, cpu) in table {
            if p == pid {
                total += cpu;
            }
            if ppid == pid && p != pid {
                frontier.push(p);
            }
        }
    }
    total
}

/// CPU time each component used between two snapshots, unrounded and
/// unfiltered (for CPU per token).
pub fn cpu_time_between(before: &CpuSnapshot, after: &CpuSnapshot) -> Vec<(String, Duration)> {
    after
        .by_component
        .iter()
        .map(|(label, t)| {
            let used = t.saturating_sub(*before.by_component.get(label).unwrap_or(&Duration::ZERO));
            ((*label).to_owned(), used)
        })
        .collect()
}

/// CPU used between two snapshots, as a percentage of one core over `wall`,
/// per component, largest first; the machine's busy time that none of them
/// accounts for is reported as [`OTHERS`] (other work on the machine skews
/// the numbers, so the report shows it).
pub fn cpu_between(
    before: &CpuSnapshot,
    after: &CpuSnapshot,
    wall: Duration,
) -> Vec<(String, f64)> {
    let percent = |t: Duration| 100.0 * t.as_secs_f64() / wall.as_secs_f64().max(1e-9);
    let ours: Duration = after
        .by_component
        .iter()
        .map(|(label, t)| {
            t.saturating_sub(*before.by_component.get(label).unwrap_or(&Duration::ZERO))
        })
        .sum();
    let others = after
        .machine_busy
        .saturating_sub(before.machine_busy)
        .saturating_sub(ours);
    let mut out: Vec<(String, f64)> = after
        .by_component
        .iter()
        .map(|(label, t)| {
            let used = t.saturating_sub(*before.by_component.get(label).unwrap_or(&Duration::ZERO));
            ((*label).to_owned(), percent(used))
        })
        .filter(|(_, pct)| *pct >= 0.5)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out.push((
        IRQ.to_owned(),
        percent(after.machine_irq.saturating_sub(before.machine_irq)),
    ));
    out.push((OTHERS.to_owned(), percent(others)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let stat = "42 (lg-client 1) S 1 42 42 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 1 0";
        let (name, rest) = parse_stat(stat).unwrap();
        assert_eq!(name, "lg-client 1");
        assert_eq!(rest[0], "S");
        assert_eq!(stat_cpu(stat), Some(Duration::from_millis(2000)));
    }

    #[test]
    fn a_process_tree_sums_its_descendants() {
        let ms = Duration::from_millis;
        // 1 -> 10 -> 11, 1 -> 20; 30 is unrelated.
        let table = [
            (1, 0, ms(5)),
            (10, 1, ms(10)),
            (11, 10, ms(20)),
            (20, 1, ms(40)),
            (30, 2, ms(80)),
        ];
        assert_eq!(tree_cpu(&table, 1), ms(75));
        assert_eq!(tree_cpu(&table, 10), ms(30));
        assert_eq!(tree_cpu(&table, 99), Duration::ZERO);
    }

    #[test]
    fn this_process_has_resident_memory() {
        assert!(rss("self").unwrap().total_kb > 0);
        assert!(open_fds("self") > 0);
    }
}
