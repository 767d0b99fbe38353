//! Bounded in-memory stores for produced files and predictions.

use crate::media::Media;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub(crate) const FILE_TTL: Duration = Duration::from_secs(3600);
const MAX_FILES: usize = 10_000;
const MAX_FILE_BYTES: usize = 256 * 1024 * 1024;

/// Files evicted oldest-first by count, resident bytes and age. Only the
/// media's small head is resident; padding is generated at download time.
#[derive(Default)]
pub(crate) struct FileStore {
    files: HashMap<String, (Media, Instant)>,
    order: VecDeque<String>,
    resident: usize,
}

impl FileStore {
    pub fn insert(&mut self, id: String, media: Media) {
        let now = Instant::now();
        self.resident += media.resident_bytes();
        self.files.insert(id.clone(), (media, now));
        self.order.push_back(id);
        while let Some(oldest) = self.order.front() {
            let expired = self
                .files
                .get(oldest)
                .is_none_or(|(_, at)| now.duration_since(*at) > FILE_TTL);
            let over = self.files.len() > MAX_FILES || self.resident > MAX_FILE_BYTES;
            if !(expired || over) {
                break;
            }
            let removed = self.order.pop_front().and_then(|id| self.files.remove(&id));
            if let Some((m, _)) = removed {
                self.resident -= m.resident_bytes();
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Media> {
        self.files
            .get(id)
            .filter(|(_, at)| at.elapsed() <= FILE_TTL)
            .map(|(m, _)| m.clone())
    }
}

/// Counts requests per `sim_key` for `sim_fail_times`.
#[derive(Default)]
pub(crate) struct FailCounter {
    counts: HashMap<String, u64>,
}

impl FailCounter {
    const MAX_KEYS: usize = 100_000;

    /// Returns how many requests (including this one) carried `key`.
    pub(crate) fn bump(&mut self, key: String) -> u64 {
        // Crude bound: tests use a handful of keys, so forgetting all of them
        // once in a blue moon is acceptable.
        if self.counts.len() >= Self::MAX_KEYS && !self.counts.contains_key(&key) {
            self.counts.clear();
        }
        let n = self.counts.entry(key).or_default();
        *n += 1;
        *n
    }
}
