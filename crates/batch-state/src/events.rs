//! Consumes workers' outcome events and applies them in batches: one statement and one
//! multiple-ack per batch instead of a transaction and an ack per event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use volley_amqp::{Consumer, ConsumerConfig, Names, Source};
use volley_db::{Db, EachResult, Refusal};
use volley_domain::JobStatus;
use volley_domain::{Event, Outcome};
use volley_proto::{JobEvent, Message};

use crate::Shared;

/// The longest a retry may wait before its job is available again, whatever the event says.
const MAX_RETRY_DELAY_MS: i64 = 3_600_000;

/// How a job whose outcome the database refused is failed.
fn refusal() -> Refusal {
    Refusal {
        error_type: "invalid_output".into(),
        message: "the job's outcome could not be stored".into(),
    }
}

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
    let mut outcome = Outcome::try_from(e.outcome.ok_or("event without an outcome")?)?;
    // Defence in depth: workers clean outcomes already, but one U+0000 that reached SQL
    // would fail a whole batch of other tenants' outcomes.
    outcome.clean();
    if let Outcome::Retry { delay_ms, .. } = &mut outcome {
        *delay_ms = (*delay_ms).clamp(0, MAX_RETRY_DELAY_MS);
    }
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
    let s = &shared.settings;
    let names = Names::new(&s.queue_prefix);
    let batch = s.state.event_batch.max(1);
    let config = ConsumerConfig {
        url: s.amqp_url.clone(),
        connection_name: "volley-batch-state-events".into(),
        source: Source::Queue(names.events_queue()),
        names,
        prefetch: Some((batch * 2).min(u16::MAX as usize) as u16),
        tag: "batch-state".into(),
    };
    volley_amqp::consumer::run(
        config,
        stop.clone(),
        |up| shared.set_consuming(up),
        |consumer| consume(&shared, &stop, consumer),
    )
    .await;
}

async fn consume(
    shared: &Shared,
    stop: &CancellationToken,
    mut consumer: Consumer,
) -> anyhow::Result<()> {
    let queue = consumer.queue().to_owned();
    let batch = shared.settings.state.event_batch.max(1);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => {
                consumer.close("shutdown").await;
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
        let mut tags = Vec::with_capacity(deliveries.len());
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
                    tags.push(d.delivery_tag);
                    events.push(e);
                    last_good = Some(d.delivery_tag);
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "dead-lettering an undecodable event");
                    shared.metrics.amqp.dead_lettered(&queue);
                    consumer.dead_letter(d.delivery_tag).await?;
                }
            }
        }
        let Some(tag) = last_good else { continue };
        let Applied { applied, refused } = apply_with_retry(&shared.db, events, stop).await?;
        // An event that can never apply leaves the queue (dead-lettered, kept for a look)
        // rather than wedging every later outcome; settled before the multiple ack below.
        for i in refused {
            shared.metrics.amqp.dead_lettered(&queue);
            consumer.dead_letter(tags[i]).await?;
        }
        record_applied(shared, received, applied);
        consumer.ack_through(tag).await?;
    }
}

/// One log event per state change, inside the event's consumer span (so it is part of the
/// job's trace too), and the counts.
fn record_applied(
    shared: &Shared,
    received: Vec<(i64, i32, EventContext, tracing::Span)>,
    applied: Vec<(i64, JobStatus)>,
) {
    let total = received.len();
    let n_applied = applied.len();
    let mut applied: HashMap<i64, JobStatus> = applied.into_iter().collect();
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
        shared
            .metrics
            .jobs
            .transition(&c.inference_type, status.as_str());
    }
    let ignored = total - n_applied;
    if ignored > 0 {
        tracing::debug!(ignored, "duplicate, stale or late events ignored");
    }
    shared.metrics.state.events(n_applied, ignored);
}

/// What became of a batch of events: `(job id, new status)` of those that changed their job,
/// and the indexes of those that can never apply.
struct Applied {
    applied: Vec<(i64, JobStatus)>,
    refused: Vec<usize>,
}

/// A database outage holds the events (unacked, so nothing is lost) and retries, the delay
/// capped. A statement the database refuses is not retried as is: the events are applied one
/// by one, so one bad event fails only its own job ([`Db::apply_each`]).
async fn apply_with_retry(
    db: &Db,
    events: Vec<Event>,
    stop: &CancellationToken,
) -> anyhow::Result<Applied> {
    let mut delay = Duration::from_millis(100);
    loop {
        let err = match db.apply_events(events.clone()).await {
            Ok(applied) => {
                return Ok(Applied {
                    applied,
                    refused: Vec::new(),
                });
            }
            Err(e) if e.is_refusal() => {
                tracing::warn!(error = %e, events = events.len(), "the database refused a batch of events; applying them one by one");
                match db.apply_each(events.clone(), refusal()).await {
                    Ok(each) => return Ok(sort_each(&events, each)),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        tracing::warn!(error = %err, events = events.len(), "applying events failed; retrying");
        if stop.is_cancelled() {
            anyhow::bail!("stopping with events unapplied; they stay on the queue");
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn sort_each(events: &[Event], each: Vec<EachResult>) -> Applied {
    let mut out = Applied {
        applied: Vec::new(),
        refused: Vec::new(),
    };
    for (i, (e, r)) in events.iter().zip(each).enumerate() {
        match r {
            EachResult::Applied(status) => out.applied.push((e.job_id, status)),
            EachResult::Ignored => {}
            EachResult::FailedInstead(why) => {
                tracing::error!(job.id = e.job_id, attempt = e.attempt, reason = %why, "an outcome could not be stored; the job failed as invalid_output");
                out.applied.push((e.job_id, JobStatus::Failed));
            }
            EachResult::Refused(why) => {
                tracing::error!(job.id = e.job_id, attempt = e.attempt, reason = %why, "an outcome can never be stored; dead-lettering it");
                out.refused.push(i);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use volley_proto::{Failed, Succeeded, job_event};

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

    #[test]
    fn cleans_what_postgresql_cannot_store_and_caps_delays() {
        let nul = JobEvent {
            job_id: 1,
            attempt: 1,
            outcome: Some(job_event::Outcome::Succeeded(Succeeded {
                result_json: br#"{"text":"a\u0000b","k\u0000":1}"#.to_vec(),
                usage: None,
                ..Default::default()
            })),
            ..Default::default()
        };
        let Outcome::Succeeded { result, .. } = decode(&nul.encode_to_vec()).unwrap().outcome
        else {
            panic!("not a success")
        };
        assert_eq!(
            result,
            serde_json::json!({"text": "a\u{FFFD}b", "k\u{FFFD}": 1})
        );
        let mut failed = nul.clone();
        failed.outcome = Some(job_event::Outcome::Failed(Failed {
            error_type: "x\0".into(),
            message: "m\0".into(),
        }));
        assert_eq!(
            decode(&failed.encode_to_vec()).unwrap().outcome,
            Outcome::Failed {
                error_type: "x\u{FFFD}".into(),
                message: "m\u{FFFD}".into()
            }
        );
        let mut retry = nul.clone();
        retry.outcome = Some(job_event::Outcome::Retry(volley_proto::Retry {
            error: "e\0".into(),
            delay_ms: i64::MAX,
        }));
        assert_eq!(
            decode(&retry.encode_to_vec()).unwrap().outcome,
            Outcome::Retry {
                error: "e\u{FFFD}".into(),
                delay_ms: MAX_RETRY_DELAY_MS
            }
        );
    }
}
