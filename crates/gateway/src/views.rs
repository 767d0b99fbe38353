//! The gateway's own JSON shapes, as typed bodies (their OpenAPI schemas are derived from
//! them). The batch and job objects, which batch-state's webhooks carry too, are
//! `volley_api`'s, re-exported here.
//!
//! Fields are declared in alphabetical order of their JSON names: these bodies used to be
//! `serde_json::Value` maps, which write their keys sorted, and clients keep getting the same
//! bytes.

use serde::Serialize;
use utoipa::ToSchema;
pub use volley_api::{
    Batch, BatchDetail, Job, MediaLinks, batch, batch_with_jobs, job, signed_result, usage,
};

use crate::openapi::schema;

/// A page of batches, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchList {
    pub data: Vec<Batch>,
    /// More pass `after` = the last id of this page.
    pub has_more: bool,
    #[schema(schema_with = schema::object_list)]
    pub object: &'static str,
}

/// A page of a batch's jobs, in order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobList {
    pub data: Vec<Job>,
    pub has_more: bool,
    #[schema(schema_with = schema::object_list)]
    pub object: &'static str,
}

/// A model some configured provider serves.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Model {
    pub created: i64,
    /// The batch endpoints this model accepts.
    pub endpoints: Vec<String>,
    pub id: String,
    #[schema(schema_with = schema::object_model)]
    pub object: &'static str,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ModelList {
    pub data: Vec<Model>,
    #[schema(schema_with = schema::object_list)]
    pub object: &'static str,
}

/// `/healthz`: the process is alive.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(schema_with = schema::ok)]
    pub status: &'static str,
}

/// `/readyz`: whether this gateway can take requests (503 with the same body when not).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Readiness {
    pub database: bool,
    /// True while shutting down.
    pub draining: bool,
    pub rabbitmq: bool,
}
