//! Provider adapters. One trait-free dispatch on the provider's kind; each kind is a module.
//! Capacity lives here too: each provider has an adaptive concurrency limit (`capacity.rs`),
//! an optional request rate and token rate, and a short pause for all its jobs when 429s come
//! back for several batches at once (one batch's 429 delays only that job).
//!
//! What a provider's answer may make a worker fetch is `volley-egress`'s to decide: media
//! links go through the provider's guarded client, its own URLs must stay on its origin, and
//! every body is read up to a cap.

mod capacity;
mod espeak;
mod media;
mod openai;
mod predictions;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use volley_config::{ProviderConfig, ProviderKind, Settings};
use volley_domain::Endpoint;
use volley_media::MediaStore;

/// One job as a worker runs it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub batch_id: i64,
    pub attempt: i32,
    pub endpoint: Endpoint,
    pub model: String,
    pub body: Value,
}

pub use volley_domain::Usage;

#[derive(Debug, Clone)]
pub struct Output {
    pub result: Value,
    pub usage: Option<Usage>,
    /// Media the attempt stored (set by [`Providers::run`] from the store).
    pub media_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Timeouts, 429, 5xx, connection errors, malformed answers: worth another attempt.
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused the request (4xx), or the output cannot be kept.
    #[error("{message}")]
    Fatal {
        error_type: &'static str,
        message: String,
    },
    /// The job was cancelled while running.
    #[error("cancelled")]
    Cancelled,
}

impl ProviderError {
    fn retry(message: impl Into<String>) -> ProviderError {
        ProviderError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }
    fn fatal(error_type: &'static str, message: impl Into<String>) -> ProviderError {
        ProviderError::Fatal {
            error_type,
            message: message.into(),
        }
    }
}

pub struct Provider {
    pub config: ProviderConfig,
    /// The provider's own API, at the operator's `base_url` (no redirects followed).
    http: reqwest::Client,
    /// Media links from the provider's answers: only what `egress` allows.
    media_http: reqwest::Client,
    egress: volley_egress::Policy,
    /// `base_url` parsed: the origin a provider's `urls.*` must stay on.
    origin: Option<volley_egress::Url>,
    /// Batches that met a 429 lately, and when: one batch's 429 is that batch's business,
    /// 429s for several batches at once are the provider's (see [`Provider::rate_limited`]).
    recent_429: std::sync::Mutex<HashMap<i64, Instant>>,
    capacity: capacity::Capacity,
    /// No call starts before this instant (set by 429 / Retry-After).
    paused_until: Mutex<Instant>,
    /// Next start allowed by `requests_per_minute`.
    next_start: Mutex<Instant>,
    /// Call metrics, set once by [`Providers::with_metrics`].
    meters: std::sync::OnceLock<volley_telemetry::metrics::ProviderMeters>,
    /// `tokens_per_minute`, for chat and completions.
    tokens: Option<std::sync::Mutex<capacity::TokenBucket>>,
}

impl Provider {
    fn new(config: ProviderConfig) -> anyhow::Result<Provider> {
        let builder = || {
            reqwest::Client::builder()
                .timeout(Duration::from_millis(config.timeout_ms))
                .connect_timeout(Duration::from_secs(10))
        };
        let http = builder()
            .pool_max_idle_per_host(config.max_concurrency.min(1024))
            // A provider's API does not redirect; a redirect would take the key elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let egress = volley_egress::Policy::new(config.allow_private_network, &config.media_hosts)
            .map_err(|e| anyhow::anyhow!("provider {:?}: {e}", config.name))?;
        let media_http = egress.client(builder())?;
        let origin = volley_egress::Url::parse(&config.base_url).ok();
        let now = Instant::now();
        Ok(Provider {
            media_http,
            egress,
            origin,
            recent_429: std::sync::Mutex::new(HashMap::new()),
            capacity: capacity::Capacity::new(config.max_concurrency),
            tokens: config
                .tokens_per_minute
                .map(|t| std::sync::Mutex::new(capacity::TokenBucket::new(t))),
            config,
            http,
            paused_until: Mutex::new(now),
            meters: std::sync::OnceLock::new(),
            next_start: Mutex::new(now),
        })
    }

