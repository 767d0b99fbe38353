//! Media links under attack (issue 14, items 1, 5 and 11): provider text never becomes a
//! link, keys cannot be guessed, a link opens only its own job's media until an expiry no
//! further ahead than links are issued for, every refusal is in the contract's error shape,
//! and the gateway will not start with a signing key anyone could know.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use volley_harness::Stack;

const LONG: Duration = Duration::from_secs(60);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn image() -> Value {
    json!({"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a cat"}})
}

/// Every string inside `v`.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|i| strings(i, out)),
        Value::Object(m) => m.values().for_each(|i| strings(i, out)),
        _ => {}
    }
}

/// The key and the query parameters of a media link.
fn parse_link(url: &str) -> (String, i64, i64, String) {
    let (path, query) = url.split_once('?').unwrap();
    let key = path.split("/v1/media/").nth(1).unwrap().to_owned();
    let get = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_owned()
    };
    (
        key,
        get("job").parse().unwrap(),
        get("expires").parse().unwrap(),
        get("sig"),
    )
}

/// GETs a media URL; returns the status and, for errors, the JSON body (which must be the
/// contract's error shape).
async fn fetch(s: &Stack, url: &str) -> (u16, Value) {
    let r = s.http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    if status == 200 {
        return (status, Value::Null);
    }
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{url}: {status} is not JSON: {text:?} ({ct:?})"));
    assert!(
        v["error"]["type"].is_string() && v["error"]["message"].is_string(),
        "{url}: not the error shape: {v}"
    );
    assert_eq!(ct.as_deref(), Some("application/json"), "{url}");
    (status, v)
}

/// A model told to "reply with exactly volley-media:<another tenant's key>" (the simulator's
/// `sim_echo`) hands its tenant plain text, not a link; so does a guessed key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_text_never_becomes_a_link() {
    let s = Stack::start().await;
    let alice = s.key.clone();
    let mallory = s.db.create_key("mallory", None).await.unwrap().secret;

    let victim = s.run_batch_as(&alice, &[image()], LONG).await;
    let link = victim[0]["result"]["data"][0]["url"].as_str().unwrap();
    assert_eq!(fetch(&s, link).await.0, 200, "the owner's own link works");
    let (key, job_id, _, _) = parse_link(link);
    let batch_id = victim[0]["batch_id"].as_str().unwrap();
    // Unguessable: 128 random bits after the job's prefix.
    let prefix = format!("batches/{batch_id}/{job_id}-a1-0-");
    let nonce = key
        .strip_prefix(&prefix)
        .and_then(|k| k.strip_suffix(".png"))
        .unwrap_or_else(|| panic!("{key}"));
    assert!(
        nonce.len() == 32 && nonce.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );

    let stolen = format!("volley-media:{key}");
    let guessed = format!("volley-media:batches/{batch_id}/{job_id}-a1-0.png");
    let mut requests = Vec::new();
    for said in [&stolen, &guessed] {
        requests.push(json!({"endpoint": "/v1/chat/completions", "body": {
            "model": "qwen3-8b", "sim_echo": true,
            "messages": [{"role": "user", "content": said}]}}));
        requests.push(json!({"endpoint": "/v1/completions", "body": {
            "model": "qwen3-8b", "sim_echo": true, "prompt": said}}));
    }
    let jobs = s.run_batch_as(&mallory, &requests, LONG).await;
    for (i, job) in jobs.iter().enumerate() {
        let said = if i < 2 { &stolen } else { &guessed };
        let text = job["result"]["choices"][0]["message"]["content"]
            .as_str()
            .or(job["result"]["choices"][0]["text"].as_str())
            .unwrap();
        assert_eq!(text, said, "the provider's text comes back as it was");
        let mut all = Vec::new();
        strings(&job["result"], &mut all);
        assert!(
            all.iter().all(|t| !t.contains("/v1/media/")),
            "provider text became a link: {job}"
        );
    }
    // The guessed (old, sequential) key names nothing even when validly signed.
    let signer = volley_media::Signer::new(s.settings.media.signing_key.expose().as_bytes());
    let guess = signer.url(
        &s.url,
        job_id,
        &format!("batches/{batch_id}/{job_id}-a1-0.png"),
        now() + 60,
    );
    assert_eq!(fetch(&s, &guess).await.0, 404);
    s.stop().await;
}

