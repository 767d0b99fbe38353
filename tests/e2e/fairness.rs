//! Fair share between tenants: per-key quotas (429 `rate_limited` + `Retry-After`, nothing
//! created), batch priority, against the real stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::RunQueryDsl;
use diesel::sql_types::BigInt;
use serde_json::{Value, json};
use volley_db::QuotaChange;
use volley_harness::{Options, Stack};

fn completions(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": format!("q{i}")}}))
        .collect()
}

async fn post(
    s: &Stack,
    url: &str,
    key: &str,
    body: &Value,
    idem: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut rb = s
        .http
        .post(format!("{url}/v1/batches"))
        .bearer_auth(key)
        .json(body);
    if let Some(k) = idem {
        rb = rb.header("Idempotency-Key", k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("Retry-After")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, r.json().await.unwrap())
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows in PostgreSQL: batches and jobs of every owner.
async fn rows(s: &Stack) -> (i64, i64) {
    s.db.run(|c| {
        let b =
            diesel::sql_query("SELECT count(*) AS n FROM batches").get_result::<Count>(&mut **c)?;
        let j =
            diesel::sql_query("SELECT count(*) AS n FROM jobs").get_result::<Count>(&mut **c)?;
        Ok((b.n, j.n))
    })
    .await
    .unwrap()
}

/// A key of its own for `owner`, with quotas.
async fn key_with(s: &Stack, owner: &str, active: QuotaChange, per_minute: QuotaChange) -> String {
    let k = s.db.create_key(owner, None).await.unwrap();
    let changed =
        s.db.set_quotas(&k.key.id.to_string(), active, per_minute)
            .await
            .unwrap();
    assert_eq!(changed.len(), 1);
    k.secret
}

fn assert_rate_limited(status: u16, retry: &Option<String>, body: &Value, max_secs: u64) -> u64 {
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limited", "{body}");
    let secs: u64 = retry.as_deref().expect("Retry-After").parse().unwrap();
    assert!((1..=max_secs).contains(&secs), "Retry-After {secs}");
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_per_minute_quota_refuses_whole_batches_with_retry_after() {
    let s = Stack::start().await;
    let k = key_with(&s, "metered", QuotaChange::Keep, QuotaChange::Max(5)).await;

    let (st, _, b) = post(&s, &s.url, &k, &json!({"requests": completions(3)}), None).await;
    assert_eq!(st, 202, "{b}");
    let before = rows(&s).await;

    // 3 + 3 > 5: the whole batch is refused, nothing is written.
    let (st, retry, b) = post(&s, &s.url, &k, &json!({"requests": completions(3)}), None).await;
    assert_rate_limited(st, &retry, &b, 60);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per minute"),
        "{b}"
    );
    assert_eq!(rows(&s).await, before, "nothing created");

    // What still fits in the window is accepted.
    let (st, _, b) = post(&s, &s.url, &k, &json!({"requests": completions(2)}), None).await;
    assert_eq!(st, 202, "{b}");
    let (st, retry, b) = post(&s, &s.url, &k, &json!({"requests": completions(1)}), None).await;
    assert_rate_limited(st, &retry, &b, 60);

    // A batch larger than the limit can never pass: said so, not an endless retry.
    let other = key_with(&s, "small", QuotaChange::Keep, QuotaChange::Max(2)).await;
    let (st, retry, b) = post(
        &s,
        &s.url,
        &other,
        &json!({"requests": completions(3)}),
        None,
    )
    .await;
    assert_rate_limited(st, &retry, &b, 60);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("split"),
        "{b}"
    );

    // Other tenants are not metered by this key's quota.
    let (st, _, b) = post(
        &s,
        &s.url,
        &s.key,
        &json!({"requests": completions(10)}),
        None,
    )
    .await;
    assert_eq!(st, 202, "{b}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_jobs_quota_frees_as_jobs_finish() {
    // No LLM worker: accepted jobs stay QUEUED, so they stay active until cancelled.
    let opts = Options {
        workers: Vec::new(),
        ..Options::default()
    };
    let s = Stack::start_with(opts, |_| {}).await;
    let k = key_with(&s, "capped", QuotaChange::Max(4), QuotaChange::Keep).await;

    let (st, _, first) = post(&s, &s.url, &k, &json!({"requests": completions(3)}), None).await;
    assert_eq!(st, 202, "{first}");
    let before = rows(&s).await;
    let (st, retry, b) = post(&s, &s.url, &k, &json!({"requests": completions(2)}), None).await;
    assert_rate_limited(st, &retry, &b, 60);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("at once"),
        "{b}"
    );
    assert_eq!(rows(&s).await, before, "nothing created");
    let (st, _, b) = post(&s, &s.url, &k, &json!({"requests": completions(1)}), None).await;
    assert_eq!(st, 202, "{b}");

    // Finished (here: cancelled) jobs no longer count.
    let id = first["id"].as_str().unwrap();
    let r = s
        .http
        .post(format!("{}/v1/batches/{id}/cancel", s.url))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (st, _, b) = post(&s, &s.url, &k, &json!({"requests": completions(3)}), None).await;
    assert_eq!(st, 202, "{b}");

    // With an Idempotency-Key: refused over the quota and the key left unbound, so the same
    // key creates the batch once there is room.
    let (st, retry, b) = post(
        &s,
        &s.url,
        &k,
        &json!({"requests": completions(2)}),
        Some("idem-1"),
    )
    .await;
    assert_rate_limited(st, &retry, &b, 60);
    s.db.set_quotas(
        &k_id(&s, "capped").await,
        QuotaChange::Max(6),
        QuotaChange::Keep,
    )
    .await
    .unwrap();
    let r = s
        .http
        .post(format!("{}/v1/batches", s.url))
        .bearer_auth(&k)
        .header("Idempotency-Key", "idem-1")
        .json(&json!({"requests": completions(2)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert!(
        r.headers().get("Idempotent-Replayed").is_none(),
        "created, not replayed"
    );
    s.stop().await;
}

async fn k_id(s: &Stack, name: &str) -> String {
    s.db.list_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.name == name)
        .unwrap()
        .id
        .to_string()
}

/// Two gateway replicas admitting concurrently never pass a key's quota between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_cannot_both_exceed_a_quota() {
    let opts = Options {
        workers: Vec::new(),
        ..Options::default()
    };
    let s = Stack::start_with(opts, |_| {}).await;
    let b = s.replica(|_| {}).await;
    let url_b = b.url.clone();

    let k = key_with(&s, "racer", QuotaChange::Max(10), QuotaChange::Max(1_000)).await;
    let body = json!({"requests": completions(3)});
    let mut tries = Vec::new();
    for i in 0..16 {
        let url = if i % 2 == 0 {
            s.url.clone()
        } else {
            url_b.clone()
        };
        let (http, k, body) = (s.http.clone(), k.clone(), body.clone());
        tries.push(tokio::spawn(async move {
            http.post(format!("{url}/v1/batches"))
                .bearer_auth(&k)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut accepted = 0;
    for t in tries {
        match t.await.unwrap() {
            202 => accepted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(
        accepted, 3,
        "3 batches of 3 fit under 10 active jobs, a 4th does not"
    );
    assert_eq!(rows(&s).await, (3, 9));
    b.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_is_stored_returned_and_validated() {
    let s = Stack::start().await;
    for (given, shown) in [
        (None, "normal"),
        (Some("low"), "low"),
        (Some("normal"), "normal"),
        (Some("high"), "high"),
    ] {
        let mut body = json!({"requests": completions(1)});
        if let Some(p) = given {
            body["priority"] = json!(p);
        }
        let (st, _, b) = post(&s, &s.url, &s.key, &body, None).await;
        assert_eq!(st, 202, "{b}");
        assert_eq!(b["priority"], shown, "{b}");
        let (st, got) = s
            .get(&format!("/v1/batches/{}", b["id"].as_str().unwrap()))
            .await;
        assert_eq!(st, 200);
        assert_eq!(got["priority"], shown, "{got}");
    }
    let (st, list) = s.get("/v1/batches").await;
    assert_eq!(st, 200);
    let shown: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["priority"].as_str().unwrap())
        .collect();
    assert_eq!(shown, ["high", "normal", "low", "normal"], "{list}");

    let before = rows(&s).await;
    for bad in [
        json!("urgent"),
        json!("HIGH"),
        json!(2),
        json!(null),
        json!(["high"]),
    ] {
        let (st, _, b) = post(
            &s,
            &s.url,
            &s.key,
            &json!({"priority": bad, "requests": completions(1)}),
            None,
        )
        .await;
        if bad.is_null() {
            assert_eq!(st, 202, "null is the default: {b}");
            continue;
        }
        assert_eq!(st, 400, "{bad}: {b}");
        assert_eq!(b["error"]["type"], "invalid_request");
        assert_eq!(b["error"]["errors"][0]["field"], "priority", "{b}");
    }
    assert_eq!(
        rows(&s).await.0,
        before.0 + 1,
        "only the null one was created"
    );
    s.stop().await;
}
