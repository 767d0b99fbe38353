//! End-to-end tests over real HTTP against a simulator on an ephemeral port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use provider_sim::{SimConfig, SimHandle, spawn};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::time::{Duration, Instant};

async fn start(config: SimConfig) -> SimHandle {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    spawn(listener, config).await.unwrap()
}

async fn fast() -> SimHandle {
    start(SimConfig {
        latency_ms: 5,
        ..SimConfig::default()
    })
    .await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(sim: &SimHandle, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post_json(sim: &SimHandle, path: &str, body: Value) -> (u16, Value) {
    let resp = post(sim, path, body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn get_json(sim: &SimHandle, path_or_url: &str) -> (u16, Value) {
    let url = if path_or_url.starts_with("http") {
        path_or_url.to_owned()
    } else {
        format!("{}{path_or_url}", sim.url())
    };
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn download(url: &str) -> (String, Option<u64>, Vec<u8>) {
    let resp = client().get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let len = resp.content_length();
    (ctype, len, resp.bytes().await.unwrap().to_vec())
}

fn assert_openai_error(body: &Value, kind: &str) {
    let err = &body["error"];
    assert!(err["message"].is_string(), "{body}");
    assert_eq!(err["type"], kind, "{body}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "{body}"
    );
}

fn decode_png(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    reader.finish().unwrap();
    (info.width, info.height)
}

fn assert_wav(bytes: &[u8]) {
    assert_eq!(&bytes[..4], b"RIFF");
    assert_eq!(&bytes[8..12], b"WAVE");
    assert_eq!(&bytes[12..16], b"fmt ");
    assert_eq!(u16::from_le_bytes([bytes[22], bytes[23]]), 1, "mono");
    assert_eq!(
        u32::from_le_bytes(bytes[24..28].try_into().unwrap()),
        16_000
    );
    let riff = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    assert_eq!(riff + 8, bytes.len());
}

fn chat_body(text: &str) -> Value {
    json!({"model": "sim-chat", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text}
    ]})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn health_models_stats_and_unknown_route() {
    let sim = fast().await;
    assert_eq!(
        get_json(&sim, "/healthz").await,
        (200, json!({"status": "ok"}))
    );
    let (status, models) = get_json(&sim, "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert!(!models["data"].as_array().unwrap().is_empty());

    let (status, body) = get_json(&sim, "/v1/nope").await;
    assert_eq!(status, 404);
    assert_openai_error(&body, "invalid_request_error");

    let (_, stats) = get_json(&sim, "/sim/stats").await;
    assert_eq!(stats["requests"], 2, "healthz and /sim are not counted");
    assert_eq!(stats["by_path"]["/v1/models"], 1);
    assert_eq!(stats["by_path"]["<unmatched>"], 1);
    let (status, _) = post_json(&sim, "/sim/reset", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(sim.stats().requests, 0);
    sim.stop().await;
}

/// The default (current-thread) test runtime must work too.
#[tokio::test]
async fn runs_on_current_thread_runtime() {
    let sim = fast().await;
    let (status, body) = post_json(&sim, "/v1/chat/completions", chat_body("hi")).await;
    assert_eq!(status, 200, "{body}");
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completion_shape() {
    let sim = fast().await;
    let (status, body) = post_json(
        &sim,
        "/v1/chat/completions",
        chat_body("tell me a story about a cat"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_i64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "sim-chat");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        "Simulated reply to: tell me a story about a cat"
    );
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], 9);
    assert_eq!(usage["completion_tokens"], 10);
    assert_eq!(usage["total_tokens"], 19);
    assert_eq!(sim.stats().by_path["/v1/chat/completions"], 1);

    // max_tokens truncates and reports "length".
    let (_, body) = post_json(
        &sim,
        "/v1/chat/completions",
        with(chat_body("one two three four"), json!({"max_tokens": 3})),
    )
    .await;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Simulated reply to:"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn text_completion_shape() {
    let sim = fast().await;
    let (status, body) = post_json(
        &sim,
        "/v1/completions",
        json!({"model": "sim-completion", "prompt": "hello there"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "sim-completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "Simulated reply to: hello there");
    assert_eq!(choice["index"], 0);
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 2);
    assert_eq!(body["usage"]["total_tokens"], 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn image_urls_serve_real_distinct_pngs() {
    let sim = fast().await;
    let (status, body) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "sim-image", "prompt": "a red fox", "n": 2, "size": "48x32"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["created"].is_i64());
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let mut images = Vec::new();
    for item in data {
        let url = item["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/files/", sim.url())), "{url}");
        let (ctype, len, bytes) = download(url).await;
        assert_eq!(ctype, "image/png");
        assert_eq!(len, Some(bytes.len() as u64));
        assert_eq!(decode_png(&bytes), (48, 32));
        images.push(bytes);
    }
    assert_ne!(images[0], images[1]);

    let (_, other) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "sim-image", "prompt": "a blue whale", "size": "48x32"}),
    )
    .await;
    let (_, _, bytes) = download(other["data"][0]["url"].as_str().unwrap()).await;
    assert_ne!(bytes, images[0], "different prompts give different images");

    let (status, body) = get_json(&sim, "/files/does-not-exist.png").await;
    assert_eq!(status, 404);
    assert_openai_error(&body, "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_b64_json_decodes_to_png() {
    let sim = fast().await;
    let (status, body) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "sim-image", "prompt": "tiny", "response_format": "b64_json"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let item = &body["data"][0];
    assert!(item["revised_prompt"].is_string());
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(item["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(decode_png(&bytes), (64, 64));
}

#[tokio::test(flavor = "multi_thread")]
async fn speech_returns_real_wav() {
    let sim = fast().await;
    let resp = post(
        &sim,
        "/v1/audio/speech",
        json!({"model": "sim-tts", "input": "one two three four", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    let bytes = resp.bytes().await.unwrap();
    assert_wav(&bytes);
    // 4 words * 50 ms at 16 kHz mono 16-bit.
    assert_eq!(bytes.len(), 44 + 4 * 800 * 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn sim_media_bytes_grows_media_and_stays_valid() {
    let sim = fast().await;
    let target = 3 * 1024 * 1024 + 7;
    let (_, body) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "m", "prompt": "big", "sim_media_bytes": target}),
    )
    .await;
    let (_, len, bytes) = download(body["data"][0]["url"].as_str().unwrap()).await;
    assert_eq!(len, Some(bytes.len() as u64));
    assert!(bytes.len() >= target);
    assert_eq!(decode_png(&bytes), (64, 64));

    let (_, body) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "m", "prompt": "big", "sim_media_bytes": 300_000, "response_format": "b64_json"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert!(bytes.len() >= 300_000);
    decode_png(&bytes);

    let resp = post(
        &sim,
        "/v1/audio/speech",
        json!({"model": "m", "input": "hi", "sim_media_bytes": 1_000_000}),
    )
    .await;
    assert_eq!(resp.content_length(), Some(1_000_000));
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.len(), 1_000_000);
    assert_wav(&bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn sim_latency_ms_is_respected() {
    let sim = fast().await;
    let started = Instant::now();
    let (status, _) = post_json(
        &sim,
        "/v1/completions",
        json!({"model": "m", "prompt": "p", "sim_latency_ms": 400}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_modes() {
    let sim = fast().await;
    let chat = |mode: &str| with(chat_body("x"), json!({"sim_fail": mode}));

    let (status, body) = post_json(&sim, "/v1/chat/completions", chat("retryable")).await;
    assert_eq!(status, 500);
    assert_openai_error(&body, "server_error");
    assert_eq!(body["error"]["message"], "simulated upstream failure");

    let (status, body) = post_json(&sim, "/v1/chat/completions", chat("fatal")).await;
    assert_eq!(status, 400);
    assert_openai_error(&body, "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("simulated invalid request")
    );

    let resp = post(&sim, "/v1/chat/completions", chat("rate_limit")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_openai_error(&resp.json().await.unwrap(), "rate_limit_error");
    let resp = post(
        &sim,
        "/v1/chat/completions",
        with(chat("rate_limit"), json!({"sim_retry_after": 7})),
    )
    .await;
    assert_eq!(resp.headers()["retry-after"], "7");

    let (status, body) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"prompt": "p", "sim_fail": "malformed"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"unexpected": true})));
    let resp = post(
        &sim,
        "/v1/audio/speech",
        json!({"model": "m", "input": "i", "sim_fail": "malformed"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), "{}");

    let stats = sim.stats();
    assert_eq!(stats.status_429, 2);
    assert_eq!(stats.status_5xx, 1);

    let (status, body) = post_json(&sim, "/v1/chat/completions", chat("bogus")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "sim_fail");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_mode_makes_client_time_out() {
    let sim = fast().await;
    let err = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .timeout(Duration::from_millis(300))
        .json(&with(chat_body("x"), json!({"sim_fail": "timeout"})))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");

    // With an explicit sim_latency_ms the hang is bounded and ends in a 504.
    let (status, body) = post_json(
        &sim,
        "/v1/chat/completions",
        with(
            chat_body("x"),
            json!({"sim_fail": "timeout", "sim_latency_ms": 100}),
        ),
    )
    .await;
    assert_eq!(status, 504);
    assert_openai_error(&body, "server_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_times_then_success() {
    let sim = fast().await;
    let body = with(
        chat_body("x"),
        json!({"sim_fail": "retryable", "sim_fail_times": 2, "sim_key": "job-1"}),
    );
    for _ in 0..2 {
        assert_eq!(
            post(&sim, "/v1/chat/completions", body.clone())
                .await
                .status(),
            500
        );
    }
    assert_eq!(
        post(&sim, "/v1/chat/completions", body.clone())
            .await
            .status(),
        200
    );
    assert_eq!(post(&sim, "/v1/chat/completions", body).await.status(), 200);

    // Without sim_key the body (minus sim_* fields) is the key: a 429 storm
    // for one request does not affect a different one.
    let storm = |text: &str, latency: u64| {
        with(
            chat_body(text),
            json!({"sim_fail": "rate_limit", "sim_fail_times": 3, "sim_latency_ms": latency}),
        )
    };
    for i in 0..3 {
        let status = post(&sim, "/v1/chat/completions", storm("a", i))
            .await
            .status();
        assert_eq!(status, 429);
    }
    assert_eq!(
        post(&sim, "/v1/chat/completions", storm("b", 0))
            .await
            .status(),
        429
    );
    assert_eq!(
        post(&sim, "/v1/chat/completions", storm("a", 0))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_in_flight_counts_concurrent_calls() {
    let sim = fast().await;
    let calls = (0..8).map(|i| {
        let sim = &sim;
        async move {
            post(
                sim,
                "/v1/completions",
                json!({"model": "m", "prompt": format!("p{i}"), "sim_latency_ms": 1000}),
            )
            .await
            .status()
        }
    });
    let statuses = futures::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200));
    let stats = sim.stats();
    assert_eq!(stats.max_in_flight, 8);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.requests, 8);

    sim.reset_stats();
    assert_eq!(sim.stats().max_in_flight, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_get_openai_errors() {
    let sim = fast().await;
    let raw = |body: &'static str| {
        client()
            .post(format!("{}/v1/chat/completions", sim.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = raw("{not json").await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_openai_error(&resp.json().await.unwrap(), "invalid_request_error");
    let resp = raw("[1,2]").await.unwrap();
    assert_eq!(resp.status(), 400);

    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": 5, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (json!({"model": "m"}), "messages"),
        (json!({"model": "m", "messages": "hi"}), "messages"),
        (json!({"model": "m", "messages": []}), "messages"),
        (
            json!({"model": "m", "messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": 3}]}),
            "messages[0].content",
        ),
        (with(chat_body("x"), json!({"stream": true})), "stream"),
        (
            with(chat_body("x"), json!({"sim_latency_ms": "slow"})),
            "sim_latency_ms",
        ),
    ];
    for (body, param) in cases {
        let (status, resp) = post_json(&sim, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_openai_error(&resp, "invalid_request_error");
        assert_eq!(resp["error"]["param"], param, "{body}");
    }
    for (path, body, param) in [
        ("/v1/completions", json!({"model": "m"}), "prompt"),
        (
            "/v1/images/generations",
            json!({"prompt": "p", "n": 9}),
            "n",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "p", "size": "4096x2"}),
            "size",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "p", "response_format": "gif"}),
            "response_format",
        ),
        (
            "/v1/audio/speech",
            json!({"model": "m", "input": 1}),
            "input",
        ),
        ("/v1/predictions", json!({"input": {}}), "model"),
        (
            "/v1/predictions",
            json!({"model": "m", "input": "x"}),
            "input",
        ),
    ] {
        let (status, resp) = post_json(&sim, path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}");
        assert_eq!(resp["error"]["param"], param, "{path} {body}");
    }

    let huge = format!(
        "{{\"model\":\"m\",\"prompt\":\"{}\"}}",
        "a".repeat(9 * 1024 * 1024)
    );
    let resp = client()
        .post(format!("{}/v1/completions", sim.url()))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_openai_error(&resp.json().await.unwrap(), "invalid_request_error");
    assert_eq!(sim.stats().in_flight, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_is_enforced() {
    let sim = start(SimConfig {
        latency_ms: 1,
        required_api_key: Some("sekret".into()),
        ..SimConfig::default()
    })
    .await;
    let (status, body) = post_json(&sim, "/v1/chat/completions", chat_body("x")).await;
    assert_eq!(status, 401);
    assert_openai_error(&body, "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");

    let wrong = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .bearer_auth("nope")
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let ok = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .bearer_auth("sekret")
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(get_json(&sim, "/healthz").await.0, 200);
}

async fn create_prediction(sim: &SimHandle, body: Value) -> Value {
    let (status, pred) = post_json(sim, "/v1/predictions", body).await;
    assert_eq!(status, 201, "{pred}");
    pred
}

async fn wait_terminal(sim: &SimHandle, pred: &Value) -> Value {
    let get = pred["urls"]["get"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, p) = get_json(sim, &get).await;
        assert_eq!(status, 200);
        let s = p["status"].as_str().unwrap();
        assert!(
            ["starting", "processing", "succeeded", "failed", "canceled"].contains(&s),
            "{p}"
        );
        if ["succeeded", "failed", "canceled"].contains(&s) {
            return p;
        }
        assert!(Instant::now() < deadline, "prediction never finished: {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prediction_lifecycle_per_kind() {
    let sim = start(SimConfig {
        latency_ms: 500,
        ..SimConfig::default()
    })
    .await;
    let pred = create_prediction(
        &sim,
        json!({"model": "acme/text-to-video", "input": {"prompt": "a boat"}}),
    )
    .await;
    let id = pred["id"].as_str().unwrap();
    assert_eq!(pred["status"], "starting");
    assert_eq!(pred["model"], "acme/text-to-video");
    assert_eq!(pred["input"]["prompt"], "a boat");
    assert!(pred["output"].is_null() && pred["error"].is_null());
    assert!(pred["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        pred["urls"]["get"],
        format!("{}/v1/predictions/{id}", sim.url())
    );
    assert_eq!(
        pred["urls"]["cancel"],
        format!("{}/v1/predictions/{id}/cancel", sim.url())
    );
    assert_eq!(sim.stats().in_flight, 1);
    let done = wait_terminal(&sim, &pred).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(done["completed_at"].is_string());
    let (ctype, _, bytes) = download(done["output"].as_str().unwrap()).await;
    assert_eq!(ctype, "video/mp4");
    assert_eq!(&bytes[4..8], b"ftyp");

    // Music: single WAV URL; kind from the model name.
    let pred = create_prediction(
        &sim,
        json!({"version": "acme/musicgen", "input": {"prompt": "jazz", "duration": 1.5, "sim_latency_ms": 10}}),
    )
    .await;
    let done = wait_terminal(&sim, &pred).await;
    let (ctype, _, bytes) = download(done["output"].as_str().unwrap()).await;
    assert_eq!(ctype, "audio/wav");
    assert_wav(&bytes);
    assert_eq!(bytes.len(), 44 + 24_000 * 2);

    // Image: a list of PNG URLs; input.kind overrides the model name.
    let pred = create_prediction(
        &sim,
        json!({"model": "acme/anything", "sim_latency_ms": 10,
               "input": {"prompt": "cat", "kind": "image", "num_outputs": 2, "width": 40, "height": 30}}),
    )
    .await;
    let done = wait_terminal(&sim, &pred).await;
    let urls = done["output"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    for url in urls {
        let (ctype, _, bytes) = download(url.as_str().unwrap()).await;
        assert_eq!(ctype, "image/png");
        assert_eq!(decode_png(&bytes), (40, 30));
    }
    assert_eq!(sim.stats().in_flight, 0);
    assert!(sim.stats().by_path["/v1/predictions/{id}"] >= 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn prediction_padded_video() {
    let sim = fast().await;
    let pred = create_prediction(
        &sim,
        json!({"model": "m", "input": {"kind": "video", "sim_media_bytes": 200_000}}),
    )
    .await;
    let done = wait_terminal(&sim, &pred).await;
    let (ctype, len, bytes) = download(done["output"].as_str().unwrap()).await;
    assert_eq!(ctype, "video/mp4");
    assert_eq!(len, Some(200_000));
    assert_eq!(bytes.len(), 200_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn prediction_cancel_fail_and_errors() {
    let sim = fast().await;
    // Cancel a long-running prediction.
    let pred = create_prediction(
        &sim,
        json!({"model": "acme/video", "input": {"prompt": "p"}, "sim_latency_ms": 30_000}),
    )
    .await;
    assert_eq!(sim.stats().in_flight, 1);
    let (status, canceled) = post_json(
        &sim,
        pred["urls"]["cancel"]
            .as_str()
            .unwrap()
            .trim_start_matches(&sim.url()),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(canceled["status"], "canceled");
    let stats = sim.stats();
    assert_eq!(stats.predictions_cancelled, 1);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(wait_terminal(&sim, &pred).await["status"], "canceled");

    // Fatal: the prediction itself fails.
    let pred = create_prediction(
        &sim,
        json!({"model": "acme/video", "input": {"prompt": "p", "sim_fail": "fatal"}}),
    )
    .await;
    let done = wait_terminal(&sim, &pred).await;
    assert_eq!(done["status"], "failed");
    assert!(done["error"].as_str().unwrap().contains("simulated"));
    assert!(done["output"].is_null());

    // Retryable / rate_limit hit the create call, honouring sim_fail_times.
    let body = json!({"model": "acme/video", "input": {"prompt": "q"},
                      "sim_fail": "retryable", "sim_fail_times": 1});
    let (status, err) = post_json(&sim, "/v1/predictions", body.clone()).await;
    assert_eq!(status, 500);
    assert_openai_error(&err, "server_error");
    create_prediction(&sim, body).await;
    let resp = post(
        &sim,
        "/v1/predictions",
        json!({"model": "acme/video", "input": {"prompt": "r", "sim_fail": "rate_limit"}}),
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");

    // Unknown ids use Replicate's 404 shape.
    for (method, path) in [
        ("GET", "/v1/predictions/nope"),
        ("POST", "/v1/predictions/nope/cancel"),
    ] {
        let req = match method {
            "GET" => client().get(format!("{}{path}", sim.url())),
            _ => client().post(format!("{}{path}", sim.url())),
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"detail": "Not found."})
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn running_predictions_count_in_flight_without_polling() {
    let sim = fast().await;
    for i in 0..3 {
        create_prediction(
            &sim,
            json!({"model": "acme/flux", "input": {"prompt": format!("p{i}"), "sim_latency_ms": 1000}}),
        )
        .await;
    }
    let stats = sim.stats();
    assert_eq!((stats.in_flight, stats.max_in_flight), (3, 3));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sim.stats().in_flight, 0);
}

/// Benchmark-scale check (run with `--ignored`): 2,000 concurrent slow calls
/// are all in flight at once on a single worker.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "load check; opens 2,000 connections"]
async fn two_thousand_concurrent_slow_calls() {
    let sim = fast().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let calls = (0..2000).map(|i| {
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", sim.url());
        tokio::spawn(async move {
            client
                .post(url)
                .json(&with(
                    chat_body(&format!("m{i}")),
                    json!({"sim_latency_ms": 2000}),
                ))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| matches!(r, Ok(Ok(200)))).count();
    assert_eq!(ok, 2000);
    assert_eq!(sim.stats().max_in_flight, 2000);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefer_wait_returns_quick_predictions_finished() {
    let sim = fast().await;
    let create = |prefer: &'static str, latency: u64| {
        client()
            .post(format!("{}/v1/predictions", sim.url()))
            .header("Prefer", prefer)
            .json(&json!({"model": "sim/video-1", "input": {"prompt": "waves", "sim_latency_ms": latency}}))
            .send()
    };
    // Quicker than the wait: finished in the create's own answer.
    let r = create("wait=5", 20).await.unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["status"], "succeeded", "{p}");
    assert!(p["output"].is_string());
    // Slower than the wait: answered running once the wait is over, then polled as usual.
    let t = Instant::now();
    let p: Value = create("wait=1", 3_000).await.unwrap().json().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert!(
        ["starting", "processing"].contains(&p["status"].as_str().unwrap()),
        "{p}"
    );
    // A malformed preference is ignored rather than refused.
    let r = create("wait=soon", 0).await.unwrap();
    assert_eq!(r.status(), 201);
}

/// `sim_echo` replies with the prompt verbatim (no prefix, spacing kept), only when asked.
#[tokio::test]
async fn sim_echo_repeats_the_prompt_verbatim() {
    let sim = fast().await;
    let said = "volley-media:batches/1/1-a1-0.png  exactly";
    let (status, v) = post_json(
        &sim,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": said}], "sim_echo": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], said);
    let (status, v) = post_json(
        &sim,
        "/v1/completions",
        json!({"model": "m", "prompt": said, "sim_echo": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], said);
    let (_, v) = post_json(
        &sim,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": said}]}),
    )
    .await;
    assert_ne!(v["choices"][0]["message"]["content"], said, "opt-in only");
    let (status, _) = post_json(
        &sim,
        "/v1/completions",
        json!({"model": "m", "prompt": said, "sim_echo": "yes"}),
    )
    .await;
    assert_eq!(status, 400, "sim_echo takes a boolean");
}

#[tokio::test]
async fn hostile_behaviours_only_when_asked_and_sim_fields_are_counted() {
    let sim = fast().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // sim_media_url: the image link is the caller's choice.
    let (status, v) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "m", "prompt": "p", "sim_media_url": "http://10.0.0.1/x"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["url"], "http://10.0.0.1/x");
    // sim_redirect_to: the link answers 302 to the target.
    let target = "http://127.0.0.1:1/metrics?a=b&c=d";
    let (_, v) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "m", "prompt": "p", "sim_redirect_to": target}),
    )
    .await;
    let link = v["data"][0]["url"].as_str().unwrap();
    assert!(link.starts_with(&sim.url()), "{link}");
    let r = no_redirects.get(link).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], target);
    // sim_answer_bytes, streamed slowly with sim_slow_body_ms (no declared length).
    let started = Instant::now();
    let r = post(
        &sim,
        "/v1/completions",
        json!({"model": "m", "prompt": "p", "sim_answer_bytes": 100_000, "sim_slow_body_ms": 300}),
    )
    .await;
    assert_eq!(r.content_length(), None);
    let v: Value = r.json().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(v["choices"][0]["text"].as_str().unwrap().len() >= 100_000);
    // sim_poll_url: a prediction's urls.get; urls.cancel stays its own.
    let pred = create_prediction(
        &sim,
        json!({"version": "sim/video-1", "input": {"prompt": "p",
               "sim_poll_url": "http://169.254.169.254/x"}}),
    )
    .await;
    assert_eq!(pred["urls"]["get"], "http://169.254.169.254/x");
    assert!(
        pred["urls"]["cancel"]
            .as_str()
            .unwrap()
            .starts_with(&sim.url())
    );
    // Without them: the simulator's own links.
    let (_, v) = post_json(
        &sim,
        "/v1/images/generations",
        json!({"model": "m", "prompt": "p"}),
    )
    .await;
    assert!(
        v["data"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&sim.url())
    );
    let stats = sim.stats();
    assert_eq!(stats.sim_fields.get("sim_media_url"), Some(&1), "{stats:?}");
    assert_eq!(stats.sim_fields.get("sim_poll_url"), Some(&1), "{stats:?}");
    assert_eq!(
        stats.sim_fields.get("sim_answer_bytes"),
        Some(&1),
        "{stats:?}"
    );
    sim.reset_stats();
    assert!(sim.stats().sim_fields.is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn sim_nul_puts_u0000_in_replies_and_errors() {
    let sim = fast().await;
    let (status, body) = post_json(
        &sim,
        "/v1/chat/completions",
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "sim_nul": true}),
    )
    .await;
    assert_eq!(status, 200);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains('\0'), "{text:?}");
    let (status, body) = post_json(
        &sim,
        "/v1/completions",
        json!({"model": "m", "prompt": "hi", "sim_nul": true, "sim_fail": "fatal"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains('\0'));
    let (_, body) = post_json(
        &sim,
        "/v1/completions",
        json!({"model": "m", "prompt": "hi"}),
    )
    .await;
    assert!(!body["choices"][0]["text"].as_str().unwrap().contains('\0'));
    sim.stop().await;
}