/// A link opens its own job's media only, with an expiry no further ahead than the TTL
/// (plus a minute), and every refusal of the media route is JSON in the error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_are_bound_to_their_job_and_refusals_are_json() {
    let s = Stack::start().await;
    let key = s.key.clone();
    let jobs = s.run_batch_as(&key, &[image(), image()], LONG).await;
    let link_a = jobs[0]["result"]["data"][0]["url"].as_str().unwrap();
    let link_b = jobs[1]["result"]["data"][0]["url"].as_str().unwrap();
    let (key_a, job_a, exp_a, sig_a) = parse_link(link_a);
    let (key_b, job_b, _, _) = parse_link(link_b);
    assert_ne!(job_a, job_b);
    assert_eq!(fetch(&s, link_a).await.0, 200);
    assert_eq!(fetch(&s, link_b).await.0, 200);

    let base = format!("{}/v1/media", s.url);
    // Job A's link, presented as job B's.
    let (status, v) = fetch(
        &s,
        &format!("{base}/{key_a}?job={job_b}&expires={exp_a}&sig={sig_a}"),
    )
    .await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (403, Some("forbidden"))
    );
    // Job A's signature on job B's media.
    let (status, _) = fetch(
        &s,
        &format!("{base}/{key_b}?job={job_a}&expires={exp_a}&sig={sig_a}"),
    )
    .await;
    assert_eq!(status, 403);
    // Even a valid signature cannot bind one job's id to another job's media.
    let signer = volley_media::Signer::new(s.settings.media.signing_key.expose().as_bytes());
    let cross = signer.url(&s.url, job_b, &key_a, now() + 60);
    assert_eq!(fetch(&s, &cross).await.0, 403);

    // Expiry: within TTL + 60 s is fine; beyond it is refused even when validly signed.
    let ttl = s.settings.media.url_ttl_secs as i64;
    let fine = signer.url(&s.url, job_a, &key_a, now() + ttl + 30);
    assert_eq!(fetch(&s, &fine).await.0, 200);
    let far = signer.url(&s.url, job_a, &key_a, now() + 20 * 365 * 86_400);
    let (status, v) = fetch(&s, &far).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (403, Some("forbidden"))
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expiry"),
        "{v}"
    );

    // Malformed query strings: 400 invalid_request, as JSON.
    for query in [
        format!("job=x&expires={exp_a}&sig={sig_a}"),
        format!("job={job_a}&expires=soon&sig={sig_a}"),
        format!("job={job_a}&expires=99999999999999999999999&sig={sig_a}"),
        format!("job={job_a}&job={job_b}&expires={exp_a}&sig={sig_a}"),
    ] {
        let (status, v) = fetch(&s, &format!("{base}/{key_a}?{query}")).await;
        assert_eq!(
            (status, v["error"]["type"].as_str()),
            (400, Some("invalid_request")),
            "{query}: {v}"
        );
    }
    // Missing parts, a bad signature, a key outside the store: 403 or 404, as JSON.
    for (query, want) in [
        (String::new(), 403),
        (format!("expires={exp_a}&sig={sig_a}"), 403),
        (format!("job={job_a}&expires={exp_a}&sig=00"), 403),
        (format!("job={job_a}&expires={exp_a}&sig=%FF%FE"), 403),
        (format!("job={job_a}&expires={exp_a}&sig={sig_a}&x=1"), 200),
    ] {
        assert_eq!(
            fetch(&s, &format!("{base}/{key_a}?{query}")).await.0,
            want,
            "{query}"
        );
    }
    let missing = signer.url(&s.url, job_a, &key_a.replace(".png", "0.png"), now() + 60);
    let (status, v) = fetch(&s, &missing).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (404, Some("not_found"))
    );
    s.stop().await;
}

/// The gateway binary refuses to start outside dev mode with an empty, short or shipped
/// signing key: exit code 2 and a message naming the setting (run
/// `cargo build --workspace --bins` first).
#[tokio::test]
async fn gateway_refuses_weak_signing_keys_outside_dev_mode() {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/volley.toml");
    for (key, dev_mode) in [
        ("", "false"),
        ("too-short", "false"),
        ("dev-only-signing-key", "false"),
        ("compose-dev-signing-key-change-me", "false"),
        ("dev-only-signing-key", ""),
    ] {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.env_clear()
            .env("VOLLEY_CONFIG", &config)
            .env("VOLLEY_MEDIA_SIGNING_KEY", key)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if !dev_mode.is_empty() {
            cmd.env("VOLLEY_DEV_MODE", dev_mode);
        }
        let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("the gateway started with the signing key {key:?}"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key:?}: {stderr}");
        assert!(stderr.contains("VOLLEY_MEDIA_SIGNING_KEY"), "{stderr}");
    }
}
