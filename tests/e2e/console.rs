//! The web console and the API additions it reads: served files and their headers, paged
//! listings, job request bodies, the operator view for admin keys; and the console itself in
//! Debian's Chromium, driven by tests/console/e2e.mjs (Playwright) against the real stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_harness::Stack;

fn item(endpoint: &str, body: Value) -> Value {
    json!({"endpoint": endpoint, "body": body})
}

async fn submit(s: &Stack, items: Vec<Value>) -> String {
    let (status, b) = s.post("/v1/batches", &json!({ "requests": items })).await;
    assert_eq!(status, 202, "{b}");
    b["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_redirects_and_headers() {
    let s = Stack::start().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/", "/console"] {
        let r = http.get(format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 302, "{path}");
        assert_eq!(r.headers()["location"], "/console/", "{path}");
    }

    let r = http
        .get(format!("{}/console/", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    for want in [
        "default-src 'none'",
        "script-src 'self';",
        "style-src 'self';",
        "connect-src 'self';",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(want), "{want} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-cache");
    let etag = h["etag"].to_str().unwrap().to_owned();
    let html = r.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="app.js">"#));
    // No CDN: every script, style and image the page names is one of its own.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );

    for (file, ct) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let r = http
            .get(format!("{}/console/{file}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{file}");
        assert_eq!(r.headers()["content-type"], ct, "{file}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("https://"), "{file} names another host");
        // Revalidation costs no body.
        let r = http
            .get(format!("{}/console/{file}", s.url))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{file}");
    }
    // The key is read from session storage, never from local storage or a URL.
    let api = http
        .get(format!("{}/console/api.js", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(api.contains("sessionStorage") && !api.contains("localStorage"));

    let r = http
        .get(format!("{}/console/nope.js", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_listings_job_requests_and_admin_status() {
    let s = Stack::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            submit(
                &s,
                vec![item(
                    "/v1/completions",
                    json!({"model": "qwen3-8b", "prompt": format!("p{i}")}),
                )],
            )
            .await,
        );
    }
    // Batches, newest first, two a page.
    let (st, p1) = s.get("/v1/batches?limit=2").await;
    assert_eq!(st, 200, "{p1}");
    let got: Vec<&str> = p1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(p1["has_more"], true);
    let (_, p2) = s
        .get(&format!("/v1/batches?limit=2&after={}", ids[1]))
        .await;
    assert_eq!(p2["data"][0]["id"], ids[0]);
    assert_eq!(p2["data"].as_array().unwrap().len(), 1);
    assert_eq!(p2["has_more"], false);
    // The contract's listing is unchanged without parameters.
    let (_, all) = s.get("/v1/batches").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3);

    // A batch's jobs: one finishes, one fails, one is cancelled.
    let id = submit(
        &s,
        vec![
            item(
                "/v1/chat/completions",
                json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]}),
            ),
            item(
                "/v1/completions",
                json!({"model": "qwen3-8b", "prompt": "x", "sim_fail": "fatal"}),
            ),
            item(
                "/v1/completions",
                json!({"model": "qwen3-8b", "prompt": "slow", "sim_latency_ms": 120_000}),
            ),
        ],
    )
    .await;
    s.wait_batch(&id, Duration::from_secs(30), |b| {
        b["processed"] == 1 && b["failed"] == 1
    })
    .await;
    let (_, b) = s.get(&format!("/v1/batches/{id}")).await;
    let slow = b["jobs"][2]["id"].as_str().unwrap().to_owned();
    let (st, _) = s.post_empty(&format!("/v1/jobs/{slow}/cancel")).await;
    assert_eq!(st, 200);

    let (st, jobs) = s.get(&format!("/v1/batches/{id}/jobs")).await;
    assert_eq!(st, 200, "{jobs}");
    let statuses: Vec<&str> = jobs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["PROCESSED", "FAILED", "CANCELLED"]);
    assert!(jobs["data"][0]["result"]["choices"].is_array(), "{jobs}");
    assert_eq!(jobs["data"][1]["error"]["type"], "invalid_request");
    assert_eq!(jobs["has_more"], false);
    let (_, failed) = s.get(&format!("/v1/batches/{id}/jobs?status=failed")).await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 1, "{failed}");
    assert_eq!(failed["data"][0]["status"], "FAILED");
    let (_, one) = s.get(&format!("/v1/batches/{id}/jobs?limit=1")).await;
    assert_eq!(one["has_more"], true);
    let after = one["data"][0]["id"].as_str().unwrap();
    let (_, rest) = s
        .get(&format!("/v1/batches/{id}/jobs?limit=5&after={after}"))
        .await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 2);

    // Bad parameters: the contract's 400, naming the field.
    for (q, field) in [
        ("status=DONEISH", "status"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("after=-1", "after"),
    ] {
        let (st, e) = s.get(&format!("/v1/batches/{id}/jobs?{q}")).await;
        assert_eq!(st, 400, "{q}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request");
        assert_eq!(e["error"]["errors"][0]["field"], field, "{q}");
    }
    let (st, _) = s.get("/v1/batches?limit=1000").await;
    assert_eq!(st, 400);

    // The job carries the body it was submitted with.
    let first = jobs["data"][0]["id"].as_str().unwrap();
    let (_, job) = s.get(&format!("/v1/jobs/{first}")).await;
    assert_eq!(job["request"]["messages"][0]["content"], "hi", "{job}");

    // Another owner sees neither the batch nor its jobs.
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    let (st, _) = s.get_as(&format!("/v1/batches/{id}/jobs"), &bob).await;
    assert_eq!(st, 404);
    let (_, bobs) = s.get_as("/v1/batches", &bob).await;
    assert_eq!(bobs["data"], json!([]));

    // The operator view: 401 without a key, 403 for a tenant key, the queues for an admin.
    let (st, _) = s.get_as("/v1/admin/status", "vk_nope").await;
    assert_eq!(st, 401);
    let (st, e) = s.get("/v1/admin/status").await;
    assert_eq!(st, 403, "{e}");
    assert_eq!(e["error"]["type"], "forbidden");
    let admin = s.db.create_key("ops", None).await.unwrap();
    assert_eq!(s.db.set_admin(admin.key.id, true).await.unwrap(), 1);
    let (st, v) = s.get_as("/v1/admin/status", &admin.secret).await;
    assert_eq!(st, 200, "{v}");
    let llm = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "llm")
        .unwrap();
    assert_eq!(llm["inference_type"], "LLM");
    assert!(llm["consumers"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(llm["dead_letters"], 0);
    assert_eq!(llm["processing"], 0, "{v}");
    assert_eq!(v["errors"]["rabbitmq"], Value::Null);
    assert_eq!(v["errors"]["database"], Value::Null);
    s.stop().await;
}

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// The console in a real browser: see tests/console/e2e.mjs for what it does and checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium is not installed at {chromium}: the console's browser tests need Debian's \
         chromium package (scripts/setup.sh installs it; CHROMIUM names another binary)"
    );
    assert!(
        console_dir().join("node_modules/playwright-core").is_dir(),
        "tests/console/node_modules is missing: run scripts/setup.sh (npm ci in tests/console)"
    );
    let s = Stack::start().await;
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    let admin = s.db.create_key("ops", None).await.unwrap();
    s.db.set_admin(admin.key.id, true).await.unwrap();

    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = std::process::Command::new("node");
    cmd.arg("e2e.mjs")
        .current_dir(console_dir())
        .env("VOLLEY_URL", &s.url)
        .env("VOLLEY_KEY", &s.key)
        .env("VOLLEY_KEY_2", &bob)
        .env("VOLLEY_ADMIN_KEY", &admin.secret)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(Stdio::inherit());
    // `VOLLEY_CONSOLE_SCREENSHOTS=docs` refreshes the README's screenshots.
    if let Ok(dir) = std::env::var("VOLLEY_CONSOLE_SCREENSHOTS") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        cmd.env("SCREENSHOTS", dir);
    }
    let mut child = cmd
        .spawn()
        .expect("cannot start node: install Debian's nodejs (scripts/setup.sh)");
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            // Chromium is node's child: ending node closes the browser's pipe and it exits.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the browser test did not finish in 240 s:\n{}",
                std::fs::read_to_string(out.path()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = std::fs::read_to_string(out.path()).unwrap();
    let last: Value = output
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result from the browser test:\n{output}"));
    eprintln!("{output}");
    assert!(
        status.success() && last["ok"] == true,
        "the browser test failed:\n{output}"
    );
    for check in [
        "sign_in",
        "validation_error",
        "progress_done",
        "download_jsonl",
        "failed_job_error",
        "image_decodes",
        "audio_plays",
        "chat_text",
        "cancel_batch",
        "batches_list",
        "narrow_screen",
        "second_key_isolated",
        "operator_page",
        "key_never_in_url",
    ] {
        assert!(
            last["checks"].as_array().unwrap().contains(&json!(check)),
            "{check} did not run:\n{output}"
        );
    }
    s.stop().await;
}
