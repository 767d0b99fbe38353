//! Volley's RabbitMQ layer.
//!
//! Topology (every name starts with the configured prefix, so stacks and tests can share a
//! broker):
//! - `P.jobs` (direct exchange) routes a job to `P.jobs.<type>` (durable quorum queue) by the
//!   inference type's key (`llm`, `image`, ...).
//! - `P.events` (quorum queue, default exchange) carries workers' outcome events to batch-state.
//! - `P.dlx` (direct) receives what a queue dead-letters (undecodable, or redelivered more than
//!   the delivery limit) and routes it, by the source queue's name, to `<queue>.dlq`.
//! - `P.control` (fanout) broadcasts cancellations to every worker.

pub mod consumer;
pub mod depths;
pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use prost::Message;
use tokio::sync::Mutex;
use tracing::Instrument;
use volley_domain::InferenceType;
use volley_proto::{Control, JobEvent, JobMessage};
use volley_telemetry::Metrics;

pub use consumer::{Consumer, ConsumerConfig, Delivery, Source};

/// How many times a message may be delivered before its queue dead-letters it. Quorum queues
/// count redeliveries themselves, so a message that kills its consumer cannot loop forever.
pub const DELIVERY_LIMIT: i64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("RabbitMQ: {0}")]
    Lapin(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the broker could not route the message to any queue")]
    Unroutable,
    #[error("publisher confirms are not on for this channel")]
    NoConfirm,
    #[error("timed out waiting for RabbitMQ")]
    Timeout,
    #[error("the AMQP URL is not valid: {0}")]
    BadUrl(String),
}

/// Queue and exchange names of one stack.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_owned(),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    pub fn job_queue(&self, t: InferenceType) -> String {
        format!("{}.jobs.{}", self.prefix, t.key())
    }
    pub fn events_queue(&self) -> String {
        format!("{}.events", self.prefix)
    }
    fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn dlq(queue: &str) -> String {
        format!("{queue}.dlq")
    }
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }
    /// Every durable work queue (jobs of each type, then events).
    pub fn work_queues(&self) -> Vec<String> {
        let mut q: Vec<String> = InferenceType::ALL
            .into_iter()
            .map(|t| self.job_queue(t))
            .collect();
        q.push(self.events_queue());
        q
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares the whole topology; idempotent, and every process declares it the same way so the
/// arguments never conflict.
pub async fn declare_topology(ch: &Channel, names: &Names) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        names.jobs_exchange().as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        names.dlx().as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        names.control_exchange().as_str().into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    let qopts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for queue in names.work_queues() {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("quorum"));
        args.insert("x-dead-letter-exchange".into(), long(&names.dlx()));
        args.insert("x-dead-letter-routing-key".into(), long(&queue));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        ch.queue_declare(queue.as_str().into(), qopts, args).await?;
        let dlq = Names::dlq(&queue);
        let mut dargs = FieldTable::default();
        dargs.insert("x-queue-type".into(), long("quorum"));
        ch.queue_declare(dlq.as_str().into(), qopts, dargs).await?;
        ch.queue_bind(
            dlq.as_str().into(),
            names.dlx().as_str().into(),
            queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    for t in InferenceType::ALL {
        ch.queue_bind(
            names.job_queue(t).as_str().into(),
            names.jobs_exchange().as_str().into(),
            t.key().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// The largest AMQP frame Volley asks for, unless the URL sets `frame_max`. Its messages are
/// small (media never travels on the broker), and the client keeps 32 frames of buffer each
/// way per connection, zeroed up front: at RabbitMQ's default of 128 KiB that is 8 MiB per
/// connection, at this 1 MiB. Larger messages are split into frames, as AMQP does anyway.
const FRAME_MAX: u32 = 16 * 1024;

/// Parses `url`, asking for `FRAME_MAX` unless it names a `frame_max` itself.
pub fn parse_url(url: &str) -> Result<lapin::uri::AMQPUri, AmqpError> {
    // The parser's message quotes the URL: never with its password.
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| AmqpError::BadUrl(e.replace(url, &redact(url))))?;
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(FRAME_MAX);
    }
    Ok(uri)
}

/// `url` with its user and password replaced by `***`, fit for a log or an error.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

pub async fn connect(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let uri = parse_url(url)?;
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect_uri(uri, props)).await {
        Ok(c) => Ok(c?),
        Err(_) => Err(AmqpError::Timeout),
    }
}

/// A consuming channel with a prefetch window.
pub(crate) async fn consumer_channel(
    conn: &Connection,
    prefetch: u16,
) -> Result<Channel, AmqpError> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch)
}

