//! When a batch will finish (`estimated_completion_at`, `estimated_seconds_remaining` on
//! `GET /v1/batches/{id}`, additions to the contract).
//!
//! Per inference type: throughput is the newest finishes (PROCESSED or FAILED, at most
//! [`SAMPLE`]) within `eta_window_secs`, divided by the time since the oldest of them; the work
//! ahead of a batch is every unfinished job of that type in an older batch, plus the batch's
//! own unfinished jobs. The estimate is the slowest type's `(ahead + own) / throughput`. Both
//! aggregates are read by one query each, at most every [`TTL`] per gateway process, in the
//! background, never per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use volley_db::progress::EtaInputs;

/// How long one read of the aggregates serves every request of this process.
const TTL: Duration = Duration::from_secs(5);
/// Finishes per type a throughput is measured over, at most: enough to smooth it, few
/// enough that reading them is a short walk of the `jobs_finished` index.
const SAMPLE: i64 = 1_000;
/// (type, batch) rows of unfinished work read at most; batches past them get no estimate.
const MAX_BACKLOG_ROWS: i64 = 50_000;
/// A throughput is measured over at least this long, so that two finishes a millisecond
/// apart do not claim a thousand a second.
const MIN_SPAN_SECS: f64 = 1.0;

/// The estimate's fields on the batch object; both null when there is none.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Estimate {
    /// RFC 3339, UTC, whole seconds.
    pub estimated_completion_at: Option<String>,
    pub estimated_seconds_remaining: Option<u64>,
}

/// Throughput and backlog per inference type, as last read.
#[derive(Debug, Default)]
struct Model {
    /// Jobs finished per second, by type; types without recent finishes are absent.
    rates: HashMap<String, f64>,
    /// By type: `(batch id, unfinished jobs of this type in batches up to this one)`,
    /// batch ids ascending.
    ahead: HashMap<String, Vec<(i64, i64)>>,
    /// With the backlog cut short, the last batch it covers.
    covered_until: Option<i64>,
}

impl Model {
    fn from_inputs(i: &EtaInputs, window_secs: u64) -> Model {
        let mut rates = HashMap::new();
        for t in &i.throughput {
            let Some(oldest) = t.oldest.filter(|_| t.finished > 0) else {
                continue;
            };
            let span = ((i.now - oldest).num_milliseconds() as f64 / 1000.0)
                .clamp(MIN_SPAN_SECS, window_secs as f64);
            rates.insert(t.inference_type.clone(), t.finished as f64 / span);
        }
        let mut ahead: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
        for b in &i.backlog {
            let list = ahead.entry(b.inference_type.clone()).or_default();
            let before = list.last().map_or(0, |(_, n)| *n);
            list.push((b.batch_id, before + b.unfinished));
        }
        let covered_until = if i.truncated {
            i.backlog.last().map(|b| b.batch_id)
        } else {
            None
        };
        Model {
            rates,
            ahead,
            covered_until,
        }
    }

    /// Seconds until `batch_id` finishes, given its own unfinished jobs per type.
    fn seconds(&self, batch_id: i64, own: &HashMap<&str, i64>) -> Option<f64> {
        if self.covered_until.is_some_and(|last| batch_id > last) {
            return None;
        }
        let mut worst: Option<f64> = None;
        for (t, n) in own.iter().filter(|(_, n)| **n > 0) {
            let rate = *self.rates.get(*t)?;
            // Unfinished jobs of this type in older batches (ids are handed out in order).
            let ahead = self.ahead.get(*t).map_or(0, |list| {
                let i = list.partition_point(|(b, _)| *b < batch_id);
                i.checked_sub(1).map_or(0, |i| list[i].1)
            });
            let secs = (ahead + n) as f64 / rate;
            worst = Some(worst.map_or(secs, |w: f64| w.max(secs)));
        }
        worst
    }
}

/// The aggregates, cached per gateway process.
pub(crate) struct EtaCache {
    window_secs: u64,
    cached: Arc<Mutex<Cached>>,
}

#[derive(Default)]
struct Cached {
    /// When `model` was read; `None` before the first read.
    at: Option<Instant>,
    /// `None` before the first read and after a failed one.
    model: Option<Arc<Model>>,
    refreshing: bool,
}

