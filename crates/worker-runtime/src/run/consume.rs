//! Taking job messages: a slot, then a delivery; decode, claim in batches, settle, start.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use volley_amqp::{Consumer, ConsumerConfig, Delivery, Source};
use volley_domain::{Claim, Dispatch, InferenceType};
use volley_proto::{JobMessage, Message};

use crate::Worker;
use crate::providers::Job;
use tracing::Instrument;

/// At most this many jobs in one claim request (batch-state takes up to 512).
const CLAIM_BATCH: usize = 128;

pub async fn consume_forever(w: Arc<Worker>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(usize::from(w.settings.worker.concurrency)));
    let names = w.broker.names().clone();
    let config = ConsumerConfig {
        url: w.settings.amqp_url.clone(),
        connection_name: format!("volley-worker-{}-jobs", w.kind.key()),
        source: Source::Queue(names.job_queue(w.kind)),
        names,
        prefetch: Some(w.settings.worker.concurrency),
        tag: String::new(),
    };
    volley_amqp::consumer::run(
        config,
        stop.clone(),
        |up| w.consuming.store(up, Ordering::Relaxed),
        |consumer| consume(&w, &stop, &slots, consumer),
    )
    .await;
}

async fn consume(
    w: &Arc<Worker>,
    stop: &CancellationToken,
    slots: &Arc<Semaphore>,
    mut consumer: Consumer,
) -> anyhow::Result<()> {
    let queue = consumer.queue().to_owned();
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
        claim_and_start(w, &consumer, &queue, batch, stop).await?;
    }
    // Claims run in this loop, so none is in progress: the prefetched messages not yet
    // claimed go back to the queue as the channel closes.
    consumer.close("worker stopping").await;
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
    consumer: &Consumer,
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
                consumer.dead_letter(d.delivery_tag).await?;
            }
        }
    }
    let Some(tag) = last_tag else { return Ok(()) };
    let ids: Vec<i64> = pending.iter().map(|p| p.job.id).collect();
    let Some(claims) = claim_with_retry(w, &ids, &pending, stop).await else {
        consumer.requeue_through(tag).await?;
        return Ok(());
    };
    // The claims are durable in PostgreSQL: the messages have done their work. A redelivery
    // after a failed ack is refused by the claim.
    if let Err(e) = consumer.ack_through(tag).await {
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
                    super::job::run_job(
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
