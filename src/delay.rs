//! The one backoff schedule behind every wait-and-try-again of the
//! library: exponential (factor 2) with +-20% jitter, from an initial delay
//! up to a cap. Relay reconnects, a row's publish backoff, the relay's and
//! the worker's database steps and the wake-up connections all use it.
//!
//! Listener retries are not this: their delays are a list of fixed steps,
//! one retry queue each ([`ListenerOptions::backoff`](crate::ListenerOptions::backoff)).

use std::time::Duration;

use backoff::backoff::Backoff as _;

/// Jitter, as a fraction of the delay either way: enough that processes
/// failing together do not come back in step.
const JITTER: f64 = 0.2;

/// An exponential backoff with jitter; [`Backoff::next_delay`] gives the
/// wait before each next try, [`Backoff::reset`] starts over after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    schedule: backoff::ExponentialBackoff,
}

impl Backoff {
    /// Starts at `initial` (jittered), doubling up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            schedule: backoff::ExponentialBackoff {
                initial_interval: initial,
                current_interval: initial,
                randomization_factor: JITTER,
                multiplier: 2.0,
                max_interval: max,
                max_elapsed_time: None,
                ..backoff::ExponentialBackoff::default()
            },
        }
    }

    /// The delay of `failures` earlier failures: the `failures + 1`-th
    /// [`next_delay`](Self::next_delay) of a fresh schedule.
    pub(crate) fn nth(initial: Duration, max: Duration, failures: u32) -> Duration {
        let mut schedule = Self::new(initial, max);
        let mut delay = schedule.next_delay();
        for _ in 0..failures.min(64) {
            delay = schedule.next_delay();
        }
        delay
    }

    /// The next wait (jittered, never over the cap), and doubles the one
    /// after it.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let max = self.schedule.max_interval;
        self.schedule.next_backoff().unwrap_or(max).min(max)
    }

    /// The wait the next [`next_delay`](Self::next_delay) is around, without
    /// jitter: for log lines.
    pub(crate) fn upcoming(&self) -> Duration {
        self.schedule.current_interval
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.schedule.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let within = |d: Duration, around: u64| {
            d >= Duration::from_millis(around * 8 / 10) && d <= Duration::from_millis(around * 12 / 10)
        };
        assert!(within(delays[0], 100), "{delays:?}");
        assert!(within(delays[1], 200), "{delays:?}");
        assert!(within(delays[2], 400), "{delays:?}");
        assert!(within(delays[3], 800), "{delays:?}");
        assert!(delays[4..].iter().all(|d| within(*d, 1000)), "{delays:?}");
        backoff.reset();
        assert_eq!(backoff.upcoming(), Duration::from_millis(100));
        assert!(within(backoff.next_delay(), 100));
    }

    #[test]
    fn nth_counts_earlier_failures() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let first = Backoff::nth(initial, max, 0);
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        let third = Backoff::nth(initial, max, 2);
        assert!(third >= Duration::from_millis(3200) && third <= Duration::from_millis(4800));
        assert!(Backoff::nth(initial, max, 1000) <= max);
    }
}
