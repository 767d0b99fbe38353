//! How fast one provider's calls start: an adaptive concurrency limit (AIMD) and a token
//! bucket for LLM tokens per minute.
//!
//! **Concurrency.** The limit starts at `max_concurrency`. A 429 halves it (at most once per
//! cool-down, so one burst of 429s from calls already in flight counts once); every
//! [`INCREASE_EVERY`] successes add one back, up to `max_concurrency`. Lowering the limit
//! below the calls in flight cannot take permits back from them, so the difference is kept
//! as a debt: the next calls to finish return their permits to nobody.
//!
//! **Tokens.** A call reserves its estimate before it starts and waits until the bucket has
//! refilled enough; reservations queue in arrival order (the level may go negative, and each
//! waits for its own deficit). After the call, the reservation is corrected with the usage
//! the provider reported, or refunded if the call failed.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Successes that raise a lowered concurrency limit by one.
const INCREASE_EVERY: usize = 4;
/// Shortest time between two halvings.
const MIN_COOL_DOWN: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Aimd {
    limit: usize,
    /// Permits to retire as calls finish, because the limit dropped below the calls in flight.
    debt: usize,
    successes: usize,
    no_decrease_before: Option<Instant>,
}

pub(crate) struct Capacity {
    max: usize,
    sem: Semaphore,
    aimd: Mutex<Aimd>,
}

/// A started call's place; dropping it frees the place (or retires it, see the debt).
pub(crate) struct Slot<'a> {
    cap: &'a Capacity,
    permit: Option<SemaphorePermit<'a>>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut a = self.cap.lock();
        if a.debt > 0 {
            a.debt -= 1;
            permit.forget();
        }
        // Otherwise the permit returns to the semaphore as it drops, after the lock.
    }
}

impl Capacity {
    pub fn new(max: usize) -> Capacity {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Capacity {
            max,
            sem: Semaphore::new(max),
            aimd: Mutex::new(Aimd {
                limit: max,
                debt: 0,
                successes: 0,
                no_decrease_before: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Aimd> {
        // The state is a few counters: a panic elsewhere cannot leave them unusable.
        self.aimd.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a place (first come, first served).
    pub(crate) async fn acquire(&self) -> Option<Slot<'_>> {
        let permit = self.sem.acquire().await.ok()?;
        Some(Slot {
            cap: self,
            permit: Some(permit),
        })
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// The provider answered 429: halve the limit, unless it was halved within the cool-down.
    pub fn rate_limited(&self, pause: Duration) {
        let now = Instant::now();
        let mut a = self.lock();
        if a.no_decrease_before.is_some_and(|t| now < t) {
            return;
        }
        a.no_decrease_before = Some(now + pause.max(MIN_COOL_DOWN));
        a.successes = 0;
        let new = (a.limit / 2).max(1);
        let cut = a.limit - new;
        a.limit = new;
        let forgotten = self.sem.forget_permits(cut);
        a.debt += cut - forgotten;
        if cut > 0 {
            tracing::info!(limit = new, "provider rate limited: concurrency lowered");
        }
    }

    /// A call succeeded: one step towards raising a lowered limit.
    pub fn succeeded(&self) {
        let mut a = self.lock();
        if a.limit >= self.max {
            return;
        }
        a.successes += 1;
        if a.successes >= INCREASE_EVERY {
            a.successes = 0;
            a.limit += 1;
            if a.debt > 0 {
                a.debt -= 1;
            } else {
                self.sem.add_permits(1);
            }
        }
    }
}

/// Tokens per minute, as a bucket of `per_minute` tokens refilled continuously.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(per_minute: u32) -> TokenBucket {
        let capacity = f64::from(per_minute.max(1));
        TokenBucket {
            capacity,
            per_sec: capacity / 60.0,
            level: capacity,
            updated: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.updated = now;
    }

    /// Takes `n` tokens (at most a full bucket, so that one large request can still run) and
    /// returns how many were taken and how long to wait before starting.
    pub(crate) fn reserve(&mut self, n: u64) -> (u64, Duration) {
        let n = (n as f64).min(self.capacity).max(1.0);
        self.refill(Instant::now());
        self.level -= n;
        let wait = if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.per_sec)
        };
        (n as u64, wait)
    }

    /// Gives back tokens (a refund, or a positive correction), or takes more (negative).
    pub(crate) fn adjust(&mut self, delta: i64) {
        self.refill(Instant::now());
        self.level = (self.level + delta as f64).min(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_limit_once_per_cool_down_and_successes_restore_it() {
        let c = Capacity::new(8);
        let held: Vec<Slot<'_>> = {
            let mut v = Vec::new();
            for _ in 0..6 {
                v.push(c.acquire().await.unwrap());
            }
            v
        };
        c.rate_limited(Duration::ZERO);
        assert_eq!(c.limit(), 4);
        // A second 429 from a call that was already in flight does not count again.
        c.rate_limited(Duration::ZERO);
        assert_eq!(c.limit(), 4);
        // Six in flight, limit four: no new call starts until three have finished.
        drop(held);
        let mut now = Vec::new();
        for _ in 0..4 {
            now.push(c.acquire().await.unwrap());
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(10), c.acquire())
                .await
                .is_err(),
            "a fifth call must wait"
        );
        tokio::time::advance(MIN_COOL_DOWN).await;
        c.rate_limited(Duration::ZERO);
        assert_eq!(c.limit(), 2);
        drop(now);
        for _ in 0..(INCREASE_EVERY * 6) {
            c.succeeded();
        }
        assert_eq!(c.limit(), 8);
        let mut all = Vec::new();
        for _ in 0..8 {
            all.push(c.acquire().await.unwrap());
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(10), c.acquire())
                .await
                .is_err(),
            "never above max_concurrency"
        );
        c.succeeded();
        assert_eq!(c.limit(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_never_drops_below_one() {
        let c = Capacity::new(3);
        for _ in 0..5 {
            c.rate_limited(Duration::ZERO);
            tokio::time::advance(MIN_COOL_DOWN).await;
        }
        assert_eq!(c.limit(), 1);
        let one = c.acquire().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(10), c.acquire())
                .await
                .is_err()
        );
        drop(one);
        let _again = c.acquire().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_queue_in_order_and_refunds_help() {
        // 600 per minute = 10 per second.
        let mut b = TokenBucket::new(600);
        assert_eq!(b.reserve(500), (500, Duration::ZERO));
        assert_eq!(b.reserve(100), (100, Duration::ZERO));
        // Empty: 50 more tokens are 5 s away, and the next 50 another 5 s.
        assert_eq!(b.reserve(50).1, Duration::from_secs(5));
        assert_eq!(b.reserve(50).1, Duration::from_secs(10));
        // Larger than the bucket: clamped, so it can run once the bucket has filled.
        let (n, _) = b.reserve(10_000);
        assert_eq!(n, 600);
        b.adjust(700);
        tokio::time::advance(Duration::from_secs(3)).await;
        let (_, wait) = b.reserve(10);
        assert_eq!(wait, Duration::ZERO, "refunded and refilled");
        // The level never exceeds a full bucket.
        b.adjust(1_000_000);
        assert_eq!(b.reserve(600).1, Duration::ZERO);
        assert!(b.reserve(60).1 >= Duration::from_secs(6));
    }
}