    /// The concurrency limit now (lowered by 429s, see `capacity.rs`).
    pub fn concurrency_limit(&self) -> usize {
        self.capacity.limit()
    }

    fn bucket(&self) -> Option<std::sync::MutexGuard<'_, capacity::TokenBucket>> {
        self.tokens
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reserves the job's estimated tokens, waiting until the provider's token rate allows
    /// them. Returns what was reserved, to correct afterwards.
    async fn reserve_tokens(
        &self,
        job: &Job,
        cancel: &CancellationToken,
    ) -> Result<u64, ProviderError> {
        if !matches!(
            job.endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions
        ) {
            return Ok(0);
        }
        let Some((taken, wait)) = self
            .bucket()
            .map(|mut b| b.reserve(estimate_tokens(&job.body)))
        else {
            return Ok(0);
        };
        if !wait.is_zero() {
            tracing::debug!(
                job.id = job.id,
                wait_ms = wait.as_millis() as u64,
                "waiting for tokens"
            );
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.settle_tokens(taken, None);
                    return Err(ProviderError::Cancelled);
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        Ok(taken)
    }

    /// Corrects a reservation: by the tokens the provider reports, or a full refund when the
    /// call produced none (failed, or reported no usage).
    fn settle_tokens(&self, reserved: u64, used: Option<i64>) {
        if reserved == 0 {
            return;
        }
        if let Some(mut b) = self.bucket() {
            let used = used.filter(|u| *u > 0).unwrap_or(0);
            b.adjust(
                i64::try_from(reserved)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(used),
            );
        }
    }

    /// Waits out a pause and the request rate, or returns `Cancelled`.
    async fn pace(&self, cancel: &CancellationToken) -> Result<(), ProviderError> {
        loop {
            let until = *self.paused_until.lock().await;
            if until <= Instant::now() {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(ProviderError::Cancelled),
                _ = tokio::time::sleep_until(until) => {}
            }
        }
        if let Some(rpm) = self.config.requests_per_minute.filter(|r| *r > 0) {
            let gap = Duration::from_secs_f64(60.0 / f64::from(rpm));
            let start = {
                let mut next = self.next_start.lock().await;
                let start = (*next).max(Instant::now());
                *next = start + gap;
                start
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(ProviderError::Cancelled),
                _ = tokio::time::sleep_until(start) => {}
            }
        }
        Ok(())
    }

    /// A 429 for a job of `batch_id`. Alone, it is that batch's (one tenant's request may be
    /// what the provider limits): only the job waits, as its own retry delay. When 429s came
    /// back for at least [`SHARED_429_BATCHES`] batches within [`SHARED_429_WINDOW`], the
    /// provider itself is saturated: every call waits a short pause (at most
    /// [`MAX_SHARED_PAUSE`]) and the concurrency limit is halved. Returns whether it was
    /// provider-wide.
    async fn rate_limited(&self, batch_id: i64, wait: Duration) -> bool {
        let now = Instant::now();
        let shared = {
            let mut recent = self.recent_429.lock().unwrap_or_else(|e| e.into_inner());
            recent.retain(|_, t| now.saturating_duration_since(*t) <= SHARED_429_WINDOW);
            // Bounded: past this many batches the provider is saturated anyway.
            if recent.len() < 1024 {
                match recent.entry(batch_id) {
                    Entry::Occupied(mut e) => *e.get_mut() = now,
                    Entry::Vacant(e) => {
                        e.insert(now);
                    }
                }
            }
            recent.len() >= SHARED_429_BATCHES
        };
        if shared {
            let d = wait.min(MAX_SHARED_PAUSE);
            self.capacity.rate_limited(d);
            let mut p = self.paused_until.lock().await;
            let until = Instant::now() + d;
            if until > *p {
                *p = until;
            }
        }
        shared
    }

    /// The provider's policy for links in its answers, and its client for them.
    fn media(&self) -> (&volley_egress::Policy, &reqwest::Client) {
        (&self.egress, &self.media_http)
    }

    /// A URL the provider handed back for its own API (`urls.get`, `urls.cancel`): it must
    /// stay on `base_url`'s origin, since the provider's key goes with it.
    fn own_url(&self, link: &str) -> Result<String, ProviderError> {
        let origin = self.origin.as_ref().ok_or_else(|| {
            ProviderError::fatal(
                "provider_error",
                format!("{}: no base_url", self.config.name),
            )
        })?;
        volley_egress::on_origin(origin, link)
            .map(String::from)
            .map_err(|e| {
                ProviderError::fatal(
                    "provider_error",
                    format!("{}: refused the provider's own link: {e}", self.config.name),
                )
            })
    }

    /// The request body as this provider gets it: `sim_*` fields steer the simulator only and
    /// are no other provider's business.
    fn outgoing(&self, body: &mut Value) {
        if !self.config.simulator
            && let Some(o) = body.as_object_mut()
        {
            o.retain(|k, _| !k.starts_with("sim_"));
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        // The provider call's trace context goes along (W3C `traceparent`), so a provider
        // that traces (vLLM, an internal gateway) joins the job's trace.
        let rb = volley_telemetry::trace::current_context_headers()
            .into_iter()
            .fold(rb, |rb, (k, v)| rb.header(k, v));
        if self.config.api_key.is_empty() {
            rb
        } else {
            rb.bearer_auth(self.config.api_key.expose())
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url.trim_end_matches('/'))
    }

    /// Maps an HTTP status that is not a success to a job error; a 429 delays the job (and,
    /// if several batches meet 429s, the provider: [`Provider::rate_limited`]).
    async fn status_error(&self, resp: reqwest::Response, job: &Job) -> ProviderError {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .map(|d| d.min(MAX_PAUSE));
        let text = volley_egress::read_prefix(resp, ERROR_BODY_CAP).await;
        let message = provider_message(&String::from_utf8_lossy(&text));
        let name = &self.config.name;
        if status.as_u16() == 429 {
            if let Some(m) = self.meters.get() {
                m.rate_limited();
            }
            let wait = retry_after.unwrap_or(Duration::from_secs(1));
            let scope = if self.rate_limited(job.batch_id, wait).await {
                "provider-wide"
            } else {
                "this job"
            };
            return ProviderError::Retryable {
                message: format!("{name}: rate limited (429, {scope}): {message}"),
                retry_after: Some(wait),
            };
        }
        if status.is_server_error() || status.as_u16() == 408 {
            return ProviderError::Retryable {
                message: format!("{name}: HTTP {}: {message}", status.as_u16()),
                retry_after,
            };
        }
        ProviderError::fatal(
            "invalid_request",
            format!(
                "{name} refused the request (HTTP {}): {message}",
                status.as_u16()
            ),
        )
    }
}

/// The longest a provider's `Retry-After` may delay a job's retry.
const MAX_PAUSE: Duration = Duration::from_secs(300);
/// 429s for this many distinct batches within [`SHARED_429_WINDOW`] pause the whole provider.
const SHARED_429_BATCHES: usize = 2;
const SHARED_429_WINDOW: Duration = Duration::from_secs(10);
/// The longest a provider-wide pause lasts, whatever `Retry-After` says: long enough to
/// relieve the provider, short enough that no tenant can stall the others for long.
const MAX_SHARED_PAUSE: Duration = Duration::from_secs(5);

/// How much of a provider's error body is read (enough to quote its message).
const ERROR_BODY_CAP: usize = 64 * 1024;
/// The largest JSON answer read for a chat, a completion or a prediction's state.
pub const TEXT_ANSWER_CAP: u64 = 4 * 1024 * 1024;

/// Reads a JSON answer of at most `cap` bytes. Larger fails the job: the same request would
/// get the same answer.
async fn read_json(
    p: &Provider,
    resp: reqwest::Response,
    cap: u64,
) -> Result<Value, ProviderError> {
    read_json_or(p, resp, cap, || {
        ProviderError::fatal(
            "response_too_large",
            format!(
                "{}: the answer is larger than the {cap} byte limit",
                p.config.name
            ),
        )
    })
    .await
}

/// [`read_json`] with its own error for an answer past the cap.
async fn read_json_or(
    p: &Provider,
    resp: reqwest::Response,
    cap: u64,
    too_large: impl FnOnce() -> ProviderError,
) -> Result<Value, ProviderError> {
    let body = volley_egress::read_limited(resp, cap)
        .await
        .map_err(|e| match e {
            volley_egress::ReadError::TooLarge { .. } => too_large(),
            volley_egress::ReadError::Body(e) => send_error(&p.config.name, e),
        })?;
    serde_json::from_slice(&body).map_err(|e| {
        ProviderError::retry(format!(
            "{}: malformed response: not JSON: {e}",
            p.config.name
        ))
    })
}

/// `Retry-After` in seconds (fractions allowed, as some servers send) or as an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = (at.timestamp_millis() - chrono::Utc::now().timestamp_millis()).clamp(0, 3_600_000);
    Some(Duration::from_millis(ms as u64))
}

/// A rough token count for `tokens_per_minute`, known before the call: about four characters
/// per token of the prompt or messages (plus a few tokens of framing per message), plus the
/// completion's ceiling, `max_tokens` (or `max_completion_tokens`), or
/// [`DEFAULT_COMPLETION_ESTIMATE`] when the request sets none. The reservation is corrected
/// with the usage the provider reports.
pub fn estimate_tokens(body: &Value) -> u64 {
    fn chars(v: &Value) -> usize {
        match v {
            Value::String(s) => s.chars().count(),
            Value::Array(a) => a.iter().map(chars).sum(),
            Value::Object(o) => o.get("text").or_else(|| o.get("content")).map_or(0, chars),
            _ => 0,
        }
    }
    let mut prompt_chars = 0usize;
    let mut framing = 0u64;
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            prompt_chars += m.get("content").map_or(0, chars);
            framing = framing.saturating_add(4);
        }
    }
    if let Some(p) = body.get("prompt") {
        prompt_chars += chars(p);
    }
    let completion = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_COMPLETION_ESTIMATE);
    // Saturating: `max_tokens` is the tenant's number, up to u64::MAX.
    (prompt_chars as u64)
        .div_ceil(4)
        .saturating_add(framing)
        .saturating_add(completion)
}

