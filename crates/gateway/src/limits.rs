//! Per-API-key limits, so that one tenant cannot take the gateway from the others: a token
//! bucket (average rate and burst) and a cap on requests in progress at once. Both answer 429
//! `rate_limited` with `Retry-After`.
//!
//! Keys are told apart by a keyed hash of the `Authorization` header, checked before the key
//! is looked up in PostgreSQL, so a flood of requests costs no database round trip. The map of
//! buckets is bounded: a full bucket with nothing in flight is the same as no entry and is
//! dropped first; past that, the longest-idle key is forgotten.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use volley_config::GatewaySettings;

use crate::error::ApiError;

/// Keys tracked at once on one gateway.
const MAX_KEYS: usize = 10_000;

pub(crate) struct KeyLimiter {
    /// Tokens per second; 0 turns the rate limit off.
    rate: f64,
    burst: f64,
    /// 0 turns the in-flight limit off.
    max_in_flight: u32,
    capacity: usize,
    hasher: RandomState,
    keys: Mutex<HashMap<u64, Bucket>>,
}

struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    in_flight: u32,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + secs * rate).min(burst);
        self.at = now;
    }
}

/// Holds one of a key's in-flight slots until dropped.
pub(crate) struct InFlight {
    limiter: Arc<KeyLimiter>,
    key: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut keys = self.limiter.lock();
        if let Some(b) = keys.get_mut(&self.key) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }
}

impl KeyLimiter {
    pub fn new(s: &GatewaySettings) -> Arc<KeyLimiter> {
        KeyLimiter::with_capacity(s, MAX_KEYS)
    }

    fn with_capacity(s: &GatewaySettings, capacity: usize) -> Arc<KeyLimiter> {
        Arc::new(KeyLimiter {
            rate: f64::from(s.key_rate_per_sec),
            burst: f64::from(s.key_burst.max(1)),
            max_in_flight: s.key_max_in_flight,
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            keys: Mutex::new(HashMap::new()),
        })
    }

    fn enabled(&self) -> bool {
        self.rate > 0.0 || self.max_in_flight > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Bucket>> {
        // A panic while holding the lock leaves counters, not broken invariants: carry on.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one request of the key `credential` (the `Authorization` header's bytes) or
    /// says why not. `None` when no limit is configured.
    pub(crate) fn admit(self: &Arc<Self>, credential: &[u8]) -> Result<Option<InFlight>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        let key = self.hasher.hash_one(credential);
        let now = Instant::now();
        let mut keys = self.lock();
        if !keys.contains_key(&key) && keys.len() >= self.capacity {
            self.make_room(&mut keys, now)?;
        }
        let b = keys.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
            in_flight: 0,
        });
        if self.max_in_flight > 0 && b.in_flight >= self.max_in_flight {
            return Err(ApiError::RateLimited {
                message: "too many requests in progress for this API key",
                retry_after_secs: 1,
            });
        }
        if self.rate > 0.0 {
            b.refill(now, self.rate, self.burst);
            if b.tokens < 1.0 {
                let wait = ((1.0 - b.tokens) / self.rate).ceil().max(1.0);
                return Err(ApiError::RateLimited {
                    message: "too many requests for this API key",
                    retry_after_secs: wait as u64,
                });
            }
            b.tokens -= 1.0;
        }
        if self.max_in_flight == 0 {
            return Ok(None);
        }
        b.in_flight += 1;
        Ok(Some(InFlight {
            limiter: self.clone(),
            key,
        }))
    }

    /// Frees an entry of the full map: first every key in its resting state, else the
    /// longest-idle key with nothing in flight. With every key busy, the newcomer waits.
    fn make_room(&self, keys: &mut HashMap<u64, Bucket>, now: Instant) -> Result<(), ApiError> {
        let (rate, burst) = (self.rate, self.burst);
        keys.retain(|_, b| {
            if rate > 0.0 {
                b.refill(now, rate, burst);
            }
            b.in_flight > 0 || (rate > 0.0 && b.tokens < burst)
        });
        if keys.len() < self.capacity {
            return Ok(());
        }
        let idle = keys
            .iter()
            .filter(|(_, b)| b.in_flight == 0)
            .min_by_key(|(_, b)| b.at)
            .map(|(k, _)| *k);
        match idle {
            Some(k) => {
                keys.remove(&k);
                Ok(())
            }
            None => Err(ApiError::RateLimited {
                message: "the gateway is busy",
                retry_after_secs: 1,
            }),
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn settings(rate: u32, burst: u32, in_flight: u32) -> GatewaySettings {
        GatewaySettings {
            key_rate_per_sec: rate,
            key_burst: burst,
            key_max_in_flight: in_flight,
            ..GatewaySettings::default()
        }
    }

    fn retry_after(r: Result<Option<InFlight>, ApiError>) -> u64 {
        match r {
            Err(ApiError::RateLimited {
                retry_after_secs, ..
            }) => retry_after_secs,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("admitted"),
        }
    }

    #[test]
    fn burst_then_refused_with_retry_after() {
        let l = KeyLimiter::new(&settings(1, 3, 0));
        for _ in 0..3 {
            assert!(l.admit(b"Bearer a").is_ok());
        }
        assert_eq!(retry_after(l.admit(b"Bearer a")), 1);
        // Another key has its own bucket.
        assert!(l.admit(b"Bearer b").is_ok());
    }

    #[test]
    fn in_flight_slots_come_back_when_dropped() {
        let l = KeyLimiter::new(&settings(0, 1, 2));
        let a = l.admit(b"k").unwrap();
        let b = l.admit(b"k").unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(retry_after(l.admit(b"k")), 1);
        drop(a);
        assert!(l.admit(b"k").unwrap().is_some());
        drop(b);
    }

    #[test]
    fn the_map_stays_bounded() {
        let l = KeyLimiter::with_capacity(&settings(1000, 1000, 4), 100);
        let mut held = Vec::new();
        for i in 0..10_000u32 {
            if let Ok(g) = l.admit(&i.to_le_bytes()) {
                held.push(g);
            }
            if held.len() > 50 {
                held.clear();
            }
        }
        assert!(l.tracked() <= 100, "{}", l.tracked());
        // With every tracked key busy, a newcomer is turned away rather than tracked.
        let l = KeyLimiter::with_capacity(&settings(0, 1, 4), 2);
        let _a = l.admit(b"a").unwrap();
        let _b = l.admit(b"b").unwrap();
        assert_eq!(retry_after(l.admit(b"c")), 1);
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn off_when_not_configured() {
        let l = KeyLimiter::new(&settings(0, 1, 0));
        for _ in 0..1000 {
            assert!(l.admit(b"k").unwrap().is_none());
        }
        assert_eq!(l.tracked(), 0);
    }
}