struct Live {
    conn: Connection,
    channel: Channel,
}

/// A lazily (re)connecting publisher with confirms on. Publishing waits for the broker's
/// confirm; a nack, a return (unroutable) or a lost connection is an error, and the next call
/// reconnects.
pub struct Broker {
    url: String,
    conn_name: String,
    names: Names,
    live: Mutex<Option<Arc<Live>>>,
    /// The runtime that owns the connection's I/O. actix-web runs handlers on per-thread
    /// runtimes that die with the server; a connection opened there would die with them.
    runtime: Option<tokio::runtime::Handle>,
    /// Publish results are counted here when set.
    metrics: Option<Arc<Metrics>>,
}

impl Broker {
    pub fn new(url: &str, conn_name: &str, names: Names) -> Broker {
        Broker {
            url: url.to_owned(),
            conn_name: conn_name.to_owned(),
            names,
            live: Mutex::new(None),
            runtime: tokio::runtime::Handle::try_current().ok(),
            metrics: None,
        }
    }

    /// Counts publish confirms and failures in `metrics` (`volley_amqp_published_total`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Broker {
        self.metrics = Some(metrics);
        self
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    async fn live(&self) -> Result<Arc<Live>, AmqpError> {
        let mut guard = self.live.lock().await;
        if let Some(l) = guard.as_ref()
            && l.conn.status().connected()
            && l.channel.status().connected()
        {
            return Ok(l.clone());
        }
        let (url, name, names) = (self.url.clone(), self.conn_name.clone(), self.names.clone());
        let open = async move {
            let conn = connect(&url, &name).await?;
            let channel = conn.create_channel().await?;
            declare_topology(&channel, &names).await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, AmqpError>(Live { conn, channel })
        };
        let live = match &self.runtime {
            Some(rt) => rt.spawn(open).await.map_err(|_| AmqpError::Timeout)??,
            None => open.await?,
        };
        let l = Arc::new(live);
        *guard = Some(l.clone());
        Ok(l)
    }

    /// Connects (and declares the topology) if not connected.
    pub async fn ensure_connected(&self) -> Result<(), AmqpError> {
        self.live().await.map(|_| ())
    }

    async fn forget(&self) {
        *self.live.lock().await = None;
    }

    /// Publishes many messages, then waits for all their confirms. One result per message.
    ///
    /// Each message gets a producer span (a child of the current span) that lasts until its
    /// confirm, and carries that span's W3C trace context in its `traceparent`/`tracestate`
    /// headers, so the consumer continues the same trace.
    async fn publish_many(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        let live = self.live().await?;
        let mut pending = Vec::with_capacity(messages.len());
        let mut broken = false;
        for m in messages {
            let destination = if m.exchange.is_empty() {
                m.routing_key.clone()
            } else {
                m.exchange.clone()
            };
            let make =
                || trace::producer_span(&destination, &m.routing_key, m.message_id.as_deref());
            let span = match &m.parent {
                Some(parent) => parent.in_scope(make),
                None => make(),
            };
            let mut props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/x-protobuf"));
            if let Some(id) = m.message_id {
                props = props.with_message_id(ShortString::from(id));
            }
            if let Some(headers) = trace::headers(m.headers, &span) {
                props = props.with_headers(headers);
            }
            let r = live
                .channel
                .basic_publish(
                    m.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.payload,
                    props,
                )
                .instrument(span.clone())
                .await;
            if r.is_err() {
                broken = true;
            }
            pending.push((r, destination, span));
        }
        let confirms = pending
            .into_iter()
            .map(|(p, destination, span)| async move {
                let r = match p {
                    Err(e) => Err(AmqpError::Lapin(e)),
                    Ok(confirm) => settle(confirm).await,
                };
                if r.is_err() {
                    volley_telemetry::trace::record_error(&span);
                }
                if let Some(m) = &self.metrics {
                    m.amqp.published(&destination, publish_result(&r));
                }
                r
            });
        let results = futures::future::join_all(confirms).await;
        if broken
            || results
                .iter()
                .any(|r| matches!(r, Err(AmqpError::Lapin(_) | AmqpError::Timeout)))
        {
            self.forget().await;
        }
        Ok(results)
    }

