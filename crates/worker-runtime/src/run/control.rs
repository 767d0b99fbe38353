//! The control fanout: cancellations of running jobs.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use volley_amqp::{Consumer, ConsumerConfig, Source};
use volley_proto::{Control, Message, control};

use crate::Worker;

/// Listens on the control fanout for cancellations.
pub async fn control_forever(w: Arc<Worker>, stop: CancellationToken) {
    let names = w.broker.names().clone();
    let config = ConsumerConfig {
        url: w.settings.amqp_url.clone(),
        connection_name: format!("volley-worker-{}-control", w.kind.key()),
        source: Source::Fanout(names.control_exchange()),
        names,
        prefetch: None,
        tag: String::new(),
    };
    volley_amqp::consumer::run(
        config,
        stop.clone(),
        |_| {},
        |consumer| control(&w, &stop, consumer),
    )
    .await;
}

async fn control(
    w: &Worker,
    stop: &CancellationToken,
    mut consumer: Consumer,
) -> anyhow::Result<()> {
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => {
                consumer.close("worker stopping").await;
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
