//! Tracing for the test process. A tracing subscriber is process-wide and the end-to-end tests
//! share one process, so it is installed here, once, with what any test needs: the
//! OpenTelemetry layer into an in-memory exporter (for tests that follow a trace) and, when
//! `RUST_LOG` is set, logs to the test writer.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use volley_telemetry::opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

static SPANS: OnceLock<InMemorySpanExporter> = OnceLock::new();

/// The spans the in-process services have ended, from the first call on (it installs
/// tracing). Every stack in the process reports into this one exporter: a test picks its own
/// spans by trace id, and its stack's by the queue prefix in span names.
pub fn spans() -> &'static InMemorySpanExporter {
    SPANS.get_or_init(install)
}

/// Installs tracing now if `RUST_LOG` asks for logs (a stack calls it before starting).
pub(crate) fn logs_if_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        spans();
    }
}

fn install() -> InMemorySpanExporter {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let logs = std::env::var_os("RUST_LOG").is_some().then(|| {
        tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(EnvFilter::from_default_env())
    });
    tracing_subscriber::registry()
        .with(volley_telemetry::trace::layer(&provider))
        .with(logs)
        .try_init()
        .expect("the harness installs the test process's only tracing subscriber");
    volley_telemetry::trace::install_propagator();
    // Kept for the life of the process: dropping the provider would stop exporting.
    std::mem::forget(provider);
    exporter
}