    async fn publish_one(&self, m: Outgoing) -> Result<(), AmqpError> {
        self.publish_many(vec![m])
            .await?
            .pop()
            .unwrap_or(Err(AmqpError::NoConfirm))
    }

    /// Publishes jobs to their type's queue; one result per job.
    pub async fn publish_jobs(
        &self,
        jobs: &[JobMessage],
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        let out = jobs
            .iter()
            .map(|j| Outgoing {
                exchange: self.names.jobs_exchange(),
                routing_key: j
                    .inference_type
                    .parse::<InferenceType>()
                    .map(|t| t.key().to_owned())
                    .unwrap_or_default(),
                payload: j.encode_to_vec(),
                message_id: Some(j.job_id.to_string()),
                headers: Vec::new(),
                parent: None,
            })
            .collect();
        self.publish_many(out).await
    }

    /// Publishes jobs (as [`Broker::publish_jobs`]) and sorts their ids by whether the broker
    /// confirmed their messages: what the outbox records after a publish. The gateway
    /// (a new batch) and batch-state's sweeper (jobs due again) record it differently, since
    /// their jobs start out marked differently, but both go through here.
    pub async fn publish_jobs_confirmed(&self, jobs: &[JobMessage]) -> Result<Confirms, AmqpError> {
        let results = self.publish_jobs(jobs).await?;
        Ok(Confirms::sort(jobs, &results))
    }

    pub async fn publish_events(
        &self,
        events: &[JobEvent],
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        self.publish_events_under(events, &[]).await
    }

    /// [`Broker::publish_events`], each event's producer span a child of the span at the
    /// same place in `parents` (its job's span), or of the current span past its end.
    pub async fn publish_events_under(
        &self,
        events: &[JobEvent],
        parents: &[tracing::Span],
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        let out = events
            .iter()
            .enumerate()
            .map(|(i, e)| Outgoing {
                exchange: String::new(),
                routing_key: self.names.events_queue(),
                payload: e.encode_to_vec(),
                message_id: Some(format!("{}-{}", e.job_id, e.attempt)),
                headers: Vec::new(),
                parent: parents.get(i).cloned(),
            })
            .collect();
        self.publish_many(out).await
    }

    /// Broadcasts a control message to every worker. A nack is an error, not retried here.
    ///
    /// *Why not retry:* a control message only speeds up what PostgreSQL already decided (a
    /// cancel is committed before it is broadcast), and a worker that misses it learns the
    /// same at its next lease renewal (`state.lease_ms / 3`); its late outcome is discarded
    /// by the status guard. The gateway publishes it while the client waits for its cancel
    /// to be answered, so a retry loop would hold that answer up for a broker in trouble.
    /// The caller logs the error, and it is counted (`nacked`) like any other publish.
    pub async fn publish_control(&self, c: &Control) -> Result<(), AmqpError> {
        let destination = self.names.control_exchange();
        let live = self.live().await?;
        // Not `mandatory`: a fanout with no bound worker queue is fine, nothing runs to abort.
        let published = live
            .channel
            .basic_publish(
                destination.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &c.encode_to_vec(),
                BasicProperties::default(),
            )
            .await;
        let r = match published {
            Err(e) => Err(AmqpError::Lapin(e)),
            Ok(confirm) => settle(confirm).await,
        };
        if matches!(r, Err(AmqpError::Lapin(_) | AmqpError::Timeout)) {
            self.forget().await;
        }
        if let Some(m) = &self.metrics {
            m.amqp.published(&destination, publish_result(&r));
        }
        r
    }

    /// Publishes raw bytes to a queue through the default exchange (used to replay
    /// dead-lettered messages).
    pub async fn publish_raw(
        &self,
        queue: &str,
        payload: Vec<u8>,
        message_id: Option<String>,
    ) -> Result<(), AmqpError> {
        self.publish_one(Outgoing {
            exchange: String::new(),
            routing_key: queue.to_owned(),
            payload,
            message_id,
            headers: Vec::new(),
            parent: None,
        })
        .await
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let live = self.live.lock().await.take();
        if let Some(l) = live {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), l.conn.close(200, "bye".into())).await;
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub message_id: Option<String>,
    /// Extra AMQP headers (string values). The producer span's `traceparent`/`tracestate`
    /// are added to them, replacing any given, when tracing is on.
    pub headers: Vec<(String, String)>,
    /// The span the producer span is a child of; the current span when `None`.
    pub parent: Option<tracing::Span>,
}

