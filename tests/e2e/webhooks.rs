//! Webhooks end to end: a real stack delivers to `tests/python/webhook_receiver.py`, which
//! verifies every signature with the Standard Webhooks reference library (PyPI), not with
//! Volley's code. Retries after 500s and after the receiver was down, de-duplication by
//! `webhook-id`, pausing, redelivery, secret rotation and every SSRF refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use volley_harness::{Options, Stack};

/// The repository's Python (`.venv`, made by scripts/setup.sh), found from the workspace root.
fn python() -> PathBuf {
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    loop {
        let p = dir.join(".venv/bin/python");
        if p.exists() {
            return p;
        }
        assert!(
            dir.pop(),
            "no .venv with the tests' Python tools: run `bash scripts/setup.sh`"
        );
    }
}

/// The receiver as a child process, killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
    secrets: Vec<String>,
}

impl Receiver {
    fn start(log: &Path, secrets: &[String], fail_first: usize, port: u16) -> Receiver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/webhook_receiver.py");
        let mut cmd = Command::new(python());
        cmd.arg(script)
            .arg("--log")
            .arg(log)
            .arg("--fail-first")
            .arg(fail_first.to_string())
            .arg("--port")
            .arg(port.to_string())
            .stdout(Stdio::piped());
        for s in secrets {
            cmd.arg("--secret").arg(s);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("receiver said {line:?}"))
            .parse()
            .unwrap();
        Receiver {
            child,
            port,
            log: log.to_owned(),
            secrets: secrets.to_vec(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Started again on the same port with the same log (the record survives).
    fn restart(&mut self, fail_first: usize) {
        self.kill();
        *self = Receiver::start(
            &self.log.clone(),
            &self.secrets.clone(),
            fail_first,
            self.port,
        );
    }

    /// Every request it got, in order.
    fn deliveries(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until `done(deliveries)`.
    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self.deliveries();
            if done(&d) {
                return d;
            }
            assert!(Instant::now() < deadline, "{what}: got {d:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fast retries for tests: 200 ms steps.
fn fast(s: &mut volley_config::Settings) {
    // The receiver is on loopback, over plain http: the development allowances.
    s.webhooks.http_hosts = vec!["127.0.0.1".into(), "localhost".into()];
    s.webhooks.allow_private_network = true;
    s.webhooks.schedule_ms = vec![200, 200, 200, 200];
    s.webhooks.poll_interval_ms = 50;
    s.webhooks.lease_ms = 5_000;
}

fn chat(prompt: &str) -> Value {
    json!({"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
        "messages": [{"role": "user", "content": prompt}]}})
}

async fn submit(s: &Stack, key: &str, body: Value) -> (u16, Value) {
    let r = s
        .http
        .post(format!("{}/v1/batches", s.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn cancel(s: &Stack, key: &str, batch: &str) -> u16 {
    s.http
        .post(format!("{}/v1/batches/{batch}/cancel", s.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Verified deliveries the receiver accepted (2xx), by type.
fn accepted<'a>(d: &'a [Value], t: &str) -> Vec<&'a Value> {
    d.iter()
        .filter(|r| r["answered"] == 204 && r["type"] == t)
        .collect()
}

async fn deliveries_api(s: &Stack, key: &str, batch: &str) -> Vec<Value> {
    let (st, v) = s
        .get_as(&format!("/v1/batches/{batch}/webhook-deliveries"), key)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "list");
    v["data"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_and_deduplicated() {
    let s = Stack::start_with(Options::default(), fast).await;
    let k = s.db.create_key("hooks", Some("alice")).await.unwrap();
    assert!(k.webhook_secret.starts_with("whsec_"));
    let dir = tempfile::tempdir().unwrap();
    // The first two deliveries are answered 500: they must come again, same webhook-id.
    let rx = Receiver::start(
        &dir.path().join("log"),
        std::slice::from_ref(&k.webhook_secret),
        2,
        0,
    );
    let (st, b) = submit(
        &s,
        &k.secret,
        json!({"label": "hooked", "webhook": {"url": rx.url(),
            "events": ["batch.completed", "batch.cancelled", "job.completed", "job.failed"]},
            "requests": [
                chat("hello"),
                {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a lamp"}},
                {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x", "sim_fail": "fatal"}},
            ]}),
    )
    .await;
    assert_eq!(st, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let d = rx
        .wait("every event accepted", Duration::from_secs(60), |d| {
            accepted(d, "job.completed").len() == 2
                && accepted(d, "job.failed").len() == 1
                && accepted(d, "batch.completed").len() == 1
        })
        .await;
    // Every request, the refused ones included, carried a valid signature.
    for r in &d {
        assert_eq!(r["verified_with"], json!([0]), "{r}");
        assert_eq!(r["signatures"], 1);
    }
    // The two answered 500 came again with the same webhook-id, and nothing was accepted
    // twice: receivers de-duplicate by webhook-id.
    let failed: Vec<&Value> = d.iter().filter(|r| r["answered"] == 500).collect();
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert!(
            d.iter()
                .any(|r| r["answered"] == 204 && r["webhook_id"] == f["webhook_id"]),
            "{f} never redelivered"
        );
    }
    let ok: Vec<&Value> = d.iter().filter(|r| r["answered"] == 204).collect();
    let ids: std::collections::HashSet<&str> = ok
        .iter()
        .map(|r| r["webhook_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "{ok:#?}");
    assert_eq!(ok.len(), 4, "an accepted event was sent again: {ok:#?}");

    // The payloads: the batch object, and each job as GET /v1/jobs/{id} shows it.
    let batch_ev = accepted(&d, "batch.completed")[0];
    let body = &batch_ev["body"];
    assert_eq!(body["type"], "batch.completed");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(body["data"]["id"], id.as_str());
    assert_eq!(body["data"]["status"], "DONE");
    assert_eq!(body["data"]["processed"], 2);
    assert_eq!(body["data"]["failed"], 1);
    for ev in accepted(&d, "job.completed")
        .into_iter()
        .chain(accepted(&d, "job.failed"))
    {
        let job = &ev["body"]["data"];
        let (st, mut api) = s
            .get_as(
                &format!("/v1/jobs/{}", job["id"].as_str().unwrap()),
                &k.secret,
            )
            .await;
        assert_eq!(st, 200);
        // The API's addition of the submitted body (up to 256 KiB) stays out of webhooks.
        api.as_object_mut().unwrap().remove("request");
        if job["inference_type"] == "IMAGE" {
            // A media link signed at delivery time, which the gateway serves.
            let url = job["result"]["data"][0]["url"].as_str().unwrap();
            let r = s.http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
            assert_eq!(&r.bytes().await.unwrap()[..4], b"\x89PNG");
        } else {
            assert_eq!(job, &api, "the webhook's job differs from the API's");
        }
    }
    let failed_job = &accepted(&d, "job.failed")[0]["body"]["data"];
    assert_eq!(failed_job["status"], "FAILED");
    assert!(failed_job["error"]["type"].is_string());

    // The API shows each event with its attempts.
    let list = deliveries_api(&s, &k.secret, &id).await;
    assert_eq!(list.len(), 4, "{list:#?}");
    let mut attempts = 0;
    for e in &list {
        assert_eq!(e["object"], "webhook_delivery");
        assert_eq!(e["status"], "delivered", "{e}");
        assert_eq!(e["last_status_code"], 204);
        assert!(e["next_attempt"].is_null());
        assert!(ids.contains(e["webhook_id"].as_str().unwrap()));
        attempts += e["attempts"].as_i64().unwrap();
    }
    assert_eq!(attempts, 6, "4 events, 2 of them tried twice: {list:#?}");

    // Another owner sees none of it; nonsense ids are 404s.
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    let (st, _) = s
        .get_as(&format!("/v1/batches/{id}/webhook-deliveries"), &bob)
        .await;
    assert_eq!(st, 404);
    let ev = list[0]["id"].as_str().unwrap();
    let r = s
        .http
        .post(format!("{}/v1/webhook-deliveries/{ev}/retry", s.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for bad in ["0", "-1", "abc", "99999999999999999999"] {
        let (st, _) = s
            .get_as(&format!("/v1/batches/{bad}/webhook-deliveries"), &k.secret)
            .await;
        assert_eq!(st, 404, "{bad}");
    }
    let r = s
        .http
        .post(format!("{}/v1/webhook-deliveries/{ev}/retry", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A redelivery asked for by the client: same webhook-id, accepted again.
    let r = s
        .http
        .post(format!("{}/v1/webhook-deliveries/{ev}/retry", s.url))
        .bearer_auth(&k.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let wid = list[0]["webhook_id"].as_str().unwrap().to_owned();
    rx.wait("the redelivery", Duration::from_secs(20), |d| {
        d.iter()
            .filter(|r| r["answered"] == 204 && r["webhook_id"] == wid.as_str())
            .count()
            == 2
    })
    .await;

    // A batch without a webhook records nothing.
    let plain = s.submit_as(&k.secret, &[chat("plain")]).await;
    s.wait_done_as(&k.secret, &plain, Duration::from_secs(30))
        .await;
    assert!(deliveries_api(&s, &k.secret, &plain).await.is_empty());
    drop(rx);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_its_events_later_and_a_failing_one_is_paused() {
    let s = Stack::start_with(Options::default(), |st| {
        fast(st);
        st.webhooks.schedule_ms = vec![300, 300, 300, 300, 300, 300, 300, 300];
    })
    .await;
    let k = s.db.create_key("hooks", Some("alice")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rx = Receiver::start(
        &dir.path().join("log"),
        std::slice::from_ref(&k.webhook_secret),
        0,
        0,
    );
    rx.kill();
    let (st, b) = submit(
        &s,
        &k.secret,
        json!({"webhook": {"url": rx.url()}, "requests": [chat("a"), chat("b")]}),
    )
    .await;
    assert_eq!(st, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    // Down: attempts fail to connect and are scheduled again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = deliveries_api(&s, &k.secret, &id).await;
        if let Some(e) = list.first()
            && e["attempts"].as_i64().unwrap() >= 2
        {
            assert_eq!(e["status"], "pending", "{e}");
            assert_eq!(e["type"], "batch.completed");
            assert!(e["next_attempt"].is_i64());
            assert!(e["last_error"].as_str().unwrap().contains("connect"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "no failed attempts: {list:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back up: the event arrives, verified.
    rx.restart(0);
    let d = rx
        .wait("delivery after the outage", Duration::from_secs(20), |d| {
            accepted(d, "batch.completed").len() == 1
        })
        .await;
    assert_eq!(d[0]["verified_with"], json!([0]));
    assert_eq!(d[0]["body"]["data"]["id"], id.as_str());

    // An endpoint that keeps failing uses up its schedule: the event fails, the endpoint is
    // paused, and later events to it wait (visibly) instead of being tried.
    rx.restart(1_000);
    let (_, b1) = submit(
        &s,
        &k.secret,
        json!({"webhook": {"url": rx.url()}, "requests": [chat("c")]}),
    )
    .await;
    let b1 = b1["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let list = deliveries_api(&s, &k.secret, &b1).await;
        if let Some(e) = list.first()
            && e["status"] == "failed"
        {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "never failed: {list:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed["attempts"], 9, "{failed}");
    assert_eq!(failed["last_status_code"], 500);
    assert_eq!(failed["last_response"], r#"{"seen": true}"#);
    assert_eq!(failed["endpoint_paused"], true);
    let (_, b2) = submit(
        &s,
        &k.secret,
        json!({"webhook": {"url": rx.url()}, "requests": [chat("d")]}),
    )
    .await;
    let b2 = b2["id"].as_str().unwrap().to_owned();
    s.wait_done_as(&k.secret, &b2, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let waiting = deliveries_api(&s, &k.secret, &b2).await;
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0]["status"], "pending");
    assert_eq!(waiting[0]["attempts"], 0, "{waiting:#?}");
    assert_eq!(waiting[0]["endpoint_paused"], true);
    // batchctl status's backlog shows the failed event and the paused endpoint.
    let backlog = s.db.webhook_backlog().await.unwrap();
    assert_eq!(
        (backlog.failed, backlog.paused_endpoints),
        (1, 1),
        "{backlog:?}"
    );
    assert!(backlog.pending >= 1);

    // The receiver is fixed; the client redelivers the failed event: it arrives with its
    // webhook-id, the endpoint is resumed, and the waiting event follows.
    rx.restart(0);
    let r = s
        .http
        .post(format!(
            "{}/v1/webhook-deliveries/{}/retry",
            s.url,
            failed["id"].as_str().unwrap()
        ))
        .bearer_auth(&k.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let wid = failed["webhook_id"].as_str().unwrap().to_owned();
    let wid2 = waiting[0]["webhook_id"].as_str().unwrap().to_owned();
    rx.wait(
        "redelivered, then the waiting one",
        Duration::from_secs(20),
        |d| {
            let ok = |w: &str| {
                d.iter()
                    .any(|r| r["answered"] == 204 && r["webhook_id"] == w)
            };
            ok(&wid) && ok(&wid2)
        },
    )
    .await;
    let list = deliveries_api(&s, &k.secret, &b1).await;
    assert_eq!(list[0]["status"], "delivered");
    assert_eq!(list[0]["endpoint_paused"], false);
    drop(rx);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secrets_sign_twice_during_the_grace_and_cancel_sends_batch_cancelled() {
    let s = Stack::start_with(Options::default(), |st| {
        fast(st);
        st.webhooks.secret_grace_secs = 3;
    })
    .await;
    let k = s.db.create_key("hooks", Some("alice")).await.unwrap();
    let rotated = s.db.rotate_webhook_secret("hooks").await.unwrap();
    assert_eq!(rotated.len(), 1);
    let new = rotated[0].1.clone();
    assert_ne!(new, k.webhook_secret);
    let dir = tempfile::tempdir().unwrap();
    // A receiver that knows both; it records which of them verified each delivery.
    let rx = Receiver::start(
        &dir.path().join("log"),
        &[k.webhook_secret.clone(), new.clone()],
        0,
        0,
    );
    let slow = json!({"endpoint": "/v1/completions",
        "body": {"model": "qwen3-8b", "prompt": "slow", "sim_latency_ms": 60_000}});
    let (st, b) = submit(
        &s,
        &k.secret,
        json!({"webhook": {"url": rx.url()}, "requests": [slow.clone(), slow]}),
    )
    .await;
    assert_eq!(st, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(cancel(&s, &k.secret, &id).await, 200);
    let d = rx
        .wait("batch.cancelled", Duration::from_secs(20), |d| {
            accepted(d, "batch.cancelled").len() == 1
        })
        .await;
    assert_eq!(d[0]["signatures"], 2);
    assert_eq!(d[0]["verified_with"], json!([0, 1]));
    assert_eq!(d[0]["body"]["data"]["cancelled"], 2);
    // A second cancel changes nothing and records nothing.
    assert_eq!(cancel(&s, &k.secret, &id).await, 200);

    // After the grace only the new secret signs.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let (_, b2) = submit(
        &s,
        &k.secret,
        json!({"webhook": {"url": rx.url()}, "requests": [chat("x")]}),
    )
    .await;
    let b2 = b2["id"].as_str().unwrap().to_owned();
    let d = rx
        .wait("batch.completed", Duration::from_secs(30), |d| {
            accepted(d, "batch.completed").len() == 1
        })
        .await;
    let done = accepted(&d, "batch.completed")[0];
    assert_eq!(done["body"]["data"]["id"], b2.as_str());
    assert_eq!(done["signatures"], 1);
    assert_eq!(done["verified_with"], json!([1]));
    assert_eq!(deliveries_api(&s, &k.secret, &id).await.len(), 1);
    drop(rx);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_the_policy_refuses() {
    // The production policy: https on 443 to public addresses only.
    let s = Stack::start_with(Options::default(), |st| {
        fast(st);
        st.webhooks.http_hosts = Vec::new();
        st.webhooks.allow_private_network = false;
        st.webhooks.allowed_ports = vec![443];
        st.webhooks.schedule_ms = vec![100];
    })
    .await;
    let k = s.db.create_key("hooks", Some("alice")).await.unwrap();
    for (url, why) in [
        ("http://hooks.example.com/x", "https"),
        ("https://127.0.0.1/x", "loopback"),
        ("https://[::1]/x", "loopback"),
        ("https://10.0.0.7/x", "private"),
        ("https://192.168.1.1/x", "private"),
        ("https://169.254.10.10/x", "link-local"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://224.0.0.251/x", "multicast"),
        ("https://hooks.example.com:8443/x", "port 8443"),
        ("https://user:pw@hooks.example.com/x", "user name"),
        ("https://hooks.example.com/\u{0}", "https URL"),
        ("ftp://hooks.example.com/x", "https URL"),
    ] {
        let (st, v) = submit(
            &s,
            &k.secret,
            json!({"webhook": {"url": url}, "requests": [chat("x")]}),
        )
        .await;
        assert_eq!(st, 400, "{url}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request");
        let e = &v["error"]["errors"][0];
        assert_eq!(e["field"], "webhook.url", "{url}: {v}");
        assert!(e["message"].as_str().unwrap().contains(why), "{url}: {v}");
    }
    let (_, listed) = s.get_as("/v1/batches", &k.secret).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(0), "{listed}");

    // A name is resolved at delivery, and one resolving to loopback is refused then: nothing
    // is connected to, the event fails visibly.
    let (st, b) = submit(
        &s,
        &k.secret,
        json!({"webhook": {"url": "https://localhost/hook"}, "requests": [chat("x")]}),
    )
    .await;
    assert_eq!(st, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = deliveries_api(&s, &k.secret, &id).await;
        if let Some(e) = list.first()
            && e["status"] == "failed"
        {
            let err = e["last_error"].as_str().unwrap();
            assert!(
                err.starts_with("refused") && err.contains("loopback"),
                "{e}"
            );
            assert!(e["last_status_code"].is_null());
            break;
        }
        assert!(Instant::now() < deadline, "not refused: {list:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}
