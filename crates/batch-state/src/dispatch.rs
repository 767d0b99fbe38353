//! The fair dispatcher: releases work the gateway held back from a full queue, round-robin
//! over owners (as many turns in a row as the owner's key weight; within an owner, its
//! highest aged priority, then its oldest batch), only as far as each modality's queue has
//! room: a turn is at most that room, so a batch may take several. Every replica runs it;
//! `SKIP LOCKED` keeps them from releasing the same work. See ARCHITECTURE.md, "Tenants:
//! quotas, priority, fair share".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use volley_amqp::Names;
use volley_amqp::depths::DepthProbe;
use volley_db::Turns;
use volley_domain::InferenceType;
use volley_proto::JobMessage;

use crate::Shared;

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let every = Duration::from_millis(shared.settings.dispatch.interval_ms.max(1));
    let mut cursors: HashMap<InferenceType, Turns> = HashMap::new();
    let mut depths: Option<DepthProbe> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = release_once(&shared, &mut depths, &mut cursors).await {
            tracing::warn!(error = %e, "fair dispatch failed; will try again");
            depths = None;
        }
    }
    if let Some(d) = depths {
        d.close().await;
    }
}

/// One pass: for each type with held work, releases jobs while its queue has room.
/// Returns the jobs published.
async fn release_once(
    shared: &Shared,
    depths: &mut Option<DepthProbe>,
    cursors: &mut HashMap<InferenceType, Turns>,
) -> anyhow::Result<usize> {
    let held = shared.db.held_work().await?;
    for t in InferenceType::ALL {
        let n = held
            .iter()
            .find(|h| h.inference_type == t)
            .map_or(0, |h| h.jobs);
        shared
            .metrics
            .state
            .held
            .with_label_values(&[t.as_str()])
            .set(n);
    }
    if held.is_empty() {
        return Ok(0);
    }
    let s = &shared.settings;
    if depths.is_none() {
        let names = Names::new(&s.queue_prefix);
        *depths = Some(DepthProbe::open(&s.amqp_url, names, "volley-dispatcher").await?);
    }
    let Some(d) = depths.as_ref() else {
        return Ok(0);
    };
    let mut published = 0;
    for h in held {
        let t = h.inference_type;
        let (messages, consumers) = d.job_queue(t).await?;
        let limit = s.dispatch.queue_limit(t, consumers, s.worker.concurrency);
        let mut room = limit.saturating_sub(u64::from(messages));
        // A turn is at least a quarter of the limit: a fast modality's newcomer goes out in
        // one turn rather than a slice per interval, and the queue runs at most that over.
        let turn = (limit / 4).max(1);
        while room > 0 {
            let Some(r) = shared
                .db
                .release_next(
                    t,
                    cursors.entry(t).or_default(),
                    s.dispatch.aging_ms,
                    usize::try_from(room.max(turn)).unwrap_or(usize::MAX),
                )
                .await?
            else {
                break;
            };
            if r.jobs.is_empty() {
                continue;
            }
            let n = publish(shared, r.batch_id, &r.jobs).await?;
            shared
                .metrics
                .state
                .released
                .with_label_values(&[t.as_str()])
                .inc_by(n as u64);
            published += n;
            room = room.saturating_sub(r.jobs.len() as u64);
        }
    }
    Ok(published)
}

/// Publishes released jobs; what the broker does not confirm goes to the outbox (the
/// sweeper publishes it). If even that fails, the jobs' messages count as lost once the
/// release is `state.redispatch_after_ms` old, and the sweeper publishes them then.
async fn publish(
    shared: &Shared,
    batch_id: i64,
    jobs: &[volley_domain::Dispatch],
) -> anyhow::Result<usize> {
    let messages: Vec<JobMessage> = jobs.iter().map(JobMessage::from).collect();
    match shared.broker.publish_jobs_confirmed(&messages).await {
        Ok(c) => {
            let n = c.confirmed.len();
            if !c.unconfirmed.is_empty() {
                tracing::warn!(
                    batch.id = batch_id,
                    unconfirmed = c.unconfirmed.len(),
                    "released jobs not confirmed; the sweeper will publish them"
                );
                shared.db.to_outbox(c.unconfirmed).await?;
            }
            Ok(n)
        }
        Err(e) => {
            shared
                .db
                .to_outbox(jobs.iter().map(|j| j.id).collect())
                .await?;
            Err(e.into())
        }
    }
}
