//! `GET /v1/batches/{id}/events` (Server-Sent Events) and completion estimates, against the
//! real stack: two gateway replicas on one database, resuming with `Last-Event-ID`, the
//! per-key stream cap, tenants, heartbeats and hostile event ids.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use volley_harness::Stack;

/// One event of a stream; comments (heartbeats) have `comment` set and nothing else.
#[derive(Debug, Clone, Default)]
struct Event {
    id: Option<String>,
    event: String,
    data: Value,
    comment: Option<String>,
}

/// A minimal SSE reader over a streaming response.
struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    async fn open(url: &str, key: &str, batch: &str, last_id: Option<&str>) -> Sse {
        let r = request(url, key, batch, last_id).await;
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event or comment; `None` when the server ended the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut e = Event::default();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        e.comment = Some(c.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(": ") {
                        match field {
                            "id" => e.id = Some(value.to_owned()),
                            "event" => e.event = value.to_owned(),
                            "data" => e.data = serde_json::from_str(value).unwrap(),
                            other => panic!("unexpected field {other:?} in {block:?}"),
                        }
                    }
                }
                return Some(e);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("no event within 30 s")?;
            self.buf
                .push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
    }

    /// Every event up to the end of the stream (heartbeats left out).
    async fn rest(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            if e.comment.is_none() {
                out.push(e);
            }
        }
        out
    }
}

async fn request(url: &str, key: &str, batch: &str, last_id: Option<&str>) -> reqwest::Response {
    let mut rb = reqwest::Client::new()
        .get(format!("{url}/v1/batches/{batch}/events"))
        .bearer_auth(key);
    if let Some(id) = last_id {
        rb = rb.header("Last-Event-ID", id);
    }
    rb.send().await.unwrap()
}

fn jobs(n: usize, latency_ms: impl Fn(usize) -> u64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"endpoint": "/v1/completions", "custom_id": format!("item-{i}"), "body": {
                "model": "qwen3-8b", "prompt": format!("p{i}"), "sim_latency_ms": latency_ms(i)
            }})
        })
        .collect()
}

/// The job ids of `events`' `job` events, checking none is repeated.
fn job_ids(events: &[Event]) -> Vec<String> {
    let ids: Vec<String> = events
        .iter()
        .filter(|e| e.event == "job")
        .map(|e| e.data["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "a job event was sent twice: {ids:?}"
    );
    ids
}

async fn batch_job_ids(s: &Stack, id: &str) -> HashSet<String> {
    let (_, b) = s.get(&format!("/v1/batches/{id}")).await;
    b["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A batch followed to `done` on two replicas at once: a `job` event per job (its status as
/// the API has it, and the item's `custom_id`), `progress` as counts change, `done` last, then the
/// end of the stream. Re-checks are set to a minute, so only NOTIFY can wake the streams in
/// time: the test fails if batch-state's notifications do not arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_follow_a_batch_to_done_on_either_replica() {
    let s = Stack::start_with(Default::default(), |s| s.gateway.sse_recheck_ms = 60_000).await;
    let b = s.replica(|_| {}).await;
    let id = s
        .submit_as(&s.key, &jobs(6, |i| 300 + 250 * i as u64))
        .await;
    let mut on_a = Sse::open(&s.url, &s.key, &id, None).await;
    let mut on_b = Sse::open(&b.url, &s.key, &id, None).await;
    // The jobs take under 2 s; without notifications the streams would wait a minute.
    let (a, bb) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(on_a.rest(), on_b.rest())
    })
    .await
    .expect("the streams were not woken by batch-state's notifications");
    let expected = batch_job_ids(&s, &id).await;
    for events in [&a, &bb] {
        let got: HashSet<String> = job_ids(events).into_iter().collect();
        assert_eq!(got, expected);
        for e in events.iter().filter(|e| e.event == "job") {
            let (_, job) = s
                .get(&format!("/v1/jobs/{}", e.data["id"].as_str().unwrap()))
                .await;
            assert_eq!(e.data["status"], job["status"]);
            assert!(e.data["custom_id"].is_string(), "{:?}", e.data);
            assert_eq!(e.data["custom_id"], job["custom_id"]);
            assert!(e.id.as_deref().unwrap().starts_with("1."));
        }
        let progress: Vec<&Event> = events.iter().filter(|e| e.event == "progress").collect();
        assert!(progress.len() >= 2, "{events:?}");
        for p in &progress {
            assert_eq!(p.data["id"], id.as_str());
            assert_eq!(p.data["total"], 6);
        }
        let done = events.last().unwrap();
        assert_eq!(done.event, "done", "{events:?}");
        assert_eq!(done.data["status"], "DONE");
        assert_eq!(done.data["processed"], 6);
        assert_eq!(events.iter().filter(|e| e.event == "done").count(), 1);
    }
    b.stop().await;
    s.stop().await;
}

