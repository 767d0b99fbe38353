//! The contract's JSON shapes, as typed bodies (their OpenAPI schemas are derived from them).
//!
//! Fields are declared in alphabetical order of their JSON names: these bodies used to be
//! `serde_json::Value` maps, which write their keys sorted, and clients keep getting the same
//! bytes. `Option` fields without `skip_serializing_if` are `null` when empty; those with it are
//! absent, as they always were.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use volley_db::{BatchView, JobSummary, JobView};
use volley_media::Signer;

use crate::openapi::schema;

/// A batch with its per-status job counts.
#[derive(Debug, Serialize, ToSchema)]
pub struct Batch {
    /// Jobs cancelled (an addition to the contract).
    pub cancelled: u64,
    /// Unix time (seconds) the batch was accepted.
    pub created: i64,
    pub failed: u64,
    #[schema(example = "7")]
    pub id: String,
    pub label: Option<String>,
    /// The batch's `metadata` as submitted (`{}` when none).
    #[schema(schema_with = schema::metadata)]
    pub metadata: Value,
    #[schema(schema_with = schema::object_batch)]
    pub object: &'static str,
    /// `low`, `normal` or `high`: the order within the key's own work (an addition).
    #[schema(schema_with = schema::priority)]
    pub priority: &'static str,
    pub processed: u64,
    pub processing: u64,
    pub queued: u64,
    #[schema(schema_with = schema::batch_status)]
    pub status: &'static str,
    pub total: i64,
}

/// A batch with a link to each of its jobs; `GET /v1/batches/{id}` adds the token usage.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchDetail {
    pub cancelled: u64,
    pub created: i64,
    /// When the batch should finish (RFC 3339, UTC), from measured throughput; `null` when
    /// there is no estimate. Only on `GET /v1/batches/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_completion_at: Option<Option<String>>,
    /// Seconds until then; `null` when there is no estimate. Only on `GET /v1/batches/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_seconds_remaining: Option<Option<u64>>,
    pub failed: u64,
    #[schema(example = "7")]
    pub id: String,
    /// Every job of the batch, in submission order.
    pub jobs: Vec<JobLink>,
    pub label: Option<String>,
    #[schema(schema_with = schema::metadata)]
    pub metadata: Value,
    #[schema(schema_with = schema::object_batch)]
    pub object: &'static str,
    /// `low`, `normal` or `high`: the order within the key's own work (an addition).
    #[schema(schema_with = schema::priority)]
    pub priority: &'static str,
    pub processed: u64,
    pub processing: u64,
    pub queued: u64,
    #[schema(schema_with = schema::batch_status)]
    pub status: &'static str,
    pub total: i64,
    /// Tokens used so far (only on `GET /v1/batches/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<BatchUsage>,
}

/// One job of a batch, as the batch lists it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobLink {
    /// The item's `custom_id`, or `null`.
    pub custom_id: Option<String>,
    pub id: String,
    #[schema(schema_with = schema::inference_type)]
    pub inference_type: String,
    #[schema(schema_with = schema::job_status)]
    pub status: String,
    /// `GET` this for the job's result.
    pub url: String,
}

/// Tokens the batch's jobs used so far (chat and completions report usage), summed.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchUsage {
    pub completion_tokens: i64,
    /// Jobs that reported usage.
    pub jobs: i64,
    pub prompt_tokens: i64,
    pub total_tokens: i64,
}

