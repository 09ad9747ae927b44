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
}
