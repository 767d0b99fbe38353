//! What the services say to each other about one job: the job as handed to a worker, the
//! answer to a claim, an attempt's outcome and the tokens it used. One type per concept, here;
//! wire formats (protobuf on RabbitMQ, JSON on batch-state's internal API) convert to these in
//! `volley-proto`, and `volley-db` stores them.

use serde_json::Value;

use crate::text::{clean_json, clean_string};
use crate::{Endpoint, InferenceType};

/// What a worker needs to run a job; the gateway and the sweeper publish the same one.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub id: i64,
    pub batch_id: i64,
    pub inference_type: InferenceType,
    pub endpoint: Endpoint,
    pub model: String,
    /// The request body as the client sent it.
    pub body: Value,
    /// When the job was accepted (Unix milliseconds), for queue-wait measurements.
    pub accepted_at_ms: i64,
}

/// Tokens one attempt used, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

/// The tokens a batch's jobs used so far, and how many jobs reported usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchUsage {
    pub tokens: Usage,
    pub jobs: i64,
}

impl BatchUsage {
    /// Counts one job that reported usage.
    pub fn add(&mut self, u: Usage) {
        self.tokens.prompt_tokens += u.prompt_tokens;
        self.tokens.completion_tokens += u.completion_tokens;
        self.tokens.total_tokens += u.total_tokens;
        self.jobs += 1;
    }
}

/// The answer to a worker's claim on one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller now runs the job; outcomes must carry this attempt number.
    Claimed {
        attempt: i32,
        /// The attempt counted from the latest operator retry (equal to `attempt` for a job
        /// never retried by hand): what the worker's retry budget goes by.
        round_attempt: i32,
    },
    /// Someone else runs it, or it has finished or been cancelled.
    Refused,
    NotFound,
}

/// How one attempt of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        result: Value,
        usage: Option<Usage>,
        /// Media the worker stored for this attempt: the only keys that may become links.
        media_keys: Vec<String>,
    },
    Failed {
        error_type: String,
        message: String,
    },
    /// A retryable failure: hand the job back to the queue after `delay_ms`.
    Retry {
        error: String,
        delay_ms: i64,
    },
}

impl Outcome {
    /// Replaces what PostgreSQL cannot store (U+0000) in every text the outcome carries. One
    /// such value would fail a whole batched statement of other tenants' outcomes, so workers
    /// clean before publishing and batch-state again after decoding.
    pub fn clean(&mut self) {
        match self {
            Outcome::Succeeded {
                result, media_keys, ..
            } => {
                clean_json(result);
                media_keys.iter_mut().for_each(clean_string);
            }
            Outcome::Failed {
                error_type,
                message,
            } => {
                clean_string(error_type);
                clean_string(message);
            }
            Outcome::Retry { error, .. } => clean_string(error),
        }
    }

    /// The transition this outcome makes.
    pub fn transition(&self) -> crate::Transition {
        match self {
            Outcome::Succeeded { .. } => crate::Transition::Succeed,
            Outcome::Failed { .. } => crate::Transition::Fail,
            Outcome::Retry { .. } => crate::Transition::Requeue,
        }
    }
}

/// A worker's report on one attempt: the attempt number is the fencing token.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub job_id: i64,
    pub attempt: i32,
    pub outcome: Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_reaches_every_text() {
        let mut o = Outcome::Succeeded {
            result: serde_json::json!({"a\u{0}": ["b\u{0}"]}),
            usage: None,
            media_keys: vec!["k\u{0}".into()],
        };
        o.clean();
        assert_eq!(
            o,
            Outcome::Succeeded {
                result: serde_json::json!({"a\u{fffd}": ["b\u{fffd}"]}),
                usage: None,
                media_keys: vec!["k\u{fffd}".into()],
            }
        );
        let mut f = Outcome::Failed {
            error_type: "t\u{0}".into(),
            message: "m\u{0}".into(),
        };
        f.clean();
        assert_eq!(
            f,
            Outcome::Failed {
                error_type: "t\u{fffd}".into(),
                message: "m\u{fffd}".into(),
            }
        );
        let mut r = Outcome::Retry {
            error: "e\u{0}".into(),
            delay_ms: 5,
        };
        r.clean();
        assert_eq!(
            r,
            Outcome::Retry {
                error: "e\u{fffd}".into(),
                delay_ms: 5
            }
        );
    }

    #[test]
    fn batch_usage_sums_and_counts() {
        let mut b = BatchUsage::default();
        let u = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
        };
        b.add(u);
        b.add(u);
        assert_eq!(b.tokens.total_tokens, 6);
        assert_eq!(b.jobs, 2);
    }
}
