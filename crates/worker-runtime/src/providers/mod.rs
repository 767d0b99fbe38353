//! Provider adapters. One trait-free dispatch on the provider's kind; each kind is a module.
//! Capacity lives here too: each provider has a concurrency limit, an optional request rate,
//! and a pause that a 429 or `Retry-After` sets for all its jobs.

mod media;
mod openai;
mod predictions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};
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
    slots: Semaphore,
    /// No call starts before this instant (set by 429 / Retry-After).
    paused_until: Mutex<Instant>,
    /// Next start allowed by `requests_per_minute`.
    next_start: Mutex<Instant>,
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
            slots: Semaphore::new(config.max_concurrency),
            config,
            http,
            paused_until: Mutex::new(now),
            next_start: Mutex::new(now),
        })
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

    /// A 429 slows the whole provider down, not just the job that met it.
    async fn pause(&self, d: Duration) {
        let mut p = self.paused_until.lock().await;
        let until = Instant::now() + d.min(Duration::from_secs(300));
        if until > *p {
            *p = until;
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
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
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let message = provider_message(&text);
        let name = &self.config.name;
        if status.as_u16() == 429 {
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
            s = p.slots.acquire() => s.map_err(|_| ProviderError::retry("provider closed"))?,
        };
        p.pace(cancel).await?;
        let store = media::Store {
            media: &self.media,
            job,
        };
        let call = async {
            match p.config.kind {
                ProviderKind::Openai => openai::run(&p, job, &upstream, &store).await,
                ProviderKind::Predictions => {
                    predictions::run(&p, job, &upstream, &store, cancel).await
                }
            }
        };
        tokio::select! {
            r = call => r,
            // Dropping the call aborts the HTTP request; predictions cancel upstream themselves.
            _ = cancel.cancelled(), if p.config.kind == ProviderKind::Openai => Err(ProviderError::Cancelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
