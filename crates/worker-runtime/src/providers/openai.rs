//! OpenAI-compatible HTTP: OpenAI, vLLM, llama.cpp server, Ollama, Together, Groq and others.

use base64::Engine;
use serde_json::{Value, json};
use volley_domain::Endpoint;

use super::media::Store;
use super::{
    Job, Output, Provider, ProviderError, TEXT_ANSWER_CAP, Usage, read_json, read_json_or,
    send_error,
};

pub async fn run(
    p: &Provider,
    job: &Job,
    upstream: &str,
    store: &Store<'_>,
) -> Result<Output, ProviderError> {
    let path = match job.endpoint {
        Endpoint::ChatCompletions => "/chat/completions",
        Endpoint::Completions => "/completions",
        Endpoint::ImagesGenerations => "/images/generations",
        Endpoint::AudioSpeech => "/audio/speech",
        Endpoint::VideosGenerations | Endpoint::MusicGenerations => {
            return Err(ProviderError::fatal(
                "invalid_request",
                format!(
                    "provider {} speaks the OpenAI API, which has no {}",
                    p.config.name, job.endpoint
                ),
            ));
        }
    };
    let mut body = job.body.clone();
    p.outgoing(&mut body);
    body["model"] = json!(upstream);
    if job.endpoint == Endpoint::AudioSpeech && body.get("response_format").is_none() {
        // WAV needs no decoder to check, and every server that speaks OpenAI's API offers it.
        body["response_format"] = json!("wav");
    }
    let resp = p
        .auth(p.http.post(p.url(path)))
        .json(&body)
        .send()
        .await
        .map_err(|e| send_error(&p.config.name, e))?;
    if !resp.status().is_success() {
        return Err(p.status_error(resp, job).await);
    }
    let malformed =
        |why: &str| ProviderError::retry(format!("{}: malformed response: {why}", p.config.name));
    match job.endpoint {
        Endpoint::AudioSpeech => {
            let ct = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            if !(ct.starts_with("audio/") || ct.starts_with("application/octet-stream")) {
                return Err(malformed(&format!("expected audio, got {ct:?}")));
            }
            let entry = store.response(0, resp, "audio/wav").await?;
            Ok(Output {
                result: json!({"object": "audio", "model": job.model, "data": [entry]}),
                usage: None,
                media_keys: Vec::new(),
            })
        }
        _ => {
            let v = if job.endpoint == Endpoint::ImagesGenerations {
                // Images may come inline as base64: a third larger than the media limit, plus
                // room for the JSON around them. Past that it is the media that is too large.
                let max = store.media.max_bytes();
                let cap = max.saturating_mul(4) / 3 + 64 * 1024;
                read_json_or(p, resp, cap, || media_too_large(max)).await?
            } else {
                read_json(p, resp, TEXT_ANSWER_CAP).await?
            };
            if job.endpoint == Endpoint::ImagesGenerations {
                return images(p, job, v, store).await;
            }
            if !v.get("choices").is_some_and(Value::is_array) {
                return Err(malformed("no `choices` array"));
            }
            let usage = v.get("usage").map(|u| {
                let n = |k: &str| u.get(k).and_then(Value::as_i64).unwrap_or(0);
                Usage {
                    prompt_tokens: n("prompt_tokens"),
                    completion_tokens: n("completion_tokens"),
                    total_tokens: n("total_tokens"),
                }
            });
            Ok(Output {
                result: v,
                usage,
                media_keys: Vec::new(),
            })
        }
    }
}

async fn images(
    p: &Provider,
    job: &Job,
    v: Value,
    store: &Store<'_>,
) -> Result<Output, ProviderError> {
    let malformed =
        |why: &str| ProviderError::retry(format!("{}: malformed response: {why}", p.config.name));
    let items = v
        .get("data")
        .and_then(Value::as_array)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| malformed("no `data` array of images"))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let mut entry = if let Some(b64) = item.get("b64_json").and_then(Value::as_str) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| malformed(&format!("b64_json: {e}")))?;
            if raw.len() as u64 > store.media.max_bytes() {
                return Err(media_too_large(store.media.max_bytes()));
            }
            let ct = sniff_image(&raw);
            store.bytes(i, ct, raw.into()).await?
        } else if let Some(url) = item.get("url").and_then(Value::as_str) {
            store.url(p, i, url, "image/png").await?
        } else {
            return Err(malformed("an image with neither `url` nor `b64_json`"));
        };
        if let Some(rp) = item.get("revised_prompt") {
            entry["revised_prompt"] = rp.clone();
        }
        out.push(entry);
    }
    Ok(Output {
        result: json!({
            "created": v.get("created").cloned().unwrap_or(json!(chrono::Utc::now().timestamp())),
            "model": job.model,
            "data": out,
        }),
        usage: None,
        media_keys: Vec::new(),
    })
}

fn sniff_image(raw: &[u8]) -> &'static str {
    if raw.starts_with(b"\x89PNG") {
        "image/png"
    } else if raw.starts_with(&[0xff, 0xd8]) {
        "image/jpeg"
    } else if raw.len() > 12 && &raw[8..12] == b"WEBP" {
        "image/webp"
    } else {
        "application/octet-stream"
    }
}

fn media_too_large(max: u64) -> ProviderError {
    ProviderError::fatal(
        "media_too_large",
        format!("the provider's media is larger than the {max} byte limit"),
    )
}
