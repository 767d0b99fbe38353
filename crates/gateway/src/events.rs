//! `GET /v1/batches/{id}/events` (an addition to the contract): a batch's progress as
//! Server-Sent Events, until it is DONE.
//!
//! Driven by PostgreSQL, so that it works on whichever replica a client reaches: batch-state's
//! statement that applies outcomes also `NOTIFY`s the changed batches' ids (delivered at
//! commit), and each gateway process has one `LISTEN` connection ([`volley_db::progress`])
//! that wakes the streams of those batches through the [`Hub`]. A woken stream re-reads its
//! batch's jobs (at most 256 rows) and sends what changed; it also re-reads every
//! `sse_recheck_ms` on its own, for notifications lost while the listener reconnected and for
//! changes nothing notifies (claims, the sweeper's).
//!
//! Event ids: a stream re-scans all of its batch's jobs every time and sends a `job` event for
//! every terminal job it has not sent yet; the id of every event is the set of jobs sent so far
//! on the stream (a bitmap by job position, see [`Cursor`]). A client reconnecting with
//! `Last-Event-ID` therefore gets exactly the terminal jobs it has not seen, whatever order
//! their transactions committed in: nothing depends on timestamps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use volley_db::progress::Changed;
use volley_domain::{BatchCounts, BatchStatus, JobStatus};
use volley_telemetry::prometheus::{IntCounter, IntGauge};

use crate::Shared;
use crate::error::ApiError;
use crate::routes::bearer;

/// A stream reads its batch at most this often, however many notifications arrive: a busy
/// batch costs a few reads a second, not one per committed outcome.
const MIN_READ_INTERVAL: Duration = Duration::from_millis(250);

/// Chunks waiting for a client: each is everything one read found (at most a `job` event per
/// job of the batch, about 30 KiB), so a stream holds at most this many of those.
const CHANNEL_CHUNKS: usize = 4;

/// The longest `Last-Event-ID` this server sends: "1." and 64 hex digits (256 jobs).
const MAX_EVENT_ID: usize = 2 + 64;

/// The wake-ups of the streams open on each batch, by stream number.
type Watchers = HashMap<i64, Vec<(u64, Arc<Notify>)>>;

/// Open streams per gateway process: who waits on which batch, and how many each key holds.
pub(crate) struct Hub {
    watchers: Mutex<Watchers>,
    per_key: Mutex<HashMap<Vec<u8>, u32>>,
    next: AtomicU64,
    max_per_key: u32,
    closing: watch::Sender<bool>,
    open: IntGauge,
    dropped: IntCounter,
}

impl Hub {
    pub fn new(max_per_key: u32, metrics: &volley_telemetry::Metrics) -> anyhow::Result<Hub> {
        let open = IntGauge::new(
            "volley_gateway_event_streams",
            "Event streams (GET /v1/batches/{id}/events) open on this gateway",
        )?;
        let dropped = IntCounter::new(
            "volley_gateway_event_streams_dropped_total",
            "Event streams dropped because their client stopped reading",
        )?;
        metrics.registry().register(Box::new(open.clone()))?;
        metrics.registry().register(Box::new(dropped.clone()))?;
        Ok(Hub {
            watchers: Mutex::new(HashMap::new()),
            per_key: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            max_per_key,
            closing: watch::channel(false).0,
            open,
            dropped,
        })
    }

    /// Wakes the streams of the batches a notification names (all of them for
    /// [`Changed::All`]). A `Notify` keeps one pending wake-up: notifications that arrive
    /// while a stream is busy collapse into one re-read, and nothing queues up.
    pub fn changed(&self, what: Changed) {
        let watchers = lock(&self.watchers);
        match what {
            Changed::All => watchers
                .values()
                .flatten()
                .for_each(|(_, n)| n.notify_one()),
            Changed::Batches(ids) => {
                for id in ids {
                    for (_, n) in watchers.get(&id).into_iter().flatten() {
                        n.notify_one();
                    }
                }
            }
        }
    }

