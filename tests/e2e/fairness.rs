//! Fair share between tenants: per-key quotas (429 `rate_limited` + `Retry-After`, nothing
//! created), batch priority, and fair dispatch of a saturated modality, against the real
//! stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::RunQueryDsl;
use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use serde_json::{Value, json};
use volley_config::Settings;
use volley_db::QuotaChange;
use volley_domain::InferenceType;
use volley_harness::{Options, SimConfig, Stack};

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
        s.db.set_quotas(&k.key.id.to_string(), active, per_minute, None)
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
        None,
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

/// A stack whose LLM modality saturates at once: one worker with two slots on a 20 ms
/// provider (about 100 jobs/s), its queue full at 4 ready messages.
async fn saturating(fair: bool) -> Stack {
    let opts = Options {
        sim: SimConfig {
            latency_ms: 20,
            ..SimConfig::default()
        },
        workers: vec![InferenceType::Llm],
    };
    Stack::start_with(opts, |s: &mut Settings| {
        s.worker.concurrency = 2;
        s.dispatch.fair = fair;
        s.dispatch.min_queue_depth = 4;
        s.dispatch.interval_ms = 20;
    })
    .await
}

/// Submits `n` completions as `key` with `priority`; the batch id.
async fn submit(s: &Stack, key: &str, n: usize, priority: &str) -> String {
    let body = json!({"requests": completions(n), "priority": priority});
    let (st, _, b) = post(s, &s.url, key, &body, None).await;
    assert_eq!(st, 202, "{b}");
    b["id"].as_str().unwrap().to_owned()
}

async fn held_llm_jobs(s: &Stack) -> i64 {
    s.db.held_work()
        .await
        .unwrap()
        .iter()
        .filter(|h| h.inference_type == InferenceType::Llm)
        .map(|h| h.jobs)
        .sum()
}

#[derive(diesel::QueryableByName)]
struct Started {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = diesel::sql_types::Double)]
    at: f64,
}

/// Each job's start (seconds since the epoch), tagged by `column` (owner or batch id).
async fn starts(s: &Stack, column: &'static str) -> Vec<(String, f64)> {
    s.db.run(move |c| {
        let rows: Vec<Started> = diesel::sql_query(format!(
            "SELECT {column}::text AS key, EXTRACT(EPOCH FROM started_at)::float8 AS at \
             FROM jobs WHERE started_at IS NOT NULL"
        ))
        .load(&mut **c)?;
        Ok(rows.into_iter().map(|r| (r.key, r.at)).collect())
    })
    .await
    .unwrap()
}

