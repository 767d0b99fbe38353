//! OpenTelemetry traces through `tracing` spans.
//!
//! One trace follows a job: the gateway's HTTP server span, a producer span per published
//! message (W3C `traceparent`/`tracestate` in the AMQP headers), the worker's consumer span
//! (child of the producer span, and linked to it), its claim and provider client spans, and
//! batch-state's consumer span for the outcome event that updates the job row.
//!
//! Span names and attributes follow the OpenTelemetry semantic conventions (messaging,
//! HTTP). Every entry span (server or consumer) also carries `volley.service`, so spans stay
//! attributable when several services share one process and one tracer provider (the
//! in-process test stack); deployed, the resource's `service.name` says the same.
//!
//! Configuration is the standard environment, read by the SDK and the exporter:
//! `OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_SDK_DISABLED`.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// Held by `main`; [`Telemetry::shutdown`] flushes what the exporter still buffers.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub(crate) fn new(provider: Option<SdkTracerProvider>) -> Telemetry {
        Telemetry { provider }
    }

    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes buffered spans and stops the exporter. The SDK's shutdown blocks (it joins the
    /// batch processor's thread), and run directly on an async runtime thread it stalls for
    /// its whole timeout and loses the spans: it runs on the blocking pool instead.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        if let Ok(Err(e)) = done {
            eprintln!("tracing: flushing spans on shutdown failed: {e}");
        }
    }
}

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the standard variables ask for OTLP traces. Off by default: on with
/// `OTEL_TRACES_EXPORTER=otlp`, or when an OTLP endpoint is set and `OTEL_TRACES_EXPORTER` is
/// unset; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.
fn otlp_requested(get: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| {
        get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match set("OTEL_TRACES_EXPORTER") {
        Some(v) => v.split(',').any(|e| e.trim() == "otlp"),
        None => {
            set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    }
}

/// The OTLP/HTTP tracer provider the environment asks for, or `None` when tracing is off.
pub(crate) fn otlp_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    let env = |k: &str| std::env::var(k).ok();
    if !otlp_requested(env) {
        return Ok(None);
    }
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    if !(protocol.is_empty() || protocol == "http/protobuf") {
        return Err(format!(
            "OTLP protocol {protocol:?} is not supported; use http/protobuf (port 4318)"
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_resource(resource(service))
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(provider))
}

/// `service.name` is the service unless `OTEL_SERVICE_NAME` says otherwise; the SDK's
/// detectors add `OTEL_RESOURCE_ATTRIBUTES` (pod, namespace...).
pub fn resource(service: &'static str) -> Resource {
    let b = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        b.build()
    } else {
        b.with_service_name(service).build()
    }
}

/// The layer that turns spans into OpenTelemetry spans (and events inside them into span
/// events). INFO and above; chatty dependencies only from WARN.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let filter = Targets::new()
        .with_default(Level::INFO)
        .with_target("h2", Level::WARN)
        .with_target("hyper", Level::WARN)
        .with_target("hyper_util", Level::WARN)
        .with_target("reqwest", Level::WARN)
        .with_target("lapin", Level::WARN)
        .with_target("actix_server", Level::WARN)
        .with_target("actix_web", Level::WARN);
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("volley"))
        .with_location(false)
        .with_threads(false)
        .with_filter(filter)
}

/// Sets W3C trace context as the global propagator (for libraries that consult it; Volley's
/// own propagation below uses it directly).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// The headers that carry `span`'s context to another service (`traceparent` and, if any,
/// `tracestate`). Empty, without allocating, when tracing is off.
pub fn context_headers(span: &Span) -> Vec<(String, String)> {
    if span.is_disabled() {
        return Vec::new();
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = Headers(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// [`context_headers`] of the current span.
pub fn current_context_headers() -> Vec<(String, String)> {
    context_headers(&Span::current())
}

struct Headers(Vec<(String, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        // The propagator sets an empty `tracestate` when there is none: not worth a header.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value));
        }
    }
}

/// `'a` ties the looked-up values to the headers they borrow from.
struct Lookup<'a, F>(F, std::marker::PhantomData<&'a ()>);

impl<'a, F> Extractor for Lookup<'a, F>
where
    F: Fn(&str) -> Option<&'a str>,
{
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Continues a remote trace in `span`: the context found by `get` (a header lookup) becomes
/// its parent, so the job's trace goes on across the broker, and with `link` also a link, as
/// the messaging conventions ask of a consumer span. Nothing happens when tracing is off or
/// no context came along.
pub fn continue_remote<'a>(span: &Span, get: impl Fn(&str) -> Option<&'a str>, link: bool) {
    if span.is_disabled() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Lookup(get, std::marker::PhantomData));
    let remote = cx.span().span_context().clone();
    if !remote.is_valid() {
        return;
    }
    let _ = span.set_parent(cx);
    if link {
        span.add_link(remote);
    }
}

