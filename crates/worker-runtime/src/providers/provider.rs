//! One configured provider: its clients, its capacity (concurrency, request and token
//! rates, the pause 429s set) and what it accepts back (its own URLs, its error answers).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use volley_config::ProviderConfig;
use volley_domain::Endpoint;

use super::{
    ERROR_BODY_CAP, Job, ProviderError, capacity, estimate_tokens, parse_retry_after,
    provider_message,
};

pub struct Provider {
    pub config: ProviderConfig,
    /// The provider's own API, at the operator's `base_url` (no redirects followed).
    pub(super) http: reqwest::Client,
    /// Media links from the provider's answers: only what `egress` allows.
    pub(super) media_http: reqwest::Client,
    pub(super) egress: volley_egress::Policy,
    /// `base_url` parsed: the origin a provider's `urls.*` must stay on.
    pub(super) origin: Option<volley_egress::Url>,
    /// Batches that met a 429 lately, and when: one batch's 429 is that batch's business,
    /// 429s for several batches at once are the provider's (see [`Provider::rate_limited`]).
    pub(super) recent_429: std::sync::Mutex<HashMap<i64, Instant>>,
    pub(super) capacity: capacity::Capacity,
    /// No call starts before this instant (set by 429 / Retry-After).
    pub(super) paused_until: Mutex<Instant>,
    /// Next start allowed by `requests_per_minute`.
    pub(super) next_start: Mutex<Instant>,
    /// Call metrics, set once by [`Providers::with_metrics`].
    pub(super) meters: std::sync::OnceLock<volley_telemetry::metrics::ProviderMeters>,
    /// `tokens_per_minute`, for chat and completions.
    pub(super) tokens: Option<std::sync::Mutex<capacity::TokenBucket>>,
}

impl Provider {
    pub(super) fn new(config: ProviderConfig) -> anyhow::Result<Provider> {
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

    pub(super) fn bucket(&self) -> Option<std::sync::MutexGuard<'_, capacity::TokenBucket>> {
        self.tokens
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reserves the job's estimated tokens, waiting until the provider's token rate allows
    /// them. Returns what was reserved, to correct afterwards.
    pub(super) async fn reserve_tokens(
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
    pub(super) fn settle_tokens(&self, reserved: u64, used: Option<i64>) {
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
    pub(super) async fn pace(&self, cancel: &CancellationToken) -> Result<(), ProviderError> {
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
    pub(super) async fn rate_limited(&self, batch_id: i64, wait: Duration) -> bool {
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
    pub(super) fn media(&self) -> (&volley_egress::Policy, &reqwest::Client) {
        (&self.egress, &self.media_http)
    }

    /// A URL the provider handed back for its own API (`urls.get`, `urls.cancel`): it must
    /// stay on `base_url`'s origin, since the provider's key goes with it.
    pub(super) fn own_url(&self, link: &str) -> Result<String, ProviderError> {
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
    pub(super) fn outgoing(&self, body: &mut Value) {
        if !self.config.simulator
            && let Some(o) = body.as_object_mut()
        {
            o.retain(|k, _| !k.starts_with("sim_"));
        }
    }

    pub(super) fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
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

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url.trim_end_matches('/'))
    }

    /// Maps an HTTP status that is not a success to a job error; a 429 delays the job (and,
    /// if several batches meet 429s, the provider: [`Provider::rate_limited`]).
    pub(super) async fn status_error(&self, resp: reqwest::Response, job: &Job) -> ProviderError {
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
pub(super) const MAX_PAUSE: Duration = Duration::from_secs(300);
/// 429s for this many distinct batches within [`SHARED_429_WINDOW`] pause the whole provider.
pub(super) const SHARED_429_BATCHES: usize = 2;
pub(super) const SHARED_429_WINDOW: Duration = Duration::from_secs(10);
/// The longest a provider-wide pause lasts, whatever `Retry-After` says: long enough to
/// relieve the provider, short enough that no tenant can stall the others for long.
pub(super) const MAX_SHARED_PAUSE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

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
}
