//! The simulator's shared data (`Simulator`), request-body parsing and the `sim_*` control fields.

use crate::error::ApiError;
use crate::media::MAX_MEDIA_BYTES;
use crate::predictions::Predictions;
use crate::stats::{InFlightGuard, Stats};
use crate::store::{FailCounter, FileStore};
use actix_web::http::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderMap};
use actix_web::{HttpRequest, web};
use futures::StreamExt as _;
use serde_json::{Map, Value};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub(crate) type Object = Map<String, Value>;

pub(crate) const BODY_LIMIT: usize = 8 * 1024 * 1024;
/// Oversized bodies are read and discarded up to this much so that the
/// client sees the 413 instead of a reset connection.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
const TIMEOUT_SLEEP: Duration = Duration::from_secs(60);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data in a
    // state worse than "slightly stale counters", so recover.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every handler shares: settings, counters, stored files and predictions.
pub(crate) struct Simulator {
    pub default_latency: Duration,
    pub api_key: Option<String>,
    pub base_url: String,
    pub stats: Stats,
    pub files: Mutex<FileStore>,
    pub predictions: Mutex<Predictions>,
    fails: Mutex<FailCounter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailMode {
    Retryable,
    Fatal,
    RateLimit,
    Malformed,
    Timeout,
}

/// What the simulator should do with a call once its latency has elapsed.
pub(crate) enum Outcome {
    Succeed,
    Malformed,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct SimOpts {
    pub latency_ms: Option<u64>,
    pub fail: Option<FailMode>,
    pub fail_times: Option<u64>,
    pub key: Option<String>,
    pub retry_after: Option<u64>,
    pub media_bytes: u64,
    /// `sim_echo`: chat and completions reply with the prompt verbatim, as a model that
    /// follows "reply with exactly ..." does (for tests of hostile provider text).
    pub echo: bool,
    /// `sim_media_url`: media links in the answer point here instead (a hostile provider,
    /// or a model talked into it).
    pub media_url: Option<String>,
    /// `sim_redirect_to`: media links point to `/sim/redirect`, which redirects here.
    pub redirect_to: Option<String>,
    /// `sim_answer_bytes`: a text answer padded to at least this many bytes.
    pub answer_bytes: u64,
    /// `sim_slow_body_ms`: a text answer's body trickles out over this long.
    pub slow_body_ms: Option<u64>,
    /// `sim_poll_url`: a prediction's `urls.get` (off the provider's origin, say).
    pub poll_url: Option<String>,
    /// `sim_nul`: put U+0000 in the reply text and in error messages (what PostgreSQL
    /// cannot store).
    pub nul: bool,
}

impl SimOpts {
    /// Reads `sim_*` fields from `primary`, falling back to `secondary`
    /// (predictions accept them top-level or inside `input`).
    pub fn parse(primary: &Object, secondary: Option<&Object>) -> Result<Self, ApiError> {
        let pick = |name: &str| -> Option<&Object> {
            if primary.get(name).is_some_and(|v| !v.is_null()) {
                Some(primary)
            } else {
                secondary.filter(|s| s.get(name).is_some_and(|v| !v.is_null()))
            }
        };
        let u = |name: &str| match pick(name) {
            Some(obj) => opt_u64(obj, name),
            None => Ok(None),
        };
        let s = |name: &str| match pick(name) {
            Some(obj) => opt_str(obj, name).map(|v| v.map(str::to_owned)),
            None => Ok(None),
        };
        let fail = match s("sim_fail")?.as_deref() {
            None => None,
            Some("retryable") => Some(FailMode::Retryable),
            Some("fatal") => Some(FailMode::Fatal),
            Some("rate_limit") => Some(FailMode::RateLimit),
            Some("malformed") => Some(FailMode::Malformed),
            Some("timeout") => Some(FailMode::Timeout),
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "unknown sim_fail '{other}' (expected retryable, fatal, rate_limit, malformed or timeout)"
                    ),
                    Some("sim_fail"),
                ));
            }
        };
        Ok(Self {
            latency_ms: u("sim_latency_ms")?,
            fail,
            fail_times: u("sim_fail_times")?,
            key: s("sim_key")?,
            retry_after: u("sim_retry_after")?,
            media_bytes: u("sim_media_bytes")?.unwrap_or(0).min(MAX_MEDIA_BYTES),
            echo: match pick("sim_echo") {
                Some(obj) => opt_bool(obj, "sim_echo")?.unwrap_or(false),
                None => false,
            },
            media_url: s("sim_media_url")?,
            redirect_to: s("sim_redirect_to")?,
            answer_bytes: u("sim_answer_bytes")?.unwrap_or(0).min(MAX_ANSWER_BYTES),
            slow_body_ms: u("sim_slow_body_ms")?,
            poll_url: s("sim_poll_url")?,
            nul: match pick("sim_nul") {
                Some(obj) => opt_bool(obj, "sim_nul")?.unwrap_or(false),
                None => false,
            },
        })
    }

    /// The link to hand out for produced media, if `sim_media_url` or `sim_redirect_to`
    /// chose one.
    pub(crate) fn media_link(&self, base: &str) -> Option<String> {
        if let Some(u) = &self.media_url {
            return Some(u.clone());
        }
        let to = self.redirect_to.as_ref()?;
        let mut q = String::new();
        for b in to.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                q.push(char::from(b));
            } else {
                q.push_str(&format!("%{b:02X}"));
            }
        }
        Some(format!("{base}/sim/redirect?to={q}"))
    }
}

