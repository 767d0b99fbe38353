//! Small schemas the typed bodies name with `#[schema(schema_with = ...)]`: the closed sets of
//! strings the domain defines, listed from the domain itself.

use utoipa::openapi::Object;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use volley_domain::{BatchStatus, Endpoint, InferenceType, JobStatus};

/// A string that is one of `values`.
pub fn strings(values: &[&str]) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
}

pub fn object_batch() -> Object {
    strings(&["batch"])
}
pub fn priority() -> Object {
    strings(&["low", "normal", "high"])
}
pub fn object_job() -> Object {
    strings(&["job"])
}

pub fn batch_status() -> Object {
    let all = [
        BatchStatus::Pending,
        BatchStatus::Processing,
        BatchStatus::Done,
    ];
    strings(&all.map(BatchStatus::as_str))
}

pub fn job_status() -> Object {
    let all: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
    strings(&all)
}

pub fn inference_type() -> Object {
    let all: Vec<&str> = InferenceType::ALL.iter().map(|t| t.as_str()).collect();
    strings(&all)
}

pub fn endpoint() -> Object {
    let all: Vec<&str> = Endpoint::ALL.iter().map(|e| e.path()).collect();
    strings(&all)
}

/// A batch's `metadata`: string values by key.
pub fn metadata() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}