    /// Ends every stream (the gateway is shutting down; clients reconnect elsewhere).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Takes one of the key's stream slots and registers a stream of `batch_id`.
    fn register(self: &Arc<Self>, key: Vec<u8>, batch_id: i64) -> Result<Registration, ApiError> {
        {
            let mut per_key = lock(&self.per_key);
            let n = per_key.entry(key.clone()).or_insert(0);
            if *n >= self.max_per_key {
                return Err(ApiError::RateLimited {
                    message: "too many event streams open for this API key",
                    retry_after_secs: 5,
                });
            }
            *n += 1;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        lock(&self.watchers)
            .entry(batch_id)
            .or_default()
            .push((id, notify.clone()));
        self.open.inc();
        Ok(Registration {
            hub: self.clone(),
            key,
            batch_id,
            id,
            notify,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map of wake-ups, not broken invariants.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open stream: its key slot, its wake-up and the gauge, given back when dropped.
struct Registration {
    hub: Arc<Hub>,
    key: Vec<u8>,
    batch_id: i64,
    id: u64,
    notify: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        {
            let mut watchers = lock(&self.hub.watchers);
            if let Some(list) = watchers.get_mut(&self.batch_id) {
                list.retain(|(id, _)| *id != self.id);
                if list.is_empty() {
                    watchers.remove(&self.batch_id);
                }
            }
        }
        {
            let mut per_key = lock(&self.hub.per_key);
            if let Some(n) = per_key.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_key.remove(&self.key);
                }
            }
        }
        self.hub.open.dec();
    }
}

/// The jobs (by position in the batch, ids ascending) a stream has sent a `job` event for.
/// As an event id: `1.` and one hex digit per four jobs, job `4i + k` being bit `k` of digit
/// `i`, so 66 characters for 256 jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    sent: Vec<bool>,
}

impl Cursor {
    fn new(total: usize) -> Cursor {
        Cursor {
            sent: vec![false; total],
        }
    }

    /// A `Last-Event-ID` this server could have sent for a batch of `total` jobs.
    fn parse(raw: &str, total: usize) -> Result<Cursor, &'static str> {
        const BAD: &str = "Last-Event-ID is not an event id of this stream: send back the \
                           `id` of the last event received, unchanged, or no Last-Event-ID";
        let hex = raw.strip_prefix("1.").ok_or(BAD)?;
        if hex.len() != total.div_ceil(4) {
            return Err(BAD);
        }
        let mut sent = Vec::with_capacity(hex.len() * 4);
        for c in hex.bytes() {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return Err(BAD),
            };
            sent.extend((0..4).map(|k| d & (1 << k) != 0));
        }
        // Bits past the last job: no stream sent them.
        if sent[total..].iter().any(|b| *b) {
            return Err(BAD);
        }
        sent.truncate(total);
        Ok(Cursor { sent })
    }

    fn encode(&self) -> String {
        let mut s = String::with_capacity(2 + self.sent.len().div_ceil(4));
        s.push_str("1.");
        for chunk in self.sent.chunks(4) {
            let d = chunk
                .iter()
                .enumerate()
                .fold(0u32, |d, (k, b)| d | (u32::from(*b) << k));
            s.push(char::from_digit(d, 16).unwrap_or('0'));
        }
        s
    }
}

/// The `progress` and `done` events: the batch's status and counts, as on the batch object.
#[derive(Debug, Serialize)]
struct ProgressEvent {
    pub id: String,
    pub status: &'static str,
    pub total: u64,
    pub queued: u64,
    pub processing: u64,
    pub processed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl ProgressEvent {
    fn new(batch_id: i64, c: &BatchCounts) -> ProgressEvent {
        ProgressEvent {
            id: batch_id.to_string(),
            status: c.status().as_str(),
            total: c.total(),
            queued: c.queued,
            processing: c.processing,
            processed: c.processed,
            failed: c.failed,
            cancelled: c.cancelled,
        }
    }
}

/// The `job` event: one per job that reached a terminal status.
#[derive(Debug, Serialize)]
pub struct JobEvent<'a> {
    pub id: String,
    /// The job's `custom_id` as submitted (null when it has none).
    pub custom_id: Option<&'a str>,
    pub status: &'a str,
}

