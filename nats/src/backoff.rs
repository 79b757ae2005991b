//! Exponential backoff with jitter, the one retry schedule of every service.
//!
//! Each delay is a random point in the upper half of the current step
//! (`first`, doubling, at most `cap`), so many workers that failed together
//! do not retry in step.

use std::time::Duration;

use rand::Rng as _;

/// The delay before retry `attempt` (0 for the first retry).
pub fn delay(first: Duration, attempt: u32, cap: Duration) -> Duration {
    let step = first.saturating_mul(1 << attempt.min(20)).min(cap);
    step.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// A retry schedule that remembers its attempt, for loops that retry until
/// they succeed and then start over.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `first`, doubling up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let delay = delay(self.first, self.attempt, self.cap);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_their_cap_with_jitter_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        let delays: Vec<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(delays.last().unwrap() >= &Duration::from_secs(5));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        let huge = delay(Duration::from_secs(1), 1_000, Duration::from_secs(60));
        assert!(huge >= Duration::from_secs(30) && huge <= Duration::from_secs(60));
    }
}
