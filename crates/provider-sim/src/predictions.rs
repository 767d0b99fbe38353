//! Replicate-style asynchronous predictions.
//!
//! A prediction runs for its latency (wall clock since creation); a tokio
//! timer finishes it so `in_flight` drops even if nobody polls, and a GET past
//! the deadline finishes it on the spot so polling never races the timer.

use crate::error::ApiError;
use crate::media::{self, Media};
use crate::openai::Data;
use crate::sim::{FailMode, Object, SimOpts, Simulator, lock, new_id, read_json, word_count};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUTE: &str = "/v1/predictions";
const MAX_PREDICTIONS: usize = 100_000;
const FINISHED_TTL: Duration = Duration::from_secs(3600);
const SWEEP_EVERY: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Video,
    Audio,
    Image,
}

#[derive(Clone)]
enum Plan {
    Succeed {
        kind: Kind,
        prompt: String,
        outputs: u64,
        width: u32,
        height: u32,
        audio_ms: u64,
        media_bytes: u64,
        /// `sim_media_url`/`sim_redirect_to`: the output links instead of the files'.
        link: Option<String>,
    },
    Fail(String),
}

enum Status {
    Running,
    Succeeded(Value),
    Failed(String),
    Canceled,
}

struct Prediction {
    id: String,
    model: Option<String>,
    version: Option<String>,
    input: Value,
    created: Instant,
    created_at: DateTime<Utc>,
    latency: Duration,
    plan: Plan,
    /// `sim_poll_url`: `urls.get` instead of this prediction's own.
    poll_url: Option<String>,
    status: Status,
    completed_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
pub(crate) struct Predictions {
    map: HashMap<String, Prediction>,
    inserts: u64,
}

impl Predictions {
    /// Makes room for one more prediction; false if every slot is running.
    fn make_room(&mut self) -> bool {
        self.inserts += 1;
        if self.map.len() >= MAX_PREDICTIONS || self.inserts.is_multiple_of(SWEEP_EVERY) {
            self.map.retain(|_, p| {
                matches!(p.status, Status::Running) || p.created.elapsed() < FINISHED_TTL
            });
        }
        if self.map.len() < MAX_PREDICTIONS {
            return true;
        }
        let oldest_finished = self
            .map
            .values()
            .filter(|p| !matches!(p.status, Status::Running))
            .min_by_key(|p| p.created)
            .map(|p| p.id.clone());
        match oldest_finished {
            Some(id) => {
                self.map.remove(&id);
                true
            }
            None => false,
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Prediction {
    fn to_json(&self, base: &str) -> Value {
        let elapsed = self.created.elapsed();
        let start_after = self.latency / 5;
        let (status, output, error) = match &self.status {
            Status::Running if elapsed < start_after => ("starting", Value::Null, Value::Null),
            Status::Running => ("processing", Value::Null, Value::Null),
            Status::Succeeded(out) => ("succeeded", out.clone(), Value::Null),
            Status::Failed(e) => ("failed", Value::Null, Value::String(e.clone())),
            Status::Canceled => ("canceled", Value::Null, Value::Null),
        };
        let started = (status != "starting")
            .then(|| chrono::Duration::from_std(start_after).ok())
            .flatten()
            .map(|d| rfc3339(self.created_at + d));
        let metrics = match (status, self.completed_at) {
            ("succeeded", Some(done)) => {
                json!({"predict_time": (done - self.created_at).as_seconds_f64()})
            }
            _ => json!({}),
        };
        let own = format!("{base}{ROUTE}/{}", self.id);
        let get = self.poll_url.clone().unwrap_or_else(|| own.clone());
        json!({
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": "",
            "output": output,
            "data_removed": false,
            "error": error,
            "status": status,
            "created_at": rfc3339(self.created_at),
            "started_at": started,
            "completed_at": self.completed_at.map(rfc3339),
            "urls": {"get": get, "cancel": format!("{own}/cancel")},
            "metrics": metrics,
        })
    }
}

fn kind_of(model: &str, input: &Object) -> Result<Kind, ApiError> {
    match input.get("kind") {
        None | Some(Value::Null) => {}
        Some(Value::String(k)) => {
            return match k.as_str() {
                "video" => Ok(Kind::Video),
                "audio" | "music" => Ok(Kind::Audio),
                "image" => Ok(Kind::Image),
                other => Err(ApiError::invalid(
                    format!("unknown input.kind '{other}' (expected video, audio or image)"),
                    Some("input.kind"),
                )),
            };
        }
        Some(_) => return Err(ApiError::wrong_type("input.kind", "a string")),
    }
    let m = model.to_ascii_lowercase();
    Ok(if m.contains("video") {
        Kind::Video
    } else if ["music", "audio", "speech", "tts"]
        .iter()
        .any(|w| m.contains(w))
    {
        Kind::Audio
    } else {
        // "image", "flux", diffusion models and anything unrecognised.
        Kind::Image
    })
}

/// Model-specific inputs are loosely typed on Replicate, so odd values fall
/// back to defaults instead of failing.
fn input_u64(input: &Object, name: &str) -> Option<u64> {
    input.get(name).and_then(Value::as_u64)
}

fn build_plan(model: &str, input: &Object, sim: &SimOpts, base: &str) -> Result<Plan, ApiError> {
    let kind = kind_of(model, input)?;
    let prompt = input
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let side = |name| input_u64(input, name).unwrap_or(64).clamp(1, 1024) as u32;
    let audio_ms = match input.get("duration").and_then(Value::as_f64) {
        Some(secs) if secs > 0.0 => (secs * 1000.0) as u64,
        _ => (word_count(&prompt) * 50).max(500),
    }
    .min(10_000);
    Ok(Plan::Succeed {
        kind,
        outputs: input_u64(input, "num_outputs").unwrap_or(1).clamp(1, 4),
        width: side("width"),
        height: side("height"),
        audio_ms,
        media_bytes: sim.media_bytes,
        link: sim.media_link(base),
        prompt,
    })
}

/// Produces output files; video/audio give one URL string, images a list of
/// URLs (the common Replicate conventions for those model families).
fn render(plan: &Plan, st: &Simulator) -> Result<(Value, Vec<(String, Media)>), String> {
    let Plan::Succeed {
        kind,
        prompt,
        outputs,
        width,
        height,
        audio_ms,
        media_bytes,
        link,
    } = plan
    else {
        return Err("no output planned".to_owned());
    };
    let mut files = Vec::new();
    let mut add = |m: Media| {
        let id = format!("{}.{}", new_id("pred-"), m.extension());
        let url = link.clone().unwrap_or_else(|| st.file_url(&id));
        files.push((id, m));
        url
    };
    let output = match kind {
        Kind::Video => Value::String(add(Media::mp4(*media_bytes).map_err(|e| e.message)?)),
        Kind::Audio => Value::String(add(Media::wav(
            *audio_ms,
            media::tone_for(prompt),
            *media_bytes,
        )
        .map_err(|e| e.message)?)),
        Kind::Image => {
            let mut urls = Vec::new();
            for i in 0..*outputs {
                let png = media::render_png(*width, *height, media::seed_of(prompt, i))
                    .map_err(|e| e.message)?;
                urls.push(Value::String(add(
                    Media::png(png, *media_bytes).map_err(|e| e.message)?
                )));
            }
            Value::Array(urls)
        }
    };
    Ok((output, files))
}

/// Moves a running prediction past its deadline to its terminal status.
fn finish(st: &Simulator, id: &str) {
    let plan = {
        let preds = lock(&st.predictions);
        match preds.map.get(id) {
            Some(p) if matches!(p.status, Status::Running) && p.created.elapsed() >= p.latency => {
                p.plan.clone()
            }
            _ => return,
        }
    };
    // Rendering happens outside the lock; if a cancel or another finisher
    // wins meanwhile, this result is dropped.
    let result = match &plan {
        Plan::Fail(msg) => Err(msg.clone()),
        Plan::Succeed { .. } => render(&plan, st),
    };
    let mut preds = lock(&st.predictions);
    let Some(p) = preds.map.get_mut(id) else {
        return;
    };
    if !matches!(p.status, Status::Running) {
        return;
    }
    p.status = match result {
        Ok((output, files)) => {
            let mut store = lock(&st.files);
            for (fid, m) in files {
                store.insert(fid, m);
            }
            Status::Succeeded(output)
        }
        Err(e) => Status::Failed(e),
    };
    p.completed_at = Some(Utc::now());
    st.stats.inference_finished();
}

fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"detail": "Not found."}))
}

