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
mod http;
mod media;
mod openai;
mod predictions;
mod provider;
mod tokens;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use volley_config::{ProviderKind, Settings};
use volley_domain::Endpoint;
use volley_media::MediaStore;

pub use http::TEXT_ANSWER_CAP;
use http::{
    ERROR_BODY_CAP, call_span, parse_retry_after, provider_message, read_json, read_json_or,
    record_call, send_error,
};
pub use provider::Provider;
pub(crate) use tokens::estimate_tokens;

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
    pub(super) fn retry(message: impl Into<String>) -> ProviderError {
        ProviderError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }
    pub(super) fn fatal(error_type: &'static str, message: impl Into<String>) -> ProviderError {
        ProviderError::Fatal {
            error_type,
            message: message.into(),
        }
    }
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
    pub(crate) fn with_metrics(self, metrics: &volley_telemetry::Metrics) -> Providers {
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
