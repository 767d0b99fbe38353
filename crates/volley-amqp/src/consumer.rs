//! The one way Volley consumes: connect, declare the topology, open a consumer with a prefetch
//! window, and keep it running through broker failures with a backoff that starts over once a
//! connection has been healthy for a while. Services see deliveries and settle them; lapin's
//! channels, options and field tables stay in this crate.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::{AmqpError, Names, connect, consumer_channel, declare_topology};

pub use lapin::message::Delivery;

/// Where a consumer's messages come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A durable work queue of the topology, shared by competing consumers. Deliveries must
    /// be settled ([`Consumer::ack_through`], [`Consumer::requeue_through`],
    /// [`Consumer::dead_letter`]).
    Queue(String),
    /// A broadcast: a private queue (exclusive, deleted with the connection) bound to this
    /// fanout exchange. Deliveries need no settling (`no_ack`); what arrives while the
    /// consumer is down is missed, so a broadcast must never be the only path for its news.
    Fanout(String),
}

/// What to consume and how.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub url: String,
    /// The connection's name in RabbitMQ's management views.
    pub connection_name: String,
    pub names: Names,
    pub source: Source,
    /// The channel's prefetch window (`basic.qos`); `None` leaves the broker's default
    /// (unlimited), which only a `no_ack` broadcast should use.
    pub prefetch: Option<u16>,
    /// The consumer tag; empty lets the broker pick one.
    pub tag: String,
}

/// An open consumer: one connection, one channel, one subscription. A [`Stream`] of
/// deliveries; it ends when the broker cancels the subscription.
pub struct Consumer {
    conn: Connection,
    channel: Channel,
    inner: lapin::Consumer,
    queue: String,
}

impl Consumer {
    /// Connects, declares the topology (idempotent, the same everywhere) and subscribes.
    pub async fn open(config: &ConsumerConfig) -> Result<Consumer, AmqpError> {
        let conn = connect(&config.url, &config.connection_name).await?;
        let channel = match config.prefetch {
            Some(p) => consumer_channel(&conn, p).await?,
            None => conn.create_channel().await?,
        };
        declare_topology(&channel, &config.names).await?;
        let (queue, no_ack) = match &config.source {
            Source::Queue(q) => (q.clone(), false),
            Source::Fanout(exchange) => {
                let q = channel
                    .queue_declare(
                        "".into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        q.name().clone(),
                        exchange.as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                (q.name().as_str().to_owned(), true)
            }
        };
        let inner = channel
            .basic_consume(
                queue.as_str().into(),
                config.tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer {
            conn,
            channel,
            inner,
            queue,
        })
    }

    /// The queue consumed (the broker-named private queue for a [`Source::Fanout`]).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Acks every unsettled delivery up to and including `tag` (one `multiple` ack).
    pub async fn ack_through(&self, tag: u64) -> Result<(), AmqpError> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await?;
        Ok(())
    }

    /// Hands every unsettled delivery up to and including `tag` back to the queue.
    pub async fn requeue_through(&self, tag: u64) -> Result<(), AmqpError> {
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await?;
        Ok(())
    }

    /// Rejects one delivery without requeueing: its queue dead-letters it.
    pub async fn dead_letter(&self, tag: u64) -> Result<(), AmqpError> {
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: false,
                },
            )
            .await?;
        Ok(())
    }

    /// Closes the connection; unsettled deliveries go back to their queue.
    pub async fn close(self, reason: &str) {
        let _ = self.conn.close(200, reason.into()).await;
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery, AmqpError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|d| d.map(|r| r.map_err(AmqpError::from)))
    }
}