/// A job: status, attempts, timestamps, and its result or error.
#[derive(Debug, Serialize, ToSchema)]
pub struct Job {
    pub attempts: i32,
    pub batch_id: String,
    pub created: i64,
    /// The item's `custom_id`, or `null`.
    pub custom_id: Option<String>,
    #[schema(schema_with = schema::endpoint)]
    pub endpoint: String,
    /// Why the job failed (only when `status` is `FAILED`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Unix time the job reached a terminal state, or `null`.
    pub finished: Option<i64>,
    pub id: String,
    #[schema(schema_with = schema::inference_type)]
    pub inference_type: String,
    /// The last retryable failure, while the job is being retried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub model: String,
    #[schema(schema_with = schema::object_job)]
    pub object: &'static str,
    /// The body the job was submitted with (only on `GET /v1/jobs/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub request: Option<Value>,
    /// The provider's answer, in the endpoint's own shape; media as signed URLs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Unix time a worker first started the job, or `null`.
    pub started: Option<i64>,
    #[schema(schema_with = schema::job_status)]
    pub status: String,
    pub updated: i64,
    /// Tokens the job used, when the provider reported them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<JobUsage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobError {
    pub message: String,
    /// `provider_error`, `timeout`, `expired`, `worker_lost`, `invalid_output`, ...
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobUsage {
    pub completion_tokens: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
}

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

pub fn batch(b: &BatchView) -> Batch {
    let c = &b.counts;
    Batch {
        cancelled: c.cancelled,
        created: b.created_at.timestamp(),
        failed: c.failed,
        id: b.id.to_string(),
        label: b.label.clone(),
        metadata: b.metadata.clone(),
        object: "batch",
        priority: b.priority.as_str(),
        processed: c.processed,
        processing: c.processing,
        queued: c.queued,
        status: c.status().as_str(),
        total: b.total,
    }
}

pub(crate) fn batch_with_jobs(b: &BatchView, jobs: &[JobSummary], public_url: &str) -> BatchDetail {
    let c = &b.counts;
    BatchDetail {
        cancelled: c.cancelled,
        created: b.created_at.timestamp(),
        estimated_completion_at: None,
        estimated_seconds_remaining: None,
        failed: c.failed,
        id: b.id.to_string(),
        jobs: jobs
            .iter()
            .map(|j| JobLink {
                custom_id: j.custom_id.clone(),
                id: j.id.to_string(),
                inference_type: j.inference_type.clone(),
                status: j.status.as_str().to_owned(),
                url: format!("{public_url}/v1/jobs/{}", j.id),
            })
            .collect(),
        label: b.label.clone(),
        metadata: b.metadata.clone(),
        object: "batch",
        priority: b.priority.as_str(),
        processed: c.processed,
        processing: c.processing,
        queued: c.queued,
        status: c.status().as_str(),
        total: b.total,
        usage: None,
    }
}

pub fn usage(u: &volley_domain::BatchUsage) -> BatchUsage {
    BatchUsage {
        completion_tokens: u.tokens.completion_tokens,
        jobs: u.jobs,
        prompt_tokens: u.tokens.prompt_tokens,
        total_tokens: u.tokens.total_tokens,
    }
}

pub(crate) struct MediaLinks<'a> {
    pub signer: &'a Signer,
    pub public_url: &'a str,
    pub ttl_secs: i64,
    pub now: i64,
}

/// The job's result with its media as freshly signed links (every view of a result goes
/// through here: the job object, the listing and the bulk results).
pub(crate) fn signed_result(j: &JobView, links: &MediaLinks<'_>) -> Option<Value> {
    let mut r = j.result.clone()?;
    // Signed afresh on every read: links never outlive their expiry, results do. Only
    // media this job's worker stored, in this job's part of the store, becomes a link.
    let expires = links.now.saturating_add(links.ttl_secs);
    let own: Vec<String> = j
        .media_keys
        .iter()
        .flatten()
        .filter(|k| volley_media::key_belongs_to_job(k, j.id))
        .cloned()
        .collect();
    volley_media::rewrite_refs(&mut r, &own, &|key| {
        links.signer.url(links.public_url, j.id, key, expires)
    });
    Some(r)
}

