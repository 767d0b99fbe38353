//! Provider adapters. One trait-free dispatch on the provider's kind; each kind is a module.
//! Capacity lives here too: each provider has an adaptive concurrency limit (`capacity.rs`),
//! an optional request rate and token rate, and a pause that a 429 or `Retry-After` sets for
//! all its jobs.

mod capacity;
mod espeak;
mod media;
mod openai;
mod predictions;

use std::collections::HashMap;
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub result: Value,
    pub usage: Option<Usage>,
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
    http: reqwest::Client,
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
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(config.max_concurrency.min(1024))
            .build()?;
        let now = Instant::now();
        Ok(Provider {
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

    /// A 429 slows the whole provider down, not just the job that met it: every call waits
    /// out the pause, and the concurrency limit is halved.
    async fn pause(&self, d: Duration) {
        self.capacity.rate_limited(d);
        let mut p = self.paused_until.lock().await;
        let until = Instant::now() + d.min(MAX_PAUSE);
        if until > *p {
            *p = until;
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

    /// Maps an HTTP status that is not a success to a job error, pausing on 429.
    async fn status_error(&self, resp: reqwest::Response) -> ProviderError {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .map(|d| d.min(MAX_PAUSE));
        let text = resp.text().await.unwrap_or_default();
        let message = provider_message(&text);
        let name = &self.config.name;
        if status.as_u16() == 429 {
            if let Some(m) = self.meters.get() {
                m.rate_limited();
            }
            let wait = retry_after.unwrap_or(Duration::from_secs(1));
            self.pause(wait).await;
            return ProviderError::Retryable {
                message: format!("{name}: rate limited (429): {message}"),
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

/// The longest a provider's `Retry-After` may pause it (and delay a job's retry).
const MAX_PAUSE: Duration = Duration::from_secs(300);

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
        let store = media::Store {
            media: &self.media,
            job,
        };
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
        result
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
