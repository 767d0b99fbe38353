//! Telemetry shared by every Volley process: logs, traces, metrics, health plumbing and the
//! shutdown signal.
//!
//! - **Logs**: structured JSON (human format on a terminal), level by `RUST_LOG`. Log ids
//!   (`batch.id`, `job.id`, `attempt`, `inference_type`, `duration_ms`), never keys, prompts or
//!   media.
//! - **Traces**: OpenTelemetry through `tracing` spans, exported over OTLP/HTTP when the
//!   standard `OTEL_*` variables ask for it ([`trace`]); off by default, and then every span is
//!   disabled at its call site, so instrumentation costs a branch.
//! - **Metrics**: one Prometheus registry per service instance ([`Metrics`]), served at
//!   `/metrics` on the service's own HTTP port ([`http::metrics_resource`]).

pub mod http;
pub mod metrics;
pub mod trace;

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing::subscriber::Interest;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use metrics::Metrics;
pub use trace::Telemetry;

// Re-exported so that crates and tests instrumenting Volley use exactly these versions.
pub use opentelemetry;
pub use opentelemetry_sdk;
pub use prometheus;
pub use tracing_opentelemetry;

/// Logs (and, when the `OTEL_*` variables ask for it, traces) for a service. Keep the returned
/// [`Telemetry`] and call [`Telemetry::shutdown`] on the way out so buffered spans are sent.
pub fn init(service: &'static str) -> Telemetry {
    let provider = match trace::otlp_provider(service) {
        Ok(p) => p,
        Err(e) => {
            // Telemetry must never keep a service from starting.
            eprintln!("{service}: tracing disabled: {e}");
            None
        }
    };
    let otel = provider.as_ref().map(trace::layer);
    let r = tracing_subscriber::registry()
        .with(log_layer())
        .with(otel)
        .try_init();
    // A second init (tests starting several services in one process) keeps the first.
    let _ = r;
    if provider.is_some() {
        trace::install_propagator();
    }
    tracing::debug!(service, tracing = provider.is_some(), "telemetry ready");
    Telemetry::new(provider)
}

/// The log layer: JSON, or a human format when stderr is a terminal; level by `RUST_LOG`
/// (default `info`). It sees events only: spans exist for traces, and with no trace layer
/// installed no layer wants them, so they are disabled where they are created.
fn log_layer<S>() -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        fmt.with_filter(EventsOnly.and(filter)).boxed()
    } else {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(EventsOnly.and(filter))
            .boxed()
    }
}

/// A per-layer filter that passes events and never spans, decided once per call site.
struct EventsOnly;

impl<S> Filter<S> for EventsOnly {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &Context<'_, S>) -> bool {
        meta.is_event()
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> Interest {
        if meta.is_event() {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
