//! The worker's loops: consuming jobs, renewing leases, listening for cancellations.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use volley_amqp::lapin::Channel;
use volley_amqp::lapin::message::Delivery;
use volley_amqp::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, QueueBindOptions, QueueDeclareOptions,
};
use volley_amqp::lapin::types::FieldTable;
use volley_amqp::{connect, consumer_channel, declare_topology};
use volley_domain::{Claim, Dispatch, InferenceType, Outcome};
use volley_proto::{Control, JobEvent, JobMessage, Message, control};

use crate::providers::{Job, Output, ProviderError};
use crate::{InFlight, Worker};
use tracing::Instrument;
use volley_telemetry::metrics::JobOutcome;

/// At most this many jobs in one claim request (batch-state takes up to 512).
const CLAIM_BATCH: usize = 128;

pub async fn consume_forever(w: Arc<Worker>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(usize::from(w.settings.worker.concurrency)));
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        match consume(&w, &stop, &slots).await {
            Ok(()) => break,
            Err(e) => {
                w.consuming.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "job consumer lost; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    w.consuming.store(false, Ordering::Relaxed);
}

async fn consume(
    w: &Arc<Worker>,
    stop: &CancellationToken,
    slots: &Arc<Semaphore>,
) -> anyhow::Result<()> {
    let names = w.broker.names().clone();
    let queue = names.job_queue(w.kind);
    let conn = connect(
        &w.settings.amqp_url,
        &format!("volley-worker-{}-jobs", w.kind.key()),
    )
    .await?;
    let ch = consumer_channel(&conn, w.settings.worker.concurrency).await?;
    declare_topology(&ch, &names).await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    w.consuming.store(true, Ordering::Relaxed);
    tracing::info!(queue = %queue, "consuming");
    loop {
        // A free slot first, then a message: prefetch never outruns what we can run.
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => p?,
        };
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else {
            anyhow::bail!("the broker cancelled the consumer");
        };
        let mut batch = vec![(delivery?, permit)];
        // Whatever else has arrived and has a free slot joins the same claim: one request to
        // batch-state and one ack for many jobs. Nothing waits for more to come.
        while batch.len() < CLAIM_BATCH {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            match consumer.next().now_or_never() {
                Some(Some(d)) => batch.push((d?, permit)),
                Some(None) => anyhow::bail!("the broker cancelled the consumer"),
                None => break,
            }
        }
        claim_and_start(w, &ch, &queue, batch, stop).await?;
    }
    // Claims run in this loop, so none is in progress: the prefetched messages not yet
    // claimed go back to the queue as the channel closes.
    let _ = conn.close(200, "worker stopping".into()).await;
    Ok(())
}

/// Checks a message against the worker's type and turns it into a job.
pub fn decode(kind: InferenceType, payload: &[u8]) -> Result<(Job, i64), String> {
    let m = JobMessage::decode(payload).map_err(|e| format!("not a JobMessage: {e}"))?;
    let d = Dispatch::try_from(m)?;
    if d.inference_type != kind {
        return Err(format!(
            "a {} job ({}) on the {} queue",
            d.inference_type, d.endpoint, kind
        ));
    }
    Ok((
        Job {
            id: d.id,
            batch_id: d.batch_id,
            attempt: 0,
            endpoint: d.endpoint,
            model: d.model,
            body: d.body,
        },
        d.accepted_at_ms,
    ))
}

/// A decoded job message waiting for its claim.
struct Pending {
    job: Job,
    accepted_ms: i64,
    span: tracing::Span,
    permit: OwnedSemaphorePermit,
}

