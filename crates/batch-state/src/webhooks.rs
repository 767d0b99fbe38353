//! Delivers webhook events (Standard Webhooks) from the `webhook_events` table, where the
//! state change that causes each one recorded it in its own transaction.
//!
//! One loop per replica claims due events (`FOR UPDATE SKIP LOCKED`, a lease), sends each on
//! a task of its own under a semaphore (`webhooks.concurrency`), and records the attempt:
//! delivered on a 2xx, otherwise due again after the next step of `webhooks.schedule_ms`
//! (jittered), or failed, with its endpoint paused, once the schedule is used up. The payload
//! is built at delivery time: media links in a job are signed then, so a retry hours later
//! still carries links that work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};
use rand::Rng;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use volley_api::{EventData, MediaLinks, WebhookEvent};
use volley_config::Settings;
use volley_db::webhooks::{Attempt, Backlog, DueEvent};
use volley_db::{BatchView, Db, JobView};
use volley_egress::WebhookPolicy;
use volley_media::Signer;

use crate::Shared;

/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// How long a stopping replica waits for attempts in flight.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// The Standard Webhooks signature of one message: `v1,` and the base64 HMAC-SHA256, keyed
/// with the secret's bytes (the base64 after `whsec_`), of `{id}.{timestamp}.{body}`.
/// `None` for a secret that is not valid base64.
fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).ok()?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", b64.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header: one signature per live secret, space-separated (the
/// previous secret too while its rotation grace lasts, so receivers can switch over).
fn signature_header(
    secret: &str,
    previous: Option<&str>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Option<String> {
    let mut sigs = vec![sign(secret, msg_id, timestamp, body)?];
    if let Some(p) = previous.and_then(|p| sign(p, msg_id, timestamp, body)) {
        sigs.push(p);
    }
    Some(sigs.join(" "))
}

/// The delay before attempt `attempts + 1`, after `attempts` failed ones, jittered by ±10%;
/// `None` when the schedule is used up.
fn next_delay_ms(schedule: &[u64], attempts: i32) -> Option<u64> {
    let step = usize::try_from(attempts).ok()?.checked_sub(1)?;
    let base = *schedule.get(step)?;
    let spread = base / 10;
    Some(if spread == 0 {
        base
    } else {
        rand::rng().random_range(base - spread..=base + spread)
    })
}

struct Meters {
    attempts: IntCounterVec,
    duration: HistogramVec,
    backlog: IntGaugeVec,
}

impl Meters {
    fn new(shared: &Shared) -> prometheus::Result<Meters> {
        let r = shared.metrics.registry();
        let attempts = IntCounterVec::new(
            Opts::new(
                "volley_webhook_attempts_total",
                "Webhook delivery attempts, by result: delivered (2xx), failed (another \
                 status, a timeout or a connection error) or refused (the URL or its address \
                 is not allowed).",
            ),
            &["result"],
        )?;
        r.register(Box::new(attempts.clone()))?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "volley_webhook_attempt_duration_seconds",
                "Time of one webhook delivery attempt, by result.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["result"],
        )?;
        r.register(Box::new(duration.clone()))?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                "volley_webhook_backlog",
                "Webhook events by state: pending (to be tried), due (waiting for a \
                 deliverer now), failed (retries used up); paused_endpoints; \
                 oldest_due_seconds.",
            ),
            &["state"],
        )?;
        r.register(Box::new(backlog.clone()))?;
        Ok(Meters {
            attempts,
            duration,
            backlog,
        })
    }

    fn set_backlog(&self, b: &Backlog) {
        for (k, v) in [
            ("pending", b.pending),
            ("due", b.due),
            ("failed", b.failed),
            ("paused_endpoints", b.paused_endpoints),
            ("oldest_due_seconds", b.oldest_due_secs),
        ] {
            self.backlog.with_label_values(&[k]).set(v);
        }
    }
}

/// What one delivery needs, shared by its tasks.
struct Deliverer {
    db: Db,
    client: reqwest::Client,
    policy: WebhookPolicy,
    signer: Signer,
    public_url: String,
    url_ttl_secs: i64,
    schedule: Vec<u64>,
    response_cap: usize,
    meters: Meters,
}

