//! The fair-dispatch gate: which inference types a new batch's jobs are held for instead of
//! published (see ARCHITECTURE.md, "Tenants: quotas, priority, fair share"). A type is held
//! while its queue is full or work of it is already held, so that new work waits its turn
//! behind held work instead of overtaking it. Read every `dispatch.interval_ms` by one task,
//! so a submission only reads two flags.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use volley_amqp::Names;
use volley_amqp::depths::DepthProbe;
use volley_config::Settings;
use volley_db::Db;
use volley_domain::InferenceType;

#[derive(Default)]
pub struct Gate {
    hold: [AtomicBool; InferenceType::ALL.len()],
}

fn slot(t: InferenceType) -> usize {
    InferenceType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

impl Gate {
    /// The types among `types` whose jobs are to be held.
    pub fn held(&self, types: impl IntoIterator<Item = InferenceType>) -> Vec<InferenceType> {
        let mut out: Vec<InferenceType> = Vec::new();
        for t in types {
            if self.hold[slot(t)].load(Ordering::Relaxed) && !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    fn set(&self, t: InferenceType, hold: bool) {
        self.hold[slot(t)].store(hold, Ordering::Relaxed);
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
    loop {
        match db.held_work().await {
            Ok(held) => {
                if probe.is_none() {
                    let names = Names::new(&settings.queue_prefix);
                    match DepthProbe::open(&settings.amqp_url, names, "volley-gateway-gate").await {
                        Ok(p) => probe = Some(p),
                        Err(e) => tracing::debug!(error = %e, "queue depths unavailable"),
                    }
                }
                for t in InferenceType::ALL {
                    let waiting = held.iter().any(|h| h.inference_type == t);
                    let full = match &probe {
                        Some(p) => match p.job_queue(t).await {
                            Ok((messages, consumers)) => {
                                let limit = settings
                                    .dispatch
                                    .queue_limit(consumers, settings.worker.concurrency);
                                u64::from(messages) >= limit
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "queue depth poll failed");
                                probe = None;
                                false
                            }
                        },
                        None => false,
                    };
                    gate.set(t, waiting || full);
                }
            }
            Err(e) => tracing::debug!(error = %e, "held work unavailable"),
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
    fn only_flagged_types_are_held_once_each() {
        let g = Gate::default();
        g.set(InferenceType::Video, true);
        let held = g.held([
            InferenceType::Llm,
            InferenceType::Video,
            InferenceType::Video,
            InferenceType::Tts,
        ]);
        assert_eq!(held, vec![InferenceType::Video]);
        g.set(InferenceType::Video, false);
        assert!(g.held([InferenceType::Video]).is_empty());
    }
}
