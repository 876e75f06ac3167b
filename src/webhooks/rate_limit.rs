//! Per-endpoint rate limits in one worker process. An endpoint limited to
//! `N` per second has at most `N` requests that are either in flight or
//! answered less than [`WINDOW`] ago: a request is counted from before it
//! is sent until a second after its answer (or failure) came back. So no
//! second at the receiver sees more than `N` arrive, whatever the network
//! and scheduling delays: any request that arrived within a second before
//! a new one is sent was either still in flight or answered within that
//! second, and is counted.
//!
//! A delivery that finds no room waits for it on its handler thread while
//! room is near (within [`MAX_WAIT`], and no more than [`MAX_WAITING`]
//! deliveries of the endpoint waiting already); otherwise it is deferred to
//! the broker's retry queues without counting a try
//! (`ListenerError::Deferred`), so a limited endpoint never holds most of
//! the worker's concurrency. Several worker processes each allow the
//! limit: with `k` of them the endpoint may get up to `k` times it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long after its answer a request still counts.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);
/// The longest a delivery waits on its thread for room.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(500);
/// Deliveries of one endpoint that may wait on threads at once.
pub(crate) const MAX_WAITING: usize = 4;
/// How often a waiting delivery looks for room while requests are in
/// flight (their answer time, and so the room, is not known yet).
const POLL: Duration = Duration::from_millis(10);
/// The least a deferred delivery is deferred for.
const MIN_DEFER: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Counted {
    /// Requests in flight.
    in_flight: usize,
    /// When answered requests of the last [`WINDOW`] were answered, oldest
    /// first.
    answered: std::collections::VecDeque<Instant>,
    /// Deliveries waiting on threads for room.
    waiting: usize,
}

/// The requests counted per endpoint (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct EndpointLimiter {
    counted: Mutex<HashMap<i64, Counted>>,
}

/// Room for one request to an endpoint: counted as in flight until
/// dropped, then as answered for [`WINDOW`].
pub(crate) struct Permit {
    limiter: Arc<EndpointLimiter>,
    id: i64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counted = self.limiter.lock();
        if let Some(endpoint) = counted.get_mut(&self.id) {
            endpoint.in_flight = endpoint.in_flight.saturating_sub(1);
            endpoint.answered.push_back(Instant::now());
        }
    }
}

impl EndpointLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Counted>> {
        self.counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Room for a request to endpoint `id` limited to `per_second`, waited
    /// for on this thread while it is near; `Err(wait)`: defer for at least
    /// `wait`.
    pub(crate) fn acquire(self: &Arc<Self>, id: i64, per_second: u32) -> Result<Permit, Duration> {
        let limit = usize::try_from(per_second.max(1)).unwrap_or(usize::MAX);
        let started = Instant::now();
        let mut waiting = false;
        loop {
            let now = Instant::now();
            let mut counted = self.lock();
            let endpoint = counted.entry(id).or_default();
            while endpoint.answered.front().is_some_and(|at| *at + WINDOW <= now) {
                endpoint.answered.pop_front();
            }
            if endpoint.in_flight + endpoint.answered.len() < limit {
                endpoint.in_flight += 1;
                if waiting {
                    endpoint.waiting -= 1;
                }
                return Ok(Permit {
                    limiter: Arc::clone(self),
                    id,
                });
            }
            // Room comes when the oldest answer leaves the window; with
            // only requests in flight, not known yet.
            let room_in = endpoint
                .answered
                .front()
                .filter(|_| endpoint.in_flight < limit)
                .map(|at| *at + WINDOW - now);
            let near = room_in.is_none_or(|wait| started.elapsed() + wait <= MAX_WAIT)
                && started.elapsed() < MAX_WAIT;
            if !near || (!waiting && endpoint.waiting >= MAX_WAITING) {
                if waiting {
                    endpoint.waiting -= 1;
                }
                return Err(room_in.unwrap_or(WINDOW).max(MIN_DEFER));
            }
            if !waiting {
                endpoint.waiting += 1;
                waiting = true;
            }
            drop(counted);
            std::thread::sleep(room_in.unwrap_or(POLL).min(POLL));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_while_in_flight_and_a_window_after_its_answer() {
        let limiter = Arc::new(EndpointLimiter::default());
        let first = limiter.acquire(1, 2).ok();
        let second = limiter.acquire(1, 2).ok();
        assert!(first.is_some() && second.is_some());
        let started = Instant::now();
        assert!(limiter.acquire(1, 2).is_err(), "two in flight: no room");
        assert!(started.elapsed() >= MAX_WAIT / 2, "it waited for room first");
        assert!(limiter.acquire(2, 2).is_ok(), "another endpoint has its own room");
        drop(first);
        let answered = Instant::now();
        // Room again a window after the answer, not before.
        let third = limiter.acquire(1, 2);
        assert!(third.is_err(), "the answer counts for a window");
        drop(second);
        let mut waited = None;
        for _ in 0..60 {
            if let Ok(permit) = limiter.acquire(1, 2) {
                waited = Some(answered.elapsed());
                drop(permit);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let waited = waited.unwrap_or_default();
        assert!(waited >= WINDOW, "room came {waited:?} after the answer");
    }
}
