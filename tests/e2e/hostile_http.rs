//! The gateway under a hostile tenant (issue 14): invented methods, slow and oversized bodies,
//! floods from one key, NUL characters, malformed and deeply nested JSON, odd ids and headers,
//! and hundreds of requests at once. Every answer is in the contract's error shape, nothing
//! is a 500, and the stack is healthy at the end. Timing bounds are generous: the machines
//! running this are small and shared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use volley_domain::InferenceType;
use volley_harness::{Options, Stack};

/// Request headers as name and raw bytes (some not UTF-8).
type Headers = Vec<(&'static str, Vec<u8>)>;

/// A stack with no workers: these tests are about the gateway.
async fn gateway_only(tweak: impl FnOnce(&mut volley_config::Settings)) -> Stack {
    Stack::start_with(
        Options {
            workers: Vec::new(),
            ..Options::default()
        },
        tweak,
    )
    .await
}

fn port(s: &Stack) -> u16 {
    s.url.rsplit(':').next().unwrap().parse().unwrap()
}

fn completion(prompt: &str) -> Value {
    json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": prompt}})
}

/// Asserts the contract's error shape and returns its `type`.
fn error_type(status: u16, body: &Value) -> String {
    assert!(
        body["error"]["type"].is_string() && body["error"]["message"].is_string(),
        "{status}: not the error shape: {body}"
    );
    body["error"]["type"].as_str().unwrap().to_owned()
}

/// An HTTP/1.1 answer read off a raw socket.
struct Raw {
    status: u16,
    head: String,
    body: Value,
}

/// Reads one response from `stream`: the head, then `Content-Length` bytes of body.
async fn read_response(stream: &mut TcpStream, within: Duration) -> Raw {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let body = &buf[end + 4..end + 4 + len];
                    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
                    return Raw { status, head, body };
                }
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed without a whole response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(within, read)
        .await
        .expect("no response in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_metrics() {
    let s = gateway_only(|_| {}).await;
    let metrics = || async {
        s.http
            .get(format!("{}/metrics", s.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = metrics().await.len();
    let url = s.url.clone();
    let answered = futures::stream::iter(0..20_000)
        .map(|i| {
            let (http, url) = (s.http.clone(), url.clone());
            async move {
                let m = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
                http.request(m, format!("{url}/v1/batches/{i}"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        })
        .buffer_unordered(32)
        .filter(|r| futures::future::ready(matches!(r, Ok(s) if *s < 500)))
        .count()
        .await;
    assert_eq!(answered, 20_000, "every invented method got a 4xx");
    let text = metrics().await;
    assert!(
        text.len() < before + 8_000,
        "/metrics grew from {before} to {} bytes",
        text.len()
    );
    assert!(text.contains(r#"method="OTHER""#), "{text}");
    assert!(!text.contains("M19999X"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_an_internal_port_are_not_public() {
    let internal = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = gateway_only(|c| c.gateway.metrics_addr = Some(format!("127.0.0.1:{internal}"))).await;
    let r = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_type(404, &v), "not_found");
    let r = s
        .http
        .get(format!("http://127.0.0.1:{internal}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("volley_http_requests_total")
    );
    // The internal port serves nothing else, and the public API is unchanged.
    let (status, _) = s.get_as("/v1/batches", &s.key).await;
    assert_eq!(status, 200);
    let r = s
        .http
        .get(format!("http://127.0.0.1:{internal}/v1/batches"))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_a_big_one_413_at_once() {
    let s = gateway_only(|c| c.gateway.body_timeout_ms = 1_000).await;
    let addr = format!("127.0.0.1:{}", port(&s));

    // Slowloris: the headers, a tenth of the body, then nothing.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(
        format!(
            "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"requests\": [",
            s.key
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut slow, Duration::from_secs(15)).await;
    assert_eq!(r.status, 408, "{}", r.head);
    assert_eq!(error_type(r.status, &r.body), "request_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );

    // A declared size over the cap is refused before a byte of body is sent.
    let mut big = TcpStream::connect(&addr).await.unwrap();
    big.write_all(
        format!(
            "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            s.key,
            s.settings.gateway.max_body_bytes + 1
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut big, Duration::from_secs(5)).await;
    assert_eq!(r.status, 413, "{}", r.head);
    assert_eq!(error_type(r.status, &r.body), "too_large");

    // A streamed (chunked) body is cut off as soon as it passes the cap.
    let chunk = vec![b' '; 1 << 20];
    let n = s.settings.gateway.max_body_bytes / chunk.len() + 2;
    let stream = futures::stream::iter((0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = s
        .http
        .post(format!("{}/v1/batches", s.url))
        .bearer_auth(&s.key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    // The gateway may answer and close before the client has sent everything.
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }

    let r = s
        .http
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_is_rate_limited_with_retry_after() {
    let s = gateway_only(|c| {
        c.gateway.key_rate_per_sec = 2;
        c.gateway.key_burst = 5;
        c.gateway.key_max_in_flight = 0;
    })
    .await;
    let mut limited = Vec::new();
    for _ in 0..15 {
        let r = s
            .http
            .get(format!("{}/v1/batches", s.url))
            .bearer_auth(&s.key)
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            let after: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let v: Value = r.json().await.unwrap();
            assert_eq!(error_type(429, &v), "rate_limited");
            limited.push(after);
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert!(limited.len() >= 5, "only {} of 15 refused", limited.len());
    assert!(limited.iter().all(|a| (1..=5).contains(a)), "{limited:?}");

    // Another tenant's key is not held back by this one.
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    let (status, _) = s.get_as("/v1/batches", &bob).await;
    assert_eq!(status, 200);

    // After the wait it asked for, the key is served again.
    tokio::time::sleep(Duration::from_secs(limited[0])).await;
    let (status, _) = s.get("/v1/batches").await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_has_a_bounded_number_of_requests_in_flight() {
    let s = gateway_only(|c| {
        c.gateway.key_rate_per_sec = 0;
        c.gateway.key_max_in_flight = 2;
        c.gateway.body_timeout_ms = 30_000;
    })
    .await;
    let addr = format!("127.0.0.1:{}", port(&s));
    // Requests whose bodies never finish hold the key's slots: two are let in, the third
    // (sent when the two are surely in) is refused.
    let hold = || async {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(
            format!(
                "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Length: 100\r\n\r\n{{",
                s.key
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        c
    };
    let mut held = vec![hold().await, hold().await];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut third = hold().await;
    let r = read_response(&mut third, Duration::from_secs(10)).await;
    assert_eq!(r.status, 429, "{}", r.head);
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        r.head
    );
    assert_eq!(error_type(r.status, &r.body), "rate_limited");
    // The two held ones are still waiting for their bodies.
    for c in &mut held {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await;
        assert!(read.is_err(), "a held request was answered");
    }
    let (status, v) = s.get("/v1/batches").await;
    assert_eq!(status, 429, "{v}");
    // Another key is unaffected.
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    assert_eq!(s.get_as("/v1/batches", &bob).await.0, 200);
    // Hanging up frees the slots.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("/v1/batches").await.0 != 200 {
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_clear_400s_and_nothing_is_written() {
    let s = gateway_only(|_| {}).await;

    // NUL in a prompt, a message, a key and the label: 400 with every path, not a 500.
    let (status, v) = s
        .post(
            "/v1/batches",
            &json!({"label": "x\u{0}", "requests": [
                completion("a\u{0}b"),
                {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
                    "messages": [{"role": "user", "content": "\u{0}"}]}},
                {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "p", "k\u{0}": 1}},
                completion("fine"),
            ]}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(error_type(status, &v), "invalid_request");
    let fields: Vec<&str> = v["error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "label",
            "requests[0].body.prompt",
            "requests[1].body.messages[0].content",
            "requests[2].body"
        ],
        "{v}"
    );

    let raw = |body: Vec<u8>| {
        let (http, url, key) = (s.http.clone(), s.url.clone(), s.key.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/batches"))
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let deep_arrays = "[".repeat(100_000).into_bytes();
    let deep_objects = {
        let mut b = "{\"a\":".repeat(50_000);
        b.push('1');
        b.push_str(&"}".repeat(50_000));
        b.into_bytes()
    };
    let huge_prompt =
        serde_json::to_vec(&json!({"requests": [completion(&"x".repeat(2 << 20))]})).unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "not JSON",
            b"{\"requests\": [".to_vec(),
            400,
            "invalid_request",
        ),
        ("not UTF-8", vec![0xff, 0xfe, 0x00], 400, "invalid_request"),
        ("empty", Vec::new(), 400, "invalid_request"),
        (
            "a raw NUL",
            b"{\"requests\": [\x00]}".to_vec(),
            400,
            "invalid_request",
        ),
        ("nested arrays", deep_arrays, 400, "invalid_request"),
        ("nested objects", deep_objects, 400, "invalid_request"),
        ("a 2 MiB prompt", huge_prompt, 400, "invalid_request"),
        ("a number", b"1e999999".to_vec(), 400, "invalid_request"),
        (
            "257 items",
            serde_json::to_vec(&json!({"requests": vec![completion("p"); 257]})).unwrap(),
            400,
            "too_large",
        ),
    ];
    for (what, body, want, kind) in cases {
        let (status, v) = raw(body).await;
        assert_eq!(status, want, "{what}: {v}");
        assert_eq!(error_type(status, &v), kind, "{what}");
    }
    let (status, list) = s.get("/v1/batches").await;
    assert_eq!(status, 200);
    assert_eq!(
        list["data"].as_array().unwrap().len(),
        0,
        "nothing was written"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_ids_and_headers_are_4xx_in_the_error_shape() {
    let s = gateway_only(|_| {}).await;
    let long = "9".repeat(5_000);
    let paths = [
        "/v1/batches/%00".to_owned(),
        "/v1/batches/0".to_owned(),
        "/v1/batches/-1".to_owned(),
        "/v1/batches/99999999999999999999999999".to_owned(),
        format!("/v1/batches/{long}"),
        "/v1/batches/%E2%9C%93%F0%9F%98%80".to_owned(),
        "/v1/batches/1%2F..%2F2".to_owned(),
        "/v1/batches/%ff%fe".to_owned(),
        "/v1/jobs/%00".to_owned(),
        "/v1/jobs/1e3".to_owned(),
        format!("/v1/jobs/{long}"),
        "/v1/jobs/%E2%80%AE1".to_owned(),
    ];
    for p in &paths {
        let (status, v) = s.get(p).await;
        assert_eq!(status, 404, "{p}: {v}");
        assert_eq!(error_type(status, &v), "not_found", "{p}");
        let (status, v) = s.post_empty(&format!("{p}/cancel")).await;
        assert_eq!(status, 404, "{p}/cancel: {v}");
    }

    let get = |headers: Headers| {
        let (http, url) = (s.http.clone(), s.url.clone());
        async move {
            let mut rb = http.get(format!("{url}/v1/batches"));
            for (k, v) in headers {
                rb = rb.header(k, reqwest::header::HeaderValue::from_bytes(&v).unwrap());
            }
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let bearer = |k: &str| format!("Bearer {k}").into_bytes();
    let cases: Vec<(&str, Headers, u16)> = vec![
        ("no key", vec![], 401),
        (
            "empty bearer",
            vec![("authorization", b"Bearer ".to_vec())],
            401,
        ),
        (
            "basic",
            vec![("authorization", b"Basic YTpi".to_vec())],
            401,
        ),
        (
            "not UTF-8",
            vec![("authorization", b"Bearer \xff\xfe".to_vec())],
            401,
        ),
        (
            "a 300-byte key",
            vec![("authorization", bearer(&"k".repeat(300)))],
            401,
        ),
        (
            "an unknown key",
            vec![("authorization", bearer("vk_nope"))],
            401,
        ),
        (
            "a garbage traceparent",
            vec![
                ("authorization", bearer(&s.key)),
                ("traceparent", b"00-zz-\xff-01".to_vec()),
            ],
            200,
        ),
        (
            "a long header",
            vec![
                ("authorization", bearer(&s.key)),
                ("x-padding", vec![b'a'; 6_000]),
            ],
            200,
        ),
    ];
    for (what, headers, want) in cases {
        let (status, v) = get(headers).await;
        assert_eq!(status, want, "{what}: {v}");
        if want >= 400 {
            assert_eq!(error_type(status, &v), "unauthorized", "{what}");
        }
    }

    // Framing the server must refuse outright (not a 5xx, not a hang).
    let addr = format!("127.0.0.1:{}", port(&s));
    for head in [
        "POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_owned(),
        "POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
        format!("GET /v1/batches HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n", "h".repeat(200_000)),
    ] {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        let _ = c.write_all(head.as_bytes()).await;
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("the server neither answered nor hung up")
            .unwrap_or(0);
        let line = String::from_utf8_lossy(&buf[..n]);
        assert!(
            n == 0 || line.starts_with("HTTP/1.1 4"),
            "{}: {line}",
            &head[..40]
        );
    }
    let r = s
        .http
        .get(format!("{}/healthz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_at_once_and_the_stack_is_healthy_after() {
    let s = Stack::start_with(
        Options {
            workers: vec![InferenceType::Llm],
            ..Options::default()
        },
        |_| {},
    )
    .await;
    // Liveness is watched by its own client throughout.
    let probe = {
        let (http, url) = (
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            s.url.clone(),
        );
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for _ in 0..40 {
                let t = Instant::now();
                let r = http.get(format!("{url}/healthz")).send().await.unwrap();
                assert_eq!(r.status(), 200);
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            worst
        })
    };
    // Four bodies near the cap, parsed while the rest goes on (each rejected whole).
    let big: &'static [u8] = Box::leak(
        serde_json::to_vec(&json!({"requests": vec![completion(&"y".repeat(60_000)); 257]}))
            .unwrap()
            .into_boxed_slice(),
    );
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let (http, url, key) = (s.http.clone(), s.url.clone(), s.key.clone());
            tokio::spawn(async move {
                let rb = match i % 5 {
                    0 => http
                        .post(format!("{url}/v1/batches"))
                        .json(&json!({"requests": [completion(&format!("p{i}"))]})),
                    1 => http.get(format!("{url}/v1/batches")),
                    2 => http.get(format!("{url}/v1/jobs/{i}")),
                    3 if i < 20 => http
                        .post(format!("{url}/v1/batches"))
                        .header("content-type", "application/json")
                        .body(big),
                    _ => http.get(format!("{url}/v1/batches/{i}")),
                };
                let r = rb.bearer_auth(key).send().await.unwrap();
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                (status, v)
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        let (status, v) = t.await.unwrap();
        match status {
            202 => accepted += 1,
            200 | 404 => {}
            400 => assert_eq!(error_type(status, &v), "too_large"),
            429 => assert_eq!(error_type(status, &v), "rate_limited"),
            other => panic!("{other}: {v}"),
        }
    }
    let worst = probe.await.unwrap();
    assert!(worst < Duration::from_secs(5), "/healthz took {worst:?}");
    assert!(accepted > 0);

    // Healthy at the end: ready, and a new batch runs to DONE.
    let r = s
        .http
        .get(format!("{}/readyz", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, b) = s
        .post("/v1/batches", &json!({"requests": [completion("after")]}))
        .await;
    assert_eq!(status, 202, "{b}");
    let done = s
        .wait_done(b["id"].as_str().unwrap(), Duration::from_secs(120))
        .await;
    assert_eq!(done["processed"], 1, "{done}");
    s.stop().await;
}
