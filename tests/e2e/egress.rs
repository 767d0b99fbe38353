//! What workers fetch, against a provider that does what it is told (issue 14, items 4, 8 and
//! 10): media links to internal addresses, redirects to them and off-origin poll URLs are
//! refused with a clear error and nothing is read from them; oversized answers fail the job;
//! `sim_*` fields reach only the simulator; one batch's 429 does not pause the provider for
//! another tenant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_config::{ProviderConfig, Route, Settings};
use volley_domain::InferenceType;
use volley_harness::{Options, Stack};

const WAIT: Duration = Duration::from_secs(40);

fn options(workers: &[InferenceType]) -> Options {
    Options {
        workers: workers.to_vec(),
        ..Options::default()
    }
}

fn copy_provider(s: &Settings, from: &str, name: &str) -> ProviderConfig {
    let mut p = s.provider(from).unwrap().clone();
    p.name = name.into();
    p
}

fn add_model(s: &mut Settings, name: &str, endpoint: &str, provider: &str, upstream: Option<&str>) {
    s.models.push(volley_config::ModelConfig {
        name: name.into(),
        endpoints: vec![endpoint.into()],
        routes: vec![Route {
            provider: provider.into(),
            upstream_model: upstream.map(str::to_owned),
        }],
    });
}

/// A listener on loopback standing for an internal service (metrics, an admin page): it
/// counts connections and answers each with a "secret".
struct Internal {
    port: u16,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Internal {
    async fn start() -> Internal {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 14\r\n\r\n\x89PNG internal!")
                    .await;
            }
        });
        Internal { port, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn item(endpoint: &str, body: Value) -> Value {
    json!({"endpoint": endpoint, "body": body})
}

fn assert_failed(label: &str, job: &Value, kind: &str, text: &str) {
    assert_eq!(job["status"], "FAILED", "{label}: {job}");
    assert_eq!(job["error"]["type"], kind, "{label}: {job}");
    assert_eq!(job["attempts"], 1, "{label}: not retried: {job}");
    let msg = job["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains(text), "{label}: {msg:?} lacks {text:?}");
    assert!(
        !job.to_string().contains("internal!"),
        "{label}: internal content read back: {job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_to_internal_addresses_are_refused_and_nothing_is_read_back() {
    let internal = Internal::start().await;
    let s = Stack::start_with(
        options(&[InferenceType::Image, InferenceType::Video]),
        |s| {
            // As a provider on the internet is configured: no private network.
            let mut img = copy_provider(s, "sim-openai", "public-images");
            img.allow_private_network = false;
            s.providers.push(img);
            add_model(
                s,
                "public-flux",
                "/v1/images/generations",
                "public-images",
                None,
            );
            // The simulator, its media hosts listed: only its own host and port.
            let sim = s.provider("sim-openai").unwrap().base_url.clone();
            let host_port = sim
                .trim_start_matches("http://")
                .trim_end_matches("/v1")
                .to_owned();
            let mut listed = copy_provider(s, "sim-openai", "listed-images");
            listed.media_hosts = vec![host_port];
            s.providers.push(listed);
            add_model(
                s,
                "listed-flux",
                "/v1/images/generations",
                "listed-images",
                None,
            );
            let mut pv = copy_provider(s, "sim-predictions", "public-predictions");
            pv.allow_private_network = false;
            s.providers.push(pv);
            add_model(
                s,
                "public-video",
                "/v1/videos/generations",
                "public-predictions",
                Some("sim/video-1"),
            );
            // Predictions without Prefer: wait (timeout under 2 s), so a create answers at once.
            let mut pred = copy_provider(s, "sim-predictions", "quick-predictions");
            pred.timeout_ms = 1_900;
            s.providers.push(pred);
            add_model(
                s,
                "quick-video",
                "/v1/videos/generations",
                "quick-predictions",
                Some("sim/video-1"),
            );
        },
    )
    .await;
    let image = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "prompt": "a red square"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        item("/v1/images/generations", b)
    };
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "loopback link",
            image(
                "public-flux",
                json!({"sim_media_url": internal.url("/metrics")}),
            ),
            "media_refused",
            "refused to fetch a media link: 127.0.0.1 is a loopback address",
        ),
        (
            "loopback by name",
            image(
                "public-flux",
                json!({"sim_media_url": format!("http://localhost:{}/metrics", internal.port)}),
            ),
            "media_refused",
            "loopback address",
        ),
        (
            "IPv4-mapped IPv6 loopback",
            image(
                "public-flux",
                json!({"sim_media_url": format!("http://[::ffff:127.0.0.1]:{}/", internal.port)}),
            ),
            "media_refused",
            "loopback address",
        ),
        (
            "metadata, even where the private network is allowed",
            image(
                "flux-dev",
                json!({"sim_media_url": "http://169.254.169.254/latest/meta-data/"}),
            ),
            "media_refused",
            "cloud metadata address",
        ),
        (
            "user info",
            image(
                "flux-dev",
                json!({"sim_media_url": format!("http://admin:pw@127.0.0.1:{}/", internal.port)}),
            ),
            "media_refused",
            "user name or password",
        ),
        (
            "not http",
            image("flux-dev", json!({"sim_media_url": "file:///etc/passwd"})),
            "media_refused",
            "only http and https",
        ),
        (
            "redirect off the media hosts",
            image(
                "listed-flux",
                json!({"sim_redirect_to": internal.url("/metrics")}),
            ),
            "media_refused",
            "not among this provider's media hosts",
        ),
        (
            "redirect to metadata",
            image(
                "flux-dev",
                json!({"sim_redirect_to": "http://169.254.169.254/latest/meta-data/"}),
            ),
            "media_refused",
            "cloud metadata address",
        ),
        (
            "the simulator's own loopback link, where the private network is not allowed",
            image("public-flux", json!({})),
            "media_refused",
            "loopback address",
        ),
        (
            "prediction output to an internal address",
            item(
                "/v1/videos/generations",
                json!({"model": "public-video", "prompt": "waves",
                       "sim_media_url": internal.url("/video.mp4")}),
            ),
            "media_refused",
            "127.0.0.1 is a loopback address",
        ),
        (
            "off-origin poll URL",
            item(
                "/v1/videos/generations",
                json!({"model": "quick-video", "prompt": "waves", "sim_latency_ms": 60_000,
                       "sim_poll_url": internal.url("/v1/predictions/steal")}),
            ),
            "provider_error",
            "is not on the provider's origin",
        ),
    ];
    // Controls: the listed host itself, and the simulator's own links, still work.
    let controls = [
        image("listed-flux", json!({})),
        image("flux-dev", json!({})),
    ];
    let items: Vec<Value> = cases
        .iter()
        .map(|c| c.1.clone())
        .chain(controls.iter().cloned())
        .collect();
    let jobs = s.run_batch_as(&s.key, &items, WAIT).await;
    for ((label, _, kind, text), job) in cases.iter().zip(&jobs) {
        assert_failed(label, job, kind, text);
    }
    for job in &jobs[cases.len()..] {
        assert_eq!(job["status"], "PROCESSED", "control: {job}");
    }
    assert_eq!(internal.hits(), 0, "an internal address was contacted");
    // The refused poll URL's prediction was cancelled at the provider, on its own origin.
    assert_eq!(s.sim().stats().predictions_cancelled, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_answers_fail_and_sim_fields_reach_only_the_simulator() {
    let s = Stack::start_with(options(&[InferenceType::Llm]), |s| {
        let mut plain = copy_provider(s, "sim-openai", "not-a-simulator");
        plain.simulator = false;
        s.providers.push(plain);
        add_model(s, "plain", "/v1/completions", "not-a-simulator", None);
    })
    .await;
    let completion = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "prompt": "hello"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        item("/v1/completions", b)
    };

    // A provider that is not the simulator never sees sim_* fields: this would fail (400).
    s.sim().reset_stats();
    let jobs = s
        .run_batch_as(
            &s.key,
            &[completion(
                "plain",
                json!({"sim_fail": "fatal", "sim_answer_bytes": 10_000_000}),
            )],
            WAIT,
        )
        .await;
    assert_eq!(jobs[0]["status"], "PROCESSED", "{}", jobs[0]);
    let stats = s.sim().stats();
    assert_eq!(stats.by_path.get("/v1/completions"), Some(&1), "{stats:?}");
    assert!(stats.sim_fields.is_empty(), "{stats:?}");

    let big = 5 * 1024 * 1024;
    let jobs = s
        .run_batch_as(
            &s.key,
            &[
                completion("qwen3-8b", json!({"sim_answer_bytes": big})),
                // No declared length: the cap stops the read while streaming.
                completion(
                    "qwen3-8b",
                    json!({"sim_answer_bytes": big, "sim_slow_body_ms": 10}),
                ),
                completion("qwen3-8b", json!({"sim_answer_bytes": 1024 * 1024})),
            ],
            WAIT,
        )
        .await;
    for (label, job) in ["declared", "streamed"].iter().zip(&jobs) {
        assert_failed(
            label,
            job,
            "response_too_large",
            "larger than the 4194304 byte limit",
        );
    }
    assert_eq!(jobs[2]["status"], "PROCESSED", "under the cap: {}", jobs[2]);
    // The simulator itself still gets them.
    let stats = s.sim().stats();
    assert_eq!(
        stats.sim_fields.get("sim_answer_bytes"),
        Some(&3),
        "{stats:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_429_does_not_pause_the_provider_for_another() {
    let s = Stack::start_with(options(&[InferenceType::Llm]), |_| {}).await;
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    // Alice's request is one the provider rate-limits, asking for a long wait.
    let (status, a) = s
        .post(
            "/v1/batches",
            &json!({"requests": [item("/v1/completions", json!({"model": "qwen3-8b",
                "prompt": "a", "sim_fail": "rate_limit", "sim_retry_after": 60}))]}),
        )
        .await;
    assert_eq!(status, 202, "{a}");
    let deadline = Instant::now() + WAIT;
    while s.sim().stats().status_429 == 0 {
        assert!(Instant::now() < deadline, "no 429 yet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Bob's jobs on the same provider do not wait out Alice's Retry-After.
    let started = Instant::now();
    let items: Vec<Value> = (0..3)
        .map(|i| {
            item(
                "/v1/completions",
                json!({"model": "qwen3-8b", "prompt": format!("b{i}")}),
            )
        })
        .collect();
    let jobs = s.run_batch_as(&bob, &items, WAIT).await;
    assert!(jobs.iter().all(|j| j["status"] == "PROCESSED"), "{jobs:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bob waited {:?} behind alice's 429",
        started.elapsed()
    );
    // Alice's job waits for its own retry.
    let (_, a_now) = s
        .get(&format!("/v1/batches/{}", a["id"].as_str().unwrap()))
        .await;
    assert_ne!(a_now["status"], "DONE", "{a_now}");
    let (status, _) = s
        .post_empty(&format!("/v1/batches/{}/cancel", a["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    s.stop().await;
}
