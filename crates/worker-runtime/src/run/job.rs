//! Running one claimed job on its provider, then reporting its outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::providers::{Job, ProviderError};
use crate::{InFlight, Worker};

/// Runs a claimed job (inside its consumer span) and reports its outcome.
pub(super) async fn run_job(
    w: Arc<Worker>,
    mut job: Job,
    attempt: i32,
    round_attempt: i32,
    accepted_ms: i64,
    permit: OwnedSemaphorePermit,
) {
    job.attempt = attempt;
    tracing::Span::current().record("attempt", attempt);
    let waited = chrono::Utc::now().timestamp_millis() - accepted_ms;
    w.meters
        .started(Duration::from_millis(u64::try_from(waited).unwrap_or(0)));
    let cancel = CancellationToken::new();
    w.in_flight.lock().await.insert(
        job.id,
        InFlight {
            batch_id: job.batch_id,
            attempt,
            cancel: cancel.clone(),
        },
    );
    tracing::info!(job.id = job.id, batch.id = job.batch_id, attempt, inference_type = %w.kind, "job started");
    let started = Instant::now();
    // A panic in the job's run (a provider adapter's bug, hostile output) fails this job: it
    // must not end the task with the job still PROCESSING and its lease renewed for ever.
    let result = std::panic::AssertUnwindSafe(w.providers.run(&job, &cancel))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(job.id = job.id, panic = %why, "the job's run panicked; failing it");
            Err(ProviderError::Fatal {
                error_type: "internal_error",
                message: "the worker failed while running this job".to_owned(),
            })
        });
    w.meters.stopped();
    let duration_ms = started.elapsed().as_millis() as u64;
    // The run slot goes to the next job now; the report holds a reporting slot instead.
    let reporting = w.reporting.clone().acquire_owned().await;
    drop(permit);
    // The job stays in flight (its lease renewed) until its outcome is confirmed, so a broker
    // outage while reporting does not let the lease run out and the job run a second time.
    super::report::report(&w, &job, round_attempt, result, duration_ms).await;
    drop(reporting);
    w.in_flight.lock().await.remove(&job.id);
}