/// The largest `sim_answer_bytes`.
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;

impl Simulator {
    pub fn new(default_latency: Duration, api_key: Option<String>, base_url: String) -> Self {
        Self {
            default_latency,
            api_key,
            base_url: base_url.trim_end_matches('/').to_owned(),
            stats: Stats::default(),
            files: Mutex::default(),
            predictions: Mutex::default(),
            fails: Mutex::default(),
        }
    }

    pub(crate) fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.api_key else {
            return true;
        };
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        // Replicate clients send `Token <key>`; OpenAI clients `Bearer <key>`.
        value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("Token "))
            .is_some_and(|k| k.trim() == expected)
    }

    pub fn latency(&self, sim: &SimOpts) -> Duration {
        sim.latency_ms
            .map(Duration::from_millis)
            .unwrap_or(self.default_latency)
    }

    pub(crate) fn timeout_latency(sim: &SimOpts) -> Duration {
        sim.latency_ms
            .map(Duration::from_millis)
            .unwrap_or(TIMEOUT_SLEEP)
    }

    /// Applies `sim_fail`/`sim_fail_times`: the failure hits only the first
    /// N requests sharing a key.
    pub(crate) fn decide_fail(
        &self,
        sim: &SimOpts,
        route: &str,
        body: &Object,
    ) -> Option<FailMode> {
        let mode = sim.fail?;
        let Some(times) = sim.fail_times else {
            return Some(mode);
        };
        let key = match &sim.key {
            Some(k) => format!("key:{k}"),
            None => format!("hash:{route}:{:016x}", body_hash(body)),
        };
        let seen = lock(&self.fails).bump(key);
        (seen <= times).then_some(mode)
    }

    /// Runs the latency of one synchronous inference call and its failure
    /// mode. The returned guard keeps the call counted as in flight until the
    /// handler has built its response.
    pub(crate) async fn simulate(
        &self,
        sim: &SimOpts,
        route: &str,
        body: &Object,
    ) -> Result<(Outcome, InFlightGuard<'_>), ApiError> {
        let fail = self.decide_fail(sim, route, body);
        let guard = InFlightGuard::new(&self.stats);
        if fail == Some(FailMode::Timeout) {
            tokio::time::sleep(Self::timeout_latency(sim)).await;
            return Err(ApiError::timed_out());
        }
        tokio::time::sleep(self.latency(sim)).await;
        let err = |mut e: ApiError| {
            if sim.nul {
                e.message.push_str(" \u{0}");
            }
            Err(e)
        };
        match fail {
            None | Some(FailMode::Timeout) => Ok((Outcome::Succeed, guard)),
            Some(FailMode::Malformed) => Ok((Outcome::Malformed, guard)),
            Some(FailMode::Retryable) => err(ApiError::upstream()),
            Some(FailMode::Fatal) => err(ApiError::fatal()),
            Some(FailMode::RateLimit) => err(ApiError::rate_limited(sim.retry_after.unwrap_or(1))),
        }
    }

    pub(crate) fn file_url(&self, id: &str) -> String {
        format!("{}/files/{id}", self.base_url)
    }
}

/// Hash of the body without `sim_*` fields (top level and inside `input`),
/// so retries of the same logical request share a failure counter.
fn body_hash(body: &Object) -> u64 {
    fn strip(obj: &Object) -> Object {
        obj.iter()
            .filter(|(k, _)| !k.starts_with("sim_"))
            .map(|(k, v)| match (k.as_str(), v) {
                ("input", Value::Object(inner)) => (k.clone(), Value::Object(strip(inner))),
                _ => (k.clone(), v.clone()),
            })
            .collect()
    }
    let mut h = DefaultHasher::new();
    Value::Object(strip(body)).to_string().hash(&mut h);
    h.finish()
}

/// Reads the body (max [`BODY_LIMIT`]) and parses it as a JSON object.
pub(crate) async fn read_json(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<Object, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut over = declared.is_some_and(|n| n > BODY_LIMIT as u64);
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(ApiError::too_large(BODY_LIMIT));
    }
    let mut buf = web::BytesMut::new();
    let mut seen = 0usize;
    let state = req.app_data::<web::Data<Simulator>>();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("could not read request body: {e}"), None))?;
        seen += chunk.len();
        if seen > BODY_LIMIT {
            over = true;
        }
        if over {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if over {
        return Err(ApiError::too_large(BODY_LIMIT));
    }
    match serde_json::from_slice::<Value>(&buf) {
        Ok(Value::Object(obj)) => {
            if let Some(st) = state {
                st.stats.record_sim_fields(&obj);
            }
            Ok(obj)
        }
        Ok(_) => Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )),
    }
}

pub(crate) fn req_str<'a>(obj: &'a Object, name: &str) -> Result<&'a str, ApiError> {
    opt_str(obj, name)?.ok_or_else(|| ApiError::missing(name))
}

pub(crate) fn opt_str<'a>(obj: &'a Object, name: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::wrong_type(name, "a string")),
    }
}

pub(crate) fn opt_u64(obj: &Object, name: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::wrong_type(name, "a non-negative integer")),
    }
}

pub(crate) fn opt_f64(obj: &Object, name: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::wrong_type(name, "a number")),
    }
}

pub(crate) fn opt_bool(obj: &Object, name: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::wrong_type(name, "a boolean")),
    }
}

pub(crate) fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

pub(crate) fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}
