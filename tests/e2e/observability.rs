//! Seeing inside a running stack: one trace per job across the gateway, RabbitMQ, the worker,
//! the provider call and batch-state; Prometheus counters on every service; health and
//! readiness. Real services, RabbitMQ and PostgreSQL, as in `tests/e2e/batches.rs`.
//!
//! Traces go to the harness's in-memory exporter (`volley_harness::spans`), one for the whole
//! test process: every test's stack reports into it, so a test picks its own spans by trace id
//! (and its queue prefix), and a span's service is told by the `volley.service` attribute the
//! services' entry spans carry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_domain::InferenceType;
use volley_harness::{Stack, spans};
use volley_telemetry::opentelemetry::trace::{SpanId, SpanKind, TraceId};
use volley_telemetry::opentelemetry::{Key, Value as AttrValue};
use volley_telemetry::opentelemetry_sdk::trace::SpanData;

const LONG: Duration = Duration::from_secs(60);

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a AttrValue> {
    s.attributes
        .iter()
        .find(|kv| kv.key == Key::from(key.to_owned()))
        .map(|kv| &kv.value)
}

fn attr_str(s: &SpanData, key: &str) -> Option<String> {
    attr(s, key).map(|v| v.as_str().into_owned())
}

fn attr_i64(s: &SpanData, key: &str) -> Option<i64> {
    match attr(s, key)? {
        AttrValue::I64(n) => Some(*n),
        other => other.as_str().parse().ok(),
    }
}

/// The span of `trace` that `pred` picks, waiting for it to end (spans are exported when
/// they end, and the last ones end right after the batch is done).
async fn find(trace: TraceId, what: &str, pred: impl Fn(&SpanData) -> bool) -> SpanData {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = spans().get_finished_spans().unwrap();
        if let Some(s) = all
            .into_iter()
            .find(|s| s.span_context.trace_id() == trace && pred(s))
        {
            return s;
        }
        assert!(Instant::now() < deadline, "no {what} span in trace {trace}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn example() -> Value {
    json!({
        "label": "observability",
        "requests": [
            {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a minimalist desk lamp"}},
            {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a wooden bookshelf"}},
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
                "messages": [{"role": "user", "content": "Write a product description for a lamp."}]}},
            // One 429 (with `Retry-After: 0`) before it succeeds: a retry and a rate limit.
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
                "messages": [{"role": "user", "content": "Another one."}],
                "sim_fail": "rate_limit", "sim_fail_times": 1, "sim_retry_after": 0}}
        ]
    })
}