/// Claims a batch of deliveries in one request, settles them with one ack (or one nack, to
/// hand them back when batch-state cannot be reached) and starts the claimed jobs.
///
/// Runs in the consume loop, so every delivery before this batch is settled already: the
/// multiple ack covers exactly this batch.
async fn claim_and_start(
    w: &Arc<Worker>,
    ch: &Channel,
    queue: &str,
    batch: Vec<(Delivery, OwnedSemaphorePermit)>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut pending = Vec::with_capacity(batch.len());
    let mut last_tag = None;
    for (d, permit) in batch {
        // Each job continues the trace of the publish that produced its message.
        let span = volley_amqp::trace::consumer_span(crate::service_name(w.kind), queue, &d);
        match decode(w.kind, &d.data) {
            Ok((job, accepted_ms)) => {
                span.record("job.id", job.id);
                span.record("batch.id", job.batch_id);
                span.record("inference_type", w.kind.as_str());
                last_tag = Some(d.delivery_tag);
                pending.push(Pending {
                    job,
                    accepted_ms,
                    span,
                    permit,
                });
            }
            Err(why) => {
                span.in_scope(
                    || tracing::warn!(reason = %why, "dead-lettering an undecodable job message"),
                );
                w.metrics.amqp.dead_lettered(queue);
                // Settled before the multiple ack below, which would otherwise cover it.
                d.nack(BasicNackOptions {
                    requeue: false,
                    ..Default::default()
                })
                .await?;
            }
        }
    }
    let Some(tag) = last_tag else { return Ok(()) };
    let ids: Vec<i64> = pending.iter().map(|p| p.job.id).collect();
    let Some(claims) = claim_with_retry(w, &ids, &pending, stop).await else {
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await?;
        return Ok(());
    };
    // The claims are durable in PostgreSQL: the messages have done their work. A redelivery
    // after a failed ack is refused by the claim.
    if let Err(e) = ch.basic_ack(tag, BasicAckOptions { multiple: true }).await {
        tracing::debug!(jobs = ids.len(), error = %e, "ack after claim failed");
    }
    for (p, claim) in pending.into_iter().zip(claims) {
        match claim {
            Claim::Claimed {
                attempt,
                round_attempt,
            } => {
                let span = p.span.clone();
                tokio::spawn(
                    run_job(
                        w.clone(),
                        p.job,
                        attempt,
                        round_attempt,
                        p.accepted_ms,
                        p.permit,
                    )
                    .instrument(span),
                );
            }
            Claim::Refused | Claim::NotFound => {
                // Redelivered, duplicated, cancelled or finished: nothing to do.
                tracing::debug!(parent: &p.span, job.id = p.job.id, "job not claimable; dropped the message");
            }
        }
    }
    Ok(())
}

/// Claims `ids`, retrying while batch-state is unreachable; `None` when it stays so (or the
/// worker is stopping): the messages then go back to the queue.
async fn claim_with_retry(
    w: &Worker,
    ids: &[i64],
    pending: &[Pending],
    stop: &CancellationToken,
) -> Option<Vec<Claim>> {
    for tries in 1..=20u32 {
        // One request for the whole batch: its span is a child of the first job's consumer
        // span and linked to the others', so each job's trace shows its claim.
        let span = pending[0]
            .span
            .in_scope(|| volley_telemetry::trace::client_span("POST", "/internal/claims"));
        for p in &pending[1..] {
            volley_telemetry::trace::link(&span, &p.span);
        }
        match w.state.claim(ids, span).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(jobs = ids.len(), error = %e, "claim failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(250 * u64::from(tries))) => {}
                }
            }
        }
    }
    tracing::warn!(
        jobs = ids.len(),
        "batch-state unreachable; returning the messages"
    );
    None
}

/// Runs a claimed job (inside its consumer span) and reports its outcome.
async fn run_job(
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
    report(&w, &job, round_attempt, result, duration_ms).await;
    drop(reporting);
    w.in_flight.lock().await.remove(&job.id);
}

