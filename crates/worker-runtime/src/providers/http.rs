//! Reading a provider's HTTP answers: capped bodies, `Retry-After`, error messages, and the
//! client span and metrics of a call.

use std::time::Duration;

use serde_json::Value;

use super::{Job, Output, Provider, ProviderError};

/// How much of a provider's error body is read (enough to quote its message).
pub(super) const ERROR_BODY_CAP: usize = 64 * 1024;
/// The largest JSON answer read for a chat, a completion or a prediction's state.
pub const TEXT_ANSWER_CAP: u64 = 4 * 1024 * 1024;

/// Reads a JSON answer of at most `cap` bytes. Larger fails the job: the same request would
/// get the same answer.
pub(super) async fn read_json(
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
pub(super) async fn read_json_or(
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
pub(super) fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = (at.timestamp_millis() - chrono::Utc::now().timestamp_millis()).clamp(0, 3_600_000);
    Some(Duration::from_millis(ms as u64))
}

/// The client span of one provider call (one job attempt; a prediction's create, polls and
/// downloads all belong to it).
pub(super) fn call_span(p: &Provider, job: &Job, upstream: &str) -> tracing::Span {
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
pub(super) fn record_call(
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
pub(super) fn provider_message(text: &str) -> String {
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
pub(super) fn send_error(name: &str, e: reqwest::Error) -> ProviderError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    ProviderError::retry(format!("{name}: {what}: {e}"))
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
