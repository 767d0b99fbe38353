//! Replicate-style create-and-poll predictions, for long media jobs: create, poll with
//! backoff, cancel upstream when the job is cancelled, then fetch the output URLs.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use volley_domain::Endpoint;

use super::media::Store;
use super::{Job, Output, Provider, ProviderError, TEXT_ANSWER_CAP, read_json, send_error};

/// How long a create may wait for a quick prediction to finish (Replicate allows 1 to 60).
const PREFER_WAIT_SECS: u64 = 5;

/// Sync mode: a quick prediction comes back finished from the create itself, saving a poll
/// round trip; a long one comes back running and is polled. Only when the request timeout
/// leaves room for the wait.
fn prefer_wait(p: &Provider, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let secs = PREFER_WAIT_SECS.min(p.config.timeout_ms / 2000);
    if secs == 0 {
        rb
    } else {
        rb.header("Prefer", format!("wait={secs}"))
    }
}
const MAX_POLL: Duration = Duration::from_secs(10);

pub async fn run(
    p: &Provider,
    job: &Job,
    upstream: &str,
    store: &Store<'_>,
    cancel: &CancellationToken,
) -> Result<Output, ProviderError> {
    let mut input = job.body.clone();
    p.outgoing(&mut input);
    if let Some(o) = input.as_object_mut() {
        o.remove("model");
    }
    let kind = match job.endpoint {
        Endpoint::VideosGenerations => "video",
        Endpoint::MusicGenerations | Endpoint::AudioSpeech => "audio",
        _ => "image",
    };
    // Replicate's `version` takes "owner/model", "owner/model:version" or a version id.
    // The request body's other fields are the model's input, passed through unchanged.
    let resp = p
        .auth(prefer_wait(p, p.http.post(p.url("/predictions"))))
        .json(&json!({"version": upstream, "input": input}))
        .send()
        .await
        .map_err(|e| send_error(&p.config.name, e))?;
    if !resp.status().is_success() {
        return Err(p.status_error(resp, job).await);
    }
    let malformed =
        |why: &str| ProviderError::retry(format!("{}: malformed response: {why}", p.config.name));
    let created = read_json(p, resp, TEXT_ANSWER_CAP).await?;
    let id = created
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no prediction id"))?
        .to_owned();
    // The provider's key goes with these: they must stay on its origin.
    let own = |key: &str, default: String| match created.pointer(key).and_then(Value::as_str) {
        Some(u) => p.own_url(u),
        None => Ok(default),
    };
    let default_cancel = p.url(&format!("/predictions/{id}/cancel"));
    let urls = own("/urls/get", p.url(&format!("/predictions/{id}")))
        .and_then(|get| Ok((get, own("/urls/cancel", default_cancel.clone())?)));
    let (get_url, cancel_url) = match urls {
        Ok(u) => u,
        Err(e) => {
            // The prediction runs at the provider: stop it there, on its own origin.
            cancel_upstream(p, &default_cancel).await;
            return Err(e);
        }
    };
    tracing::debug!(job.id = job.id, prediction = %id, "prediction created");

    let deadline = tokio::time::Instant::now() + Duration::from_millis(p.config.timeout_ms);
    let mut wait = Duration::from_millis(p.config.poll_interval_ms.max(10));
    let mut current = created;
    loop {
        match current.get("status").and_then(Value::as_str).unwrap_or("") {
            "succeeded" => break,
            "failed" => {
                let e = current
                    .get("error")
                    .map(|e| {
                        e.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| e.to_string())
                    })
                    .unwrap_or_else(|| "no reason given".into());
                return Err(ProviderError::fatal(
                    "provider_error",
                    format!("{}: prediction failed: {e}", p.config.name),
                ));
            }
            "canceled" => {
                return Err(ProviderError::retry(format!(
                    "{}: the prediction was cancelled upstream",
                    p.config.name
                )));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            cancel_upstream(p, &cancel_url).await;
            return Err(ProviderError::retry(format!(
                "{}: prediction did not finish within {} ms",
                p.config.name, p.config.timeout_ms
            )));
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                cancel_upstream(p, &cancel_url).await;
                return Err(ProviderError::Cancelled);
            }
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 3 / 2).min(MAX_POLL);
        let r = tokio::select! {
            _ = cancel.cancelled() => {
                cancel_upstream(p, &cancel_url).await;
                return Err(ProviderError::Cancelled);
            }
            r = p.auth(p.http.get(&get_url)).send() => r,
        };
        let resp = match r {
            Ok(r) => r,
            // A failed poll is not a failed prediction: poll again.
            Err(e) => {
                tracing::debug!(job.id = job.id, error = %e, "poll failed");
                continue;
            }
        };
        if resp.status().as_u16() == 429 || resp.status().is_server_error() {
            continue;
        }
        if !resp.status().is_success() {
            return Err(p.status_error(resp, job).await);
        }
        current = read_json(p, resp, TEXT_ANSWER_CAP).await?;
    }

    let urls: Vec<String> = match current.get("output") {
        Some(Value::String(u)) => vec![u.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    if urls.is_empty() {
        return Err(malformed("a succeeded prediction without output URLs"));
    }
    let fallback = match kind {
        "video" => "video/mp4",
        "audio" => "audio/wav",
        _ => "image/png",
    };
    let mut data = Vec::with_capacity(urls.len());
    for (i, u) in urls.iter().enumerate() {
        data.push(store.url(p, i, u, fallback).await?);
    }
    Ok(Output {
        result: json!({
            "object": kind,
            "model": job.model,
            "prediction_id": id,
            "data": data,
        }),
        usage: None,
        media_keys: Vec::new(),
    })
}

async fn cancel_upstream(p: &Provider, url: &str) {
    match p.auth(p.http.post(url)).send().await {
        Ok(_) => tracing::debug!("prediction cancelled upstream"),
        Err(e) => tracing::warn!(error = %e, "could not cancel the prediction upstream"),
    }
}
