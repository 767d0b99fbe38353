//! The contract end to end: real gateway, batch-state, workers, RabbitMQ and PostgreSQL, with
//! the provider simulator over real HTTP standing in for third-party providers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::{Value, json};
use volley_harness::{Options, Stack};

const LONG: Duration = Duration::from_secs(60);

fn example() -> Value {
    json!({
        "label": "Q2 product shots",
        "requests": [
            {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a minimalist desk lamp"}},
            {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a wooden bookshelf with plants"}},
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
                "messages": [{"role": "user", "content": "Write a product description for a lamp."}]}}
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_example_runs_to_done() {
    let s = Stack::start().await;
    let (status, b) = s.post("/v1/batches", &example()).await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().expect("id is a string").to_owned();
    assert_eq!(b["label"], "Q2 product shots");
    assert_eq!(b["status"], "PENDING");
    assert_eq!(
        (b["total"].as_i64(), b["queued"].as_i64()),
        (Some(3), Some(3))
    );
    for k in ["processing", "processed", "failed"] {
        assert_eq!(b[k], 0, "{k}");
    }
    let created = b["created"].as_i64().unwrap();
    assert!(
        (created - chrono_now()).abs() < 60,
        "created is unix seconds"
    );

    // Read-your-writes: the batch is there at once.
    let (status, now) = s.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(now["jobs"].as_array().unwrap().len(), 3);

    let done = s.wait_done(&id, LONG).await;
    assert_eq!(done["processed"], 3, "{done}");
    assert_eq!(
        (
            done["queued"].as_i64(),
            done["processing"].as_i64(),
            done["failed"].as_i64()
        ),
        (Some(0), Some(0), Some(0))
    );
    let jobs = done["jobs"].as_array().unwrap();
    let types: Vec<&str> = jobs
        .iter()
        .map(|j| j["inference_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["IMAGE", "IMAGE", "LLM"]);
    for j in jobs {
        assert_eq!(j["status"], "PROCESSED");
        assert!(j["id"].is_string());
        assert_eq!(
            j["url"],
            format!("{}/v1/jobs/{}", s.url, j["id"].as_str().unwrap())
        );
    }

    // Each job's result is right for its kind; image URLs download as PNG.
    for j in &jobs[..2] {
        let (status, job) = s
            .get(&format!("/v1/jobs/{}", j["id"].as_str().unwrap()))
            .await;
        assert_eq!(status, 200);
        assert_eq!(job["status"], "PROCESSED");
        assert_eq!(job["endpoint"], "/v1/images/generations");
        assert_eq!(job["model"], "flux-dev");
        assert_eq!(job["batch_id"], id.as_str());
        assert_eq!(job["attempts"], 1);
        assert!(job["finished"].as_i64().unwrap() >= job["created"].as_i64().unwrap());
        let url = job["result"]["data"][0]["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/v1/media/", s.url)), "{url}");
        let r = s.http.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let bytes = r.bytes().await.unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a real PNG");
    }
    let (_, chat) = s
        .get(&format!("/v1/jobs/{}", jobs[2]["id"].as_str().unwrap()))
        .await;
    let text = chat["result"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(!text.is_empty());
    assert!(chat["usage"]["total_tokens"].as_i64().unwrap() > 0);
    assert!(chat.get("error").is_none());

    let (status, list) = s.get("/v1/batches").await;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], id.as_str());
    s.stop().await;
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn item(endpoint: &str, body: Value) -> Value {
    json!({"endpoint": endpoint, "body": body})
}

/// One request of each of the six endpoints, `i` making each prompt distinct.
fn six(i: usize) -> Vec<Value> {
    vec![
        item(
            "/v1/chat/completions",
            json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": format!("hi {i}")}]}),
        ),
        item(
            "/v1/completions",
            json!({"model": "qwen3-8b", "prompt": format!("once {i}")}),
        ),
        item(
            "/v1/images/generations",
            json!({"model": "flux-dev", "prompt": format!("lamp {i}"), "response_format": if i.is_multiple_of(2) { "url" } else { "b64_json" }}),
        ),
        item(
            "/v1/videos/generations",
            json!({"model": "sim-video", "prompt": format!("waves {i}")}),
        ),
        item(
            "/v1/music/generations",
            json!({"model": "sim-music", "prompt": format!("jazz {i}")}),
        ),
        item(
            "/v1/audio/speech",
            json!({"model": "tts-1", "input": format!("hello number {i}"), "voice": "alloy"}),
        ),
    ]
}

async fn batch_count(s: &Stack) -> usize {
    let (_, list) = s.get("/v1/batches").await;
    list["data"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_of_every_endpoint_completes_and_bad_batches_create_nothing() {
    let s = Stack::start().await;
    let requests: Vec<Value> = (0..43).flat_map(six).take(256).collect();
    assert_eq!(requests.len(), 256);
    let (status, b) = s.post("/v1/batches", &json!({"requests": requests})).await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();

    // Too many: rejected whole.
    let too_many: Vec<Value> = (0..43).flat_map(six).take(257).collect();
    let (status, e) = s.post("/v1/batches", &json!({"requests": too_many})).await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["type"], "too_large");

    // Each kind of malformed item is named by index and field path.
    let mut bad = six(0);
    bad.extend([
        item("/v1/chat/completions", json!({"model": "qwen3-8b"})),
        item("/v1/completions", json!({"model": "qwen3-8b", "prompt": 7})),
        item(
            "/v1/images/generations",
            json!({"model": "no-such-model", "prompt": "x"}),
        ),
        item("/v1/videos/generations", json!({"model": "sim-video"})),
        item("/v1/music/generations", json!({"prompt": "x"})),
        item("/v1/audio/speech", json!({"model": "tts-1", "input": ""})),
        item("/v1/audio/transcriptions", json!({"model": "whisper"})),
        item("/v1/embeddings", json!({"model": "x"})),
        json!({"endpoint": "/v1/completions", "body": [1, 2]}),
        json!("just a string"),
    ]);
    let (status, e) = s.post("/v1/batches", &json!({"requests": bad})).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request");
    let fields: Vec<&str> = e["error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "requests[6].body.messages",
            "requests[7].body.prompt",
            "requests[8].body.model",
            "requests[9].body.prompt",
            "requests[10].body.model",
            "requests[11].body.input",
            "requests[12].endpoint",
            "requests[13].endpoint",
            "requests[14].body",
            "requests[15]",
        ]
    );
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("requests[12].endpoint") && message.contains("file upload"),
        "{message}"
    );
    for (body, why) in [
        (json!({}), "missing requests"),
        (json!({"requests": []}), "empty requests"),
        (json!({"requests": {"a": 1}}), "requests not an array"),
        (json!([1, 2]), "body not an object"),
        (
            json!({"requests": six(0), "label": 5}),
            "label not a string",
        ),
    ] {
        let (status, e) = s.post("/v1/batches", &body).await;
        assert_eq!(
            (status, e["error"]["type"].as_str()),
            (400, Some("invalid_request")),
            "{why}: {e}"
        );
    }
    assert_eq!(batch_count(&s).await, 1, "rejected batches create nothing");
    let jobs: i64 =
        s.db.run(|c| {
            use diesel::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let r: N = diesel::sql_query("SELECT count(*) AS n FROM jobs").get_result(&mut **c)?;
            Ok(r.n)
        })
        .await
        .unwrap();
    assert_eq!(jobs, 256);

    let done = s.wait_done(&id, Duration::from_secs(120)).await;
    assert_eq!(done["processed"], 256, "{}", done["failed"]);
    // Spot-check one job of each kind.
    let ids: Vec<String> = done["jobs"].as_array().unwrap()[..6]
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    let want = [
        ("LLM", None),
        ("LLM", None),
        ("IMAGE", Some("image/png")),
        ("VIDEO", Some("video/mp4")),
        ("MUSIC", Some("audio/wav")),
        ("TTS", Some("audio/wav")),
    ];
    for (jid, (t, ct)) in ids.iter().zip(want) {
        let (_, job) = s.get(&format!("/v1/jobs/{jid}")).await;
        assert_eq!(job["inference_type"], t);
        match ct {
            None => assert!(job["result"]["choices"][0].is_object(), "{job}"),
            Some(ct) => {
                let entry = &job["result"]["data"][0];
                assert_eq!(entry["content_type"], ct, "{job}");
                let r = s
                    .http
                    .get(entry["url"].as_str().unwrap())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.headers()["content-type"], ct);
                let body = r.bytes().await.unwrap();
                match ct {
                    "image/png" => assert!(body.starts_with(b"\x89PNG")),
                    "audio/wav" => assert!(body.starts_with(b"RIFF") && &body[8..12] == b"WAVE"),
                    _ => assert_eq!(&body[4..8], b"ftyp"),
                }
            }
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs_and_keeps_finished_ones() {
    let s = Stack::start_with(Default::default(), |s| s.worker.concurrency = 3).await;
    let mut requests = vec![
        item(
            "/v1/completions",
            json!({"model": "qwen3-8b", "prompt": "fast 1", "sim_latency_ms": 0}),
        ),
        item(
            "/v1/completions",
            json!({"model": "qwen3-8b", "prompt": "fast 2", "sim_latency_ms": 0}),
        ),
    ];
    for i in 0..10 {
        requests.push(item(
            "/v1/completions",
            json!({"model": "qwen3-8b", "prompt": format!("slow {i}"), "sim_latency_ms": 60_000}),
        ));
    }
    requests.push(item(
        "/v1/videos/generations",
        json!({"model": "sim-video", "prompt": "long", "sim_latency_ms": 60_000}),
    ));
    let (_, b) = s.post("/v1/batches", &json!({"requests": requests})).await;
    let id = b["id"].as_str().unwrap().to_owned();
    let before = s
        .wait_batch(&id, LONG, |b| {
            b["processed"] == 2 && b["processing"].as_i64() == Some(4)
        })
        .await;
    assert_eq!(
        before["queued"], 7,
        "3 LLM slots and one video: the rest wait"
    );
    let (status, after) = s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["status"], "DONE");
    assert_eq!(
        (after["processed"].as_i64(), after["cancelled"].as_i64()),
        (Some(2), Some(11))
    );
    assert_eq!(
        (after["queued"].as_i64(), after["processing"].as_i64()),
        (Some(0), Some(0))
    );
    let jobs = after["jobs"].as_array().unwrap();
    let (_, fast) = s
        .get(&format!("/v1/jobs/{}", jobs[0]["id"].as_str().unwrap()))
        .await;
    assert_eq!(fast["status"], "PROCESSED");
    assert!(
        fast["result"]["choices"].is_array(),
        "finished jobs keep their results"
    );

    // Running provider calls are aborted, and the prediction is cancelled upstream.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = s.sim().stats();
        let running = s.worker_in_flight().await;
        if running == 0 && st.predictions_cancelled == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{running} jobs still running: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Cancel is idempotent and a DONE batch does not change.
    let (_, again) = s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    assert_eq!(again["cancelled"], 11);
    assert_eq!(again["processed"], 2);

    // A late result for a cancelled job is discarded.
    let slow_id: i64 = jobs[5]["id"].as_str().unwrap().parse().unwrap();
    publish_event(&s, slow_id, 1, json!({"late": true})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, slow) = s.get(&format!("/v1/jobs/{slow_id}")).await;
    assert_eq!(slow["status"], "CANCELLED");
    assert!(slow.get("result").is_none());

    // Single-job cancel: only QUEUED or PROCESSING jobs, idempotent.
    let (_, b2) = s
        .post("/v1/batches", &json!({"requests": [
            item("/v1/completions", json!({"model": "qwen3-8b", "prompt": "a", "sim_latency_ms": 60_000})),
            item("/v1/completions", json!({"model": "qwen3-8b", "prompt": "b", "sim_latency_ms": 0})),
        ]}))
        .await;
    let id2 = b2["id"].as_str().unwrap().to_owned();
    let (_, view) = s.get(&format!("/v1/batches/{id2}")).await;
    let j0 = view["jobs"][0]["id"].as_str().unwrap().to_owned();
    let (status, j) = s.post_empty(&format!("/v1/jobs/{j0}/cancel")).await;
    assert_eq!((status, j["status"].as_str()), (200, Some("CANCELLED")));
    let done = s.wait_done(&id2, LONG).await;
    assert_eq!(
        (done["processed"].as_i64(), done["cancelled"].as_i64()),
        (Some(1), Some(1))
    );
    let j1 = done["jobs"][1]["id"].as_str().unwrap();
    let (status, j) = s.post_empty(&format!("/v1/jobs/{j1}/cancel")).await;
    assert_eq!((status, j["status"].as_str()), (200, Some("PROCESSED")));
    s.stop().await;
}

/// Publishes a success event straight onto the events queue, as a (late) worker would.
async fn publish_event(s: &Stack, job_id: i64, attempt: i32, result: Value) {
    use volley_proto::{JobEvent, Succeeded, job_event};
    let broker = volley_amqp::Broker::new(&volley_harness::amqp_url(), "test", s.names());
    let e = JobEvent {
        job_id,
        attempt,
        outcome: Some(job_event::Outcome::Succeeded(Succeeded {
            result_json: serde_json::to_vec(&result).unwrap(),
            usage: None,
            ..Default::default()
        })),
        at_ms: 0,
        ..Default::default()
    };
    let r = broker.publish_events(&[e]).await.unwrap();
    assert!(r[0].is_ok());
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_owners() {
    let s = Stack::start_with(Default::default(), |_| {}).await;
    let (_, b) = s.post("/v1/batches", &example()).await;
    let id = b["id"].as_str().unwrap().to_owned();
    let (_, view) = s.get(&format!("/v1/batches/{id}")).await;
    let job = view["jobs"][0]["id"].as_str().unwrap().to_owned();

    let url = format!("{}/v1/batches", s.url);
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "unauthorized");
    let r = s
        .http
        .get(&url)
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.get_as("/v1/batches", "vk_wrong").await.0, 401);
    let r = s.http.post(&url).json(&example()).send().await.unwrap();
    assert_eq!(r.status(), 401, "no key, no batch");

    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    assert_eq!(s.get_as(&format!("/v1/batches/{id}"), &bob).await.0, 404);
    assert_eq!(s.get_as(&format!("/v1/jobs/{job}"), &bob).await.0, 404);
    let r = s
        .http
        .post(format!("{}/v1/batches/{id}/cancel", s.url))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (status, list) = s.get_as("/v1/batches", &bob).await;
    assert_eq!((status, list["data"].as_array().unwrap().len()), (200, 0));
    assert_eq!(s.get("/v1/batches/999999").await.0, 404);
    assert_eq!(s.get("/v1/jobs/999999").await.0, 404);
    assert_eq!(s.get("/v1/batches/not-a-number").await.0, 404);
    assert_eq!(s.get("/v1/jobs/-1").await.0, 404);

    // A second key of the same owner sees the batch; a revoked key sees nothing.
    let alice2 =
        s.db.create_key("alice-ci", Some("alice"))
            .await
            .unwrap()
            .secret;
    assert_eq!(s.get_as(&format!("/v1/batches/{id}"), &alice2).await.0, 200);
    s.db.revoke_key("alice-ci").await.unwrap();
    assert_eq!(s.get_as(&format!("/v1/batches/{id}"), &alice2).await.0, 401);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_messages_and_duplicate_events_are_not_counted_twice() {
    let s = Stack::start().await;
    let (_, b) = s.post("/v1/batches", &example()).await;
    let id = b["id"].as_str().unwrap().to_owned();
    let done = s.wait_done(&id, LONG).await;
    let jobs: Vec<i64> = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().parse().unwrap())
        .collect();

    // Publish every job again, as a redelivery or the sweeper would, and duplicate events.
    let broker = volley_amqp::Broker::new(&volley_harness::amqp_url(), "test", s.names());
    let dispatch = s.db.due_for_dispatch(0).await.unwrap();
    assert!(dispatch.is_empty());
    let msgs: Vec<volley_proto::JobMessage> = ["IMAGE", "IMAGE", "LLM"]
        .iter()
        .zip(&jobs)
        .map(|(t, id)| volley_proto::JobMessage {
            job_id: *id,
            batch_id: 0,
            inference_type: t.to_string(),
            endpoint: if *t == "LLM" { "/v1/chat/completions" } else { "/v1/images/generations" }.into(),
            model: if *t == "LLM" { "qwen3-8b" } else { "flux-dev" }.into(),
            body_json: br#"{"model":"flux-dev","prompt":"again","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            accepted_at_ms: 0,
        })
        .collect();
    for r in broker.publish_jobs(&msgs).await.unwrap() {
        r.unwrap();
    }
    broker.close().await;
    for j in &jobs {
        publish_event(&s, *j, 1, json!({"duplicate": true})).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, again) = s.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(again["processed"], 3);
    assert_eq!(again["total"], 3);
    for j in &jobs {
        let (_, job) = s.get(&format!("/v1/jobs/{j}")).await;
        assert_eq!(
            job["attempts"], 1,
            "a redelivered message does not claim again"
        );
        assert!(
            job["result"].get("duplicate").is_none(),
            "the first outcome stands"
        );
    }
    let outcomes: Vec<i32> =
        s.db.run(|c| {
            use diesel::prelude::*;
            #[derive(diesel::QueryableByName)]
            struct O {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                outcomes: i32,
            }
            let r: Vec<O> =
                diesel::sql_query("SELECT outcomes FROM jobs ORDER BY id").load(&mut **c)?;
            Ok(r.into_iter().map(|o| o.outcomes).collect())
        })
        .await
        .unwrap();
    assert_eq!(outcomes, [1, 1, 1]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_disabled_answers_503() {
    let s = Stack::start_with(Default::default(), |s| s.gateway.async_enabled = false).await;
    let (status, e) = s.post("/v1/batches", &example()).await;
    assert_eq!(status, 503);
    assert_eq!(e["error"]["type"], "async_disabled");
    assert_eq!(batch_count(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_hostile_http() {
    let s = Stack::start().await;
    let (status, m) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(m["object"], "list");
    let data = m["data"].as_array().unwrap();
    let find = |id: &str| {
        data.iter()
            .find(|x| x["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    assert!(
        find("flux-dev")["endpoints"]
            .as_array()
            .unwrap()
            .contains(&json!("/v1/images/generations"))
    );
    assert!(
        find("qwen3-8b")["endpoints"]
            .as_array()
            .unwrap()
            .contains(&json!("/v1/chat/completions"))
    );
    for e in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/images/generations",
        "/v1/videos/generations",
        "/v1/music/generations",
        "/v1/audio/speech",
    ] {
        assert!(
            data.iter()
                .any(|x| x["endpoints"].as_array().unwrap().contains(&json!(e))),
            "no model for {e}"
        );
    }
    for url in [
        format!("{}/healthz", s.url),
        format!("{}/healthz", s.settings.state.url),
    ] {
        assert_eq!(s.http.get(url).send().await.unwrap().status(), 200);
    }

    let post_raw = |body: Vec<u8>| {
        s.http
            .post(format!("{}/v1/batches", s.url))
            .bearer_auth(&s.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post_raw(b"{\"requests\": [".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let r = post_raw(vec![0xff, 0xfe, 0x00]).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post_raw(vec![b' '; 17 * 1024 * 1024]).await.unwrap();
    assert_eq!(r.status(), 413);
    let deep = "[".repeat(100_000);
    let r = post_raw(deep.into_bytes()).await.unwrap();
    assert_eq!(r.status(), 400, "deep nesting is refused, not a crash");
    assert_eq!(s.get("/v1/nope").await.0, 404);
    assert_eq!(batch_count(&s).await, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_links_are_signed() {
    let s = Stack::start().await;
    let (_, b) = s
        .post("/v1/batches", &json!({"requests": [item("/v1/images/generations", json!({"model": "flux-dev", "prompt": "x"}))]}))
        .await;
    let done = s.wait_done(b["id"].as_str().unwrap(), LONG).await;
    let (_, job) = s
        .get(&format!(
            "/v1/jobs/{}",
            done["jobs"][0]["id"].as_str().unwrap()
        ))
        .await;
    let url = job["result"]["data"][0]["url"].as_str().unwrap().to_owned();
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 200);
    let (path, query) = url.split_once('?').unwrap();
    let parts: Vec<(String, String)> = query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let part = |name: &str| parts.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let (job_id, expires, sig) = (part("job"), part("expires"), part("sig"));
    let mut flipped = sig.clone().into_bytes();
    flipped[0] = if flipped[0] == b'a' { b'b' } else { b'a' };
    let tampered = format!(
        "{path}?job={job_id}&expires={expires}&sig={}",
        String::from_utf8(flipped).unwrap()
    );
    assert_eq!(s.http.get(&tampered).send().await.unwrap().status(), 403);
    // Extending the expiry without re-signing is refused too.
    let later = expires.parse::<i64>().unwrap() + 1000;
    assert_eq!(
        s.http
            .get(format!("{path}?job={job_id}&expires={later}&sig={sig}"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    // An expired but validly signed link is refused.
    let key = path.split("/v1/media/").nth(1).unwrap();
    let job_id: i64 = job_id.parse().unwrap();
    let signer = volley_media::Signer::new(s.settings.media.signing_key.expose().as_bytes());
    let old = signer.url(&s.url, job_id, key, chrono_now() - 10);
    assert_eq!(s.http.get(&old).send().await.unwrap().status(), 403);
    assert_eq!(
        s.http.get(path).send().await.unwrap().status(),
        403,
        "unsigned"
    );
    let escape = signer.url(&s.url, job_id, "../../etc/passwd", chrono_now() + 100);
    assert!(matches!(
        s.http.get(&escape).send().await.unwrap().status().as_u16(),
        403 | 404
    ));
    // Each read signs afresh.
    let (_, again) = s
        .get(&format!(
            "/v1/jobs/{}",
            done["jobs"][0]["id"].as_str().unwrap()
        ))
        .await;
    assert!(
        again["result"]["data"][0]["url"]
            .as_str()
            .unwrap()
            .contains("sig=")
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_committed_but_never_published_are_published_by_the_sweeper() {
    let s = Stack::start().await;
    // Straight into PostgreSQL, as if the gateway died between commit and publish.
    let jobs = vec![volley_db::NewJob {
        inference_type: "LLM".into(),
        endpoint: "/v1/completions".into(),
        model: "qwen3-8b".into(),
        body: json!({"model": "qwen3-8b", "prompt": "orphan"}),
        custom_id: None,
    }];
    let (b, _) = s.db.create_batch("alice", None, jobs, 0).await.unwrap();
    let done = s.wait_done(&b.id.to_string(), LONG).await;
    assert_eq!(done["processed"], 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_records_a_batchs_confirms_once_on_the_batch() {
    // A grace longer than the test: whatever records the publish here is the gateway.
    let s = Stack::start_with(Options::default(), |st| {
        st.state.dispatch_grace_ms = 600_000
    })
    .await;
    let requests: Vec<Value> = (0..12)
        .map(|i| json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": format!("p{i}")}}))
        .collect();
    let (status, b) = s
        .post("/v1/batches", &json!({ "requests": requests }))
        .await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let done = s.wait_done(&id, LONG).await;
    assert_eq!(done["processed"], 12, "{done}");
    let batch_id: i64 = id.parse().unwrap();
    let (published, undispatched) =
        s.db.run(move |c| {
            use diesel::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct R {
                #[diesel(sql_type = diesel::sql_types::Bool)]
                published: bool,
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                undispatched: i64,
            }
            let r: R = diesel::sql_query(
                "SELECT b.published_at IS NOT NULL AS published, \
                   (SELECT count(*) FROM jobs j WHERE j.batch_id = b.id \
                      AND j.dispatched_at IS NULL) AS undispatched \
                 FROM batches b WHERE b.id = $1",
            )
            .bind::<diesel::sql_types::BigInt, _>(batch_id)
            .get_result(&mut **c)?;
            Ok((r.published, r.undispatched))
        })
        .await
        .unwrap();
    assert!(published, "the gateway recorded the confirms on the batch");
    assert_eq!(undispatched, 0, "no job went to the outbox");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_retry_or_fail_with_the_providers_message() {
    let s = Stack::start().await;
    let (_, b) = s
        .post("/v1/batches", &json!({"requests": [
            item("/v1/completions", json!({"model": "qwen3-8b", "prompt": "a", "sim_fail": "fatal"})),
            item("/v1/completions", json!({"model": "qwen3-8b", "prompt": "b", "sim_fail": "retryable", "sim_fail_times": 2, "sim_key": "retry-b"})),
            item("/v1/completions", json!({"model": "qwen3-8b", "prompt": "c", "sim_fail": "retryable"})),
            item("/v1/videos/generations", json!({"model": "sim-video", "prompt": "d", "sim_fail": "fatal"})),
        ]}))
        .await;
    let done = s.wait_done(b["id"].as_str().unwrap(), LONG).await;
    assert_eq!(
        (done["processed"].as_i64(), done["failed"].as_i64()),
        (Some(1), Some(3)),
        "{done}"
    );
    let jobs: Vec<Value> =
        futures::future::join_all(done["jobs"].as_array().unwrap().iter().map(|j| async {
            s.get(&format!("/v1/jobs/{}", j["id"].as_str().unwrap()))
                .await
                .1
        }))
        .await;
    assert_eq!(jobs[0]["status"], "FAILED");
    assert_eq!(jobs[0]["attempts"], 1, "a 4xx is not retried");
    assert_eq!(jobs[0]["error"]["type"], "invalid_request");
    assert!(
        jobs[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("simulated invalid request"),
        "{}",
        jobs[0]
    );
    assert_eq!(jobs[1]["status"], "PROCESSED");
    assert_eq!(jobs[1]["attempts"], 3, "two 500s, then success");
    assert!(jobs[1]["last_error"].as_str().unwrap().contains("500"));
    assert_eq!(jobs[2]["status"], "FAILED");
    assert_eq!(jobs[2]["attempts"], 4, "up to the configured attempts");
    assert!(
        jobs[2]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 4 attempts")
    );
    assert_eq!(jobs[3]["error"]["type"], "provider_error");
    assert!(
        jobs[3]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prediction failed")
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_go_to_the_dead_letter_queue() {
    let s = Stack::start().await;
    let names = s.names();
    let broker = volley_amqp::Broker::new(&volley_harness::amqp_url(), "test", names.clone());
    let q = names.job_queue(volley_domain::InferenceType::Llm);
    broker
        .publish_raw(&q, b"not protobuf at all".to_vec(), Some("junk".into()))
        .await
        .unwrap();
    broker
        .publish_raw(&names.events_queue(), vec![0xff; 10], None)
        .await
        .unwrap();
    broker.close().await;
    let conn = volley_amqp::connect(&volley_harness::amqp_url(), "test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (jobs_dlq, _) = volley_amqp::queue_depth(&ch, &volley_amqp::Names::dlq(&q))
            .await
            .unwrap();
        let (events_dlq, _) =
            volley_amqp::queue_depth(&ch, &volley_amqp::Names::dlq(&names.events_queue()))
                .await
                .unwrap();
        if jobs_dlq == 1 && events_dlq == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dead letters: jobs {jobs_dlq}, events {events_dlq}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "".into()).await;
    // The stack still works.
    let (_, b) = s.post("/v1/batches", &example()).await;
    s.wait_done(b["id"].as_str().unwrap(), LONG).await;
    s.stop().await;
}