/// Runs the delivery loop until `stop`; in-flight attempts are let finish (they are bounded by
/// the timeout), and any cut short is made again once its lease has passed.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let s: &Settings = &shared.settings;
    if !s.webhooks.deliver {
        return;
    }
    let d = match build(&shared) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            tracing::error!(error = %e, "webhook deliveries cannot start");
            return;
        }
    };
    let w = &s.webhooks;
    let slots = Arc::new(Semaphore::new(w.concurrency.max(1)));
    let poll = Duration::from_millis(w.poll_interval_ms.max(10));
    let mut tasks = JoinSet::new();
    let mut backlog_at: Option<Instant> = None;
    loop {
        while tasks.try_join_next().is_some() {}
        if backlog_at.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) {
            if let Ok(b) = d.db.webhook_backlog().await {
                d.meters.set_backlog(&b);
            }
            backlog_at = Some(Instant::now());
        }
        // Claim only what free slots can take, so a claimed event never waits on a lease.
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tasks.join_next() => {}
            }
            continue;
        }
        let claimed =
            d.db.claim_webhook_events(free as i64, w.lease_ms, w.secret_grace_secs)
                .await;
        let events = match claimed {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "claiming webhook events failed; will try again");
                Vec::new()
            }
        };
        if events.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        let data = match load_data(&d.db, &events).await {
            Ok(data) => Arc::new(data),
            Err(e) => {
                // The claims' leases bring the events back.
                tracing::warn!(error = %e, "reading webhook payloads failed; will try again");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(poll) => {}
                }
                continue;
            }
        };
        for e in events {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (d, data) = (d.clone(), data.clone());
            tasks.spawn(async move {
                let attempt = d.deliver(&e, &data).await;
                if let Err(err) = d.db.record_webhook_attempts(vec![attempt]).await {
                    // Not recorded: the lease passes and the event is sent again (the
                    // receiver de-duplicates by `webhook-id`).
                    tracing::warn!(webhook.event = e.id, error = %err, "recording a webhook attempt failed");
                }
                drop(permit);
            });
        }
    }
    // Attempts in flight get a moment to finish; the rest are dropped and made again after
    // their lease (receivers de-duplicate by `webhook-id`), so shutdown stays within its grace.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_WAIT, drain).await.is_err() {
        tasks.abort_all();
    }
}

fn build(shared: &Shared) -> anyhow::Result<Deliverer> {
    let s = &shared.settings;
    let w = &s.webhooks;
    let policy = WebhookPolicy::new(w.allow_private_network, &w.http_hosts, &w.allowed_ports)
        .map_err(|e| anyhow::anyhow!("webhooks.http_hosts: {e}"))?;
    let client = policy.client(
        reqwest::Client::builder()
            .timeout(Duration::from_millis(w.timeout_ms))
            .user_agent("Volley-Webhooks/1"),
    )?;
    Ok(Deliverer {
        db: shared.db.clone(),
        client,
        policy,
        signer: Signer::new(s.media.signing_key.expose().as_bytes()),
        public_url: s.gateway.public_url.clone(),
        url_ttl_secs: i64::try_from(s.media.url_ttl_secs).unwrap_or(i64::MAX),
        schedule: w.schedule_ms.clone(),
        response_cap: w.response_cap_bytes,
        meters: Meters::new(shared)?,
    })
}

type Data = (
    std::collections::HashMap<i64, BatchView>,
    std::collections::HashMap<i64, JobView>,
);

async fn load_data(db: &Db, events: &[DueEvent]) -> Result<Data, volley_db::DbError> {
    let mut batches = Vec::new();
    let mut jobs = Vec::new();
    for e in events {
        match e.job_id {
            Some(j) => jobs.push(j),
            None => batches.push(e.batch_id),
        }
    }
    db.webhook_data(batches, jobs).await
}

impl Deliverer {
    /// The event's body (`volley_api::WebhookEvent`), media links signed now.
    fn body(&self, e: &DueEvent, data: &Data) -> Option<Vec<u8>> {
        let payload = match e.job_id {
            Some(id) => {
                let links = MediaLinks {
                    signer: &self.signer,
                    public_url: &self.public_url,
                    ttl_secs: self.url_ttl_secs,
                    now: chrono::Utc::now().timestamp(),
                };
                EventData::job(data.1.get(&id)?, &links)
            }
            None => EventData::batch(data.0.get(&e.batch_id)?)?,
        };
        serde_json::to_vec(&WebhookEvent::new(&e.event_type, e.created_at, payload)).ok()
    }

