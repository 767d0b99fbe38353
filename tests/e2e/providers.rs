//! The provider layer end to end: every adapter against the simulator (or the real espeak-ng)
//! over real HTTP, through the whole stack, with each failure mode ending in PROCESSED or
//! FAILED with a clear error; the provider concurrency limit; fall-over to a second provider;
//! token usage summed per batch. (Signed-URL tampering and expiry are in tests/e2e/batches.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_config::{ProviderConfig, ProviderKind, Route, Settings};
use volley_domain::InferenceType;
use volley_harness::{Options, Stack};

const WAIT: Duration = Duration::from_secs(40);

fn item(endpoint: &str, body: Value) -> Value {
    json!({"endpoint": endpoint, "body": body})
}

fn options(workers: &[InferenceType]) -> Options {
    Options {
        workers: workers.to_vec(),
        ..Options::default()
    }
}

/// A copy of an existing provider under another name (same simulator).
fn copy_provider(s: &Settings, from: &str, name: &str) -> ProviderConfig {
    let mut p = s.provider(from).unwrap().clone();
    p.name = name.into();
    p
}

fn add_model(s: &mut Settings, name: &str, endpoints: &[&str], routes: &[(&str, Option<&str>)]) {
    s.models.push(volley_config::ModelConfig {
        name: name.into(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        routes: routes
            .iter()
            .map(|(p, u)| Route {
                provider: p.to_string(),
                upstream_model: u.map(str::to_owned),
            })
            .collect(),
    });
}

/// Submits a batch and waits until every job is terminal; returns the batch and each job's
/// full view, in request order.
async fn run_batch(s: &Stack, items: &[Value]) -> (Value, Vec<Value>) {
    let (status, b) = s.post("/v1/batches", &json!({"requests": items})).await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let done = s.wait_done(&id, WAIT).await;
    let mut jobs = Vec::new();
    for j in done["jobs"].as_array().unwrap() {
        let (status, job) = s
            .get(&format!("/v1/jobs/{}", j["id"].as_str().unwrap()))
            .await;
        assert_eq!(status, 200, "{job}");
        jobs.push(job);
    }
    (done, jobs)
}

/// What a job must have ended as.
enum Want<'a> {
    /// PROCESSED after this many attempts, the earlier ones' error mentioning the text.
    Processed(i64, &'a str),
    /// FAILED with this error type after this many attempts, the message mentioning the text.
    Failed(&'a str, i64, &'a str),
}

fn check(label: &str, job: &Value, want: &Want<'_>) {
    let msg = job["error"]["message"].as_str().unwrap_or("");
    match want {
        Want::Processed(attempts, last) => {
            assert_eq!(job["status"], "PROCESSED", "{label}: {job}");
            assert_eq!(job["attempts"], *attempts, "{label}: {job}");
            if !last.is_empty() {
                let le = job["last_error"].as_str().unwrap_or("");
                assert!(
                    le.contains(last),
                    "{label}: last_error {le:?} lacks {last:?}"
                );
            }
        }
        Want::Failed(kind, attempts, text) => {
            assert_eq!(job["status"], "FAILED", "{label}: {job}");
            assert_eq!(job["error"]["type"], *kind, "{label}: {job}");
            assert_eq!(job["attempts"], *attempts, "{label}: {job}");
            assert!(msg.contains(text), "{label}: error {msg:?} lacks {text:?}");
        }
    }
}

/// Downloads a media link of a result and checks its content type and first bytes.
async fn fetch_media(s: &Stack, url: &str, content_type: &str, magic: &[u8]) -> usize {
    assert!(url.starts_with(&format!("{}/v1/media/", s.url)), "{url}");
    let r = s.http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(r.headers()["content-type"], content_type, "{url}");
    let body = r.bytes().await.unwrap();
    assert!(body.starts_with(magic), "{url}: not {content_type}");
    body.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_adapter_outcomes_per_endpoint() {
    let s = Stack::start_with(
        options(&[InferenceType::Llm, InferenceType::Image, InferenceType::Tts]),
        |s| {
            let mut short = copy_provider(s, "sim-openai", "sim-openai-short");
            short.timeout_ms = 300;
            s.providers.push(short);
            add_model(
                s,
                "slow-everything",
                &[
                    "/v1/chat/completions",
                    "/v1/completions",
                    "/v1/images/generations",
                    "/v1/audio/speech",
                ],
                &[("sim-openai-short", None)],
            );
            s.media.max_bytes = 200_000;
        },
    )
    .await;

    let msgs = json!([{"role": "user", "content": "Describe a lamp in five words."}]);
    // (label, endpoint, body without sim fields, whether it produces media)
    let kinds: Vec<(&str, &str, Value, bool)> = vec![
        (
            "chat",
            "/v1/chat/completions",
            json!({"model": "qwen3-8b", "messages": msgs}),
            false,
        ),
        (
            "completion",
            "/v1/completions",
            json!({"model": "qwen3-8b", "prompt": "Once upon a time", "max_tokens": 8}),
            false,
        ),
        (
            "image-url",
            "/v1/images/generations",
            json!({"model": "flux-dev", "prompt": "a lamp"}),
            true,
        ),
        (
            "image-b64",
            "/v1/images/generations",
            json!({"model": "flux-dev", "prompt": "a lamp", "response_format": "b64_json"}),
            true,
        ),
        (
            "speech",
            "/v1/audio/speech",
            json!({"model": "tts-1", "input": "hello there", "voice": "alloy"}),
            true,
        ),
    ];
    let mut items = Vec::new();
    let mut wants: Vec<(String, Want<'static>)> = Vec::new();
    for (label, endpoint, body, media) in &kinds {
        let with = |extra: Value| {
            let mut b = body.clone();
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            item(endpoint, b)
        };
        items.push(with(json!({})));
        wants.push((format!("{label} ok"), Want::Processed(1, "")));
        items.push(with(json!({"sim_fail": "rate_limit", "sim_fail_times": 2,
            "sim_retry_after": 0, "sim_key": format!("{label}-429")})));
        wants.push((format!("{label} 429 storm"), Want::Processed(3, "429")));
        items.push(with(json!({"sim_fail": "retryable", "sim_fail_times": 2,
            "sim_key": format!("{label}-500")})));
        wants.push((format!("{label} 500s"), Want::Processed(3, "HTTP 500")));
        items.push(with(
            json!({"model": "slow-everything", "sim_latency_ms": 3_000}),
        ));
        wants.push((
            format!("{label} timeout"),
            Want::Failed("provider_error", 4, "timed out"),
        ));
        items.push(with(json!({"sim_fail": "malformed"})));
        wants.push((
            format!("{label} malformed"),
            Want::Failed("provider_error", 4, "malformed response"),
        ));
        if *media {
            items.push(with(json!({"sim_media_bytes": 1_000_000})));
            wants.push((
                format!("{label} oversize"),
                Want::Failed("media_too_large", 1, "200000 byte limit"),
            ));
            items.push(with(json!({"sim_fail": "fatal"})));
            wants.push((
                format!("{label} 400"),
                Want::Failed("invalid_request", 1, "refused the request (HTTP 400)"),
            ));
        }
    }
    let (batch, jobs) = run_batch(&s, &items).await;
    assert_eq!(jobs.len(), wants.len());
    for ((label, want), job) in wants.iter().zip(&jobs) {
        check(label, job, want);
    }

    // Media of the successful jobs is ours, signed, with the right type.
    for (label, job) in wants.iter().map(|w| &w.0).zip(&jobs) {
        if job["status"] != "PROCESSED" {
            continue;
        }
        if label.starts_with("image") {
            let d = &job["result"]["data"][0];
            assert_eq!(d["content_type"], "image/png", "{label}");
            assert!(d.get("b64_json").is_none(), "{label}: inline image kept");
            fetch_media(&s, d["url"].as_str().unwrap(), "image/png", b"\x89PNG").await;
        } else if label.starts_with("speech") {
            let d = &job["result"]["data"][0];
            fetch_media(&s, d["url"].as_str().unwrap(), "audio/wav", b"RIFF").await;
        }
    }

    // Usage: every LLM job that succeeded reported tokens, and the batch sums them.
    let llm: Vec<&Value> = jobs
        .iter()
        .filter(|j| j["inference_type"] == "LLM" && j["status"] == "PROCESSED")
        .collect();
    assert_eq!(llm.len(), 6);
    let sum = |k: &str| -> i64 { llm.iter().map(|j| j["usage"][k].as_i64().unwrap()).sum() };
    assert!(sum("total_tokens") > 0);
    assert_eq!(
        batch["usage"],
        json!({"prompt_tokens": sum("prompt_tokens"), "completion_tokens": sum("completion_tokens"),
               "total_tokens": sum("total_tokens"), "jobs": 6}),
        "{batch}"
    );
    assert!(s.sim().stats().status_429 >= 10);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_adapter_outcomes_per_media_kind() {
    let s = Stack::start_with(
        options(&[
            InferenceType::Video,
            InferenceType::Music,
            InferenceType::Image,
        ]),
        |s| {
            for p in &mut s.providers {
                p.poll_interval_ms = 20;
            }
            let mut short = copy_provider(s, "sim-predictions", "sim-predictions-short");
            short.timeout_ms = 300;
            s.providers.push(short);
            add_model(
                s,
                "pred-image",
                &["/v1/images/generations"],
                &[("sim-predictions", Some("sim/flux-image"))],
            );
            add_model(
                s,
                "short-video",
                &["/v1/videos/generations"],
                &[("sim-predictions-short", Some("sim/video-1"))],
            );
            s.media.max_bytes = 200_000;
        },
    )
    .await;

    let kinds = [
        (
            "video",
            "/v1/videos/generations",
            "sim-video",
            "video/mp4",
            &b"\0\0\0"[..],
        ),
        (
            "music",
            "/v1/music/generations",
            "sim-music",
            "audio/wav",
            &b"RIFF"[..],
        ),
        (
            "image",
            "/v1/images/generations",
            "pred-image",
            "image/png",
            &b"\x89PNG"[..],
        ),
    ];
    let mut items = Vec::new();
    let mut wants: Vec<(String, Want<'static>)> = Vec::new();
    for (label, endpoint, model, _, _) in kinds {
        let with = |extra: Value| {
            let mut b =
                json!({"model": model, "prompt": format!("a {label}"), "sim_latency_ms": 30});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            item(endpoint, b)
        };
        items.push(with(json!({})));
        wants.push((format!("{label} ok"), Want::Processed(1, "")));
        items.push(with(json!({"sim_fail": "rate_limit", "sim_fail_times": 2,
            "sim_retry_after": 0, "sim_key": format!("p-{label}-429")})));
        wants.push((format!("{label} 429 storm"), Want::Processed(3, "429")));
        items.push(with(json!({"sim_fail": "retryable", "sim_fail_times": 2,
            "sim_key": format!("p-{label}-500")})));
        wants.push((format!("{label} 500s"), Want::Processed(3, "HTTP 500")));
        items.push(with(json!({"sim_fail": "malformed"})));
        wants.push((
            format!("{label} malformed"),
            Want::Failed("provider_error", 4, "malformed response"),
        ));
        items.push(with(json!({"sim_media_bytes": 1_000_000})));
        wants.push((
            format!("{label} oversize"),
            Want::Failed("media_too_large", 1, "200000 byte limit"),
        ));
        items.push(with(json!({"sim_fail": "fatal"})));
        wants.push((
            format!("{label} failed prediction"),
            Want::Failed("provider_error", 1, "prediction failed"),
        ));
    }
    // A prediction that outlives the provider's timeout is cancelled upstream and retried.
    items.push(item(
        "/v1/videos/generations",
        json!({"model": "short-video", "prompt": "slow", "sim_latency_ms": 5_000}),
    ));
    wants.push((
        "video timeout".into(),
        Want::Failed("provider_error", 4, "did not finish within 300 ms"),
    ));

    let (_, jobs) = run_batch(&s, &items).await;
    assert_eq!(jobs.len(), wants.len());
    for ((label, want), job) in wants.iter().zip(&jobs) {
        check(label, job, want);
    }
    for (label, _, _, content_type, magic) in kinds {
        let job = &jobs[wants
            .iter()
            .position(|w| w.0 == format!("{label} ok"))
            .unwrap()];
        let d = &job["result"]["data"][0];
        assert_eq!(d["content_type"], content_type, "{label}: {job}");
        assert!(job["result"]["prediction_id"].is_string(), "{job}");
        let n = fetch_media(&s, d["url"].as_str().unwrap(), content_type, magic).await;
        assert_eq!(d["bytes"], n as u64);
    }
    assert!(
        s.sim().stats().predictions_cancelled >= 4,
        "{:?}",
        s.sim().stats()
    );
    s.stop().await;
}

/// A stand-in for espeak-ng that records its process id and then hangs, to see that Volley
/// kills it on timeout and on cancellation.
fn hanging_program(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let pids = dir.join(format!("{name}.pids"));
    let script = dir.join(format!("{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ >> '{}'\nexec sleep 60\n",
            pids.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, pids)
}

fn pids(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Gone, or a zombie waiting to be reaped: either way it no longer runs.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

async fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn espeak_speaks_real_wav_and_refuses_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let (hang_short, short_pids) = hanging_program(tmp.path(), "short");
    let (hang_long, long_pids) = hanging_program(tmp.path(), "long");
    let s = Stack::start_with(options(&[InferenceType::Tts]), |s| {
        for (name, program, timeout_ms) in [
            ("espeak-hangs-short", &hang_short, 300),
            ("espeak-hangs-long", &hang_long, 60_000),
        ] {
            s.providers.push(ProviderConfig {
                name: name.into(),
                kind: ProviderKind::Espeak,
                command: Some(program.to_string_lossy().into_owned()),
                timeout_ms,
                ..copy_provider(s, "espeak", name)
            });
            add_model(s, name, &["/v1/audio/speech"], &[(name, None)]);
        }
        s.media.max_bytes = 200_000;
    })
    .await;

    let speech = |body: Value| item("/v1/audio/speech", body);
    let long_text = "Volley speaks this sentence again and again. ".repeat(80);
    let items = vec![
        speech(json!({"model": "espeak", "input": "Hello from Volley."})),
        speech(
            json!({"model": "espeak", "input": "Faster, please.", "voice": "nova", "speed": 1.5}),
        ),
        speech(
            json!({"model": "espeak", "input": "-s 9000 is text, not an option", "voice": "en-gb"}),
        ),
        speech(json!({"model": "espeak", "input": "hi", "voice": "xx-nothing"})),
        speech(json!({"model": "espeak", "input": "hi", "voice": "-w/tmp/evil"})),
        speech(json!({"model": "espeak", "input": "hi", "response_format": "mp3"})),
        speech(json!({"model": "espeak", "input": long_text})),
        speech(json!({"model": "espeak-hangs-short", "input": "never"})),
    ];
    let wants = [
        ("default voice", Want::Processed(1, "")),
        ("nova", Want::Processed(1, "")),
        ("en-gb", Want::Processed(1, "")),
        (
            "unknown voice",
            Want::Failed(
                "invalid_request",
                1,
                "espeak-ng has no voice \"xx-nothing\"",
            ),
        ),
        (
            "hostile voice",
            Want::Failed("invalid_request", 1, "neither an OpenAI voice"),
        ),
        ("mp3", Want::Failed("invalid_request", 1, "WAV only")),
        (
            "oversize",
            Want::Failed("media_too_large", 1, "200000 byte limit"),
        ),
        (
            "timeout",
            Want::Failed("provider_error", 4, "did not finish within 300 ms"),
        ),
    ];
    let (_, jobs) = run_batch(&s, &items).await;
    assert_eq!(jobs.len(), wants.len());
    for ((label, want), job) in wants.iter().zip(&jobs) {
        check(label, job, want);
    }
    for (i, voice, wpm) in [(0, "en-us", 175), (1, "en-us+f3", 263), (2, "en-gb", 175)] {
        let r = &jobs[i]["result"];
        assert_eq!(r["voice"], voice, "{r}");
        assert_eq!(r["words_per_minute"], wpm, "{r}");
        assert_eq!(r["data"][0]["content_type"], "audio/wav");
        let n = fetch_media(
            &s,
            r["data"][0]["url"].as_str().unwrap(),
            "audio/wav",
            b"RIFF",
        )
        .await;
        // Real speech: 22 kHz 16-bit mono, well over a few thousand bytes for a sentence.
        assert!(n > 10_000, "{n} bytes");
    }
    let timeouts = pids(&short_pids);
    assert_eq!(timeouts.len(), 4, "one run per attempt");
    for pid in timeouts {
        wait_dead(pid).await;
    }

    // Cancelling a running job kills its espeak-ng.
    let (status, b) = s
        .post(
            "/v1/batches",
            &json!({"requests": [speech(json!({"model": "espeak-hangs-long", "input": "x"}))]}),
        )
        .await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let pid = loop {
        if let Some(pid) = pids(&long_pids).first() {
            break *pid;
        }
        assert!(Instant::now() < deadline, "the program never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(running(pid));
    let (status, c) = s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["cancelled"], 1, "{c}");
    wait_dead(pid).await;
    assert_eq!(pids(&long_pids).len(), 1, "not started again");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_concurrency_limit_is_honoured() {
    let s = Stack::start_with(options(&[InferenceType::Llm]), |s| {
        s.worker.concurrency = 32;
        for p in &mut s.providers {
            p.max_concurrency = 4;
        }
    })
    .await;
    let items: Vec<Value> = (0..40)
        .map(|i| {
            item(
                "/v1/completions",
                json!({"model": "qwen3-8b", "prompt": format!("job {i}"), "sim_latency_ms": 300}),
            )
        })
        .collect();
    let (status, b) = s.post("/v1/batches", &json!({"requests": items})).await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    // While it runs, the worker holds many more jobs than the provider may take.
    let mut worker_max = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        worker_max = worker_max.max(s.worker_in_flight().await);
        let (_, now) = s.get(&format!("/v1/batches/{id}")).await;
        if now["status"] == "DONE" {
            assert_eq!(now["processed"], 40, "{now}");
            break;
        }
        assert!(Instant::now() < deadline, "{now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = s.sim().stats();
    assert_eq!(stats.max_in_flight, 4, "{stats:?}");
    assert!(
        worker_max > 4,
        "the worker ran {worker_max} at most: the limit was not the provider's"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rate_spaces_out_llm_calls() {
    let s = Stack::start_with(options(&[InferenceType::Llm]), |s| {
        // One token per second, a bucket of 60; each job below is estimated at 1 + 30 = 31.
        let mut p = copy_provider(s, "sim-openai", "sim-openai-tpm");
        p.tokens_per_minute = Some(60);
        s.providers.push(p);
        add_model(
            s,
            "tpm-limited",
            &["/v1/completions"],
            &[("sim-openai-tpm", None)],
        );
    })
    .await;
    // Slow calls: the first one's reservation is not corrected (refunded) before the second
    // job has reserved, whichever order the jobs arrive in.
    let items: Vec<Value> = (0..2)
        .map(|i| {
            item(
                "/v1/completions",
                json!({"model": "tpm-limited", "prompt": "x", "max_tokens": 30,
                       "user": format!("u{i}"), "sim_latency_ms": 3_000}),
            )
        })
        .collect();
    let (status, b) = s.post("/v1/batches", &json!({"requests": items})).await;
    assert_eq!(status, 202, "{b}");
    let calls = || {
        s.sim()
            .stats()
            .by_path
            .get("/v1/completions")
            .copied()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while calls() == 0 {
        assert!(Instant::now() < deadline, "no call started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The second job is 2 tokens short: it may start only about 2 s later.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(calls(), 1, "the second call did not wait for tokens");
    let done = s.wait_done(b["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(done["processed"], 2, "{done}");
    assert_eq!(calls(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fall_over_to_the_next_provider_and_4xx_is_not_retried() {
    // A port nothing listens on: every call to it fails to connect.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = Stack::start_with(options(&[InferenceType::Llm]), |s| {
        for name in ["dead-a", "dead-b"] {
            let mut p = copy_provider(s, "sim-openai", name);
            p.base_url = format!("http://127.0.0.1:{closed}/v1");
            s.providers.push(p);
        }
        let eps = ["/v1/completions"];
        add_model(
            s,
            "fallover",
            &eps,
            &[("dead-a", None), ("sim-openai", Some("qwen"))],
        );
        add_model(s, "all-dead", &eps, &[("dead-a", None), ("dead-b", None)]);
        add_model(
            s,
            "fatal-first",
            &eps,
            &[("sim-openai", None), ("dead-a", None)],
        );
    })
    .await;
    let items = [
        item(
            "/v1/completions",
            json!({"model": "fallover", "prompt": "fall over"}),
        ),
        item(
            "/v1/completions",
            json!({"model": "all-dead", "prompt": "nowhere"}),
        ),
        item(
            "/v1/completions",
            json!({"model": "fatal-first", "prompt": "bad", "sim_fail": "fatal"}),
        ),
    ];
    let (_, jobs) = run_batch(&s, &items).await;
    // Four attempts over two routes: two on the dead provider, then the simulator.
    check(
        "fallover",
        &jobs[0],
        &Want::Processed(3, "dead-a: connection failed"),
    );
    assert_eq!(
        jobs[0]["result"]["model"], "qwen",
        "the upstream name was sent"
    );
    check(
        "all dead",
        &jobs[1],
        &Want::Failed(
            "provider_error",
            4,
            "gave up after 4 attempts: dead-b: connection failed",
        ),
    );
    // A 400 is about the request: neither retried nor sent to the next provider.
    check(
        "4xx",
        &jobs[2],
        &Want::Failed(
            "invalid_request",
            1,
            "sim-openai refused the request (HTTP 400)",
        ),
    );
    assert_eq!(
        jobs[2]["last_error"], jobs[2]["error"]["message"],
        "no earlier attempt"
    );
    assert_eq!(s.sim().stats().by_path["/v1/completions"], 2);
    s.stop().await;
}