/// A client that reconnects with the last id it got (to the other replica) receives every
/// job event it missed exactly once; reconnecting after `done` with the last id sends no job
/// event again; an empty Last-Event-ID starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_last_event_id_skips_nothing_and_repeats_nothing() {
    let s = Stack::start().await;
    let b = s.replica(|_| {}).await;
    let id = s
        .submit_as(&s.key, &jobs(8, |i| 200 + 300 * i as u64))
        .await;
    let mut first = Sse::open(&s.url, &s.key, &id, None).await;
    let mut seen = Vec::new();
    let mut last_id = None;
    while seen.len() < 3 {
        let e = first.next().await.unwrap();
        if e.comment.is_some() {
            continue;
        }
        last_id = e.id.clone();
        assert_ne!(e.event, "done");
        if e.event == "job" {
            seen.push(e);
        }
    }
    drop(first);
    let last_id = last_id.unwrap();
    let rest = Sse::open(&b.url, &s.key, &id, Some(&last_id))
        .await
        .rest()
        .await;
    let mut all = job_ids(&seen);
    all.extend(job_ids(&rest));
    let unique: HashSet<String> = all.iter().cloned().collect();
    assert_eq!(all.len(), 8, "{all:?}");
    assert_eq!(unique, batch_job_ids(&s, &id).await);
    assert_eq!(rest.last().unwrap().event, "done");

    // After done, the final id: nothing missed, so no job event, and done again.
    let final_id = rest.last().unwrap().id.clone().unwrap();
    let again = Sse::open(&s.url, &s.key, &id, Some(&final_id))
        .await
        .rest()
        .await;
    assert!(job_ids(&again).is_empty(), "{again:?}");
    assert_eq!(again.last().unwrap().event, "done");
    // The id from before the gap, on a finished batch: exactly the same missed jobs.
    let replay = Sse::open(&s.url, &s.key, &id, Some(&last_id))
        .await
        .rest()
        .await;
    assert_eq!(
        job_ids(&replay).into_iter().collect::<HashSet<_>>(),
        job_ids(&rest).into_iter().collect::<HashSet<_>>()
    );
    // Empty: from the start.
    let all_again = Sse::open(&s.url, &s.key, &id, Some("")).await.rest().await;
    assert_eq!(job_ids(&all_again).len(), 8);
    b.stop().await;
    s.stop().await;
}

/// A cancel (which the gateway writes) notifies too: the stream reports every job
/// CANCELLED and ends, with re-checks set to a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_ends_the_stream_at_once() {
    let s = Stack::start_with(Default::default(), |s| s.gateway.sse_recheck_ms = 60_000).await;
    let id = s.submit_as(&s.key, &jobs(3, |_| 30_000)).await;
    let mut stream = Sse::open(&s.url, &s.key, &id, None).await;
    let first = stream.next().await.unwrap();
    assert_eq!(first.event, "progress");
    let (status, _) = s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    assert_eq!(status, 200);
    let rest = tokio::time::timeout(Duration::from_secs(20), stream.rest())
        .await
        .expect("the cancel did not wake the stream");
    assert_eq!(job_ids(&rest).len(), 3);
    assert!(
        rest.iter()
            .filter(|e| e.event == "job")
            .all(|e| e.data["status"] == "CANCELLED")
    );
    let done = rest.last().unwrap();
    assert_eq!(
        (done.event.as_str(), &done.data["cancelled"]),
        ("done", &json!(3))
    );
    s.stop().await;
}

/// Event ids are the server's own: anything else is a clear 400, never a silent restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_last_event_ids_are_refused() {
    let s = Stack::start().await;
    let id = s.submit_as(&s.key, &jobs(3, |_| 5)).await;
    let long = format!("1.{}", "f".repeat(10_000));
    for bad in [
        "garbage",
        "1.",
        "1.00",
        "1.8",
        "1.zz",
        "1.F",
        "-1",
        "1.0 0",
        long.as_str(),
    ] {
        let r = request(&s.url, &s.key, &id, Some(bad)).await;
        assert_eq!(r.status().as_u16(), 400, "{bad:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Last-Event-ID"),
            "{v}"
        );
    }
    // Not ASCII.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/batches/{id}/events", s.url))
        .bearer_auth(&s.key)
        .header(
            "Last-Event-ID",
            reqwest::header::HeaderValue::from_bytes(b"1.\xff").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    s.stop().await;
}