/// Completion tokens assumed for a request that sets no `max_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// The client span of one provider call (one job attempt; a prediction's create, polls and
/// downloads all belong to it).
fn call_span(p: &Provider, job: &Job, upstream: &str) -> tracing::Span {
    let span = volley_telemetry::trace::client_span("POST", job.endpoint.path());
    if !span.is_disabled() {
        use volley_telemetry::tracing_opentelemetry::OpenTelemetrySpanExt;
        span.record(
            "server.address",
            volley_telemetry::trace::host_of(&p.config.base_url),
        );
        span.set_attribute("volley.provider", p.config.name.clone());
        span.set_attribute("gen_ai.request.model", upstream.to_owned());
        span.set_attribute("job.id", job.id);
        span.set_attribute("attempt", i64::from(job.attempt));
    }
    span
}

/// The call's outcome in its span and its provider's metrics.
fn record_call(
    span: &tracing::Span,
    metered: Option<volley_telemetry::metrics::CallGuard<'_>>,
    result: &Result<Output, ProviderError>,
) {
    use volley_telemetry::metrics::CallOutcome;
    let outcome = match result {
        Ok(_) => CallOutcome::Ok,
        Err(ProviderError::Retryable { .. }) => CallOutcome::Retryable,
        Err(ProviderError::Fatal { .. }) => CallOutcome::Fatal,
        Err(ProviderError::Cancelled) => CallOutcome::Cancelled,
    };
    if matches!(outcome, CallOutcome::Retryable | CallOutcome::Fatal) {
        volley_telemetry::trace::record_error(span);
    }
    if let Some(m) = metered {
        m.finish(outcome);
    }
}

