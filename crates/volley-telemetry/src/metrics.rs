//! Prometheus metrics: one registry per service instance.
//!
//! *Why per instance, not process-global:* a deployed process runs one service, so either
//! works there; but the test harness runs the gateway, batch-state and five workers in one
//! process, and with one global registry every service's `/metrics` would show all of them.
//! A [`Metrics`] is built by each service, shared through its state as an `Arc`, and served
//! by that service's `/metrics`.
//!
//! Hot paths use handles resolved once ([`JobMeters`] per worker, [`ProviderMeters`] per
//! provider), so counting costs an atomic add, not a label lookup.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use volley_domain::{InferenceType, JobStatus};

/// Seconds; requests are short, with a tail for media downloads and batch submissions.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds, from a few milliseconds (a warm queue) to hours (a backlog of video jobs).
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
];
/// Seconds, from a fast completion to a 40-minute video.
const RUN_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// Every metric family of a Volley service. All are registered everywhere, so the names are
/// the same on every service; labelled families only show series a service has touched.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub jobs: JobMetrics,
    pub providers: ProviderMetrics,
    pub amqp: AmqpMetrics,
    pub queues: QueueMetrics,
    pub state: StateMetrics,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// A fresh registry with every Volley family in it.
    pub fn new() -> prometheus::Result<Arc<Metrics>> {
        let r = Registry::new();
        let m = Metrics {
            http: HttpMetrics {
                requests: counter(
                    &r,
                    "volley_http_requests_total",
                    "HTTP requests served, by route pattern, method and status code.",
                    &["route", "method", "status"],
                )?,
                duration: histogram(
                    &r,
                    "volley_http_request_duration_seconds",
                    "Time to answer an HTTP request, by route pattern and method.",
                    &["route", "method"],
                    HTTP_BUCKETS,
                )?,
            },
            jobs: JobMetrics {
                accepted: counter(
                    &r,
                    "volley_jobs_accepted_total",
                    "Jobs committed by the gateway (202), by inference type.",
                    &["inference_type"],
                )?,
                started: counter(
                    &r,
                    "volley_jobs_started_total",
                    "Job attempts started by a worker after a successful claim.",
                    &["inference_type"],
                )?,
                finished: counter(
                    &r,
                    "volley_jobs_finished_total",
                    "Job attempts finished by a worker, by outcome: succeeded, failed, retry \
                     (handed back for a later attempt) or aborted (cancelled or shut down).",
                    &["inference_type", "outcome"],
                )?,
                retries: counter(
                    &r,
                    "volley_job_retries_total",
                    "Retries scheduled after a retryable failure (timeout, 429, 5xx, ...).",
                    &["inference_type"],
                )?,
                in_flight: gauge(
                    &r,
                    "volley_jobs_in_flight",
                    "Jobs a worker is running now.",
                    &["inference_type"],
                )?,
                queue_wait: histogram(
                    &r,
                    "volley_job_queue_wait_seconds",
                    "From acceptance to the start of an attempt (retries include their \
                     earlier attempts and backoff).",
                    &["inference_type"],
                    WAIT_BUCKETS,
                )?,
                run_time: histogram(
                    &r,
                    "volley_job_run_seconds",
                    "Run time of one attempt on the worker (provider call and media storage).",
                    &["inference_type", "outcome"],
                    RUN_BUCKETS,
                )?,
                transitions: counter(
                    &r,
                    "volley_job_state_changes_total",
                    "Job state changes applied by batch-state, by inference type and new \
                     status (QUEUED is a retry; PROCESSED and FAILED are final).",
                    &["inference_type", "status"],
                )?,
                cancelled: counter(
                    &r,
                    "volley_jobs_cancelled_total",
                    "Jobs cancelled through the API.",
                    &["inference_type"],
                )?,
            },
            providers: ProviderMetrics {
                calls: counter(
                    &r,
                    "volley_provider_calls_total",
                    "Provider calls (one per job attempt), by provider and outcome: ok, \
                     retryable, fatal or cancelled.",
                    &["provider", "outcome"],
                )?,
                in_flight: gauge(
                    &r,
                    "volley_provider_in_flight",
                    "Calls holding one of the provider's concurrency slots now.",
                    &["provider"],
                )?,
                duration: histogram(
                    &r,
                    "volley_provider_call_duration_seconds",
                    "Time from holding a provider slot to the call's end.",
                    &["provider"],
                    RUN_BUCKETS,
                )?,
                rate_limited: counter(
                    &r,
                    "volley_provider_rate_limited_total",
                    "429 answers from the provider (each pauses the provider for all jobs).",
                    &["provider"],
                )?,
            },
            amqp: AmqpMetrics {
                published: counter(
                    &r,
                    "volley_amqp_published_total",
                    "Messages published, by destination (exchange, or queue for the default \
                     exchange) and result: confirmed, nacked, unroutable, timeout or error.",
                    &["destination", "result"],
                )?,
                dead_lettered: counter(
                    &r,
                    "volley_amqp_dead_lettered_total",
                    "Undecodable messages rejected to the dead-letter queue, by source queue.",
                    &["queue"],
                )?,
            },
            queues: QueueMetrics {
                messages: gauge(
                    &r,
                    "volley_queue_messages",
                    "Messages ready in a queue (dead-letter queues included), polled from \
                     RabbitMQ.",
                    &["queue"],
                )?,
                consumers: gauge(
                    &r,
                    "volley_queue_consumers",
                    "Consumers attached to a queue, polled from RabbitMQ.",
                    &["queue"],
                )?,
            },
            state: StateMetrics {
                claims: counter(
                    &r,
                    "volley_claims_total",
                    "Claims answered by batch-state: claimed, refused (running elsewhere, \
                     finished or cancelled) or not_found.",
                    &["result"],
                )?,
                events: counter(
                    &r,
                    "volley_events_total",
                    "Outcome events consumed by batch-state: applied, or ignored (duplicate, \
                     stale or late).",
                    &["result"],
                )?,
                recovered: counter(
                    &r,
                    "volley_sweeper_recovered_total",
                    "Jobs the sweeper recovered: lease_expired (requeued), lost_failed (lease \
                     expired on the last attempt), redispatched (message lost) or unconfirmed \
                     (their batch's publish was never recorded).",
                    &["reason"],
                )?,
                held: gauge(
                    &r,
                    "volley_dispatch_held_jobs",
                    "Jobs held back from a full queue for fair dispatch, by inference type \
                     (add volley_queue_messages for the modality's whole backlog).",
                    &["inference_type"],
                )?,
                released: counter(
                    &r,
                    "volley_dispatch_released_jobs_total",
                    "Held jobs the fair dispatcher published, by inference type.",
                    &["inference_type"],
                )?,
                swept: {
                    let c = IntCounter::new(
                        "volley_sweeper_published_total",
                        "Job messages the sweeper published (never confirmed, retried or \
                         recovered jobs).",
                    )?;
                    r.register(Box::new(c.clone()))?;
                    c
                },
            },
            registry: r,
        };
        Ok(Arc::new(m))
    }

    /// The registry, to add service-specific collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

