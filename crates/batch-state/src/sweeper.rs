//! Closes the dual-write gap and recovers lost work: publishes QUEUED jobs that have no
//! confirmed message (of a batch whose publish the gateway never recorded, handed back by a
//! retry or an expired lease, or marked for re-dispatch by itself or an operator), then records
//! the confirms. It also fails jobs that were not started within `state.expire_after_ms` (type
//! `expired`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use volley_amqp::Broker;
use volley_db::Db;
use volley_proto::JobMessage;

use crate::Shared;

const PAGE: i64 = 512;

pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let every = Duration::from_millis(shared.settings.state.sweep_interval_ms.max(10));
    // Lost messages are looked for a tenth as often as they are waited for: that scan reads
    // the whole backlog, and a message lost for `redispatch_after_ms` can wait 10% longer.
    let stale_every = Duration::from_millis(shared.settings.state.redispatch_after_ms / 10);
    let mut stale_checked: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let stale = stale_checked.is_none_or(|t| t.elapsed() >= stale_every);
        match sweep_once(&shared.db, &shared.broker, &shared, stale).await {
            Ok(_) if stale => stale_checked = Some(Instant::now()),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed; will try again"),
        }
    }
}

/// One pass, looking for lost messages too if `stale`; returns how many jobs were published.
async fn sweep_once(
    db: &Db,
    broker: &Broker,
    shared: &Shared,
    stale: bool,
) -> anyhow::Result<usize> {
    let s = &shared.settings;
    let report = db
        .sweep(
            s.worker.max_attempts,
            s.state.dispatch_grace_ms,
            stale.then_some(s.state.redispatch_after_ms),
        )
        .await?;
    // Before publishing, so that a job past its window is failed rather than sent out.
    let expired = db.expire(s.state.expire_after_ms).await?;
    if stale {
        // Idempotency keys past their 24 hours, a bounded batch per pass.
        db.purge_idempotency_keys(PAGE).await?;
        // Released held work, once no longer needed to tell a held job from a lost message.
        db.purge_released_holds(s.state.redispatch_after_ms, PAGE)
            .await?;
    }
    if expired > 0 {
        tracing::info!(jobs = expired, "expired jobs never started in time");
    }
    if report.leases_expired + report.lost_failed + report.redispatched + report.unconfirmed > 0 {
        tracing::info!(
            leases_expired = report.leases_expired,
            lost_failed = report.lost_failed,
            redispatched = report.redispatched,
            unconfirmed = report.unconfirmed,
            "recovered jobs"
        );
    }
    let mut published = 0;
    loop {
        let due = db.due_for_dispatch(PAGE).await?;
        if due.is_empty() {
            break;
        }
        let full = due.len() as i64 == PAGE;
        let messages: Vec<JobMessage> = due.iter().map(JobMessage::from).collect();
        // These jobs are not marked as dispatched: only those confirmed are marked.
        let confirms = broker.publish_jobs_confirmed(&messages).await?;
        let n = confirms.confirmed.len();
        db.mark_dispatched(confirms.confirmed).await?;
        published += n;
        if n < messages.len() {
            anyhow::bail!("{} job messages were not confirmed", messages.len() - n);
        }
        if !full {
            break;
        }
    }
    shared.metrics.state.swept(
        report.leases_expired,
        report.lost_failed,
        report.redispatched,
        report.unconfirmed,
        published,
    );
    if published > 0 {
        tracing::info!(jobs = published, "sweeper published jobs");
    }
    Ok(published)
}