/// The provider's own error message, from OpenAI's or Replicate's error shape, else the text.
fn provider_message(text: &str) -> String {
    let v: Option<Value> = serde_json::from_str(text).ok();
    let m = v.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("detail"))
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let m = m.unwrap_or_else(|| text.to_owned());
    m.chars().take(500).collect()
}

/// A transport error: all are worth retrying (timeouts, refused or reset connections).
fn send_error(name: &str, e: reqwest::Error) -> ProviderError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    ProviderError::retry(format!("{name}: {what}: {e}"))
}

pub struct Providers {
    by_name: HashMap<String, Arc<Provider>>,
    settings: Arc<Settings>,
    media: MediaStore,
}

impl Providers {
    pub fn new(settings: Arc<Settings>, media: MediaStore) -> anyhow::Result<Providers> {
        let mut by_name = HashMap::new();
        for p in &settings.providers {
            by_name.insert(p.name.clone(), Arc::new(Provider::new(p.clone())?));
        }
        Ok(Providers {
            by_name,
            settings,
            media,
        })
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<Provider>> {
        self.by_name.get(name)
    }

    /// Counts every provider's calls, in-flight calls and 429s in `metrics`.
    pub fn with_metrics(self, metrics: &volley_telemetry::Metrics) -> Providers {
        for (name, p) in &self.by_name {
            let _ = p.meters.set(metrics.providers.for_provider(name));
        }
        self
    }

    /// The route for this attempt: attempts are spread over the model's providers in order, so
    /// retries exhaust the first provider's share before falling over to the next.
    fn route(&self, job: &Job) -> Result<(Arc<Provider>, String), ProviderError> {
        let model = self.settings.model(&job.model).ok_or_else(|| {
            ProviderError::fatal(
                "invalid_request",
                format!("model {:?} is no longer configured", job.model),
            )
        })?;
        let n = model.routes.len().max(1);
        let max = self.settings.worker.max_attempts.max(1) as usize;
        let attempt = (job.attempt.max(1) as usize - 1).min(max - 1);
        let idx = (attempt * n / max).min(n - 1);
        let route = &model.routes[idx];
        let provider = self.by_name.get(&route.provider).ok_or_else(|| {
            ProviderError::fatal(
                "invalid_request",
                format!("provider {:?} is not configured", route.provider),
            )
        })?;
        let upstream = route
            .upstream_model
            .clone()
            .unwrap_or_else(|| job.model.clone());
        Ok((provider.clone(), upstream))
    }

    /// Runs one attempt of a job on its provider.
    pub async fn run(
        &self,
        job: &Job,
        cancel: &CancellationToken,
    ) -> Result<Output, ProviderError> {
        let (p, upstream) = self.route(job)?;
        let _slot = tokio::select! {
            _ = cancel.cancelled() => return Err(ProviderError::Cancelled),
            s = p.capacity.acquire() => s.ok_or_else(|| ProviderError::retry("provider closed"))?,
        };
        p.pace(cancel).await?;
        let reserved = p.reserve_tokens(job, cancel).await?;
        let store = media::Store::new(&self.media, job);
        let span = call_span(&p, job, &upstream);
        let metered = p.meters.get().map(|m| m.start());
        let call = async {
            match p.config.kind {
                ProviderKind::Openai => openai::run(&p, job, &upstream, &store).await,
                ProviderKind::Predictions => {
                    predictions::run(&p, job, &upstream, &store, cancel).await
                }
                ProviderKind::Espeak => espeak::run(&p, job, &store).await,
            }
        };
        let result = tokio::select! {
            r = tracing::Instrument::instrument(call, span.clone()) => r,
            // Dropping the call aborts the HTTP request or kills espeak-ng; predictions cancel
            // upstream themselves.
            _ = cancel.cancelled(), if p.config.kind != ProviderKind::Predictions => Err(ProviderError::Cancelled),
        };
        record_call(&span, metered, &result);
        p.settle_tokens(
            reserved,
            result
                .as_ref()
                .ok()
                .and_then(|o| o.usage)
                .map(|u| u.total_tokens),
        );
        if result.is_ok() {
            p.capacity.succeeded();
        }
        result.map(|mut out| {
            out.media_keys = store.take_keys();
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("1e9"), Some(Duration::from_secs(3600)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
    }

    #[test]
    fn token_estimates() {
        use serde_json::json;
        // 40 characters = 10 tokens, 4 tokens of framing, max_tokens 16.
        let chat =
            json!({"messages": [{"role": "user", "content": "x".repeat(40)}], "max_tokens": 16});
        assert_eq!(estimate_tokens(&chat), 10 + 4 + 16);
        let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}],
            "max_completion_tokens": 1});
        assert_eq!(estimate_tokens(&parts), 1 + 4 + 1);
        let completion = json!({"prompt": "abcde"});
        assert_eq!(
            estimate_tokens(&completion),
            2 + DEFAULT_COMPLETION_ESTIMATE
        );
        assert_eq!(
            estimate_tokens(&json!({"prompt": 5, "max_tokens": "many"})),
            DEFAULT_COMPLETION_ESTIMATE
        );
        // A tenant's huge max_tokens saturates instead of overflowing (a debug-build panic).
        let huge = json!({"prompt": "abcd", "max_tokens": u64::MAX});
        assert_eq!(estimate_tokens(&huge), u64::MAX);
    }

