//! Consumes workers' outcome events and applies them in batches: one statement and one
//! multiple-ack per batch instead of a transaction and an ack per event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use volley_amqp::lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions};
use volley_amqp::lapin::types::FieldTable;
use volley_amqp::{Names, connect, consumer_channel, declare_topology};
use volley_db::{Db, Event, Outcome, Usage};
use volley_proto::{JobEvent, Message, job_event};

use crate::Shared;

/// Converts a wire event to a domain event; `Err` names why it cannot be applied.
pub fn decode(payload: &[u8]) -> Result<Event, String> {
    decode_with_context(payload).map(|(e, _)| e)
}

/// What an event says about its job besides the outcome, for logs and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventContext {
    pub batch_id: i64,
    pub inference_type: String,
    pub duration_ms: i64,
}

/// [`decode`], with the event's [`EventContext`].
pub fn decode_with_context(payload: &[u8]) -> Result<(Event, EventContext), String> {
    let e = JobEvent::decode(payload).map_err(|e| format!("not a JobEvent: {e}"))?;
    let context = EventContext {
        batch_id: e.batch_id,
        inference_type: e.inference_type.clone(),
        duration_ms: e.duration_ms,
    };
    if e.job_id <= 0 || e.attempt <= 0 {
        return Err(format!("bad job id {} or attempt {}", e.job_id, e.attempt));
    }
    let outcome = match e.outcome {
        None => return Err("event without an outcome".into()),
        Some(job_event::Outcome::Succeeded(s)) => Outcome::Succeeded {
            result: serde_json::from_slice(&s.result_json)
                .map_err(|e| format!("result is not JSON: {e}"))?,
            usage: s.usage.map(|u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
            }),
            media_keys: s.media_keys,
        },
        Some(job_event::Outcome::Failed(f)) => Outcome::Failed {
            error_type: f.error_type,
            message: f.message,
        },
        Some(job_event::Outcome::Retry(r)) => Outcome::Retry {
            error: r.error,
            delay_ms: r.delay_ms,
        },
    };
    Ok((
        Event {
            job_id: e.job_id,
            attempt: e.attempt,
            outcome,
        },
        context,
    ))
}

/// Runs until `stop`, reconnecting after broker failures.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    while !stop.is_cancelled() {
        match consume(&shared, &stop).await {
            Ok(()) => return,
            Err(e) => {
                shared.set_consuming(false);
                tracing::warn!(error = %e, "events consumer lost; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn consume(shared: &Shared, stop: &CancellationToken) -> anyhow::Result<()> {
    let s = &shared.settings;
    let names = Names::new(&s.queue_prefix);
    let queue = names.events_queue();
    let conn = connect(&s.amqp_url, "volley-batch-state-events").await?;
    let batch = s.state.event_batch.max(1);
    let ch = consumer_channel(&conn, (batch * 2).min(u16::MAX as usize) as u16).await?;
    declare_topology(&ch, &names).await?;
    let mut consumer = ch
        .basic_consume(
            names.events_queue().as_str().into(),
            "batch-state".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    shared.set_consuming(true);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => {
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let Some(first) = first else {
            anyhow::bail!("the events consumer was cancelled by the broker");
        };
        let mut deliveries = vec![first?];
        // Gather what is already here (briefly), to apply it in one statement.
        while deliveries.len() < batch {
            match tokio::time::timeout(Duration::from_millis(2), consumer.next()).await {
                Ok(Some(d)) => deliveries.push(d?),
                Ok(None) => break,
                Err(_) => break,
            }
        }
        let mut events = Vec::with_capacity(deliveries.len());
        let mut received = Vec::with_capacity(deliveries.len());
        let mut last_good = None;
        for d in &deliveries {
            match decode_with_context(&d.data) {
                Ok((e, context)) => {
                    // Each event continues its job's trace: the worker's publish is its parent.
                    let span = volley_amqp::trace::consumer_span("batch-state", &queue, d);
                    span.record("job.id", e.job_id);
                    span.record("attempt", e.attempt);
                    if context.batch_id > 0 {
                        span.record("batch.id", context.batch_id);
                        span.record("inference_type", context.inference_type.as_str());
                    }
                    received.push((e.job_id, e.attempt, context, span));
                    events.push(e);
                    last_good = Some(d.delivery_tag);
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "dead-lettering an undecodable event");
                    shared.metrics.amqp.dead_lettered(&queue);
                    d.nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await?;
                }
            }
        }
        let Some(tag) = last_good else { continue };
        let applied = apply_with_retry(&shared.db, events, stop).await?;
        record_applied(shared, received, applied);
        ch.basic_ack(tag, BasicAckOptions { multiple: true })
            .await?;
    }
}

/// One log event per state change, inside the event's consumer span (so it is part of the
/// job's trace too), and the counts.
fn record_applied(
    shared: &Shared,
    received: Vec<(i64, i32, EventContext, tracing::Span)>,
    applied: Vec<(i64, String)>,
) {
    let total = received.len();
    let n_applied = applied.len();
    let mut applied: HashMap<i64, String> = applied.into_iter().collect();
    for (job_id, attempt, c, span) in received {
        let Some(status) = applied.remove(&job_id) else {
            span.record("job.status", "ignored");
            continue;
        };
        span.record("job.status", status.as_str());
        span.in_scope(|| {
            tracing::info!(
                job.id = job_id,
                batch.id = c.batch_id,
                attempt,
                inference_type = %c.inference_type,
                duration_ms = c.duration_ms,
                status = %status,
                "job state changed"
            )
        });
        shared.metrics.jobs.transition(&c.inference_type, &status);
    }
    let ignored = total - n_applied;
    if ignored > 0 {
        tracing::debug!(ignored, "duplicate, stale or late events ignored");
    }
    shared.metrics.state.events(n_applied, ignored);
}

/// A database outage holds the events (unacked, so nothing is lost) and retries.
async fn apply_with_retry(
    db: &Db,
    events: Vec<Event>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<(i64, String)>> {
    let mut delay = Duration::from_millis(100);
    loop {
        match db.apply_events(events.clone()).await {
            Ok(applied) => return Ok(applied),
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "applying events failed; retrying");
                if stop.is_cancelled() {
                    anyhow::bail!("stopping with events unapplied; they stay on the queue");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use volley_proto::{Failed, Succeeded};

    #[test]
    fn decodes_and_refuses() {
        let ok = JobEvent {
            job_id: 1,
            attempt: 1,
            outcome: Some(job_event::Outcome::Succeeded(Succeeded {
                result_json: br#"{"a":1}"#.to_vec(),
                usage: None,
                ..Default::default()
            })),
            at_ms: 0,
            ..Default::default()
        };
        assert!(decode(&ok.encode_to_vec()).is_ok());
        let mut bad = ok.clone();
        bad.outcome = None;
        assert!(decode(&bad.encode_to_vec()).is_err());
        let mut bad = ok.clone();
        bad.outcome = Some(job_event::Outcome::Succeeded(Succeeded {
            result_json: b"{nope".to_vec(),
            usage: None,
            ..Default::default()
        }));
        assert!(
            decode(&bad.encode_to_vec())
                .unwrap_err()
                .contains("not JSON")
        );
        let mut bad = ok.clone();
        bad.attempt = 0;
        bad.outcome = Some(job_event::Outcome::Failed(Failed::default()));
        assert!(decode(&bad.encode_to_vec()).is_err());
        assert!(decode(b"\xff\xff\xff").is_err());
    }
}