pub(crate) async fn create(
    req: HttpRequest,
    payload: web::Payload,
    st: Data,
) -> Result<HttpResponse, ApiError> {
    let body = read_json(&req, payload).await?;
    let model = crate::sim::opt_str(&body, "model")?.map(str::to_owned);
    let version = crate::sim::opt_str(&body, "version")?.map(str::to_owned);
    let Some(name) = model.clone().or_else(|| version.clone()) else {
        return Err(ApiError::missing("model"));
    };
    let input = match body.get("input") {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::wrong_type("input", "an object")),
    };
    let sim = SimOpts::parse(&body, Some(input))?;
    let mut plan = build_plan(&name, input, &sim, &st.base_url)?;
    let mut latency = st.latency(&sim);

    // Create itself fails only for transport-level modes; the others shape
    // how the prediction ends.
    match st.decide_fail(&sim, ROUTE, &body) {
        None => {}
        Some(FailMode::Retryable) => return Err(ApiError::upstream()),
        Some(FailMode::RateLimit) => {
            return Err(ApiError::rate_limited(sim.retry_after.unwrap_or(1)));
        }
        Some(FailMode::Malformed) => {
            return Ok(HttpResponse::Created().json(json!({"unexpected": true})));
        }
        Some(FailMode::Fatal) => {
            plan = Plan::Fail("simulated invalid request: sim_fail=fatal".to_owned());
        }
        Some(FailMode::Timeout) => {
            latency = Simulator::timeout_latency(&sim);
            plan = Plan::Fail("simulated timeout".to_owned());
        }
    }

    let id = new_id("");
    let pred = Prediction {
        id: id.clone(),
        model,
        version,
        input: Value::Object(input.clone()),
        created: Instant::now(),
        created_at: Utc::now(),
        latency,
        plan,
        poll_url: sim.poll_url.clone(),
        status: Status::Running,
        completed_at: None,
    };
    let json = pred.to_json(&st.base_url);
    {
        let mut preds = lock(&st.predictions);
        if !preds.make_room() {
            let mut e = ApiError::rate_limited(sim.retry_after.unwrap_or(1));
            e.message = "too many running predictions".to_owned();
            return Err(e);
        }
        preds.map.insert(id.clone(), pred);
        st.stats.inference_started();
    }

    let state: Arc<Simulator> = st.into_inner();
    {
        let (state, id) = (state.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            finish(&state, &id);
        });
    }
    // Replicate's sync mode: `Prefer: wait[=N]` holds the create for up to N seconds (60 at
    // most) and answers with the prediction as it stands then, finished if it was quick.
    if let Some(wait) = prefer_wait(&req) {
        tokio::time::sleep(latency.min(wait)).await;
        finish(&state, &id);
        let preds = lock(&state.predictions);
        if let Some(p) = preds.map.get(&id) {
            return Ok(HttpResponse::build(StatusCode::CREATED).json(p.to_json(&state.base_url)));
        }
    }
    Ok(HttpResponse::build(StatusCode::CREATED).json(json))
}