    fn provider(extra: serde_json::Value) -> Provider {
        let mut cfg = serde_json::json!({"name": "p", "kind": "openai",
            "base_url": "http://127.0.0.1:9/v1", "max_concurrency": 8});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        Provider::new(serde_json::from_value(cfg).unwrap()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn one_batchs_429_delays_only_its_job_and_several_batches_pause_the_provider_briefly() {
        let p = provider(serde_json::json!({}));
        let start = Instant::now();
        let paused = || async { (*p.paused_until.lock().await).saturating_duration_since(start) };
        // One batch, however often: no pause, the limit stays.
        assert!(!p.rate_limited(1, Duration::from_secs(300)).await);
        assert!(!p.rate_limited(1, Duration::from_secs(300)).await);
        assert_eq!(paused().await, Duration::ZERO);
        assert_eq!(p.concurrency_limit(), 8);
        // A second batch within the window: provider-wide, capped at MAX_SHARED_PAUSE.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(p.rate_limited(2, Duration::from_secs(300)).await);
        assert_eq!(paused().await, Duration::from_secs(2) + MAX_SHARED_PAUSE);
        assert_eq!(p.concurrency_limit(), 4);
        // Past the window, a lone batch is its own business again.
        tokio::time::advance(SHARED_429_WINDOW + Duration::from_secs(1)).await;
        assert!(!p.rate_limited(3, Duration::from_secs(1)).await);
    }

    #[test]
    fn sim_fields_go_only_to_the_simulator() {
        let body = || serde_json::json!({"prompt": "x", "sim_fail": "fatal", "simple": 1});
        let mut b = body();
        provider(serde_json::json!({})).outgoing(&mut b);
        assert_eq!(b, serde_json::json!({"prompt": "x", "simple": 1}));
        let mut b = body();
        provider(serde_json::json!({"simulator": true})).outgoing(&mut b);
        assert_eq!(b, body());
    }

    #[test]
    fn provider_links_stay_on_its_origin() {
        let p = provider(serde_json::json!({}));
        assert!(p.own_url("http://127.0.0.1:9/v1/predictions/x").is_ok());
        assert!(matches!(
            p.own_url("http://127.0.0.1:10/v1/predictions/x"),
            Err(ProviderError::Fatal { .. })
        ));
    }

    #[test]
    fn provider_messages() {
        assert_eq!(
            provider_message(r#"{"error":{"message":"bad prompt","type":"x"}}"#),
            "bad prompt"
        );
        assert_eq!(provider_message(r#"{"detail":"Not found."}"#), "Not found.");
        assert_eq!(provider_message("plain"), "plain");
        assert_eq!(provider_message(&"x".repeat(900)).len(), 500);
    }
}
