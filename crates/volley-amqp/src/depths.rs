//! Queue depths and consumer counts, for `/metrics` (batch-state exports them for every queue
//! of the stack) and for `batchctl status`.

use std::future::Future;
use std::time::Duration;

use volley_telemetry::Metrics;

use crate::{AmqpError, Names, connect, queue_depth};

/// One queue's state as RabbitMQ reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub queue: String,
    /// Messages ready for delivery (not counting those delivered and unacked).
    pub messages: u32,
    pub consumers: u32,
}

/// Every work queue, then its dead-letter queue: jobs of each type, then events.
fn watched_queues(names: &Names) -> Vec<String> {
    names
        .work_queues()
        .into_iter()
        .flat_map(|q| {
            let dlq = Names::dlq(&q);
            [q, dlq]
        })
        .collect()
}

/// Depths of every queue of the stack, by passive declares on one channel. A queue that does
/// not exist (topology not declared yet) closes the channel: that is an error for the caller.
pub async fn depths(ch: &lapin::Channel, names: &Names) -> Result<Vec<QueueDepth>, AmqpError> {
    let mut out = Vec::new();
    for queue in watched_queues(names) {
        let (messages, consumers) = queue_depth(ch, &queue).await?;
        out.push(QueueDepth {
            queue,
            messages,
            consumers,
        });
    }
    Ok(out)
}

/// Depths of every queue, read once on a connection of its own: what `batchctl status` and the
/// gateway's operator view (`GET /v1/admin/status`) show. Declaring first (idempotent) means a
/// fresh stack's missing queues read as empty instead of failing.
pub async fn read_once(
    url: &str,
    names: &Names,
    client: &str,
) -> Result<Vec<QueueDepth>, AmqpError> {
    let conn = connect(url, client).await?;
    let r = async {
        let ch = conn.create_channel().await?;
        crate::declare_topology(&ch, names).await?;
        depths(&ch, names).await
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    r
}

/// Polls the depths every `every` into `volley_queue_messages` / `volley_queue_consumers`
/// until `stop` resolves, reconnecting after failures. A scrape then costs no broker round
/// trip, and a broker outage leaves the last values (with the readiness probes saying why).
pub async fn watch(
    url: String,
    names: Names,
    metrics: std::sync::Arc<Metrics>,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    let work = async {
        loop {
            if let Err(e) = watch_once(&url, &names, &metrics, every).await {
                tracing::debug!(error = %e, "queue depth poll failed; reconnecting");
            }
            tokio::time::sleep(every).await;
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = work => {}
    }
}

async fn watch_once(
    url: &str,
    names: &Names,
    metrics: &Metrics,
    every: Duration,
) -> Result<(), AmqpError> {
    let conn = connect(url, "volley-queue-depths").await?;
    let ch = conn.create_channel().await?;
    // Declaring first (idempotent) means a passive declare never meets a missing queue, which
    // would close the channel and log an error at every start of a fresh stack.
    crate::declare_topology(&ch, names).await?;
    let r = loop {
        match depths(&ch, names).await {
            Ok(all) => {
                for d in all {
                    metrics.queues.set(&d.queue, d.messages, d.consumers);
                }
            }
            Err(e) => break Err(e),
        }
        tokio::time::sleep(every).await;
    };
    let _ = conn.close(200, "reconnecting".into()).await;
    r
}

/// A connection of its own for reading job queue depths often: the gateway's fair-dispatch
/// gate and batch-state's dispatcher, every `dispatch.interval_ms`. A passive declare is one
/// round trip and writes nothing.
pub struct DepthProbe {
    conn: lapin::Connection,
    ch: lapin::Channel,
    names: Names,
}

impl DepthProbe {
    pub async fn open(url: &str, names: Names, client: &str) -> Result<DepthProbe, AmqpError> {
        let conn = connect(url, client).await?;
        let ch = conn.create_channel().await?;
        // A missing queue would close the channel; declaring is idempotent.
        crate::declare_topology(&ch, &names).await?;
        Ok(DepthProbe { conn, ch, names })
    }

    /// Ready messages and consumers of the job queue of `t`.
    pub async fn job_queue(
        &self,
        t: volley_domain::InferenceType,
    ) -> Result<(u32, u32), AmqpError> {
        queue_depth(&self.ch, &self.names.job_queue(t)).await
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}