/// Ownership as for GET /v1/batches/{id}: another tenant's batch does not exist for it; no
/// key or an unknown one is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tenants_and_bad_keys_are_refused() {
    let s = Stack::start().await;
    let id = s.submit_as(&s.key, &jobs(1, |_| 5)).await;
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    for (key, batch, status) in [
        (bob.as_str(), id.as_str(), 404),
        (s.key.as_str(), "999999", 404),
        (s.key.as_str(), "abc", 404),
        ("not-a-key", id.as_str(), 401),
    ] {
        let r = request(&s.url, key, batch, None).await;
        assert_eq!(r.status().as_u16(), status, "{key} {batch}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    let r = reqwest::Client::new()
        .get(format!("{}/v1/batches/{id}/events", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    s.stop().await;
}

async fn open_streams_gauge(url: &str) -> i64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("volley_gateway_event_streams "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no stream gauge in /metrics"))
}

/// A key holds at most `sse_max_streams_per_key` streams; the next is 429 `rate_limited` with
/// Retry-After, another key is not affected, and a closed stream gives its slot back (the
/// server's gauge of open streams falls). Heartbeats arrive at the configured interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_key_are_capped_and_heartbeats_flow() {
    let s = Stack::start_with(Default::default(), |s| {
        s.gateway.sse_max_streams_per_key = 2;
        s.gateway.sse_heartbeat_ms = 50;
    })
    .await;
    let id = s.submit_as(&s.key, &jobs(1, |_| 20_000)).await;
    let mut one = Sse::open(&s.url, &s.key, &id, None).await;
    let two = Sse::open(&s.url, &s.key, &id, None).await;
    assert_eq!(open_streams_gauge(&s.url).await, 2);
    let r = request(&s.url, &s.key, &id, None).await;
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limited");

    // The same owner's other key has slots of its own.
    let other = s.db.create_key("alice", None).await.unwrap().secret;
    let three = Sse::open(&s.url, &other, &id, None).await;
    assert_eq!(open_streams_gauge(&s.url).await, 3);

    // Heartbeats: comments on a stream with nothing else to say.
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let e = one.next().await.unwrap();
        if e.comment.as_deref() == Some("keep-alive") {
            heartbeats += 1;
        }
    }

    drop(two);
    drop(three);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_streams_gauge(&s.url).await != 1 {
        assert!(
            Instant::now() < deadline,
            "closed streams were not released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _again = Sse::open(&s.url, &s.key, &id, None).await;
    drop(one);
    s.stop().await;
}

/// The estimate: present and plausible while a batch runs and the modality has recent
/// throughput, null once the batch is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_a_completion_estimate_while_running() {
    let s = Stack::start().await;
    // Throughput for LLM jobs.
    let warm = s.submit_as(&s.key, &jobs(20, |_| 5)).await;
    s.wait_done(&warm, Duration::from_secs(30)).await;
    let id = s.submit_as(&s.key, &jobs(4, |_| 15_000)).await;
    // The aggregates are cached for a few seconds: poll until they include the warm-up.
    let deadline = Instant::now() + Duration::from_secs(12);
    let b = loop {
        let (_, b) = s.get(&format!("/v1/batches/{id}")).await;
        assert_ne!(
            b["status"], "DONE",
            "finished before an estimate showed: {b}"
        );
        if !b["estimated_seconds_remaining"].is_null() {
            break b;
        }
        assert!(Instant::now() < deadline, "no estimate: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let secs = b["estimated_seconds_remaining"].as_u64().unwrap();
    assert!(secs <= 3_600, "{b}");
    let at = chrono::DateTime::parse_from_rfc3339(b["estimated_completion_at"].as_str().unwrap())
        .unwrap();
    let expected = chrono::Utc::now() + chrono::Duration::seconds(secs as i64);
    assert!((at.timestamp() - expected.timestamp()).abs() <= 5, "{b}");
    // Existing fields unchanged.
    assert_eq!(b["total"], 4);

    let done = s.wait_done(&id, Duration::from_secs(60)).await;
    assert!(done["estimated_completion_at"].is_null(), "{done}");
    assert!(done["estimated_seconds_remaining"].is_null(), "{done}");
    assert!(
        done.as_object()
            .unwrap()
            .contains_key("estimated_completion_at")
    );
    s.stop().await;
}