/// Appends one event to `out`. JSON from serde_json has no raw newlines, so `data` is one line.
fn frame(out: &mut String, id: &str, event: &str, data: &impl Serialize) {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
    out.push_str("id: ");
    out.push_str(id);
    out.push_str("\nevent: ");
    out.push_str(event);
    out.push_str("\ndata: ");
    out.push_str(&data);
    out.push_str("\n\n");
}

/// `Last-Event-ID`, if sent and not empty (an empty one means "from the start", as for
/// `EventSource`). Anything else that is not an id of this stream is a 400: ids are the
/// server's own, and silently starting over would send the client duplicates.
fn last_event_id(req: &HttpRequest, total: usize) -> Result<Option<Cursor>, ApiError> {
    let Some(v) = req.headers().get("Last-Event-ID") else {
        return Ok(None);
    };
    let raw = v
        .to_str()
        .map_err(|_| ApiError::invalid("Last-Event-ID must be visible ASCII"))?
        .trim();
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.len() > MAX_EVENT_ID {
        return Err(ApiError::invalid(format!(
            "Last-Event-ID is longer than {MAX_EVENT_ID} characters"
        )));
    }
    Cursor::parse(raw, total)
        .map(Some)
        .map_err(ApiError::invalid)
}

/// Live progress of a batch as Server-Sent Events.
#[utoipa::path(
    get, path = "/v1/batches/{id}/events", tag = "batches",
    params(
        ("id" = String, Path, description = "The batch id"),
        ("Last-Event-ID" = Option<String>, Header, max_length = 66,
            description = "Resume after this event (an id this stream sent)"),
    ),
    responses(
        (status = 200, description = "`progress` events (the batch's status and counts), a \
            `job` event per finished job, then `done`; the stream ends after `done`",
            body = String, content_type = "text/event-stream"),
        (status = 400, description = "A `Last-Event-ID` this stream did not send", body = crate::error::ErrorBody),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = crate::error::ErrorBody),
        (status = 404, description = "No such batch for this key", body = crate::error::ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = crate::error::ErrorBody),
        (status = 503, description = "Shutting down, or the database is unreachable", body = crate::error::ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn batch_events(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    // The key and the batch's owner are checked as for GET /v1/batches/{id}.
    let (id, (batch, _, _)) = crate::routes::batch_for_key(&req, &path, &state).await?;
    let total = usize::try_from(batch.total).unwrap_or(0);
    let cursor = last_event_id(&req, total)?.unwrap_or_else(|| Cursor::new(total));
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable);
    }
    let registration = state.hub.register(volley_db::hash_key(bearer(&req)?), id)?;
    let (tx, mut rx) = mpsc::channel::<web::Bytes>(CHANNEL_CHUNKS);
    let gw = &state.settings.gateway;
    let stream = Stream {
        db: state.db.clone(),
        batch_id: id,
        cursor,
        heartbeat: Duration::from_millis(gw.sse_heartbeat_ms),
        recheck: Duration::from_millis(gw.sse_recheck_ms),
        closing: state.hub.closing.subscribe(),
        sink: Sink {
            tx,
            timeout: Duration::from_millis(gw.sse_send_timeout_ms),
            hub: state.hub.clone(),
            batch_id: id,
        },
        registration,
    };
    actix_web::rt::spawn(stream.run());
    let body = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(Ok::<_, std::convert::Infallible>))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Proxies that buffer responses (nginx) would hold events back.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// One stream's task: reads its batch when woken, sends what changed, ends after `done`,