pub fn job(j: &JobView, links: &MediaLinks<'_>) -> Job {
    Job {
        attempts: j.attempt,
        batch_id: j.batch_id.to_string(),
        created: j.created_at.timestamp(),
        custom_id: j.custom_id.clone(),
        endpoint: j.endpoint.clone(),
        error: (j.status == volley_domain::JobStatus::Failed).then(|| JobError {
            message: j.error_message.clone().unwrap_or_default(),
            kind: j
                .error_type
                .clone()
                .unwrap_or_else(|| "provider_error".to_owned()),
        }),
        finished: j.finished_at.map(|t| t.timestamp()),
        id: j.id.to_string(),
        inference_type: j.inference_type.clone(),
        last_error: j.last_error.clone(),
        model: j.model.clone(),
        object: "job",
        request: None,
        result: signed_result(j, links),
        started: j.started_at.map(|t| t.timestamp()),
        status: j.status.as_str().to_owned(),
        updated: j.updated_at.timestamp(),
        usage: j.total_tokens.is_some().then_some(JobUsage {
            completion_tokens: j.completion_tokens,
            prompt_tokens: j.prompt_tokens,
            total_tokens: j.total_tokens,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    //! The bytes clients got when these bodies were `serde_json::json!` maps.

    use super::*;
    use chrono::TimeZone;
    use volley_domain::BatchCounts;

    fn at(secs: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc.timestamp_opt(secs, 0).unwrap()
    }

    fn view(label: Option<&str>) -> BatchView {
        BatchView {
            id: 7,
            label: label.map(str::to_owned),
            metadata: serde_json::json!({}),
            priority: volley_domain::Priority::Normal,
            total: 3,
            created_at: at(1_718_312_400),
            counts: BatchCounts {
                queued: 0,
                processing: 1,
                processed: 2,
                failed: 0,
                cancelled: 0,
            },
        }
    }

    fn job_view(status: &str) -> JobView {
        JobView {
            id: 43,
            batch_id: 7,
            custom_id: None,
            status: status.parse().unwrap(),
            inference_type: "LLM".into(),
            endpoint: "/v1/completions".into(),
            model: "qwen3-8b".into(),
            attempt: 1,
            created_at: at(100),
            started_at: Some(at(101)),
            finished_at: None,
            updated_at: at(102),
            result: None,
            error_type: None,
            error_message: None,
            last_error: None,
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            media_keys: None,
        }
    }

    fn links(signer: &Signer) -> MediaLinks<'_> {
        MediaLinks {
            signer,
            public_url: "http://gw",
            ttl_secs: 60,
            now: 0,
        }
    }

    #[test]
    fn batch_bytes() {
        assert_eq!(
            serde_json::to_string(&batch(&view(Some("Q2")))).unwrap(),
            r#"{"cancelled":0,"created":1718312400,"failed":0,"id":"7","label":"Q2","metadata":{},"object":"batch","priority":"normal","processed":2,"processing":1,"queued":0,"status":"PROCESSING","total":3}"#
        );
        assert_eq!(
            serde_json::to_string(&batch(&view(None))).unwrap(),
            r#"{"cancelled":0,"created":1718312400,"failed":0,"id":"7","label":null,"metadata":{},"object":"batch","priority":"normal","processed":2,"processing":1,"queued":0,"status":"PROCESSING","total":3}"#
        );
    }

    #[test]
    fn batch_with_jobs_bytes() {
        let jobs = [JobSummary {
            id: 43,
            status: volley_domain::JobStatus::Processed,
            inference_type: "IMAGE".into(),
            custom_id: Some("a-1".into()),
        }];
        let mut b = batch_with_jobs(&view(None), &jobs, "http://gw");
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"cancelled":0,"created":1718312400,"failed":0,"id":"7","jobs":[{"custom_id":"a-1","id":"43","inference_type":"IMAGE","status":"PROCESSED","url":"http://gw/v1/jobs/43"}],"label":null,"metadata":{},"object":"batch","priority":"normal","processed":2,"processing":1,"queued":0,"status":"PROCESSING","total":3}"#
        );
        b.estimated_completion_at = Some(None);
        b.estimated_seconds_remaining = Some(Some(5));
        b.usage = Some(usage(&volley_domain::BatchUsage {
            tokens: volley_domain::Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            },
            jobs: 1,
        }));
        let text = serde_json::to_string(&b).unwrap();
        assert!(
            text.ends_with(
                r#""total":3,"usage":{"completion_tokens":2,"jobs":1,"prompt_tokens":1,"total_tokens":3}}"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#""created":1718312400,"estimated_completion_at":null,"estimated_seconds_remaining":5,"failed":0"#
            ),
            "{text}"
        );
    }

    #[test]
    fn job_bytes() {
        let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
        let j = job_view("PROCESSING");
        assert_eq!(
            serde_json::to_string(&job(&j, &links(&signer))).unwrap(),
            r#"{"attempts":1,"batch_id":"7","created":100,"custom_id":null,"endpoint":"/v1/completions","finished":null,"id":"43","inference_type":"LLM","model":"qwen3-8b","object":"job","started":101,"status":"PROCESSING","updated":102}"#
        );
        let mut j = job_view("FAILED");
        j.result = Some(serde_json::json!({"b": 1, "a": [null]}));
        j.last_error = Some("slow".into());
        j.total_tokens = Some(5);
        j.prompt_tokens = Some(5);
        let mut v = job(&j, &links(&signer));
        v.request = Some(serde_json::json!({"model": "m"}));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"attempts":1,"batch_id":"7","created":100,"custom_id":null,"endpoint":"/v1/completions","error":{"message":"","type":"provider_error"},"finished":null,"id":"43","inference_type":"LLM","last_error":"slow","model":"qwen3-8b","object":"job","request":{"model":"m"},"result":{"a":[null],"b":1},"started":101,"status":"FAILED","updated":102,"usage":{"completion_tokens":null,"prompt_tokens":5,"total_tokens":5}}"#
        );
    }
}