fn first_and_last(all: &[(String, f64)], key: &str) -> (f64, f64) {
    let mine: Vec<f64> = all
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, t)| *t)
        .collect();
    assert!(!mine.is_empty(), "no starts of {key}");
    (
        mine.iter().copied().fold(f64::INFINITY, f64::min),
        mine.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_modality_is_shared_round_robin_between_three_tenants() {
    let s = saturating(true).await;
    let a = s.db.create_key("tenant-a", None).await.unwrap().secret;
    let b = s.db.create_key("tenant-b", None).await.unwrap().secret;
    let c = s.db.create_key("tenant-c", None).await.unwrap().secret;
    // A fills the queue (published at once: it was empty), then queues two more batches.
    let mut batches = vec![(a.clone(), submit(&s, &a, 100, "normal").await)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        batches.push((a.clone(), submit(&s, &a, 40, "normal").await));
    }
    assert_eq!(
        held_llm_jobs(&s).await,
        80,
        "the full queue held A's later batches"
    );
    // B and C come later, with a handful each.
    batches.push((b.clone(), submit(&s, &b, 5, "normal").await));
    batches.push((c.clone(), submit(&s, &c, 5, "normal").await));
    for (key, id) in &batches {
        let done = s.wait_done_as(key, id, Duration::from_secs(60)).await;
        assert_eq!(done["processed"], done["total"], "{done}");
    }
    assert_eq!(held_llm_jobs(&s).await, 0);
    let all = starts(&s, "owner").await;
    let (_, b_last) = first_and_last(&all, "tenant-b");
    let (_, c_last) = first_and_last(&all, "tenant-c");
    // B and C were released on their turns, after A's second batch and before its third:
    // FIFO would have started every job of A first.
    let a_after = all
        .iter()
        .filter(|(k, t)| k == "tenant-a" && *t > b_last.max(c_last))
        .count();
    assert!(
        a_after >= 38,
        "only {a_after} of A's jobs started after B's and C's"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_an_owner_higher_priority_runs_first() {
    let s = saturating(true).await;
    let blocker = submit(&s, &s.key, 100, "normal").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let low = submit(&s, &s.key, 5, "low").await;
    let normal = submit(&s, &s.key, 5, "normal").await;
    let high = submit(&s, &s.key, 5, "high").await;
    assert_eq!(held_llm_jobs(&s).await, 15, "held behind the full queue");
    for id in [&blocker, &low, &normal, &high] {
        s.wait_done(id, Duration::from_secs(60)).await;
    }
    let all = starts(&s, "batch_id").await;
    let (high_first, high_last) = first_and_last(&all, &high);
    let (normal_first, normal_last) = first_and_last(&all, &normal);
    let (low_first, _) = first_and_last(&all, &low);
    assert!(high_first <= normal_first && normal_first <= low_first);
    assert!(
        high_last <= normal_first,
        "every high job before any normal one"
    );
    assert!(
        normal_last <= low_first,
        "every normal job before any low one"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fair_dispatch_off_nothing_is_held() {
    let s = saturating(false).await;
    let first = submit(&s, &s.key, 100, "normal").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = submit(&s, &s.key, 5, "high").await;
    assert_eq!(held_llm_jobs(&s).await, 0);
    for id in [&first, &second] {
        s.wait_done(id, Duration::from_secs(60)).await;
    }
    // One FIFO queue: the later high-priority batch waited for the whole first one.
    let all = starts(&s, "batch_id").await;
    let (_, first_last) = first_and_last(&all, &first);
    let (second_first, _) = first_and_last(&all, &second);
    assert!(first_last <= second_first);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_held_batch_goes_out_in_turns_so_a_newcomer_waits_behind_the_floor() {
    let s = saturating(true).await;
    let a = s.db.create_key("tenant-a", None).await.unwrap().secret;
    let b = s.db.create_key("tenant-b", None).await.unwrap().secret;
    let blocker = submit(&s, &a, 100, "normal").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let big = submit(&s, &a, 60, "normal").await;
    assert_eq!(held_llm_jobs(&s).await, 60, "held behind the full queue");
    // The big batch's first turn: the queue's room (its floor is 4), not all 60.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held = held_llm_jobs(&s).await;
        if held < 60 {
            assert!(held >= 40, "one turn released {} of 60 jobs", 60 - held);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nothing released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let small = submit(&s, &b, 3, "normal").await;
    for (key, id) in [(&a, &blocker), (&a, &big), (&b, &small)] {
        let done = s.wait_done_as(key, id, Duration::from_secs(60)).await;
        assert_eq!(done["processed"], done["total"], "{done}");
    }
    let all = starts(&s, "batch_id").await;
    let (_, small_last) = first_and_last(&all, &small);
    // B's turn came after one or a few of A's, not after the whole batch.
    let big_after = all
        .iter()
        .filter(|(k, t)| k == &big && *t > small_last)
        .count();
    assert!(
        big_after >= 40,
        "only {big_after} of A's 60 started after B's 3"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modality_with_its_own_floor_is_held_sooner_than_the_rest() {
    let opts = Options {
        sim: SimConfig {
            latency_ms: 300,
            ..SimConfig::default()
        },
        workers: vec![InferenceType::Video, InferenceType::Llm],
    };
    let s = Stack::start_with(opts, |s: &mut Settings| {
        s.worker.concurrency = 1;
        s.dispatch.fair = true;
        s.dispatch.min_queue_depth = 1_000;
        s.dispatch.queue_depth = [("video".to_owned(), 2)].into_iter().collect();
        s.dispatch.interval_ms = 20;
    })
    .await;
    let videos = |n: usize| {
        let items: Vec<Value> = (0..n)
            .map(|i| json!({"endpoint": "/v1/videos/generations", "body": {"model": "sim-video", "prompt": format!("v{i}")}}))
            .collect();
        json!({"requests": items})
    };
    let mut ids = Vec::new();
    // Both modalities get six jobs on one slot: video's queue is full at 2, LLM's at 1,000.
    for body in [videos(6), json!({"requests": completions(6)})] {
        let (st, _, b) = post(&s, &s.url, &s.key, &body, None).await;
        assert_eq!(st, 202, "{b}");
        ids.push(b["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for body in [videos(3), json!({"requests": completions(3)})] {
        let (st, _, b) = post(&s, &s.url, &s.key, &body, None).await;
        assert_eq!(st, 202, "{b}");
        ids.push(b["id"].as_str().unwrap().to_owned());
    }
    let held = s.db.held_work().await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (held[0].inference_type, held[0].jobs),
        (InferenceType::Video, 3)
    );
    for id in &ids {
        let done = s.wait_done(id, Duration::from_secs(60)).await;
        assert_eq!(done["processed"], done["total"], "{done}");
    }
    s.stop().await;
}
