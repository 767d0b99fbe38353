//! The machine's own ceiling for what one job needs at minimum, measured with the same client
//! libraries and the same statements Volley uses: on RabbitMQ, the job message and the outcome
//! event (durable quorum queue, published with confirms, consumed with acks); on PostgreSQL,
//! the insert of the job and its two state changes (claim, outcome), batched 256 at a time.
//! Both run at once, as they do under Volley, so they share the machine as they would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use volley_db::{Db, NewJob};
use volley_domain::{Event, Outcome};

pub struct Ceiling {
    pub jobs: usize,
    pub amqp_secs: f64,
    pub pg_secs: f64,
    pub wall_secs: f64,
}

impl Ceiling {
    pub fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.wall_secs
    }
}

pub async fn measure(
    db: &Db,
    amqp_url: &str,
    jobs: usize,
    job_msg: usize,
    event_msg: usize,
) -> anyhow::Result<Ceiling> {
    let start = Instant::now();
    let (a, p) = tokio::join!(amqp(amqp_url, jobs, job_msg, event_msg), postgres(db, jobs));
    Ok(Ceiling {
        jobs,
        amqp_secs: a?,
        pg_secs: p?,
        wall_secs: start.elapsed().as_secs_f64(),
    })
}

async fn amqp(url: &str, jobs: usize, job_msg: usize, event_msg: usize) -> anyhow::Result<f64> {
    let conn = volley_amqp::connect(url, "volley-bench-ceiling").await?;
    let q = format!(
        "bench-ceiling-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let pubch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    pubch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    pubch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let subch = conn.create_channel().await?;
    subch.basic_qos(512, Default::default()).await?;
    let total = jobs * 2;
    let start = Instant::now();
    let consumer = {
        let subch = subch.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let mut c = subch
                .basic_consume(
                    q.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut n = 0;
            while n < total {
                let Some(d) = c.next().await else {
                    anyhow::bail!("consumer ended")
                };
                let d = d?;
                n += 1;
                // Acks in batches, as well as consuming can be done.
                if n % 50 == 0 || n == total {
                    subch
                        .basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                        .await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let job = vec![7u8; job_msg];
    let event = vec![9u8; event_msg];
    let mut sent = 0;
    while sent < total {
        let window = 256.min(total - sent);
        let mut confirms = Vec::with_capacity(window);
        for i in 0..window {
            let payload = if (sent + i) % 2 == 0 { &job } else { &event };
            confirms.push(
                pubch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        payload,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
        }
        for c in futures::future::join_all(confirms).await {
            c?;
        }
        sent += window;
    }
    tokio::time::timeout(Duration::from_secs(300), consumer).await???;
    let secs = start.elapsed().as_secs_f64();
    // The consumer's channel goes first, so deleting the queue does not cancel it under us.
    let _ = subch.close(200, "done".into()).await;
    let _ = pubch
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    Ok(secs)
}

async fn postgres(db: &Db, jobs: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let batches = jobs.div_ceil(256);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Four pipelines, like Volley's gateway, batch-state and their pools.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= batches {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let n = 256.min(jobs - i * 256);
                    let new: Vec<NewJob> = (0..n)
                        .map(|k| NewJob {
                            inference_type: "LLM".into(),
                            endpoint: "/v1/completions".into(),
                            model: "qwen3-8b".into(),
                            body: serde_json::json!({"model": "qwen3-8b", "prompt": format!("ceiling {k}")}),
                            custom_id: None,
                        })
                        .collect();
                    let (_, d) = db.create_batch("ceiling", None, new, 3_600_000).await?;
                    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
                    db.claim(ids.clone(), 60_000, 0).await?;
                    let events = ids
                        .iter()
                        .map(|id| Event {
                            job_id: *id,
                            attempt: 1,
                            outcome: Outcome::Succeeded { result: serde_json::json!({"text": "ok"}), usage: None, media_keys: Vec::new() },
                        })
                        .collect();
                    db.apply_events(events).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}
