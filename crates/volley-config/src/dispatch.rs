//! `[dispatch]`: fair share of each modality's queue between API keys (see ARCHITECTURE.md,
//! "Tenants: quotas, priority, fair share").

use std::collections::BTreeMap;

use serde::Deserialize;
use volley_domain::InferenceType;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Hold work back from a full queue and release it round-robin over owners. Off, every
    /// job is published at once and each modality is one FIFO queue.
    pub fair: bool,
    /// How often the gateway reads queue depths and held work, and batch-state releases
    /// held work.
    pub interval_ms: u64,
    /// A modality's queue counts as full at this many ready messages at least ...
    pub min_queue_depth: u32,
    /// ... or at this many for the modalities named here (`video = 32`, keys as in queue
    /// names): where jobs are slow and slots few, a newcomer's job then waits behind fewer.
    pub queue_depth: BTreeMap<String, u32>,
    /// ... or at this many ready messages per consumer slot (consumers × worker
    /// concurrency), if that is more (0, the default, turns this off: each worker's prefetch
    /// already buffers `worker.concurrency` messages beyond the ready ones).
    pub queue_depth_per_slot: u32,
    /// Held work gains one priority level for each such span it has waited, so `low` is
    /// never starved by a stream of `normal` and `high`.
    pub aging_ms: u64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        DispatchSettings {
            fair: true,
            interval_ms: 100,
            min_queue_depth: 1_024,
            queue_depth: BTreeMap::new(),
            queue_depth_per_slot: 0,
            aging_ms: 60_000,
        }
    }
}

impl DispatchSettings {
    /// Ready messages at which `t`'s queue, with `consumers` consumers of `concurrency` slots
    /// each, is full.
    pub fn queue_limit(&self, t: InferenceType, consumers: u32, concurrency: u16) -> u64 {
        let floor = self
            .queue_depth
            .get(t.key())
            .copied()
            .unwrap_or(self.min_queue_depth);
        let slots = u64::from(consumers) * u64::from(concurrency);
        slots
            .saturating_mul(u64::from(self.queue_depth_per_slot))
            .max(u64::from(floor))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 || self.interval_ms > 60_000 {
            return Err(format!(
                "dispatch.interval_ms must be 1 to 60000, not {}",
                self.interval_ms
            ));
        }
        if self.min_queue_depth == 0 {
            return Err("dispatch.min_queue_depth must be at least 1".into());
        }
        for (key, depth) in &self.queue_depth {
            if !InferenceType::ALL.iter().any(|t| t.key() == key) {
                let known: Vec<&str> = InferenceType::ALL.iter().map(|t| t.key()).collect();
                return Err(format!(
                    "dispatch.queue_depth.{key}: no such inference type (one of {})",
                    known.join(", ")
                ));
            }
            if *depth == 0 {
                return Err(format!("dispatch.queue_depth.{key} must be at least 1"));
            }
        }
        if self.aging_ms == 0 {
            return Err("dispatch.aging_ms must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_the_larger_of_the_floor_and_the_slots() {
        let d = DispatchSettings {
            queue_depth_per_slot: 1,
            ..DispatchSettings::default()
        };
        let llm = InferenceType::Llm;
        assert_eq!(DispatchSettings::default().queue_limit(llm, 64, 256), 1_024);
        assert_eq!(d.queue_limit(llm, 0, 64), 1_024);
        assert_eq!(d.queue_limit(llm, 4, 256), 1_024);
        assert_eq!(d.queue_limit(llm, 8, 256), 2_048);
        // No overflow at the extremes.
        let big = DispatchSettings {
            queue_depth_per_slot: u32::MAX,
            ..d
        };
        assert!(big.queue_limit(llm, u32::MAX, u16::MAX) > 0);
    }

    #[test]
    fn a_modality_may_have_its_own_floor() {
        let d = DispatchSettings {
            queue_depth: BTreeMap::from([("video".to_owned(), 32)]),
            ..DispatchSettings::default()
        };
        assert!(d.validate().is_ok());
        assert_eq!(d.queue_limit(InferenceType::Video, 4, 8), 32);
        assert_eq!(d.queue_limit(InferenceType::Llm, 4, 8), 1_024);
        // The slots term still applies above it.
        let per_slot = DispatchSettings {
            queue_depth_per_slot: 2,
            ..d.clone()
        };
        assert_eq!(per_slot.queue_limit(InferenceType::Video, 4, 8), 64);
    }

    #[test]
    fn unknown_modalities_and_zero_depths_are_refused_by_name() {
        for (key, depth, needle) in [
            ("VIDEO", 32, "no such inference type"),
            ("films", 32, "no such inference type"),
            ("", 32, "no such inference type"),
            ("video", 0, "at least 1"),
        ] {
            let d = DispatchSettings {
                queue_depth: BTreeMap::from([(key.to_owned(), depth)]),
                ..DispatchSettings::default()
            };
            let e = d.validate().unwrap_err();
            assert!(
                e.contains(needle) && e.contains("dispatch.queue_depth"),
                "{e}"
            );
        }
    }
}