pub struct HttpMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
}

impl HttpMetrics {
    /// `route` must be a route pattern (or a fixed word), never a raw path; `method` is
    /// bounded here: anything but the standard methods counts as `OTHER`, so invented methods
    /// cannot grow the series.
    pub fn observe(&self, route: &str, method: &str, status: u16, took: Duration) {
        let method = method_label(method);
        let code = itoa_status(status);
        self.requests
            .with_label_values(&[route, method, code.as_str()])
            .inc();
        self.duration
            .with_label_values(&[route, method])
            .observe(took.as_secs_f64());
    }
}

/// The standard HTTP methods (RFC 9110 and PATCH), which are label values as they are.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A method as a metric label: one of the standard methods, else `OTHER`.
pub(crate) fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("OTHER")
}

/// A status code as a label without going through `format!`.
fn itoa_status(status: u16) -> String {
    let mut s = String::with_capacity(3);
    for d in [status / 100 % 10, status / 10 % 10, status % 10] {
        s.push(char::from(b'0' + d as u8));
    }
    s
}

pub struct JobMetrics {
    pub accepted: IntCounterVec,
    pub started: IntCounterVec,
    pub finished: IntCounterVec,
    pub retries: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub run_time: HistogramVec,
    pub transitions: IntCounterVec,
    pub cancelled: IntCounterVec,
}

impl JobMetrics {
    /// The handles one worker needs for its inference type, resolved once.
    pub fn for_type(&self, t: InferenceType) -> JobMeters {
        let ty = t.as_str();
        let outcome = |o: JobOutcome| OutcomeMeters {
            finished: self.finished.with_label_values(&[ty, o.as_str()]),
            run_time: self.run_time.with_label_values(&[ty, o.as_str()]),
        };
        JobMeters {
            started: self.started.with_label_values(&[ty]),
            retries: self.retries.with_label_values(&[ty]),
            in_flight: self.in_flight.with_label_values(&[ty]),
            queue_wait: self.queue_wait.with_label_values(&[ty]),
            outcomes: [
                outcome(JobOutcome::Succeeded),
                outcome(JobOutcome::Failed),
                outcome(JobOutcome::Retry),
                outcome(JobOutcome::Aborted),
            ],
        }
    }