/// The `Prefer: wait` or `Prefer: wait=N` header, capped at 60 s as Replicate does.
fn prefer_wait(req: &HttpRequest) -> Option<std::time::Duration> {
    let v = req.headers().get("prefer")?.to_str().ok()?.trim();
    let secs = match v.strip_prefix("wait") {
        Some("") => 60,
        Some(rest) => rest.strip_prefix('=')?.trim().parse::<u64>().ok()?.min(60),
        None => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

pub(crate) async fn get(path: web::Path<String>, st: Data) -> HttpResponse {
    let id = path.into_inner();
    finish(&st, &id);
    let preds = lock(&st.predictions);
    match preds.map.get(&id) {
        Some(p) => HttpResponse::Ok().json(p.to_json(&st.base_url)),
        None => not_found(),
    }
}

pub(crate) async fn cancel(path: web::Path<String>, st: Data) -> HttpResponse {
    let id = path.into_inner();
    finish(&st, &id);
    let mut preds = lock(&st.predictions);
    let Some(p) = preds.map.get_mut(&id) else {
        return not_found();
    };
    if matches!(p.status, Status::Running) {
        p.status = Status::Canceled;
        p.completed_at = Some(Utc::now());
        st.stats.inference_finished();
        st.stats.record_cancel();
    }
    HttpResponse::Ok().json(p.to_json(&st.base_url))
}
