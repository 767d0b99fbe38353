//! Token usage summed per batch, from the per-job counts workers report.

/// The tokens a batch's jobs used so far, and how many jobs reported usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub jobs: i64,
}

impl BatchUsage {
    /// Counts one job that reported usage.
    pub fn add(&mut self, prompt_tokens: i64, completion_tokens: i64, total_tokens: i64) {
        self.prompt_tokens += prompt_tokens;
        self.completion_tokens += completion_tokens;
        self.total_tokens += total_tokens;
        self.jobs += 1;
    }
}