fn backoff_ms(w: &Worker, attempt: i32) -> i64 {
    let base = w.settings.worker.retry_base_ms.max(1) as f64;
    let max = w.settings.worker.retry_max_ms.max(1) as f64;
    let exp = (base * 2f64.powi(attempt.clamp(1, 30) - 1)).min(max);
    // Full jitter on the upper half, so retries of a failed burst spread out.
    (exp * rand::rng().random_range(0.5..=1.0)) as i64
}

/// `round_attempt` counts attempts from the latest operator retry: the retry budget.
async fn report(
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

/// Keeps claims alive for as long as jobs run; a claim batch-state no longer recognises
/// (cancelled, or handed to another worker) aborts its job.
pub async fn renew_leases(w: Arc<Worker>, stop: CancellationToken) {
    let every = Duration::from_millis((w.settings.state.lease_ms / 3).max(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let held: Vec<(i64, i32)> = w
            .in_flight
            .lock()
            .await
            .iter()
            .map(|(id, f)| (*id, f.attempt))
            .collect();
        if held.is_empty() {
            continue;
        }
        match w.state.renew(&held).await {
            Ok(alive) => {
                let alive: std::collections::HashSet<i64> = alive.into_iter().collect();
                let map = w.in_flight.lock().await;
                for (id, attempt) in held {
                    if !alive.contains(&id)
                        && let Some(f) = map.get(&id)
                        && f.attempt == attempt
                    {
                        tracing::info!(
                            job.id = id,
                            "claim no longer valid (cancelled or reassigned); aborting"
                        );
                        f.cancel.cancel();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
        }
    }
}

/// Listens on the control fanout for cancellations.
pub async fn control_forever(w: Arc<Worker>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        if let Err(e) = control(&w, &stop).await {
            tracing::warn!(error = %e, "control consumer lost; reconnecting");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

async fn control(w: &Worker, stop: &CancellationToken) -> anyhow::Result<()> {
    let names = w.broker.names().clone();
    let conn = connect(
        &w.settings.amqp_url,
        &format!("volley-worker-{}-control", w.kind.key()),
    )
    .await?;
    let ch = conn.create_channel().await?;
    declare_topology(&ch, &names).await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        names.control_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => {
                let _ = conn.close(200, "worker stopping".into()).await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let Some(d) = d else {
            anyhow::bail!("control consumer cancelled");
        };
        let d = d?;
        let Ok(c) = Control::decode(d.data.as_slice()) else {
            tracing::warn!("ignoring an undecodable control message");
            continue;
        };
        if let Some(control::Action::Cancel(c)) = c.action {
            let map = w.in_flight.lock().await;
            for (id, f) in map.iter() {
                if c.job_ids.contains(id) || (c.batch_id > 0 && f.batch_id == c.batch_id) {
                    tracing::info!(
                        job.id = id,
                        batch.id = f.batch_id,
                        "cancelling a running job"
                    );
                    f.cancel.cancel();
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: &str, endpoint: &str, body: &[u8]) -> Vec<u8> {
        JobMessage {
            job_id: 5,
            batch_id: 1,
            inference_type: t.into(),
            endpoint: endpoint.into(),
            model: "m".into(),
            body_json: body.to_vec(),
            accepted_at_ms: 0,
        }
        .encode_to_vec()
    }

    #[test]
    fn decode_checks_everything() {
        let ok = msg("LLM", "/v1/completions", br#"{"prompt":"x"}"#);
        assert_eq!(decode(InferenceType::Llm, &ok).unwrap().0.id, 5);
        assert!(
            decode(InferenceType::Image, &ok)
                .unwrap_err()
                .contains("on the IMAGE queue")
        );
        assert!(decode(InferenceType::Llm, &msg("LLM", "/v1/x", b"{}")).is_err());
        assert!(decode(InferenceType::Llm, &msg("LLM", "/v1/completions", b"[1]")).is_err());
        assert!(decode(InferenceType::Llm, &msg("LLM", "/v1/completions", b"{")).is_err());
        assert!(decode(InferenceType::Llm, b"\xff\xff").is_err());
    }
}