    /// A state change applied by batch-state.
    /// Both come from events on the broker, so both are bounded here: an inference type that
    /// is not one of ours counts as `unknown`, a status that is not a job status as `other`.
    pub fn transition(&self, inference_type: &str, status: &str) {
        let ty = inference_type
            .parse::<InferenceType>()
            .map(InferenceType::as_str)
            .unwrap_or("unknown");
        let status = JobStatus::ALL
            .iter()
            .map(|s| s.as_str())
            .find(|s| *s == status)
            .unwrap_or("other");
        self.transitions.with_label_values(&[ty, status]).inc();
    }
}

/// How one attempt of a job ended, on the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded,
    Failed,
    Retry,
    Aborted,
}

impl JobOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Succeeded => "succeeded",
            JobOutcome::Failed => "failed",
            JobOutcome::Retry => "retry",
            JobOutcome::Aborted => "aborted",
        }
    }
}

#[derive(Clone)]
struct OutcomeMeters {
    finished: IntCounter,
    run_time: Histogram,
}

/// One worker's job metrics, label lookups done.
#[derive(Clone)]
pub struct JobMeters {
    started: IntCounter,
    retries: IntCounter,
    in_flight: IntGauge,
    queue_wait: Histogram,
    outcomes: [OutcomeMeters; 4],
}

impl JobMeters {
    /// An attempt started after waiting `queue_wait` since acceptance.
    pub fn started(&self, queue_wait: Duration) {
        self.started.inc();
        self.queue_wait.observe(queue_wait.as_secs_f64());
        self.in_flight.inc();
    }

    /// The attempt's provider work is over (whatever the outcome).
    pub fn stopped(&self) {
        self.in_flight.dec();
    }

    pub fn finished(&self, outcome: JobOutcome, run: Duration) {
        let m = &self.outcomes[outcome as usize];
        m.finished.inc();
        m.run_time.observe(run.as_secs_f64());
        if outcome == JobOutcome::Retry {
            self.retries.inc();
        }
    }
}

pub struct ProviderMetrics {
    pub calls: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub duration: HistogramVec,
    pub rate_limited: IntCounterVec,
}

impl ProviderMetrics {
    /// One provider's handles, resolved once.
    pub fn for_provider(&self, name: &str) -> ProviderMeters {
        let call = |o: &str| self.calls.with_label_values(&[name, o]);
        ProviderMeters {
            ok: call("ok"),
            retryable: call("retryable"),
            fatal: call("fatal"),
            cancelled: call("cancelled"),
            in_flight: self.in_flight.with_label_values(&[name]),
            duration: self.duration.with_label_values(&[name]),
            rate_limited: self.rate_limited.with_label_values(&[name]),
        }
    }
}

/// How a provider call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    Retryable,
    Fatal,
    Cancelled,
}

#[derive(Clone)]
pub struct ProviderMeters {
    ok: IntCounter,
    retryable: IntCounter,
    fatal: IntCounter,
    cancelled: IntCounter,
    in_flight: IntGauge,
    duration: Histogram,
    rate_limited: IntCounter,
}

impl ProviderMeters {
    /// A call holds a slot from now until the returned guard is finished or dropped.
    pub fn start(&self) -> CallGuard<'_> {
        self.in_flight.inc();
        CallGuard {
            meters: self,
            started: std::time::Instant::now(),
        }
    }

    /// A 429 from the provider.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }
}

/// Keeps the in-flight gauge right even when a call's future is dropped midway.
pub struct CallGuard<'a> {
    meters: &'a ProviderMeters,
    started: std::time::Instant,
}

impl CallGuard<'_> {
    pub fn finish(self, outcome: CallOutcome) {
        let m = self.meters;
        match outcome {
            CallOutcome::Ok => m.ok.inc(),
            CallOutcome::Retryable => m.retryable.inc(),
            CallOutcome::Fatal => m.fatal.inc(),
            CallOutcome::Cancelled => m.cancelled.inc(),
        }
        m.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.meters.in_flight.dec();
    }
}

pub struct AmqpMetrics {
    pub published: IntCounterVec,
    pub dead_lettered: IntCounterVec,
}

