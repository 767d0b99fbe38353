//! Turning a result into an outcome event and publishing it with confirms, retried through
//! broker outages; handing running jobs back at shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use volley_domain::Outcome;
use volley_proto::JobEvent;

use crate::Worker;
use crate::providers::{Job, Output, ProviderError};
use volley_telemetry::metrics::JobOutcome;

fn backoff_ms(w: &Worker, attempt: i32) -> i64 {
    let base = w.settings.worker.retry_base_ms.max(1) as f64;
    let max = w.settings.worker.retry_max_ms.max(1) as f64;
    let exp = (base * 2f64.powi(attempt.clamp(1, 30) - 1)).min(max);
    // Full jitter on the upper half, so retries of a failed burst spread out.
    (exp * rand::rng().random_range(0.5..=1.0)) as i64
}

/// `round_attempt` counts attempts from the latest operator retry: the retry budget.
pub(super) async fn report(
    w: &Worker,
    job: &Job,
    round_attempt: i32,
    result: Result<Output, ProviderError>,
    duration_ms: u64,
) {
    let max = w.settings.worker.max_attempts as i32;
    let (mut outcome, label) = match result {
        Ok(out) => (
            Outcome::Succeeded {
                result: out.result,
                usage: out.usage,
                media_keys: out.media_keys,
            },
            "succeeded",
        ),
        Err(ProviderError::Cancelled) => {
            tracing::info!(
                job.id = job.id,
                batch.id = job.batch_id,
                attempt = job.attempt,
                inference_type = %job.endpoint.inference_type(),
                duration_ms,
                "job aborted"
            );
            w.meters
                .finished(JobOutcome::Aborted, Duration::from_millis(duration_ms));
            return;
        }
        Err(ProviderError::Retryable {
            message,
            retry_after,
        }) if round_attempt < max => {
            let delay_ms = retry_after
                .map(|d| d.as_millis() as i64)
                .unwrap_or_else(|| backoff_ms(w, round_attempt));
            (
                Outcome::Retry {
                    error: message,
                    delay_ms,
                },
                "retry",
            )
        }
        Err(ProviderError::Retryable { message, .. }) => (
            Outcome::Failed {
                error_type: "provider_error".into(),
                message: format!("gave up after {round_attempt} attempts: {message}"),
            },
            "failed",
        ),
        Err(ProviderError::Fatal {
            error_type,
            message,
        }) => (
            Outcome::Failed {
                error_type: error_type.into(),
                message,
            },
            "failed",
        ),
    };
    // What PostgreSQL cannot store (U+0000) is replaced here, at the edge.
    outcome.clean();
    let event = JobEvent {
        job_id: job.id,
        attempt: job.attempt,
        outcome: Some(outcome.into()),
        at_ms: chrono::Utc::now().timestamp_millis(),
        batch_id: job.batch_id,
        inference_type: job.endpoint.inference_type().as_str().to_owned(),
        duration_ms: duration_ms as i64,
    };
    tracing::info!(
        job.id = job.id,
        batch.id = job.batch_id,
        attempt = job.attempt,
        inference_type = %job.endpoint.inference_type(),
        duration_ms,
        outcome = label,
        "job attempt finished"
    );
    let counted = match label {
        "succeeded" => JobOutcome::Succeeded,
        "retry" => JobOutcome::Retry,
        _ => JobOutcome::Failed,
    };
    w.meters
        .finished(counted, Duration::from_millis(duration_ms));
    publish_event(w, event).await;
}

/// How long a worker keeps trying to report one outcome. The job's lease is renewed
/// meanwhile, so this rides out a broker restart without running the job again.
const REPORT_FOR: Duration = Duration::from_secs(120);

/// At most this many outcomes in one publishing round.
const REPORT_BATCH: usize = 256;

/// An outcome for the reporter to publish, the span its producer span belongs under, and who
/// waits for its confirm.
pub(crate) struct Report {
    event: JobEvent,
    span: tracing::Span,
    confirmed: oneshot::Sender<bool>,
}