/// Delays between reconnection attempts: doubling from `initial` up to `max`, and back to
/// `initial` after a connection that stayed up for `healthy_after`. Without the reset, a
/// consumer that lost its broker once an hour would wait the capped delay every time after
/// the first few outages, however long it had been fine in between.
#[derive(Debug, Clone)]
struct Backoff {
    initial: Duration,
    max: Duration,
    healthy_after: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, healthy_after: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            healthy_after,
            next: initial.min(max),
        }
    }

    /// The delay before the next attempt. `up_for` is how long the connection that just
    /// failed had been up (`None`: it never opened).
    fn after_failure(&mut self, up_for: Option<Duration>) -> Duration {
        if up_for.is_some_and(|d| d >= self.healthy_after) {
            self.next = self.initial.min(self.max);
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

impl Default for Backoff {
    /// 200 ms doubling to 5 s; a connection up for 30 s counts as healthy.
    fn default() -> Backoff {
        Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
    }
}

/// Consumes until `stop`, reconnecting after failures with a `Backoff::default()`.
///
/// Each connection is handed to `session`, which processes deliveries until `stop` (then it
/// closes the consumer and returns `Ok`) or until something fails (`Err`: the connection is
/// dropped, its unsettled deliveries go back to the queue, and a new one is opened after the
/// backoff). `up` is told when a consumer is open (`true`) and when it is lost or done
/// (`false`), for readiness.
pub async fn run<F, Fut, E>(
    config: ConsumerConfig,
    stop: CancellationToken,
    up: impl Fn(bool),
    mut session: F,
) where
    F: FnMut(Consumer) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut backoff = Backoff::default();
    while !stop.is_cancelled() {
        let opened = tokio::select! {
            _ = stop.cancelled() => break,
            c = Consumer::open(&config) => c,
        };
        let (result, up_for) = match opened {
            Ok(consumer) => {
                up(true);
                tracing::info!(queue = %consumer.queue(), "consuming");
                let since = Instant::now();
                let r = session(consumer).await.map_err(|e| e.to_string());
                (r, Some(since.elapsed()))
            }
            Err(e) => (Err(e.to_string()), None),
        };
        let Err(e) = result else { break };
        up(false);
        tracing::warn!(
            connection = %config.connection_name,
            error = %e,
            "consumer lost; reconnecting"
        );
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff.after_failure(up_for)) => {}
        }
    }
    up(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_delay_doubles_up_to_its_cap() {
        let mut b = Backoff::new(ms(100), ms(1_000), ms(10_000));
        let delays: Vec<_> = (0..7).map(|_| b.after_failure(None)).collect();
        assert_eq!(
            delays,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1_000),
                ms(1_000),
                ms(1_000)
            ]
        );
    }

    #[test]
    fn a_short_lived_connection_keeps_the_delay_growing() {
        let mut b = Backoff::new(ms(100), ms(1_000), ms(10_000));
        assert_eq!(b.after_failure(None), ms(100));
        assert_eq!(b.after_failure(Some(ms(9_999))), ms(200));
        assert_eq!(b.after_failure(Some(ms(50))), ms(400));
    }

    #[test]
    fn a_healthy_connection_starts_the_delay_over() {
        let mut b = Backoff::new(ms(100), ms(1_000), ms(10_000));
        for _ in 0..10 {
            b.after_failure(None);
        }
        assert_eq!(b.after_failure(None), ms(1_000));
        assert_eq!(b.after_failure(Some(ms(10_000))), ms(100));
        assert_eq!(b.after_failure(None), ms(200));
        assert_eq!(b.after_failure(Some(Duration::from_secs(3_600))), ms(100));
    }

    #[test]
    fn the_cap_holds_even_below_the_first_delay() {
        let mut b = Backoff::new(ms(500), ms(300), ms(10));
        assert_eq!(b.after_failure(None), ms(300));
        assert_eq!(b.after_failure(Some(ms(10))), ms(300));
    }

    #[test]
    fn the_default_matches_the_services_old_loops() {
        let mut b = Backoff::default();
        assert_eq!(b.after_failure(None), ms(200));
        for _ in 0..10 {
            b.after_failure(None);
        }
        assert_eq!(b.after_failure(None), Duration::from_secs(5));
        assert_eq!(b.after_failure(Some(Duration::from_secs(30))), ms(200));
    }
}
