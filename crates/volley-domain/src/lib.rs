//! Volley's domain model.
//!
//! **Architecture invariant:** this crate knows nothing of HTTP, AMQP or SQL. Wire formats are
//! converted to these types at the edges (gateway, queue boundary, database layer).

mod job;
mod lifecycle;
pub mod text;
mod types;
mod validate;

pub use job::{BatchUsage, Claim, Dispatch, Event, Outcome, Usage};
pub use lifecycle::{BatchCounts, BatchStatus, JobStatus, Rule, Transition};
pub use types::{Endpoint, InferenceType, ParseError, Priority};
pub use validate::ValidWebhook;
pub use validate::{
    BatchRejection, CUSTOM_ID_RULE, FieldError, Limits, ModelCatalog, ModelCheck, ValidBatch,
    ValidItem, is_custom_id, validate_batch,
};
