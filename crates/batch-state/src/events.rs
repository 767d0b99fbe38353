//! Consumes workers' outcome events and applies them in batches: one statement and one
//! multiple-ack per batch instead of a transaction and an ack per event.

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
    let e = JobEvent::decode(payload).map_err(|e| format!("not a JobEvent: {e}"))?;
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
    Ok(Event {
        job_id: e.job_id,
        attempt: e.attempt,
        outcome,
    })
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
        let mut last_good = None;
        for d in &deliveries {
            match decode(&d.data) {
                Ok(e) => {
                    events.push(e);
                    last_good = Some(d.delivery_tag);
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "dead-lettering an undecodable event");
                    d.nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await?;
                }
            }
        }
        let Some(tag) = last_good else { continue };
        apply_with_retry(&shared.db, events, stop).await?;
        ch.basic_ack(tag, BasicAckOptions { multiple: true })
            .await?;
    }
}

/// A database outage holds the events (unacked, so nothing is lost) and retries.
async fn apply_with_retry(
    db: &Db,
    events: Vec<Event>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(100);
    loop {
        match db.apply_events(events.clone()).await {
            Ok(applied) => {
                for (id, status) in &applied {
                    tracing::info!(job.id = id, status = %status, "job state changed");
                }
                let ignored = events.len() - applied.len();
                if ignored > 0 {
                    tracing::debug!(ignored, "duplicate, stale or late events ignored");
                }
                return Ok(());
            }
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
            })),
            at_ms: 0,
        };
        assert!(decode(&ok.encode_to_vec()).is_ok());
        let mut bad = ok.clone();
        bad.outcome = None;
        assert!(decode(&bad.encode_to_vec()).is_err());
        let mut bad = ok.clone();
        bad.outcome = Some(job_event::Outcome::Succeeded(Succeeded {
            result_json: b"{nope".to_vec(),
            usage: None,
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
