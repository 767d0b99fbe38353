//! OpenAI-compatible endpoints.

use crate::error::ApiError;
use crate::media::{self, Media};
use crate::sim::{
    Object, Outcome, SimOpts, Simulator, lock, new_id, opt_bool, opt_f64, opt_str, opt_u64,
    read_json, req_str, unix_now, word_count,
};
use actix_web::body::SizedStream;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde_json::{Value, json};
use std::convert::Infallible;

const REPLY_PREFIX: &str = "Simulated reply to: ";
const MAX_ECHO_CHARS: usize = 200;
const MAX_IMAGE_SIDE: u32 = 1024;
const DEFAULT_IMAGE_SIDE: u32 = 64;
const MS_PER_WORD: u64 = 50;
const MAX_SPEECH_MS: u64 = 10_000;

pub(crate) type Data = web::Data<Simulator>;

/// Pads a text answer to `sim_answer_bytes`.
fn padded(mut text: String, sim: &SimOpts) -> String {
    let want = usize::try_from(sim.answer_bytes).unwrap_or(usize::MAX);
    if text.len() < want {
        text.push_str(&"x".repeat(want - text.len()));
    }
    text
}

/// A JSON answer; with `sim_slow_body_ms`, sent in ten pieces over that long (no length
/// declared, as a streaming server would).
fn answer(sim: &SimOpts, v: &Value) -> HttpResponse {
    const PIECES: usize = 10;
    let Some(ms) = sim.slow_body_ms else {
        return HttpResponse::Ok().json(v);
    };
    let bytes = Bytes::from(v.to_string());
    let step = bytes.len().div_ceil(PIECES).max(1);
    let pause = std::time::Duration::from_millis(ms / PIECES as u64);
    let pieces: Vec<Bytes> = (0..bytes.len())
        .step_by(step)
        .map(|i| bytes.slice(i..(i + step).min(bytes.len())))
        .collect();
    let body = futures::StreamExt::then(futures::stream::iter(pieces), move |c| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, Infallible>(c)
    });
    HttpResponse::Ok()
        .content_type("application/json")
        .streaming(body)
}

fn malformed_json() -> HttpResponse {
    HttpResponse::Ok().json(json!({"unexpected": true}))
}

fn reject_stream(body: &Object) -> Result<(), ApiError> {
    if opt_bool(body, "stream")? == Some(true) {
        return Err(ApiError::invalid(
            "streaming is not supported by the provider simulator",
            Some("stream"),
        ));
    }
    Ok(())
}

fn max_tokens(body: &Object) -> Result<Option<u64>, ApiError> {
    Ok(opt_u64(body, "max_tokens")?.or(opt_u64(body, "max_completion_tokens")?))
}

/// The prompt itself, untouched (`sim_echo`).
fn echo_of(input: &str) -> (String, u64, &'static str) {
    let text: String = input.chars().take(MAX_ECHO_CHARS).collect();
    let words = word_count(&text);
    (text, words, "stop")
}

/// Deterministic reply echoing `input`, cut to `max_tokens` words.
fn reply_for(input: &str, max_tokens: Option<u64>) -> (String, u64, &'static str) {
    let echoed: String = input.chars().take(MAX_ECHO_CHARS).collect();
    let full = format!("{REPLY_PREFIX}{}", echoed.trim());
    let words: Vec<&str> = full.split_whitespace().collect();
    match max_tokens {
        Some(limit) if (words.len() as u64) > limit.max(1) => {
            let kept = limit.max(1) as usize;
            (words[..kept].join(" "), kept as u64, "length")
        }
        _ => (full.trim().to_owned(), words.len() as u64, "stop"),
    }
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Text of a message `content`: a string, an array of parts, or null.
fn content_text(content: Option<&Value>, index: usize) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" ")),
        Some(_) => Err(ApiError::wrong_type(
            &format!("messages[{index}].content"),
            "a string or an array of content parts",
        )),
    }
}

