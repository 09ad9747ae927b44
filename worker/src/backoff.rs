//! Bounded exponential backoff with jitter, for every retry loop: waits grow from `base` to
//! `max`, each drawn at random from its upper half so that workers failing together (a
//! throttled table, every pod restarting at once) do not retry together.

use std::cell::Cell;
use std::time::Duration;

/// The next wait of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    /// The wait before the next attempt; doubles the one after it, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let upper = self.current;
        self.current = (self.current * 2).min(self.max);
        upper.mul_f64(0.5 + 0.5 * unit_random())
    }

    /// After a success: start again from `base`.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    // Different per thread and per process, never zero (xorshift's fixed point).
    (nanos ^ (std::ptr::addr_of!(local) as u64).rotate_left(32) ^ u64::from(std::process::id())) | 1
}

/// A number in [0, 1) from a per-thread xorshift generator (jitter needs no better).
fn unit_random() -> f64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// How start-up calls are retried after throttling or a transient error: every pod of a
/// StatefulSet restarting at once shares `DescribeStreamSummary`'s 20 calls per second per
/// account. Waiting for the stream ([`crate::worker::Worker::wait_to_start`]) uses these delays
/// without a limit; creating the tables after it gives up after `attempts` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartRetry {
    /// Calls in all, the first included (each is itself retried by the SDK).
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for StartRetry {
    /// 8 calls; waits of at most 0.5, 1, 2, 4, 8, 16, 20 s (each at least half that):
    /// at most about 50 s of waiting in all.
    fn default() -> Self {
        StartRetry {
            attempts: 8,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl StartRetry {
    /// The wait before retry `retry` (1 for the first): exponential up to `max_delay`, of
    /// which half is fixed and half random (`jitter` in 0..1), so restarting pods spread out.
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        let full = self.first_delay.saturating_mul(factor).min(self.max_delay);
        full / 2 + (full / 2).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// A random number in 0..1 for jitter: spreads retries, nothing more (seeded from the clock,
/// a stack address and the pid, which may be the same in every pod: the clock and address
/// randomisation tell restarting pods apart).
pub fn jitter() -> f64 {
    unit_random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_bound_and_stay_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut uppers = Vec::new();
        for _ in 0..10 {
            let upper = b.current;
            let w = b.next_wait();
            assert!(
                w >= upper / 2 && w <= upper,
                "{w:?} outside [{:?}, {upper:?}]",
                upper / 2
            );
            uppers.push(upper);
        }
        assert_eq!(uppers[0], Duration::from_millis(100));
        assert_eq!(*uppers.last().unwrap(), Duration::from_secs(1));
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads() {
        let draws: std::collections::BTreeSet<u64> =
            (0..100).map(|_| (unit_random() * 1000.0) as u64).collect();
        assert!(draws.len() > 50, "{} distinct of 100", draws.len());
    }

    #[test]
    fn start_backoff_is_exponential_bounded_and_jittered() {
        let p = StartRetry::default();
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(250));
        assert_eq!(p.delay(1, 1.0), Duration::from_millis(500));
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(4, 1.0), Duration::from_secs(4));
        assert_eq!(p.delay(7, 1.0), Duration::from_secs(20), "capped");
        assert_eq!(p.delay(60, 0.5), Duration::from_secs(15), "no overflow");
        let total: Duration = (1..p.attempts).map(|r| p.delay(r, 1.0)).sum();
        assert!(total <= Duration::from_secs(60), "{total:?}");
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
