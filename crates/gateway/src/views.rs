//! The contract's JSON shapes.

use serde_json::{Value, json};
use volley_db::{BatchView, JobSummary, JobView};
use volley_media::Signer;

pub fn batch(b: &BatchView) -> Value {
    let c = &b.counts;
    json!({
        "id": b.id.to_string(),
        "object": "batch",
        "label": b.label,
        "status": c.status().as_str(),
        "total": b.total,
        "queued": c.queued,
        "processing": c.processing,
        "processed": c.processed,
        "failed": c.failed,
        "cancelled": c.cancelled,
        "created": b.created_at.timestamp(),
        "metadata": b.metadata,
        "priority": b.priority.as_str(),
    })
}

pub fn batch_with_jobs(b: &BatchView, jobs: &[JobSummary], public_url: &str) -> Value {
    let mut v = batch(b);
    v["jobs"] = jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id.to_string(),
                "status": j.status.as_str(),
                "inference_type": j.inference_type,
                "custom_id": j.custom_id,
                "url": format!("{public_url}/v1/jobs/{}", j.id),
            })
        })
        .collect();
    v
}

/// Tokens the batch's jobs used so far (chat and completions report usage), summed.
pub fn usage(u: &volley_domain::BatchUsage) -> Value {
    json!({
        "prompt_tokens": u.tokens.prompt_tokens,
        "completion_tokens": u.tokens.completion_tokens,
        "total_tokens": u.tokens.total_tokens,
        "jobs": u.jobs,
    })
}

pub struct MediaLinks<'a> {
    pub signer: &'a Signer,
    pub public_url: &'a str,
    pub ttl_secs: i64,
    pub now: i64,
}

/// The job's result with its media as freshly signed links (every view of a result goes
/// through here: the job object, the listing and the bulk results).
pub fn signed_result(j: &JobView, links: &MediaLinks<'_>) -> Option<Value> {
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

pub fn job(j: &JobView, links: &MediaLinks<'_>) -> Value {
    let mut v = json!({
        "id": j.id.to_string(),
        "object": "job",
        "batch_id": j.batch_id.to_string(),
        "custom_id": j.custom_id,
        "status": j.status.as_str(),
        "inference_type": j.inference_type,
        "endpoint": j.endpoint,
        "model": j.model,
        "attempts": j.attempt,
        "created": j.created_at.timestamp(),
        "started": j.started_at.map(|t| t.timestamp()),
        "finished": j.finished_at.map(|t| t.timestamp()),
        "updated": j.updated_at.timestamp(),
    });
    if let Some(r) = signed_result(j, links) {
        v["result"] = r;
    }
    if j.status == volley_domain::JobStatus::Failed {
        v["error"] = json!({
            "type": j.error_type.as_deref().unwrap_or("provider_error"),
            "message": j.error_message.as_deref().unwrap_or(""),
        });
    }
    if let Some(last) = &j.last_error {
        v["last_error"] = json!(last);
    }
    if j.total_tokens.is_some() {
        v["usage"] = json!({
            "prompt_tokens": j.prompt_tokens,
            "completion_tokens": j.completion_tokens,
            "total_tokens": j.total_tokens,
        });
    }
    v
}