pub(crate) async fn chat(
    req: HttpRequest,
    payload: web::Payload,
    st: Data,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload).await?;
    let sim = SimOpts::parse(&body, None)?;
    let model = req_str(&body, "model")?.to_owned();
    let messages = match body.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::missing("messages")),
        Some(Value::Array(m)) if m.is_empty() => {
            return Err(ApiError::invalid(
                "'messages' must contain at least one message",
                Some("messages"),
            ));
        }
        Some(Value::Array(m)) => m,
        Some(_) => return Err(ApiError::wrong_type("messages", "an array")),
    };
    let mut prompt_tokens = 0;
    let mut last = String::new();
    for (i, msg) in messages.iter().enumerate() {
        let Some(obj) = msg.as_object() else {
            return Err(ApiError::wrong_type(&format!("messages[{i}]"), "an object"));
        };
        match obj.get("role") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) => {
                return Err(ApiError::missing(&format!("messages[{i}].role")));
            }
            Some(_) => {
                return Err(ApiError::wrong_type(
                    &format!("messages[{i}].role"),
                    "a string",
                ));
            }
        }
        last = content_text(obj.get("content"), i)?;
        prompt_tokens += word_count(&last);
    }
    reject_stream(&body)?;
    let max_tokens = max_tokens(&body)?;

    let (outcome, _in_flight) = st.simulate(&sim, "/v1/chat/completions", &body).await?;
    if let Outcome::Malformed = outcome {
        return Ok(malformed_json());
    }
    let (text, completion_tokens, finish_reason) = if sim.echo {
        echo_of(&last)
    } else {
        reply_for(&last, max_tokens)
    };
    let mut text = padded(text, &sim);
    if sim.nul {
        text.push('\0');
    }
    Ok(answer(
        &sim,
        &json!({
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": unix_now(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage(prompt_tokens.max(1), completion_tokens),
        }),
    ))
}

pub(crate) async fn completions(
    req: HttpRequest,
    payload: web::Payload,
    st: Data,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload).await?;
    let sim = SimOpts::parse(&body, None)?;
    let model = req_str(&body, "model")?.to_owned();
    let prompt = req_str(&body, "prompt")?.to_owned();
    reject_stream(&body)?;
    let max_tokens = max_tokens(&body)?;

    let (outcome, _in_flight) = st.simulate(&sim, "/v1/completions", &body).await?;
    if let Outcome::Malformed = outcome {
        return Ok(malformed_json());
    }
    let (text, completion_tokens, finish_reason) = if sim.echo {
        echo_of(&prompt)
    } else {
        reply_for(&prompt, max_tokens)
    };
    let mut text = padded(text, &sim);
    if sim.nul {
        text.push('\0');
    }
    Ok(answer(
        &sim,
        &json!({
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": unix_now(),
            "model": model,
            "choices": [{
                "text": text,
                "index": 0,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage(word_count(&prompt).max(1), completion_tokens),
        }),
    ))
}

fn parse_size(size: &str) -> Result<(u32, u32), ApiError> {
    let bad = || {
        ApiError::invalid(
            format!("invalid size '{size}': expected WIDTHxHEIGHT, each 1..={MAX_IMAGE_SIDE}"),
            Some("size"),
        )
    };
    let (w, h) = size.split_once('x').ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if !(1..=MAX_IMAGE_SIDE).contains(&w) || !(1..=MAX_IMAGE_SIDE).contains(&h) {
        return Err(bad());
    }
    Ok((w, h))
}

/// Streams `body` with an exact Content-Length.
pub(crate) fn sized_response(
    content_type: &str,
    len: u64,
    chunks: impl Iterator<Item = Bytes> + 'static,
) -> HttpResponse {
    let stream = futures::stream::iter(chunks.map(Ok::<_, Infallible>));
    HttpResponse::Ok()
        .content_type(content_type.to_owned())
        .body(SizedStream::new(len, stream))
}

pub(crate) fn media_response(media: &Media) -> HttpResponse {
    sized_response(media.content_type, media.len(), media.chunks())
}

type Part = Box<dyn Iterator<Item = Bytes>>;

fn text_part(text: String, len: &mut u64) -> Part {
    *len += text.len() as u64;
    Box::new(std::iter::once(Bytes::from(text)))
}

pub(crate) async fn images(
    req: HttpRequest,
    payload: web::Payload,
    st: Data,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload).await?;
    let sim = SimOpts::parse(&body, None)?;
    // OpenAI defaults the model for images, so it is optional here too.
    opt_str(&body, "model")?;
    let prompt = req_str(&body, "prompt")?.to_owned();
    let n = opt_u64(&body, "n")?.unwrap_or(1);
    if !(1..=4).contains(&n) {
        return Err(ApiError::invalid("'n' must be between 1 and 4", Some("n")));
    }
    let (width, height) = match opt_str(&body, "size")? {
        Some(s) => parse_size(s)?,
        None => (DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE),
    };
    let as_b64 = match opt_str(&body, "response_format")? {
        None | Some("url") => false,
        Some("b64_json") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("invalid response_format '{other}': expected 'url' or 'b64_json'"),
                Some("response_format"),
            ));
        }
    };

    let (outcome, _in_flight) = st.simulate(&sim, "/v1/images/generations", &body).await?;
    if let Outcome::Malformed = outcome {
        return Ok(malformed_json());
    }
    let mut images = Vec::with_capacity(n as usize);
    for i in 0..n {
        let png = media::render_png(width, height, media::seed_of(&prompt, i))?;
        images.push(Media::png(png, sim.media_bytes)?);
    }
    let revised = format!("{prompt} (simulated)");
    let created = unix_now();

    if !as_b64 {
        let mut files = lock(&st.files);
        let data: Vec<Value> = images
            .into_iter()
            .map(|m| {
                let id = format!("{}.{}", new_id("img-"), m.extension());
                let url = sim
                    .media_link(&st.base_url)
                    .unwrap_or_else(|| st.file_url(&id));
                files.insert(id, m);
                json!({"url": url, "revised_prompt": revised})
            })
            .collect();
        return Ok(HttpResponse::Ok().json(json!({"created": created, "data": data})));
    }

    // b64_json of a padded image can be hundreds of MiB: stream the JSON
    // around base64 chunks instead of building it in memory.
    let revised_json = Value::String(revised).to_string();
    let mut parts: Vec<Part> = Vec::new();
    let mut len = 0u64;
    parts.push(text_part(
        format!("{{\"created\":{created},\"data\":["),
        &mut len,
    ));
    let count = images.len();
    for (i, m) in images.into_iter().enumerate() {
        parts.push(text_part(
            format!("{{\"revised_prompt\":{revised_json},\"b64_json\":\""),
            &mut len,
        ));
        len += m.base64_len();
        parts.push(Box::new(m.base64_chunks()));
        let sep = if i + 1 < count { "\"}," } else { "\"}" };
        parts.push(text_part(sep.to_owned(), &mut len));
    }
    parts.push(text_part("]}".to_owned(), &mut len));
    Ok(sized_response(
        "application/json",
        len,
        parts.into_iter().flatten(),
    ))
}