/// Hands an outcome to the reporter and waits until the broker confirmed it. If it could not
/// be confirmed within [`REPORT_FOR`], the lease runs out and batch-state hands the job out
/// again: never lost, at worst done twice.
async fn publish_event(w: &Worker, event: JobEvent) {
    let job_id = event.job_id;
    let (confirmed, answer) = oneshot::channel();
    let report = Report {
        event,
        span: tracing::Span::current(),
        confirmed,
    };
    let ok = w.reports.send(report).await.is_ok() && answer.await.unwrap_or(false);
    if !ok {
        tracing::error!(
            job.id = job_id,
            "could not report the outcome; the lease will expire and the job will be retried"
        );
    }
}

/// Publishes outcomes as they come: all those waiting go out in one round (confirms awaited
/// together), so a busy worker pays one round per batch of outcomes, not one per job. Those
/// not confirmed are retried through broker outages, each for up to [`REPORT_FOR`].
pub async fn report_forever(
    w: Arc<Worker>,
    mut reports: mpsc::Receiver<Report>,
    stop: CancellationToken,
) {
    let mut events: Vec<JobEvent> = Vec::new();
    let mut waiting: Vec<(tracing::Span, oneshot::Sender<bool>, Instant)> = Vec::new();
    let mut pause = Duration::from_millis(200);
    loop {
        if events.is_empty() {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                r = reports.recv() => r,
            };
            let Some(r) = first else { return };
            events.push(r.event);
            waiting.push((r.span, r.confirmed, Instant::now()));
        }
        while events.len() < REPORT_BATCH {
            let Ok(r) = reports.try_recv() else { break };
            events.push(r.event);
            waiting.push((r.span, r.confirmed, Instant::now()));
        }
        let spans: Vec<tracing::Span> = waiting.iter().map(|(s, _, _)| s.clone()).collect();
        let results = match w.broker.publish_events_under(&events, &spans).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(events = events.len(), error = %e, "publishing events failed");
                events
                    .iter()
                    .map(|_| Err(volley_amqp::AmqpError::NoConfirm))
                    .collect()
            }
        };
        let mut retry_events = Vec::new();
        let mut retry_waiting = Vec::new();
        let now = Instant::now();
        for ((event, (span, confirmed, since)), result) in
            events.drain(..).zip(waiting.drain(..)).zip(results)
        {
            match result {
                Ok(()) => {
                    let _ = confirmed.send(true);
                }
                Err(e) if now.duration_since(since) + pause < REPORT_FOR => {
                    tracing::warn!(job.id = event.job_id, error = %e, "event not confirmed; retrying");
                    retry_events.push(event);
                    retry_waiting.push((span, confirmed, since));
                }
                Err(_) => {
                    let _ = confirmed.send(false);
                }
            }
        }
        if retry_events.is_empty() {
            pause = Duration::from_millis(200);
            continue;
        }
        events = retry_events;
        waiting = retry_waiting;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// At the end of the grace period: abort what still runs and hand it back to the queue at
/// once, instead of waiting for its lease to run out.
pub async fn hand_back_all(w: &Worker) {
    let held: Vec<(i64, i32, i64)> = {
        let map = w.in_flight.lock().await;
        map.iter()
            .map(|(id, f)| {
                f.cancel.cancel();
                (*id, f.attempt, f.batch_id)
            })
            .collect()
    };
    if held.is_empty() {
        return;
    }
    let events: Vec<JobEvent> = held
        .iter()
        .map(|(id, attempt, batch_id)| JobEvent {
            job_id: *id,
            attempt: *attempt,
            outcome: Some(
                Outcome::Retry {
                    error: "worker shut down; handed back".into(),
                    delay_ms: 0,
                }
                .into(),
            ),
            at_ms: chrono::Utc::now().timestamp_millis(),
            batch_id: *batch_id,
            inference_type: w.kind.as_str().to_owned(),
            duration_ms: 0,
        })
        .collect();
    match w.broker.publish_events(&events).await {
        Ok(_) => tracing::info!(jobs = events.len(), "handed running jobs back"),
        Err(e) => tracing::warn!(error = %e, "could not hand jobs back; their leases will expire"),
    }
}