impl AmqpMetrics {
    /// One publish result; `result` is `confirmed`, `nacked`, `unroutable`, `timeout` or
    /// `error`.
    pub fn published(&self, destination: &str, result: &str) {
        self.published
            .with_label_values(&[destination, result])
            .inc();
    }

    pub fn dead_lettered(&self, queue: &str) {
        self.dead_lettered.with_label_values(&[queue]).inc();
    }
}

pub struct QueueMetrics {
    pub messages: IntGaugeVec,
    pub consumers: IntGaugeVec,
}

impl QueueMetrics {
    pub fn set(&self, queue: &str, messages: u32, consumers: u32) {
        self.messages
            .with_label_values(&[queue])
            .set(i64::from(messages));
        self.consumers
            .with_label_values(&[queue])
            .set(i64::from(consumers));
    }
}

pub struct StateMetrics {
    pub claims: IntCounterVec,
    pub events: IntCounterVec,
    pub recovered: IntCounterVec,
    pub swept: IntCounter,
    /// Jobs held back from a full queue for fair dispatch, by inference type: with the
    /// queue's depth, the modality's real backlog.
    pub held: IntGaugeVec,
    /// Held jobs published by the fair dispatcher.
    pub released: IntCounterVec,
}

impl StateMetrics {
    pub fn claims(&self, result: &str, n: u64) {
        self.claims.with_label_values(&[result]).inc_by(n);
    }

    pub fn events(&self, applied: usize, ignored: usize) {
        self.events
            .with_label_values(&["applied"])
            .inc_by(applied as u64);
        self.events
            .with_label_values(&["ignored"])
            .inc_by(ignored as u64);
    }

    /// One sweeper pass: jobs recovered by reason, and messages published.
    pub fn swept(
        &self,
        lease_expired: usize,
        lost_failed: usize,
        redispatched: usize,
        unconfirmed: usize,
        published: usize,
    ) {
        for (reason, n) in [
            ("lease_expired", lease_expired),
            ("lost_failed", lost_failed),
            ("redispatched", redispatched),
            ("unconfirmed", unconfirmed),
        ] {
            if n > 0 {
                self.recovered.with_label_values(&[reason]).inc_by(n as u64);
            }
        }
        if published > 0 {
            self.swept.inc_by(published as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_independent_and_render() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        let m = a.jobs.for_type(InferenceType::Image);
        m.started(Duration::from_millis(30));
        m.stopped();
        m.finished(JobOutcome::Retry, Duration::from_millis(5));
        a.http
            .observe("/v1/batches", "POST", 202, Duration::from_millis(3));
        let text = a.render();
        assert!(
            text.contains(r#"volley_jobs_started_total{inference_type="IMAGE"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"volley_job_retries_total{inference_type="IMAGE"} 1"#));
        assert!(
            text.contains(
                r#"volley_jobs_finished_total{inference_type="IMAGE",outcome="retry"} 1"#
            )
        );
        assert!(text.contains(r#"volley_jobs_in_flight{inference_type="IMAGE"} 0"#));
        assert!(text.contains(
            r#"volley_http_requests_total{method="POST",route="/v1/batches",status="202"} 1"#
        ));
        assert!(!b.render().contains("IMAGE"));
    }

    #[test]
    fn provider_guard_keeps_in_flight_right() {
        let m = Metrics::new().unwrap();
        let p = m.providers.for_provider("sim");
        let g = p.start();
        assert!(
            m.render()
                .contains(r#"volley_provider_in_flight{provider="sim"} 1"#)
        );
        g.finish(CallOutcome::Ok);
        drop(p.start());
        let text = m.render();
        assert!(text.contains(r#"volley_provider_in_flight{provider="sim"} 0"#));
        assert!(text.contains(r#"volley_provider_calls_total{outcome="ok",provider="sim"} 1"#));
    }

    #[test]
    fn status_labels() {
        assert_eq!(itoa_status(202), "202");
        assert_eq!(itoa_status(503), "503");
    }

    #[test]
    fn transition_labels_are_bounded() {
        let m = Metrics::new().unwrap();
        m.jobs.transition("LLM", "PROCESSED");
        m.jobs.transition("llm", "PROCESSED");
        for i in 0..20 {
            m.jobs.transition(&format!("T{i}"), &format!("S{i}"));
        }
        let text = m.render();
        assert!(
            text.contains(
                r#"volley_job_state_changes_total{inference_type="LLM",status="PROCESSED"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"volley_job_state_changes_total{inference_type="unknown",status="other"} 20"#
            ),
            "{text}"
        );
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("get"), "OTHER");
        assert_eq!(method_label("BREW"), "OTHER");
    }
}