pub(crate) async fn speech(
    req: HttpRequest,
    payload: web::Payload,
    st: Data,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload).await?;
    let sim = SimOpts::parse(&body, None)?;
    req_str(&body, "model")?;
    let input = req_str(&body, "input")?.to_owned();
    let voice = opt_str(&body, "voice")?.unwrap_or("alloy").to_owned();
    let speed = opt_f64(&body, "speed")?.unwrap_or(1.0);
    if !(0.25..=4.0).contains(&speed) {
        return Err(ApiError::invalid(
            "'speed' must be between 0.25 and 4.0",
            Some("speed"),
        ));
    }
    // Every accepted format is answered with WAV (and says so in
    // Content-Type); encoding mp3/opus/flac is out of scope for a simulator.
    match opt_str(&body, "response_format")? {
        None | Some("wav" | "mp3" | "opus" | "aac" | "flac" | "pcm") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!("invalid response_format '{other}'"),
                Some("response_format"),
            ));
        }
    }

    let (outcome, _in_flight) = st.simulate(&sim, "/v1/audio/speech", &body).await?;
    if let Outcome::Malformed = outcome {
        return Ok(HttpResponse::Ok()
            .content_type("application/json")
            .body("{}"));
    }
    let words = word_count(&input).max(1);
    let ms = ((words * MS_PER_WORD) as f64 / speed) as u64;
    let media = Media::wav(
        ms.min(MAX_SPEECH_MS),
        media::tone_for(&format!("{voice}:{input}")),
        sim.media_bytes,
    )?;
    Ok(media_response(&media))
}

pub(crate) async fn file(path: web::Path<String>, st: Data) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let media = lock(&st.files).get(&id);
    match media {
        Some(m) => Ok(media_response(&m)),
        None => Err(ApiError::not_found(format!("No file with id '{id}'"))),
    }
}

pub(crate) async fn models() -> HttpResponse {
    let created = 1_700_000_000;
    let data: Vec<Value> = [
        "sim-chat",
        "sim-completion",
        "sim-image",
        "sim-tts",
        "sim/video",
        "sim/music",
        "sim/flux-image",
    ]
    .iter()
    .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "provider-sim"}))
    .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}