    async fn deliver(&self, e: &DueEvent, data: &Data) -> Attempt {
        let started = Instant::now();
        let mut attempt = Attempt {
            id: e.id,
            delivered: false,
            status_code: None,
            error: None,
            response: None,
            retry_in_ms: None,
        };
        let result = self.send(e, data, &mut attempt).await;
        let took = started.elapsed();
        if !attempt.delivered {
            attempt.retry_in_ms = next_delay_ms(&self.schedule, e.attempts);
        }
        self.meters.attempts.with_label_values(&[result]).inc();
        self.meters
            .duration
            .with_label_values(&[result])
            .observe(took.as_secs_f64());
        let duration_ms = took.as_millis() as u64;
        if attempt.delivered {
            tracing::info!(
                webhook.event = e.id, webhook.id = %e.msg_id, batch.id = e.batch_id,
                event_type = %e.event_type, attempt = e.attempts,
                status = attempt.status_code, duration_ms, "webhook delivered"
            );
        } else {
            tracing::warn!(
                webhook.event = e.id, webhook.id = %e.msg_id, batch.id = e.batch_id,
                event_type = %e.event_type, attempt = e.attempts,
                status = attempt.status_code, error = attempt.error.as_deref(),
                response = attempt.response.as_deref(), duration_ms,
                retry_in_ms = attempt.retry_in_ms,
                "webhook not delivered"
            );
        }
        attempt
    }

    /// One HTTP attempt; fills `attempt`, answers the metric's result label.
    async fn send(&self, e: &DueEvent, data: &Data, attempt: &mut Attempt) -> &'static str {
        // Checked again: the operator's policy may have changed since the batch was accepted.
        let url = match self.policy.parse_url(&e.url) {
            Ok(u) => u,
            Err(r) => {
                attempt.error = Some(format!("refused: {r}"));
                return "refused";
            }
        };
        let Some(body) = self.body(e, data) else {
            attempt.error = Some("the batch or job of this event is gone".into());
            return "failed";
        };
        let ts = chrono::Utc::now().timestamp();
        let Some(signature) = signature_header(
            &e.secret,
            e.previous_secret.as_deref(),
            &e.msg_id,
            ts,
            &body,
        ) else {
            attempt.error = Some("the key's webhook secret is not valid".into());
            return "failed";
        };
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &e.msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status();
                attempt.status_code = Some(i32::from(status.as_u16()));
                let head = volley_egress::read_prefix(resp, self.response_cap).await;
                attempt.response =
                    (!head.is_empty()).then(|| String::from_utf8_lossy(&head).into_owned());
                attempt.delivered = status.is_success();
                if attempt.delivered {
                    "delivered"
                } else {
                    attempt.error = Some(format!("the endpoint answered {status}"));
                    "failed"
                }
            }
            Err(err) => {
                if let Some(r) = volley_egress::refusal(&err) {
                    attempt.error = Some(format!("refused: {r}"));
                    return "refused";
                }
                attempt.error = Some(if err.is_timeout() {
                    "timed out".to_owned()
                } else if err.is_connect() {
                    "could not connect".to_owned()
                } else {
                    format!("request failed: {err}")
                });
                "failed"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn signs_like_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(sign("whsec_not base64!", "m", 1, b"x"), None);
        let both = signature_header(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            Some("whsec_c2VjcmV0"),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(parts[1].starts_with("v1,") && parts[1] != parts[0]);
    }

    #[test]
    fn the_schedule_is_jittered_and_ends() {
        let s = [1_000, 10_000];
        for _ in 0..100 {
            let d = next_delay_ms(&s, 1).unwrap();
            assert!((900..=1_100).contains(&d), "{d}");
            let d = next_delay_ms(&s, 2).unwrap();
            assert!((9_000..=11_000).contains(&d), "{d}");
        }
        assert_eq!(next_delay_ms(&s, 3), None);
        assert_eq!(next_delay_ms(&s, 0), None);
        assert_eq!(next_delay_ms(&s, -1), None);
        assert_eq!(next_delay_ms(&[5], 1), Some(5));
    }
}