/// Links `span` to `to`: for one operation done on behalf of several traces (a claim of many
/// jobs), whose span can have one parent only. Nothing happens when tracing is off.
pub fn link(span: &Span, to: &Span) {
    if span.is_disabled() || to.is_disabled() {
        return;
    }
    let other = to.context().span().span_context().clone();
    if other.is_valid() {
        span.add_link(other);
    }
}

/// A producer span for one message (messaging conventions: `publish <destination>`).
/// `destination` is the exchange, or the queue for the default exchange.
pub fn producer_span(destination: &str, routing_key: &str, message_id: Option<&str>) -> Span {
    tracing::info_span!(
        "amqp.publish",
        otel.name = %format_args!("publish {destination}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %destination,
        messaging.rabbitmq.destination.routing_key = %routing_key,
        messaging.message.id = message_id.unwrap_or(""),
    )
}

/// A consumer span for processing one delivered message (`process <queue>`). `job.id`,
/// `batch.id`, `attempt` and `inference_type` are recorded once the message is decoded.
pub fn consumer_span(
    service: &str,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
) -> Span {
    tracing::info_span!(
        "amqp.process",
        otel.name = %format_args!("process {queue}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        volley.service = %service,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %if exchange.is_empty() { queue } else { exchange },
        messaging.destination.subscription.name = %queue,
        messaging.rabbitmq.destination.routing_key = %routing_key,
        messaging.message.id = message_id.unwrap_or(""),
        job.id = tracing::field::Empty,
        batch.id = tracing::field::Empty,
        attempt = tracing::field::Empty,
        inference_type = tracing::field::Empty,
        job.status = tracing::field::Empty,
    )
}

/// An HTTP client span (`<METHOD> <route>`), e.g. a claim to batch-state. Record
/// `server.address` (a host) and `http.response.status_code` on it when known.
pub fn client_span(method: &'static str, route: &str) -> Span {
    tracing::info_span!(
        "http.client",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        url.template = %route,
        server.address = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    )
}

/// The host of a URL, for `server.address` (without parsing in full: this only runs when
/// tracing is on, but stays allocation-free).
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match authority.rsplit_once(':') {
        Some((h, port))
            if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']')
                || h.starts_with('[') && h.ends_with(']') =>
        {
            h
        }
        _ => authority,
    }
}

/// Renames a span that may have started already (recording `otel.name` then has no effect:
/// tracing-opentelemetry only applies it before the span starts).
pub fn rename(span: &Span, name: String) {
    if !span.is_disabled() {
        span.context().span().update_name(name);
    }
}

/// Marks a span failed (`otel.status_code = ERROR`).
pub fn record_error(span: &Span) {
    span.record("otel.status_code", "ERROR");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_is_off_unless_asked_for() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(!otlp_requested(env(&[])));
        assert!(otlp_requested(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4318"
        )])));
        assert!(otlp_requested(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])));
        assert!(otlp_requested(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(!otlp_requested(env(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ])));
        assert!(!otlp_requested(env(&[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "otlp"),
        ])));
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("http://127.0.0.1:8081/internal"), "127.0.0.1");
        assert_eq!(host_of("https://api.openai.com/v1"), "api.openai.com");
        assert_eq!(host_of("http://user:pw@sim:9000"), "sim");
        assert_eq!(host_of("http://[::1]:8081/x"), "[::1]");
        assert_eq!(host_of("sim"), "sim");
    }

    #[test]
    fn no_headers_when_tracing_is_off() {
        assert!(current_context_headers().is_empty());
        assert!(context_headers(&producer_span("x", "y", None)).is_empty());
    }
}
