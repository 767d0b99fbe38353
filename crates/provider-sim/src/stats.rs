//! Request counters shared by all actix workers.

use crate::SimStats;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Stats {
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    status_429: AtomicU64,
    status_5xx: AtomicU64,
    predictions_cancelled: AtomicU64,
    by_path: Mutex<BTreeMap<String, u64>>,
    /// `sim_*` fields received (top level or in `input`), by name.
    sim_fields: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub(crate) fn record_request(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut map = self.by_path.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(path.to_owned()).or_default() += 1;
    }

    /// Counts the `sim_*` fields of a request body, to show which reached the simulator.
    pub(crate) fn record_sim_fields(&self, body: &serde_json::Map<String, serde_json::Value>) {
        let inner = body.get("input").and_then(serde_json::Value::as_object);
        let names = body.keys().chain(inner.into_iter().flat_map(|i| i.keys()));
        let mut map = self.sim_fields.lock().unwrap_or_else(|e| e.into_inner());
        for k in names.filter(|k| k.starts_with("sim_")) {
            // Bounded: only names the simulator knows could be that many.
            if map.len() < 64 || map.contains_key(k) {
                *map.entry(k.clone()).or_default() += 1;
            }
        }
    }

    pub(crate) fn record_status(&self, status: u16) {
        if status == 429 {
            self.status_429.fetch_add(1, Ordering::Relaxed);
        } else if status >= 500 {
            self.status_5xx.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_cancel(&self) {
        self.predictions_cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn inference_started(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    pub(crate) fn inference_finished(&self) {
        // Saturating: a reset never touches in_flight, so this cannot underflow
        // unless a caller double-finishes; guard anyway rather than wrap.
        let _ = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(1))
            });
    }

    pub(crate) fn snapshot(&self) -> SimStats {
        let by_path = self
            .by_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        SimStats {
            requests: self.requests.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
            by_path,
            sim_fields: self
                .sim_fields
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            status_429: self.status_429.load(Ordering::Relaxed),
            status_5xx: self.status_5xx.load(Ordering::Relaxed),
            predictions_cancelled: self.predictions_cancelled.load(Ordering::Relaxed),
        }
    }

    /// Clears counters; `in_flight` is live state, so it is kept and
    /// `max_in_flight` restarts from it.
    pub fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.status_429.store(0, Ordering::Relaxed);
        self.status_5xx.store(0, Ordering::Relaxed);
        self.predictions_cancelled.store(0, Ordering::Relaxed);
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        self.by_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.sim_fields
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Decrements `in_flight` on drop, so a call whose future is dropped (client
/// disconnect, server stop) is not counted forever.
pub(crate) struct InFlightGuard<'a>(&'a Stats);

impl<'a> InFlightGuard<'a> {
    pub fn new(stats: &'a Stats) -> Self {
        stats.inference_started();
        Self(stats)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.inference_finished();
    }
}