impl EtaCache {
    pub fn new(window_secs: u64) -> EtaCache {
        EtaCache {
            window_secs,
            cached: Arc::new(Mutex::new(Cached::default())),
        }
    }

    /// The model as last read. When it is older than [`TTL`], one read starts in the
    /// background and requests go on with the old one meanwhile: no request waits for the
    /// aggregates (the very first ones get no estimate).
    fn model(&self, db: &volley_db::Db) -> Option<Arc<Model>> {
        let mut c = lock(&self.cached);
        let fresh = c.at.is_some_and(|at| at.elapsed() < TTL);
        if !fresh && !c.refreshing {
            c.refreshing = true;
            let (cached, db, window_secs) = (self.cached.clone(), db.clone(), self.window_secs);
            tokio::spawn(async move {
                let model = match db.eta_inputs(window_secs, SAMPLE, MAX_BACKLOG_ROWS).await {
                    Ok(i) => Some(Arc::new(Model::from_inputs(&i, window_secs))),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read completion estimates' inputs");
                        None
                    }
                };
                let mut c = lock(&cached);
                c.at = Some(Instant::now());
                c.model = model;
                c.refreshing = false;
            });
        }
        c.model.clone()
    }

    /// The estimate for a batch whose unfinished jobs are `own` (inference type, count);
    /// none when every job has finished or a type has no recent throughput.
    pub fn estimate<'a>(
        &self,
        db: &volley_db::Db,
        batch_id: i64,
        own: impl Iterator<Item = &'a str>,
    ) -> Estimate {
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for t in own {
            *counts.entry(t).or_default() += 1;
        }
        if counts.is_empty() {
            return Estimate::default();
        }
        let Some(model) = self.model(db) else {
            return Estimate::default();
        };
        let Some(secs) = model.seconds(batch_id, &counts) else {
            return Estimate::default();
        };
        let secs = secs.ceil().min(10.0 * 365.0 * 86_400.0) as u64;
        let at: DateTime<Utc> = Utc::now() + chrono::Duration::seconds(secs as i64);
        Estimate {
            estimated_completion_at: Some(at.to_rfc3339_opts(SecondsFormat::Secs, true)),
            estimated_seconds_remaining: Some(secs),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a cache, not broken invariants.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use volley_db::progress::{Backlog, Throughput};

    fn inputs(truncated: bool) -> EtaInputs {
        let now = Utc::now();
        EtaInputs {
            now,
            throughput: vec![
                Throughput {
                    inference_type: "LLM".into(),
                    finished: 100,
                    oldest: Some(now - chrono::Duration::seconds(50)),
                },
                Throughput {
                    inference_type: "IMAGE".into(),
                    finished: 0,
                    oldest: None,
                },
            ],
            backlog: vec![
                Backlog {
                    inference_type: "LLM".into(),
                    batch_id: 3,
                    unfinished: 10,
                },
                Backlog {
                    inference_type: "LLM".into(),
                    batch_id: 5,
                    unfinished: 20,
                },
                Backlog {
                    inference_type: "LLM".into(),
                    batch_id: 9,
                    unfinished: 6,
                },
            ],
            truncated,
        }
    }

    #[test]
    fn queued_ahead_and_own_over_throughput() {
        let m = Model::from_inputs(&inputs(false), 300);
        // 2 jobs a second; batch 9 waits for 30 older jobs and its own 6.
        let own = HashMap::from([("LLM", 6)]);
        assert_eq!(m.seconds(9, &own), Some(18.0));
        assert_eq!(m.seconds(3, &HashMap::from([("LLM", 10)])), Some(5.0));
        // A type with no recent finishes: no estimate.
        assert_eq!(
            m.seconds(9, &HashMap::from([("LLM", 6), ("IMAGE", 1)])),
            None
        );
        // Finished: nothing to wait for.
        assert_eq!(m.seconds(9, &HashMap::new()), None);
    }

    #[test]
    fn no_estimate_past_a_cut_backlog() {
        let m = Model::from_inputs(&inputs(true), 300);
        assert!(m.seconds(9, &HashMap::from([("LLM", 6)])).is_some());
        assert_eq!(m.seconds(10, &HashMap::from([("LLM", 1)])), None);
    }
}
