//! Lease renewal for the jobs this worker runs.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Worker;

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
