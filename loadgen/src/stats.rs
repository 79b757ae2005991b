//! Turning per-turn observations into the numbers the report prints:
//! percentiles, token rates over the whole phase and over the plateau where
//! every client was streaming, and a tally of what failed verification.

use std::time::Duration;

/// What one client saw of one turn (baseline or gateway alike).
#[derive(Debug, Clone, Default)]
pub struct TurnObservation {
    /// From just before the request was sent to the first token's arrival.
    pub ttft: Option<Duration>,
    /// Arrival of each token, in microseconds since the phase's epoch.
    pub token_times_us: Vec<u64>,
    /// Token frames that were expected but never arrived.
    pub missing: u64,
    /// Token frames that arrived more than once.
    pub duplicates: u64,
    /// Token frames that arrived with a `seq` other than the next one.
    pub out_of_order: u64,
    /// Why the turn failed verification; `None` when it passed.
    pub problem: Option<String>,
}

/// A phase's turns plus the client each belongs to, reduced to figures.
#[derive(Debug, Clone, Default)]
pub struct PhaseStats {
    /// Turns measured.
    pub turns: usize,
    /// Turns that passed verification.
    pub verified: usize,
    /// Time to first token of every turn that saw one, sorted, in ms.
    pub ttft_ms: Vec<f64>,
    /// Gaps between consecutive tokens of a turn, sorted, in ms.
    pub gap_ms: Vec<f64>,
    /// Token frames received.
    pub tokens: u64,
    /// Token frames per second from the first token to the last.
    pub rate_whole: f64,
    /// Token frames per second while every client was streaming (between
    /// the last client's first token and the first client's last token);
    /// `None` when that window was too short to measure.
    pub rate_plateau: Option<f64>,
    /// Length of the plateau window.
    pub plateau: Duration,
    /// First token to last token, all clients.
    pub window: Duration,
    /// Expected token frames that never arrived (all turns).
    pub missing: u64,
    /// Token frames delivered twice.
    pub duplicates: u64,
    /// Token frames out of order.
    pub out_of_order: u64,
    /// Up to five distinct failure reasons, with counts.
    pub problems: Vec<(String, usize)>,
}

fn tally(problems: &mut Vec<(String, usize)>, problem: &str) {
    if let Some(entry) = problems.iter_mut().find(|(p, _)| p == problem) {
        entry.1 += 1;
    } else if problems.len() < 5 {
        problems.push((problem.to_owned(), 1));
    }
}

/// The `p`-th percentile (0-100) of sorted `values`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of sorted `values`.
pub fn median(sorted: &[f64]) -> f64 {
    percentile(sorted, 50.0)
}

/// Reduces the turns of one phase. `per_client` holds, for each client, the
/// turns it ran in order (warm-up turns included: they count towards the
/// token rates, since their frames share the wire, but not towards TTFT).
pub fn reduce(per_client: &[Vec<(bool, TurnObservation)>]) -> PhaseStats {
    let mut stats = PhaseStats::default();
    let mut all_times = Vec::new();
    let mut client_first = Vec::new();
    let mut client_last = Vec::new();
    let mut problems: Vec<(String, usize)> = Vec::new();
    for turns in per_client {
        let mut first = None;
        let mut last = None;
        for (measured, turn) in turns {
            all_times.extend_from_slice(&turn.token_times_us);
            if let (Some(&a), Some(&b)) = (turn.token_times_us.first(), turn.token_times_us.last())
            {
                first = Some(first.map_or(a, |f: u64| f.min(a)));
                last = Some(last.map_or(b, |l: u64| l.max(b)));
            }
            if !measured {
                // A failed warm-up turn usually kills its connection: say why.
                if let Some(problem) = &turn.problem {
                    tally(&mut problems, &format!("warm-up turn: {problem}"));
                }
                continue;
            }
            stats.turns += 1;
            if let Some(ttft) = turn.ttft {
                stats.ttft_ms.push(ttft.as_secs_f64() * 1e3);
            }
            for pair in turn.token_times_us.windows(2) {
                stats
                    .gap_ms
                    .push(pair[1].saturating_sub(pair[0]) as f64 / 1e3);
            }
            stats.missing += turn.missing;
            stats.duplicates += turn.duplicates;
            stats.out_of_order += turn.out_of_order;
            match &turn.problem {
                None => stats.verified += 1,
                Some(problem) => tally(&mut problems, problem),
            }
        }
        if let (Some(f), Some(l)) = (first, last) {
            client_first.push(f);
            client_last.push(l);
        }
    }
    stats.problems = problems;
    stats.ttft_ms.sort_by(f64::total_cmp);
    stats.gap_ms.sort_by(f64::total_cmp);
    all_times.sort_unstable();
    stats.tokens = all_times.len() as u64;
    if let (Some(&first), Some(&last)) = (all_times.first(), all_times.last()) {
        let window = last.saturating_sub(first);
        stats.window = Duration::from_micros(window);
        if window > 0 {
            stats.rate_whole = stats.tokens as f64 / (window as f64 / 1e6);
        }
    }
    // The plateau: every client had started streaming and none had finished.
    if let (Some(&start), Some(&end)) = (client_first.iter().max(), client_last.iter().min())
        && end > start
    {
        let inside =
            all_times.partition_point(|&t| t <= end) - all_times.partition_point(|&t| t < start);
        let length = end - start;
        stats.plateau = Duration::from_micros(length);
        // Shorter than 200 ms is too noisy to call a rate.
        if length >= 200_000 {
            stats.rate_plateau = Some(inside as f64 / (length as f64 / 1e6));
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn rates_cover_the_whole_phase_and_the_plateau() {
        let turn = |times: Vec<u64>| {
            (
                true,
                TurnObservation {
                    ttft: Some(Duration::from_millis(1)),
                    token_times_us: times,
                    ..Default::default()
                },
            )
        };
        // Two clients: one streams 0..1 s, the other 0.5..1.5 s, 11 tokens each.
        let a: Vec<u64> = (0..=10).map(|i| i * 100_000).collect();
        let b: Vec<u64> = (0..=10).map(|i| 500_000 + i * 100_000).collect();
        let stats = reduce(&[vec![turn(a)], vec![turn(b)]]);
        assert_eq!(stats.tokens, 22);
        assert_eq!(stats.verified, 2);
        assert!((stats.rate_whole - 22.0 / 1.5).abs() < 1e-9);
        assert_eq!(stats.plateau, Duration::from_millis(500));
        // 0.5..1.0 s holds 6 of a's and 6 of b's tokens.
        assert!((stats.rate_plateau.unwrap() - 12.0 / 0.5).abs() < 1e-9);
        assert_eq!(stats.gap_ms.len(), 20);
    }
}
