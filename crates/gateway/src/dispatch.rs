//! The fair-dispatch gate: which inference types a new batch's jobs are held for instead of
//! published (see ARCHITECTURE.md, "Tenants: quotas, priority, fair share"). A type is held
//! while its queue is full or work of it is already held, so that new work waits its turn
//! behind held work instead of overtaking it. One task reads the queues and the held work
//! every `dispatch.interval_ms`; between two reads the gateway counts what it publishes
//! itself, so a burst is held as soon as it fills the queue, not an interval later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use volley_amqp::Names;
use volley_amqp::depths::DepthProbe;
use volley_config::Settings;
use volley_db::Db;
use volley_domain::InferenceType;

const TYPES: usize = InferenceType::ALL.len();

/// Per type: whether work is held, the queue's ready messages (as last read, plus what this
/// gateway published since) and the depth at which it is full (`u64::MAX`: unknown).
pub struct Gate {
    waiting: [AtomicBool; TYPES],
    ready: [AtomicU64; TYPES],
    limit: [AtomicU64; TYPES],
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            waiting: Default::default(),
            ready: Default::default(),
            limit: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
        }
    }
}

fn slot(t: InferenceType) -> usize {
    InferenceType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

impl Gate {
    /// The types among `types` (one entry per job) whose jobs are to be held; the jobs of the
    /// other types count as published from here on.
    pub fn held(&self, types: impl IntoIterator<Item = InferenceType>) -> Vec<InferenceType> {
        let mut counts = [0u64; TYPES];
        for t in types {
            counts[slot(t)] += 1;
        }
        let mut out = Vec::new();
        for (i, t) in InferenceType::ALL.into_iter().enumerate() {
            if counts[i] == 0 {
                continue;
            }
            let full =
                self.ready[i].load(Ordering::Relaxed) >= self.limit[i].load(Ordering::Relaxed);
            if self.waiting[i].load(Ordering::Relaxed) || full {
                out.push(t);
            } else {
                self.ready[i].fetch_add(counts[i], Ordering::Relaxed);
            }
        }
        out
    }

    /// Records a read of `t`; returns whether it was held before and is now.
    fn set(&self, t: InferenceType, waiting: bool, depth: Option<(u64, u64)>) -> (bool, bool) {
        let i = slot(t);
        let before = self.is_held(i);
        self.waiting[i].store(waiting, Ordering::Relaxed);
        let (ready, limit) = depth.unwrap_or((0, u64::MAX));
        self.ready[i].store(ready, Ordering::Relaxed);
        self.limit[i].store(limit, Ordering::Relaxed);
        (before, self.is_held(i))
    }

    fn is_held(&self, i: usize) -> bool {
        self.waiting[i].load(Ordering::Relaxed)
            || self.ready[i].load(Ordering::Relaxed) >= self.limit[i].load(Ordering::Relaxed)
    }
}

/// Keeps `gate` current until `stop`. Without a broker it holds only behind
/// work already held (the queues' depths are unknown, and publishing fails over to the
/// sweeper anyway); without the database it keeps the last answer.
pub async fn watch(gate: Arc<Gate>, settings: Arc<Settings>, db: Db, stop: CancellationToken) {
    if !settings.dispatch.fair {
        return;
    }
    let every = Duration::from_millis(settings.dispatch.interval_ms.max(1));
    let mut probe: Option<DepthProbe> = None;
    // Failures are logged when they start, not every interval.
    let mut failing = false;
    loop {
        let mut problem = None;
        match db.held_work().await {
            Ok(held) => {
                if probe.is_none() {
                    let names = Names::new(&settings.queue_prefix);
                    match DepthProbe::open(&settings.amqp_url, names, "volley-gateway-gate").await {
                        Ok(p) => probe = Some(p),
                        Err(e) => problem = Some(format!("queue depths unavailable: {e}")),
                    }
                }
                for t in InferenceType::ALL {
                    let waiting = held.iter().any(|h| h.inference_type == t);
                    let mut depth = None;
                    if let Some(p) = &probe {
                        match p.job_queue(t).await {
                            Ok((messages, consumers)) => {
                                let limit = settings.dispatch.queue_limit(
                                    t,
                                    consumers,
                                    settings.worker.concurrency,
                                );
                                depth = Some((u64::from(messages), limit));
                            }
                            Err(e) => {
                                problem = Some(format!("queue depth poll failed: {e}"));
                                probe = None;
                            }
                        }
                    }
                    let (before, hold) = gate.set(t, waiting, depth);
                    if before != hold {
                        tracing::info!(
                            inference_type = t.as_str(),
                            hold,
                            waiting,
                            ready = depth.map(|d| d.0),
                            limit = depth.map(|d| d.1),
                            "fair dispatch gate changed"
                        );
                    }
                }
            }
            Err(e) => problem = Some(format!("held work unavailable: {e}")),
        }
        match problem {
            Some(p) if !failing => {
                tracing::warn!(problem = %p, "fair dispatch gate: keeping its last answer");
                failing = true;
            }
            Some(_) => {}
            None => failing = false,
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Some(p) = probe {
        p.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_held_behind_held_work_or_a_full_queue_counting_own_publishes() {
        let g = Gate::default();
        use InferenceType::{Llm, Tts, Video};
        // Nothing read yet: nothing is held.
        assert!(g.held([Llm, Video]).is_empty());
        g.set(Video, true, Some((0, 10)));
        g.set(Llm, false, Some((6, 10)));
        g.set(Tts, false, None);
        assert_eq!(g.held([Llm, Llm, Video, Llm, Video, Llm, Tts]), vec![Video]);
        // The four LLM jobs just published fill the queue (6 + 4 = 10): the next are held,
        // before the next read.
        assert_eq!(g.held([Llm]), vec![Llm]);
        // A read finds the queue drained and nothing waiting.
        g.set(Llm, false, Some((2, 10)));
        g.set(Video, false, Some((0, 10)));
        assert!(g.held([Llm, Video]).is_empty());
        // Without a depth (no broker), only held work holds.
        assert_eq!(g.set(Tts, true, None), (false, true));
        assert_eq!(g.held([Tts]), vec![Tts]);
    }
}