async fn run_example(s: &Stack) -> (String, Vec<i64>) {
    let (status, b) = s.post("/v1/batches", &example()).await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let done = s.wait_done(&id, LONG).await;
    assert_eq!(done["processed"], 4, "{done}");
    let jobs = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().parse().unwrap())
        .collect();
    (id, jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_job_across_services() {
    let exporter = spans();
    let s = Stack::start().await;
    let (_, jobs) = run_example(&s).await;
    let job = jobs[0];
    let prefix = s.settings.queue_prefix.clone();

    // The worker's consumer span for the image job names its trace.
    let deadline = Instant::now() + Duration::from_secs(10);
    let consumer = loop {
        let found = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|x| {
                // Job ids start at 1 in every test's database: the queue names this stack.
                x.span_kind == SpanKind::Consumer
                    && x.name == format!("process {prefix}.jobs.image")
                    && attr_str(x, "volley.service").as_deref() == Some("worker-image")
                    && attr_i64(x, "job.id") == Some(job)
            });
        if let Some(c) = found {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no worker consumer span for job {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let trace = consumer.span_context.trace_id();
    assert_eq!(
        attr_str(&consumer, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(attr_i64(&consumer, "attempt"), Some(1));

    // Gateway: the HTTP request that created the job, and the job's publish under it.
    let request = find(trace, "gateway server", |x| {
        x.span_kind == SpanKind::Server
            && attr_str(x, "volley.service").as_deref() == Some("gateway")
    })
    .await;
    assert_eq!(request.name, "POST /v1/batches");
    assert_eq!(attr_i64(&request, "http.response.status_code"), Some(202));
    let publish = find(trace, "job publish", |x| {
        x.span_kind == SpanKind::Producer
            && attr_str(x, "messaging.message.id") == Some(job.to_string())
    })
    .await;
    assert_eq!(publish.name, format!("publish {prefix}.jobs"));
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    assert_eq!(
        attr_str(&publish, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attr_str(&publish, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some("image")
    );

    // Through RabbitMQ: the consumer is the producer's child, and linked to it.
    assert_eq!(consumer.parent_span_id, publish.span_context.span_id());
    assert!(consumer.parent_span_is_remote);
    assert!(
        consumer
            .links
            .links
            .iter()
            .any(|l| l.span_context.span_id() == publish.span_context.span_id()),
        "the consumer span links to the producer span"
    );

    // The batch's four jobs share the request's trace: below, each span is picked by its
    // parent or its job.
    let worker = consumer.span_context.span_id();
    // The claim, from the worker's client span to batch-state's server span. Jobs that
    // arrive together are claimed in one request: its span is a child of the first job's
    // consumer span and linked to the others'.
    let claim = find(trace, "claim client", |x| {
        x.name == "POST /internal/claims"
            && (x.parent_span_id == worker
                || x.links
                    .links
                    .iter()
                    .any(|l| l.span_context.span_id() == worker))
    })
    .await;
    assert_eq!(claim.span_kind, SpanKind::Client);
    let claimed = find(trace, "batch-state claim", |x| {
        x.parent_span_id == claim.span_context.span_id()
    })
    .await;
    assert_eq!(claimed.span_kind, SpanKind::Server);
    assert_eq!(claimed.name, "POST /internal/claims");
    assert_eq!(
        attr_str(&claimed, "volley.service").as_deref(),
        Some("batch-state")
    );

    // The provider call.
    let provider = find(trace, "provider client", |x| {
        x.parent_span_id == worker && attr(x, "volley.provider").is_some()
    })
    .await;
    assert_eq!(provider.span_kind, SpanKind::Client);
    assert_eq!(provider.name, "POST /v1/images/generations");
    assert_eq!(
        attr_str(&provider, "volley.provider").as_deref(),
        Some("sim-openai")
    );

    // The outcome event, and batch-state's update of the job row.
    let event = find(trace, "event publish", |x| {
        x.span_kind == SpanKind::Producer
            && attr_str(x, "messaging.message.id") == Some(format!("{job}-1"))
    })
    .await;
    assert_eq!(event.name, format!("publish {prefix}.events"));
    assert_eq!(event.parent_span_id, worker);
    let update = find(trace, "batch-state update", |x| {
        x.parent_span_id == event.span_context.span_id()
    })
    .await;
    assert_eq!(update.span_kind, SpanKind::Consumer);
    assert_eq!(update.name, format!("process {prefix}.events"));
    assert_eq!(
        attr_str(&update, "volley.service").as_deref(),
        Some("batch-state")
    );
    assert_eq!(attr_i64(&update, "job.id"), Some(job));
    assert_eq!(
        attr_str(&update, "job.status").as_deref(),
        Some("PROCESSED")
    );

    let all: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|x| x.span_context.trace_id() == trace)
        .collect();
    let services: BTreeSet<String> = all
        .iter()
        .filter_map(|x| attr_str(x, "volley.service"))
        .collect();
    assert!(
        ["gateway", "worker-image", "batch-state"]
            .iter()
            .all(|want| services.contains(*want)),
        "{services:?}"
    );
    print_trace(trace, all, worker, job);
    s.stop().await;
}

/// One job's path through the trace as a tree, for the eye
/// (`cargo test -p volley-e2e --test e2e -- observability:: --nocapture`): the consumer span's ancestors and
/// descendants.
fn print_trace(trace: TraceId, mut all: Vec<SpanData>, consumer: SpanId, job: i64) {
    use std::collections::HashSet;
    all.sort_by_key(|x| x.start_time);
    let parent_of = |id: SpanId| {
        all.iter()
            .find(|p| p.span_context.span_id() == id)
            .map(|p| p.parent_span_id)
    };
    let mut mine: HashSet<SpanId> = HashSet::new();
    let mut id = consumer;
    while let Some(parent) = parent_of(id) {
        mine.insert(id);
        id = parent;
    }
    let mut below: HashSet<SpanId> = HashSet::from([consumer]);
    loop {
        let before = below.len();
        for x in &all {
            if below.contains(&x.parent_span_id) {
                below.insert(x.span_context.span_id());
            }
        }
        if below.len() == before {
            break;
        }
    }
    mine.extend(below);
    let depth = |x: &SpanData| {
        let mut d = 0;
        let mut p = x.parent_span_id;
        while mine.contains(&p) {
            d += 1;
            p = parent_of(p).unwrap_or(SpanId::INVALID);
        }
        d
    };
    println!("trace {trace}, job {job}:");
    for x in all
        .iter()
        .filter(|x| mine.contains(&x.span_context.span_id()))
    {
        let took = x.end_time.duration_since(x.start_time).unwrap_or_default();
        println!(
            "  {}{} [{:?}] {}span {} {:.1} ms",
            "  ".repeat(depth(x)),
            x.name,
            x.span_kind,
            attr_str(x, "volley.service")
                .map(|s| format!("service={s} "))
                .unwrap_or_default(),
            x.span_context.span_id(),
            took.as_secs_f64() * 1000.0
        );
    }
}

/// `name{labels} value` from a Prometheus text exposition (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(s: &Stack, base: &str) -> String {
    let r = s.http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_counts_what_it_did() {
    spans();
    let s = Stack::start().await;
    run_example(&s).await;
    let prefix = s.settings.queue_prefix.clone();

    let gw = scrape(&s, &s.url).await;
    let check = |text: &str, series: &str, want: f64| {
        assert_eq!(sample(text, series), want, "{series}\n{text}");
    };
    check(
        &gw,
        r#"volley_jobs_accepted_total{inference_type="IMAGE"}"#,
        2.0,
    );
    check(
        &gw,
        r#"volley_jobs_accepted_total{inference_type="LLM"}"#,
        2.0,
    );
    check(
        &gw,
        r#"volley_http_requests_total{method="POST",route="/v1/batches",status="202"}"#,
        1.0,
    );
    assert!(
        sample(
            &gw,
            r#"volley_http_requests_total{method="GET",route="/v1/batches/{id}",status="200"}"#
        ) >= 1.0
    );
    check(
        &gw,
        &format!(
            r#"volley_amqp_published_total{{destination="{prefix}.jobs",result="confirmed"}}"#
        ),
        4.0,
    );
    check(
        &gw,
        r#"volley_http_request_duration_seconds_count{method="POST",route="/v1/batches"}"#,
        1.0,
    );

    // Five attempts: four jobs, one of them twice (the 429).
    let st = scrape(&s, &s.settings.state.url).await;
    check(&st, r#"volley_claims_total{result="claimed"}"#, 5.0);
    // Jobs of one type that arrive together share a claim request: the two image jobs, the
    // two chat jobs, then the retry; one request each at most.
    let claim_requests = sample(
        &st,
        r#"volley_http_requests_total{method="POST",route="/internal/claims",status="200"}"#,
    );
    assert!(
        (3.0..=5.0).contains(&claim_requests),
        "{claim_requests}\n{st}"
    );
    check(&st, r#"volley_events_total{result="applied"}"#, 5.0);
    check(
        &st,
        r#"volley_job_state_changes_total{inference_type="IMAGE",status="PROCESSED"}"#,
        2.0,
    );
    check(
        &st,
        r#"volley_job_state_changes_total{inference_type="LLM",status="PROCESSED"}"#,
        2.0,
    );
    check(
        &st,
        r#"volley_job_state_changes_total{inference_type="LLM",status="QUEUED"}"#,
        1.0,
    );
    // The retried job went out again through the sweeper.
    assert!(sample(&st, "volley_sweeper_published_total") >= 1.0, "{st}");

    let image = scrape(&s, &s.worker_url(InferenceType::Image).unwrap()).await;
    check(
        &image,
        r#"volley_jobs_started_total{inference_type="IMAGE"}"#,
        2.0,
    );
    check(
        &image,
        r#"volley_jobs_finished_total{inference_type="IMAGE",outcome="succeeded"}"#,
        2.0,
    );
    check(
        &image,
        r#"volley_jobs_in_flight{inference_type="IMAGE"}"#,
        0.0,
    );
    check(
        &image,
        r#"volley_job_queue_wait_seconds_count{inference_type="IMAGE"}"#,
        2.0,
    );
    check(
        &image,
        r#"volley_job_run_seconds_count{inference_type="IMAGE",outcome="succeeded"}"#,
        2.0,
    );
    check(
        &image,
        r#"volley_provider_calls_total{outcome="ok",provider="sim-openai"}"#,
        2.0,
    );
    check(
        &image,
        r#"volley_provider_in_flight{provider="sim-openai"}"#,
        0.0,
    );
    check(
        &image,
        &format!(
            r#"volley_amqp_published_total{{destination="{prefix}.events",result="confirmed"}}"#
        ),
        2.0,
    );
    assert!(
        !image.contains(r#"inference_type="LLM""#),
        "per-service registries"
    );

    let llm = scrape(&s, &s.worker_url(InferenceType::Llm).unwrap()).await;
    check(
        &llm,
        r#"volley_jobs_started_total{inference_type="LLM"}"#,
        3.0,
    );
    check(
        &llm,
        r#"volley_jobs_finished_total{inference_type="LLM",outcome="succeeded"}"#,
        2.0,
    );
    check(
        &llm,
        r#"volley_jobs_finished_total{inference_type="LLM",outcome="retry"}"#,
        1.0,
    );
    check(
        &llm,
        r#"volley_job_retries_total{inference_type="LLM"}"#,
        1.0,
    );
    check(
        &llm,
        r#"volley_provider_rate_limited_total{provider="sim-openai"}"#,
        1.0,
    );
    check(
        &llm,
        r#"volley_provider_calls_total{outcome="retryable",provider="sim-openai"}"#,
        1.0,
    );
    check(
        &llm,
        r#"volley_provider_calls_total{outcome="ok",provider="sim-openai"}"#,
        2.0,
    );

    // Queue depths and consumers, polled by batch-state: every job queue has its worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = scrape(&s, &s.settings.state.url).await;
        let consumers = sample(
            &st,
            &format!(r#"volley_queue_consumers{{queue="{prefix}.jobs.image"}}"#),
        );
        let events = sample(
            &st,
            &format!(r#"volley_queue_consumers{{queue="{prefix}.events"}}"#),
        );
        if consumers == 1.0 && events == 1.0 {
            check(
                &st,
                &format!(r#"volley_queue_messages{{queue="{prefix}.jobs.image"}}"#),
                0.0,
            );
            assert!(st.contains(&format!(
                r#"volley_queue_messages{{queue="{prefix}.jobs.image.dlq"}} 0"#
            )));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue gauges never showed up:\n{st}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    print_excerpt(&[("gateway", &gw), ("worker-llm", &llm)]);
    s.stop().await;
}

/// A few lines of each scrape, for the eye.
fn print_excerpt(scrapes: &[(&str, &str)]) {
    for (service, text) in scrapes {
        println!("--- {service} /metrics (excerpt)");
        for l in text.lines().filter(|l| {
            !l.starts_with('#')
                && !l.contains("_bucket")
                && (l.starts_with("volley_jobs")
                    || l.starts_with("volley_provider")
                    || l.starts_with("volley_job_retries")
                    || l.starts_with("volley_amqp")
                    || l.starts_with("volley_http_requests"))
        }) {
            println!("{l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_readiness_turns_false_while_draining() {
    let (database, _db) = volley_db::testing::TestDatabase::create().await.unwrap();
    let mut settings = volley_harness::base_settings();
    settings.database_url = database.url.clone();
    let id = uuid::Uuid::new_v4().simple().to_string();
    settings.queue_prefix = format!("t-{}", &id[..12]);
    let media = tempfile::tempdir().unwrap();
    settings.media.dir = media.path().to_string_lossy().into_owned();
    let names = volley_amqp::Names::new(&settings.queue_prefix);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let gw = gateway::start(settings, listener).unwrap();
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.drain();
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["draining"], true);
    assert_eq!(get("/healthz").await.0, 200, "alive while draining");
    gw.stop().await.unwrap();
    // The readiness probe declared this test's topology: remove it.
    let conn = volley_amqp::connect(&volley_harness::amqp_url(), "volley-test-cleanup")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    volley_amqp::delete_topology(&ch, &names).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
}