/// Waits for a publisher confirm: a nack, a returned (unroutable) message, no confirm within
/// 30 s or a lost channel is an error.
async fn settle(confirm: lapin::PublisherConfirm) -> Result<(), AmqpError> {
    match tokio::time::timeout(Duration::from_secs(30), confirm).await {
        Err(_) => Err(AmqpError::Timeout),
        Ok(Err(e)) => Err(AmqpError::Lapin(e)),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(AmqpError::Unroutable),
        Ok(Ok(Confirmation::Nack(_))) => Err(AmqpError::Nacked),
        Ok(Ok(Confirmation::NotRequested)) => Err(AmqpError::NoConfirm),
    }
}

/// Job ids by whether the broker confirmed their messages, each list in publishing order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Confirms {
    pub confirmed: Vec<i64>,
    pub unconfirmed: Vec<i64>,
}

impl Confirms {
    /// Pairs each job with its publish result (one per job, in order).
    fn sort(jobs: &[JobMessage], results: &[Result<(), AmqpError>]) -> Confirms {
        let mut c = Confirms::default();
        for (j, r) in jobs.iter().zip(results) {
            match r {
                Ok(()) => c.confirmed.push(j.job_id),
                Err(_) => c.unconfirmed.push(j.job_id),
            }
        }
        c
    }
}

/// The label a publish result is counted under.
fn publish_result(r: &Result<(), AmqpError>) -> &'static str {
    match r {
        Ok(()) => "confirmed",
        Err(AmqpError::Nacked) => "nacked",
        Err(AmqpError::Unroutable) => "unroutable",
        Err(AmqpError::Timeout) => "timeout",
        Err(AmqpError::Lapin(_) | AmqpError::NoConfirm | AmqpError::BadUrl(_)) => "error",
    }
}

/// Deletes every queue and exchange of a stack (tests clean up after themselves with this).
pub async fn delete_topology(ch: &Channel, names: &Names) -> Result<(), AmqpError> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    for q in names.work_queues() {
        ch.queue_delete(
            Names::dlq(&q).as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await?;
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for x in [names.jobs_exchange(), names.dlx(), names.control_exchange()] {
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

/// How many messages wait in a queue, and how many consumers it has.
pub async fn queue_depth(ch: &Channel, queue: &str) -> Result<(u32, u32), AmqpError> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_ask_for_small_frames_unless_they_say_otherwise() {
        let u = parse_url("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(u.query.frame_max, Some(FRAME_MAX));
        assert_eq!(u.authority.port, 5672);
        let u = parse_url("amqp://127.0.0.1:5672/%2f?frame_max=131072&heartbeat=10").unwrap();
        assert_eq!(u.query.frame_max, Some(131_072));
        assert_eq!(u.query.heartbeat, Some(10));
    }

    #[test]
    fn a_bad_url_is_a_clear_error() {
        for bad in [
            "",
            "http://127.0.0.1/",
            "amqp://host:notaport/",
            "amqp://h/?frame_max=x",
        ] {
            let e = parse_url(bad).unwrap_err();
            assert!(matches!(e, AmqpError::BadUrl(_)), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("the AMQP URL is not valid"));
        }
        let e = parse_url("amqp://guest:s3cret@host:notaport/").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn confirms_sort_jobs_by_their_own_result() {
        let jobs: Vec<JobMessage> = [7, 3, 9, 4]
            .into_iter()
            .map(|job_id| JobMessage {
                job_id,
                ..Default::default()
            })
            .collect();
        let results = vec![
            Ok(()),
            Err(AmqpError::Nacked),
            Ok(()),
            Err(AmqpError::Unroutable),
        ];
        assert_eq!(
            Confirms::sort(&jobs, &results),
            Confirms {
                confirmed: vec![7, 9],
                unconfirmed: vec![3, 4],
            }
        );
        assert_eq!(Confirms::sort(&[], &[]), Confirms::default());
    }

    #[test]
    fn redaction_hides_credentials_only() {
        assert_eq!(redact("amqp://u:p@h:5672/%2f"), "amqp://***@h:5672/%2f");
        assert_eq!(redact("amqp://h:5672/x@y"), "amqp://h:5672/x@y");
        assert_eq!(redact("not a url"), "not a url");
    }
}
