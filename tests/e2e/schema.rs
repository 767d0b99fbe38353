//! The published API document against the live gateway: schemathesis (pinned in
//! tests/python/requirements.txt, installed into `.venv` by scripts/setup.sh) loads
//! `/openapi.json` from a harness stack (real RabbitMQ and PostgreSQL, the provider simulator)
//! and sends every operation valid and invalid requests, checking each answer against the
//! document: no 5xx, only documented status codes, content types and headers, bodies that
//! match their schemas, valid data accepted, invalid data rejected, auth enforced, 405 with
//! `Allow` for methods a path does not have.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_domain::InferenceType;
use volley_harness::{Options, Stack};

/// Examples per operation in the fuzzing phase: enough to find what a schema gets wrong,
/// few enough that the run stays around a minute.
const MAX_EXAMPLES: &str = "25";

fn schemathesis() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/schemathesis");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup.sh (it installs tests/python/requirements.txt into \
         .venv; `make test` runs it first)",
        bin.display()
    );
    bin
}

/// The document is served without a key, is OpenAPI 3.1, and names every operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn document_is_served_without_auth() {
    let s = Stack::start().await;
    let r = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/batches", "post"),
        ("/v1/batches", "get"),
        ("/v1/batches/{id}", "get"),
        ("/v1/batches/{id}/cancel", "post"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/media/{key}", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    // A method a path does not have is 405 with the methods it has.
    let r = s
        .http
        .delete(format!("{}/v1/batches", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "method_not_allowed");
    // A path that is no route stays 404 in the error shape.
    let (status, body) = s.get("/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found");
    s.stop().await;
}

/// schemathesis against the live stack: every operation, positive and negative cases, every
/// check; fails on any failure and prints schemathesis' summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_nothing() {
    let bin = schemathesis();
    // The per-key limits would answer most of a fuzzing run with 429s (documented, but they
    // would test the limiter instead of the API). Only the LLM worker runs: the fuzzer submits
    // many batches, and media jobs (espeak-ng, encoding video) would load a small machine
    // until the gateway's requests time out; the other jobs stay QUEUED, which the API serves
    // the same way.
    let opts = Options {
        workers: vec![InferenceType::Llm],
        ..Options::default()
    };
    let s = Stack::start_with(opts, |s| {
        s.gateway.key_rate_per_sec = 0;
        s.gateway.key_max_in_flight = 0;
    })
    .await;
    // Jobs in every shape a response can take, for the ids schemathesis finds by listing:
    // a result with usage, a failure with its error, a cancelled media job.
    let done = s
        .submit_as(
            &s.key,
            &[
                json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "hi"}}),
                json!({"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
                    "messages": [{"role": "user", "content": "x"}], "sim_fail": "fatal"}}),
            ],
        )
        .await;
    s.wait_done(&done, Duration::from_secs(60)).await;
    let queued = s
        .submit_as(
            &s.key,
            &[json!({"endpoint": "/v1/images/generations",
                "body": {"model": "flux-dev", "prompt": "a lamp"}})],
        )
        .await;
    let (status, _) = s.post_empty(&format!("/v1/batches/{queued}/cancel")).await;
    assert_eq!(status, 200);
    // A fixed seed keeps the run reproducible; `VOLLEY_SCHEMATHESIS_SEED` tries others, and
    // `VOLLEY_SCHEMATHESIS_ARGS` adds options (`--include-path /v1/batches --report har`).
    // The run's key is an admin key of the same owner, so the operator view answers too.
    let admin = s.db.create_key("alice", None).await.unwrap();
    s.db.set_admin(admin.key.id, true).await.unwrap();
    let seed = std::env::var("VOLLEY_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let extra = std::env::var("VOLLEY_SCHEMATHESIS_ARGS").unwrap_or_default();
    let out = tempfile::NamedTempFile::new().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/schemathesis.toml");
    let mut child = std::process::Command::new(&bin)
        .arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/openapi.json", s.url))
        .args(["--checks", "all"])
        .args(["--mode", "all"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed])
        // One worker: hypothesis on CPython 3.11 can fail parsing in two threads at once.
        .args(["--workers", "1"])
        .args(["--request-timeout", "20"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", admin.secret),
        ])
        .args(["--suppress-health-check", "all"])
        .args(extra.split_whitespace())
        .current_dir(out.path().parent().unwrap())
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .expect("cannot start schemathesis");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "schemathesis did not finish in 300 s:\n{}",
                std::fs::read_to_string(out.path()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = std::fs::read_to_string(out.path()).unwrap();
    eprintln!("{output}");
    assert!(status.success(), "schemathesis found failures:\n{output}");
    s.stop().await;
}

/// Found by schemathesis: a number near f64::MAX was stored (PostgreSQL keeps the exact
/// decimal) and could not be read back, so the submit answered 500 and the job could never be
/// read. Extreme numbers now make the round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extreme_numbers_round_trip() {
    let s = Stack::start_with(
        Options {
            workers: vec![],
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let body = json!({"model": "qwen3-8b", "prompt": "x", "big": f64::MAX, "tiny": 5e-324,
        "neg": -1.7976931348623157e308, "n": 2.0});
    let (status, batch) = s
        .post(
            "/v1/batches",
            &json!({"requests": [{"endpoint": "/v1/completions", "body": body}]}),
        )
        .await;
    assert_eq!(status, 202, "{batch}");
    let (status, b) = s
        .get(&format!("/v1/batches/{}", batch["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    let job = b["jobs"][0]["id"].as_str().unwrap().to_owned();
    let (status, j) = s.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["request"]["big"], json!(f64::MAX));
    assert_eq!(j["request"]["tiny"], json!(5e-324));
    assert_eq!(j["request"]["neg"], json!(-f64::MAX));
    s.stop().await;
}