/// on shutdown, when the client goes away, or when the client stops reading.
struct Stream {
    db: volley_db::Db,
    batch_id: i64,
    cursor: Cursor,
    heartbeat: Duration,
    recheck: Duration,
    closing: watch::Receiver<bool>,
    sink: Sink,
    registration: Registration,
}

/// Where a stream's chunks go: the response body, through a small bounded channel.
struct Sink {
    tx: mpsc::Sender<web::Bytes>,
    timeout: Duration,
    hub: Arc<Hub>,
    batch_id: i64,
}

impl Sink {
    /// Sends a chunk, or gives up on a client that has not taken the previous ones within
    /// the send timeout (it stopped reading): the stream ends rather than buffer for it.
    async fn send(&self, chunk: web::Bytes) -> bool {
        match tokio::time::timeout(self.timeout, self.tx.send(chunk)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                self.hub.dropped.inc();
                tracing::info!(
                    batch.id = self.batch_id,
                    "event stream dropped: its client stopped reading"
                );
                false
            }
        }
    }
}

enum Next {
    Read,
    End,
}

impl Stream {
    async fn run(mut self) {
        let mut last: Option<BatchCounts> = None;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + self.heartbeat, self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let read_at = tokio::time::Instant::now();
            match self.db.stream_jobs(self.batch_id).await {
                Ok(jobs) => {
                    let (out, counts) = self.changes(&jobs, last.as_ref());
                    last = Some(counts);
                    if !out.is_empty() && !self.sink.send(out).await {
                        return;
                    }
                    if counts.status() == BatchStatus::Done {
                        return;
                    }
                }
                // Kept open: the next wake-up or re-check tries again.
                Err(e) => tracing::warn!(batch.id = self.batch_id, error = %e,
                    "event stream could not read its batch"),
            }
            let recheck = tokio::time::sleep(self.recheck);
            tokio::pin!(recheck);
            let next = loop {
                tokio::select! {
                    _ = self.closing.wait_for(|c| *c) => break Next::End,
                    _ = self.sink.tx.closed() => break Next::End,
                    _ = self.registration.notify.notified() => break Next::Read,
                    _ = &mut recheck => break Next::Read,
                    _ = heartbeat.tick() => {
                        if !self.sink.send(web::Bytes::from_static(b": keep-alive\n\n")).await {
                            break Next::End;
                        }
                    }
                }
            };
            if let Next::End = next {
                return;
            }
            // Coalesce: whatever else arrives meanwhile is seen by this one read.
            tokio::select! {
                _ = self.closing.wait_for(|c| *c) => return,
                _ = tokio::time::sleep_until(read_at + MIN_READ_INTERVAL) => {}
            }
        }
    }

    /// The events a read of the batch's jobs calls for: a `job` event per newly terminal job
    /// (in job order), `progress` when the counts changed, `done` once every job is terminal.
    fn changes(
        &mut self,
        jobs: &[volley_db::progress::StreamJob],
        last: Option<&BatchCounts>,
    ) -> (web::Bytes, BatchCounts) {
        let mut out = String::new();
        let mut counts = BatchCounts::default();
        for (i, j) in jobs.iter().enumerate() {
            let Ok(status) = j.status.parse::<JobStatus>() else {
                continue;
            };
            counts.add(status, 1);
            if status.is_terminal() && self.cursor.sent.get(i) == Some(&false) {
                self.cursor.sent[i] = true;
                let event = JobEvent {
                    id: j.id.to_string(),
                    custom_id: j.custom_id.as_deref(),
                    status: status.as_str(),
                };
                frame(&mut out, &self.cursor.encode(), "job", &event);
            }
        }
        let progress = ProgressEvent::new(self.batch_id, &counts);
        let id = self.cursor.encode();
        if last != Some(&counts) {
            frame(&mut out, &id, "progress", &progress);
        }
        if counts.status() == BatchStatus::Done {
            frame(&mut out, &id, "done", &progress);
        }
        (web::Bytes::from(out), counts)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A client that stops reading fills the stream's small channel; the next send times out
    /// and the stream ends, giving back its slot and the open-streams gauge. (Over loopback
    /// TCP the same needs megabytes of events first: the kernel's send buffer autotunes to a
    /// few MiB before actix stops taking the body.)
    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped() {
        let (_database, db) = volley_db::testing::TestDatabase::create().await.unwrap();
        let job = volley_db::NewJob {
            inference_type: "LLM".into(),
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            body: serde_json::json!({"model": "m", "prompt": "p"}),
            custom_id: None,
        };
        let (batch, _) = db.create_batch("alice", None, vec![job], 0).await.unwrap();
        let metrics = volley_telemetry::Metrics::new().unwrap();
        let hub = Arc::new(Hub::new(4, &metrics).unwrap());
        let registration = hub.register(vec![1], batch.id).unwrap();
        assert_eq!(hub.open.get(), 1);
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let stream = Stream {
            db,
            batch_id: batch.id,
            cursor: Cursor::new(1),
            heartbeat: Duration::from_millis(1),
            recheck: Duration::from_secs(60),
            closing: hub.closing.subscribe(),
            sink: Sink {
                tx,
                timeout: Duration::from_millis(100),
                hub: hub.clone(),
                batch_id: batch.id,
            },
            registration,
        };
        // Never read: the stream must end on its own.
        tokio::time::timeout(Duration::from_secs(30), stream.run())
            .await
            .expect("the stream kept waiting for a client that does not read");
        assert_eq!(hub.open.get(), 0);
        assert_eq!(hub.dropped.get(), 1);
        assert!(lock(&hub.watchers).is_empty() && lock(&hub.per_key).is_empty());
        drop(rx);
    }

    #[test]
    fn notifications_wake_only_their_batches() {
        let metrics = volley_telemetry::Metrics::new().unwrap();
        let hub = Arc::new(Hub::new(1, &metrics).unwrap());
        let a = hub.register(vec![1], 7).unwrap();
        let b = hub.register(vec![2], 8).unwrap();
        assert!(matches!(
            hub.register(vec![1], 9),
            Err(ApiError::RateLimited { .. })
        ));
        hub.changed(Changed::Batches(vec![7]));
        let woken =
            |r: &Registration| futures::FutureExt::now_or_never(r.notify.notified()).is_some();
        assert!(woken(&a) && !woken(&b));
        hub.changed(Changed::All);
        assert!(woken(&a) && woken(&b));
        drop(a);
        assert_eq!(hub.open.get(), 1);
        assert!(hub.register(vec![1], 9).is_ok());
    }

    #[test]
    fn cursors_round_trip() {
        for total in [1usize, 3, 4, 5, 255, 256] {
            let mut c = Cursor::new(total);
            assert_eq!(Cursor::parse(&c.encode(), total).unwrap(), c);
            for i in (0..total).step_by(3) {
                c.sent[i] = true;
            }
            c.sent[total - 1] = true;
            assert_eq!(Cursor::parse(&c.encode(), total).unwrap(), c, "{total}");
        }
        assert_eq!(Cursor::new(256).encode().len(), MAX_EVENT_ID);
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "", "1.", "2.0", "1.00", "1.g", "1.F", "x", "1.0\n", "-1", "1.-",
            // A bit past the last of 3 jobs.
            "1.8",
        ] {
            assert!(Cursor::parse(bad, 3).is_err(), "{bad:?}");
        }
        assert!(Cursor::parse("1.7", 3).is_ok());
        assert!(Cursor::parse(&format!("1.{}", "f".repeat(64)), 256).is_ok());
        assert!(Cursor::parse(&format!("1.{}", "f".repeat(65)), 256).is_err());
    }
}
