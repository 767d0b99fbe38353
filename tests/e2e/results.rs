//! What batch clients expect beyond the contract, end to end on the real stack: per-item
//! `custom_id` and batch `metadata` on every object, lookup by custom_id, cursor paging with
//! filters, and results in bulk as NDJSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use volley_domain::InferenceType;
use volley_harness::{Options, Stack};

const LONG: Duration = Duration::from_secs(60);

fn completion(prompt: &str, custom_id: Option<&str>) -> Value {
    let mut v =
        json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": prompt}});
    if let Some(c) = custom_id {
        v["custom_id"] = json!(c);
    }
    v
}

fn image(prompt: &str) -> Value {
    json!({"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": prompt}})
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn batch_count(s: &Stack) -> usize {
    let (_, list) = s.get("/v1/batches").await;
    list["data"].as_array().unwrap().len()
}

/// `GET path` as `key`: status, content type and the body's lines parsed as JSON.
async fn ndjson(s: &Stack, path: &str, key: &str) -> (u16, String, Vec<Value>) {
    let r = s
        .http
        .get(format!("{}{path}", s.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    let lines = if status == 200 {
        assert!(text.is_empty() || text.ends_with('\n'), "{text}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    } else {
        vec![serde_json::from_str(&text).unwrap()]
    };
    (status, ct, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_id_and_metadata_appear_on_every_object() {
    let s = Stack::start().await;
    let meta = json!({"team": "ads", "run": "2026-12-04", "empty": ""});
    let body = json!({
        "label": "tagged",
        "metadata": meta,
        "requests": [
            completion("one", Some("first-1")),
            completion("two", None),
            completion("three", Some("x:y.z_-3")),
        ]
    });
    let (st, b) = s.post("/v1/batches", &body).await;
    assert_eq!(st, 202, "{b}");
    assert_eq!(b["metadata"], meta);
    let id = b["id"].as_str().unwrap().to_owned();

    let done = s.wait_done(&id, LONG).await;
    assert_eq!(done["metadata"], meta);
    let cids: Vec<&Value> = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| &j["custom_id"])
        .collect();
    assert_eq!(cids, [&json!("first-1"), &Value::Null, &json!("x:y.z_-3")]);

    let (_, list) = s.get("/v1/batches").await;
    assert_eq!(list["data"][0]["metadata"], meta);
    let (_, paged) = s.get("/v1/batches?limit=1").await;
    assert_eq!(paged["data"][0]["metadata"], meta);

    let job0 = done["jobs"][0]["id"].as_str().unwrap();
    let (_, job) = s.get(&format!("/v1/jobs/{job0}")).await;
    assert_eq!(job["custom_id"], "first-1");
    let (_, job1) = s
        .get(&format!(
            "/v1/jobs/{}",
            done["jobs"][1]["id"].as_str().unwrap()
        ))
        .await;
    assert!(job1["custom_id"].is_null(), "{job1}");
    assert!(job1.as_object().unwrap().contains_key("custom_id"));

    let (_, jobs) = s.get(&format!("/v1/batches/{id}/jobs")).await;
    let listed: Vec<&Value> = jobs["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| &j["custom_id"])
        .collect();
    assert_eq!(listed, cids);

    let (st, _, lines) = ndjson(&s, &format!("/v1/batches/{id}/results"), &s.key).await;
    assert_eq!(st, 200);
    let from_results: Vec<&Value> = lines.iter().map(|l| &l["custom_id"]).collect();
    assert_eq!(from_results, cids);

    // Cancelling answers the batch object, metadata included.
    let (_, cancelled) = s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    assert_eq!(cancelled["metadata"], meta);
    assert_eq!(cancelled["jobs"][0]["custom_id"], "first-1");

    // Absent: `metadata: {}` and `custom_id: null`, existing fields unchanged.
    let (st, plain) = s
        .post("/v1/batches", &json!({"requests": [completion("p", None)]}))
        .await;
    assert_eq!(st, 202);
    assert_eq!(plain["metadata"], json!({}));
    assert!(plain["label"].is_null());
    let (_, plain) = s
        .get(&format!("/v1/batches/{}", plain["id"].as_str().unwrap()))
        .await;
    assert_eq!(plain["metadata"], json!({}));
    assert!(plain["jobs"][0]["custom_id"].is_null());
    assert_eq!(plain["total"], 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replays_cover_custom_id_and_metadata() {
    let s = Stack::start().await;
    let post = |body: Value, key: &'static str| {
        let rb = s
            .http
            .post(format!("{}/v1/batches", s.url))
            .bearer_auth(&s.key)
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let r = rb.send().await.unwrap();
            let replayed = r.headers().contains_key("Idempotent-Replayed");
            (
                r.status().as_u16(),
                replayed,
                r.json::<Value>().await.unwrap(),
            )
        }
    };
    let body = json!({"metadata": {"k": "v"}, "requests": [completion("a", Some("a1"))]});
    let (st, replayed, first) = post(body.clone(), "k-1").await;
    assert_eq!((st, replayed), (202, false), "{first}");
    let (st, replayed, again) = post(body.clone(), "k-1").await;
    assert_eq!((st, replayed), (202, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["metadata"], json!({"k": "v"}));
    // The body hash covers both: another custom_id or other metadata is another request.
    let other_id = json!({"metadata": {"k": "v"}, "requests": [completion("a", Some("a2"))]});
    assert_eq!(post(other_id, "k-1").await.0, 422);
    let other_meta = json!({"metadata": {"k": "w"}, "requests": [completion("a", Some("a1"))]});
    assert_eq!(post(other_meta, "k-1").await.0, 422);
    assert_eq!(batch_count(&s).await, 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_custom_ids_and_metadata_are_400_and_create_nothing() {
    let s = Stack::start().await;
    let ok = || completion("x", None);
    let with_id = |c: Value| {
        let mut v = ok();
        v["custom_id"] = c;
        v
    };
    // A duplicate names both items.
    let (st, e) = s
        .post(
            "/v1/batches",
            &json!({"requests": [completion("a", Some("same")), ok(), completion("c", Some("same"))]}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("requests[2].custom_id"), "{m}");
    assert!(m.contains("requests[0]"), "{m}");
    assert_eq!(e["error"]["errors"][0]["index"], 2);
    assert_eq!(e["error"]["errors"][0]["field"], "requests[2].custom_id");

    let pairs = |n: usize| -> Value {
        Value::Object((0..n).map(|i| (format!("k{i}"), json!("v"))).collect())
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"requests": [with_id(json!("has space"))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!("slash/no"))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!("x".repeat(65)))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!(""))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!("nul\u{0}"))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!(12))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!({"id": "a"}))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"requests": [with_id(json!("ünïcode"))]}),
            "requests[0].custom_id",
        ),
        (
            json!({"metadata": pairs(17), "requests": [ok()]}),
            "metadata",
        ),
        (
            json!({"metadata": {"a": {"nested": "x"}}, "requests": [ok()]}),
            "metadata.a",
        ),
        (
            json!({"metadata": {"a": ["x"]}, "requests": [ok()]}),
            "metadata.a",
        ),
        (
            json!({"metadata": {"a": 1}, "requests": [ok()]}),
            "metadata.a",
        ),
        (
            json!({"metadata": {"a": null}, "requests": [ok()]}),
            "metadata.a",
        ),
        (
            json!({"metadata": {"a": "x\u{0}y"}, "requests": [ok()]}),
            "metadata.a",
        ),
        (
            json!({"metadata": {"k\u{0}": "v"}, "requests": [ok()]}),
            "metadata",
        ),
        (
            json!({"metadata": {"": "v"}, "requests": [ok()]}),
            "metadata",
        ),
        (
            json!({"metadata": {"k".repeat(65): "v"}, "requests": [ok()]}),
            "metadata",
        ),
        (
            json!({"metadata": {"a": "v".repeat(513)}, "requests": [ok()]}),
            "metadata.a",
        ),
        (
            json!({"metadata": [["a", "b"]], "requests": [ok()]}),
            "metadata",
        ),
        (json!({"metadata": "a=b", "requests": [ok()]}), "metadata"),
    ];
    for (body, field) in cases {
        let (st, e) = s.post("/v1/batches", &body).await;
        assert_eq!(st, 400, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request", "{e}");
        assert_eq!(e["error"]["errors"][0]["field"], field, "{e}");
        assert!(
            e.to_string().len() < 2_000,
            "the error does not echo huge input"
        );
    }
    // One bad item among good ones: all or nothing.
    let mut items: Vec<Value> = (0..255)
        .map(|i| completion("x", Some(&format!("i{i}"))))
        .collect();
    items.push(completion("x", Some("i7")));
    let (st, e) = s
        .post(
            "/v1/batches",
            &json!({"metadata": pairs(16), "requests": items}),
        )
        .await;
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"i7\" is already used by requests[7]"),
        "{e}"
    );
    assert_eq!(batch_count(&s).await, 0);
    // The limits themselves are accepted.
    let (st, b) = s
        .post(
            "/v1/batches",
            &json!({"metadata": {"k".repeat(64): "v".repeat(512)}, "requests": [with_id(json!("x".repeat(64)))]}),
        )
        .await;
    assert_eq!(st, 202, "{b}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_found_by_its_custom_id() {
    let s = Stack::start().await;
    let (_, b) = s
        .post(
            "/v1/batches",
            &json!({"requests": [completion("a", Some("alpha")), completion("b", Some("beta")), completion("c", None)]}),
        )
        .await;
    let id = b["id"].as_str().unwrap().to_owned();
    let (_, view) = s.get(&format!("/v1/batches/{id}")).await;
    let (st, found) = s
        .get(&format!("/v1/batches/{id}/jobs?custom_id=beta"))
        .await;
    assert_eq!(st, 200, "{found}");
    assert_eq!(found["object"], "list");
    assert_eq!(found["data"].as_array().unwrap().len(), 1);
    assert_eq!(found["data"][0]["id"], view["jobs"][1]["id"]);
    assert_eq!(found["data"][0]["custom_id"], "beta");
    assert_eq!(found["data"][0]["object"], "job");
    assert_eq!(found["has_more"], false);
    let (st, none) = s
        .get(&format!("/v1/batches/{id}/jobs?custom_id=gamma"))
        .await;
    assert_eq!(st, 200);
    assert!(none["data"].as_array().unwrap().is_empty());
    for bad in ["", "a%20b", "a%2Fb", "nul%00", &"x".repeat(65), "%FF"] {
        let (st, e) = s
            .get(&format!("/v1/batches/{id}/jobs?custom_id={bad}"))
            .await;
        assert_eq!(st, 400, "{bad}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request");
    }
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    assert_eq!(
        s.get_as(&format!("/v1/batches/{id}/jobs?custom_id=beta"), &bob)
            .await
            .0,
        404
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_page_both_ways_with_status_and_label_filters() {
    // Only the image worker runs: LLM jobs stay QUEUED, so every batch status is on hand.
    let s = Stack::start_with(
        Options {
            workers: vec![InferenceType::Image],
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let submit = |label: &'static str, requests: Vec<Value>| {
        let body = json!({"label": label, "requests": requests});
        let s = &s;
        async move {
            let (st, b) = s.post("/v1/batches", &body).await;
            assert_eq!(st, 202, "{b}");
            b["id"].as_str().unwrap().to_owned()
        }
    };
    let b1 = submit("x", vec![completion("p", None)]).await; // PENDING
    let b2 = submit("y", vec![image("i")]).await; // DONE
    let b3 = submit("x", vec![image("i"), completion("p", None)]).await; // PROCESSING
    let b4 = submit("x", vec![image("i")]).await; // DONE
    let b5 = submit("y", vec![completion("p", None)]).await; // PENDING
    for b in [&b2, &b4] {
        s.wait_done(b, LONG).await;
    }
    s.wait_batch(&b3, LONG, |b| b["processed"] == 1).await;

    let l = |xs: &[&String]| xs.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let get = |q: String| {
        let s = &s;
        async move {
            let (st, v) = s.get(&format!("/v1/batches?{q}")).await;
            assert_eq!(st, 200, "{q}: {v}");
            (ids(&v), v["has_more"].as_bool().unwrap())
        }
    };
    assert_eq!(get("status=DONE".into()).await.0, l(&[&b4, &b2]));
    assert_eq!(get("status=pending".into()).await.0, l(&[&b5, &b1]));
    assert_eq!(get("status=PROCESSING".into()).await.0, l(&[&b3]));
    assert_eq!(get("label=x".into()).await.0, l(&[&b4, &b3, &b1]));
    assert_eq!(get("label=x&status=done".into()).await.0, l(&[&b4]));
    assert!(get("label=nope".into()).await.0.is_empty());

    // Older pages with `after`; a batch inserted between pages shifts nothing.
    assert_eq!(
        get("limit=2".into()).await,
        (vec![b5.clone(), b4.clone()], true)
    );
    assert_eq!(
        get(format!("limit=2&after={b4}")).await,
        (vec![b3.clone(), b2.clone()], true)
    );
    let b6 = submit("x", vec![completion("p", None)]).await;
    assert_eq!(
        get(format!("limit=2&after={b2}")).await,
        (vec![b1.clone()], false)
    );
    // Newer pages with `before`, still newest first; `has_more` looks further ahead.
    assert_eq!(
        get(format!("limit=2&before={b4}")).await,
        (vec![b6.clone(), b5.clone()], false)
    );
    assert_eq!(
        get(format!("limit=1&before={b3}")).await,
        (vec![b4.clone()], true)
    );
    assert_eq!(
        get(format!("limit=2&before={b1}&label=x")).await,
        (vec![b4.clone(), b3.clone()], true)
    );
    assert_eq!(
        get(format!("before={b1}&status=pending")).await,
        (vec![b6.clone(), b5.clone()], false)
    );
    assert!(get(format!("before={b6}")).await.0.is_empty());
    // Walking back from the oldest with `before` meets every batch once, in order.
    let mut seen = vec![b1.clone()];
    let mut cursor = b1.clone();
    loop {
        let (page, more) = get(format!("limit=2&before={cursor}")).await;
        for id in page.iter().rev() {
            seen.push(id.clone());
        }
        if !more {
            break;
        }
        cursor = page[0].clone();
    }
    assert_eq!(seen, l(&[&b1, &b2, &b3, &b4, &b5, &b6]));

    // Bad values: the contract's 400 naming the parameter.
    let nul_label = "%00";
    for (q, field) in [
        ("status=RUNNING".to_owned(), "status"),
        ("status=QUEUED".to_owned(), "status"),
        ("before=0".to_owned(), "before"),
        ("before=abc".to_owned(), "before"),
        ("before=-5".to_owned(), "before"),
        (format!("after={b2}&before={b4}"), "before"),
        (format!("label={nul_label}"), "label"),
        (format!("label={}", "l".repeat(257)), "label"),
        ("limit=0".to_owned(), "limit"),
    ] {
        let (st, e) = s.get(&format!("/v1/batches?{q}")).await;
        assert_eq!(st, 400, "{q}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request");
        assert_eq!(e["error"]["errors"][0]["field"], field, "{q}");
    }

    // Another tenant sees none of it, filtered or not.
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    let (_, theirs) = s.get_as("/v1/batches?label=x", &bob).await;
    assert!(theirs["data"].as_array().unwrap().is_empty());

    // A batch's jobs page backwards too, in submission order.
    let (_, big) = s
        .post(
            "/v1/batches",
            &json!({"requests": (0..5).map(|i| completion(&format!("p{i}"), None)).collect::<Vec<_>>()}),
        )
        .await;
    let big = big["id"].as_str().unwrap().to_owned();
    let (_, all) = s.get(&format!("/v1/batches/{big}/jobs")).await;
    let jobs = ids(&all);
    let (_, back) = s
        .get(&format!(
            "/v1/batches/{big}/jobs?limit=2&before={}",
            jobs[3]
        ))
        .await;
    assert_eq!(ids(&back), &jobs[1..3]);
    assert_eq!(back["has_more"], true);
    let (_, first) = s
        .get(&format!(
            "/v1/batches/{big}/jobs?limit=2&before={}",
            jobs[1]
        ))
        .await;
    assert_eq!(ids(&first), &jobs[..1]);
    assert_eq!(first["has_more"], false);
    let (st, _) = s.get(&format!("/v1/batches/{big}/jobs?before=x")).await;
    assert_eq!(st, 400);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_stream_finished_jobs_in_order_while_the_batch_runs() {
    let s = Stack::start().await;
    let body = json!({"requests": [
        {"custom_id": "img", "endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "lamp"}},
        {"custom_id": "slow", "endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "slow", "sim_latency_ms": 120_000}},
        {"custom_id": "chat", "endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "bad", "endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x", "sim_fail": "fatal"}},
    ]});
    let (_, b) = s.post("/v1/batches", &body).await;
    let id = b["id"].as_str().unwrap().to_owned();
    let view = s
        .wait_batch(&id, LONG, |b| b["processed"] == 2 && b["failed"] == 1)
        .await;
    assert_eq!(view["status"], "PROCESSING");
    let job_ids: Vec<&str> = view["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();

    let path = format!("/v1/batches/{id}/results");
    let (st, ct, lines) = ndjson(&s, &path, &s.key).await;
    assert_eq!(st, 200);
    assert_eq!(ct, "application/x-ndjson");
    // Only the finished jobs, in submission order.
    let got: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["custom_id"].as_str().unwrap(),
                l["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("img", "PROCESSED"),
            ("chat", "PROCESSED"),
            ("bad", "FAILED")
        ]
    );
    assert_eq!(lines[0]["id"], job_ids[0]);
    assert_eq!(lines[1]["id"], job_ids[2]);
    assert_eq!(lines[0]["batch_id"], id.as_str());
    assert_eq!(lines[0]["endpoint"], "/v1/images/generations");
    assert_eq!(lines[0]["model"], "flux-dev");
    assert!(lines[0]["error"].is_null());
    assert!(lines[0]["usage"].is_null());
    // Media as freshly signed links that download, exactly as the job object has them.
    let url = lines[0]["result"]["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/v1/media/", s.url)), "{url}");
    let r = s.http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert!(r.bytes().await.unwrap().starts_with(b"\x89PNG"));
    let (_, job) = s.get(&format!("/v1/jobs/{}", job_ids[0])).await;
    let strip = |u: &str| u.split('?').next().unwrap().to_owned();
    assert_eq!(
        strip(url),
        strip(job["result"]["data"][0]["url"].as_str().unwrap())
    );
    assert!(lines[1]["result"]["choices"].is_array());
    assert!(lines[1]["usage"]["total_tokens"].as_i64().unwrap() > 0);
    assert!(lines[2]["result"].is_null());
    assert_eq!(lines[2]["error"]["type"], "invalid_request");
    assert!(!lines[2]["error"]["message"].as_str().unwrap().is_empty());

    // Filters: finished statuses only, any case, comma-separated.
    let (_, _, failed) = ndjson(&s, &format!("{path}?status=failed"), &s.key).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["custom_id"], "bad");
    let (_, _, both) = ndjson(&s, &format!("{path}?status=FAILED,processed"), &s.key).await;
    assert_eq!(both.len(), 3);
    let (_, _, none) = ndjson(&s, &format!("{path}?status=cancelled"), &s.key).await;
    assert!(none.is_empty());
    for bad in ["queued", "PROCESSING", "DONE", "x%00"] {
        let (st, _, e) = ndjson(&s, &format!("{path}?status={bad}"), &s.key).await;
        assert_eq!(st, 400, "{bad}");
        assert_eq!(e[0]["error"]["type"], "invalid_request");
        assert_eq!(e[0]["error"]["errors"][0]["field"], "status");
    }

    // Cancelled jobs are finished too.
    s.post_empty(&format!("/v1/batches/{id}/cancel")).await;
    let (_, _, after) = ndjson(&s, &path, &s.key).await;
    assert_eq!(after.len(), 4);
    assert_eq!(after[1]["custom_id"], "slow");
    assert_eq!(after[1]["status"], "CANCELLED");

    // Authenticated and owned like GET /v1/batches/{id}.
    let bob = s.db.create_key("bob", None).await.unwrap().secret;
    let (st, _, e) = ndjson(&s, &path, &bob).await;
    assert_eq!(st, 404);
    assert_eq!(e[0]["error"]["type"], "not_found");
    let (_, theirs) = s.get_as(&format!("/v1/batches/{id}"), &bob).await;
    assert_eq!(theirs, e[0], "the same 404 as the batch itself");
    assert_eq!(ndjson(&s, &path, "vk_nope").await.0, 401);
    assert_eq!(
        s.http
            .get(format!("{}{path}", s.url))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        ndjson(&s, "/v1/batches/999999/results", &s.key).await.0,
        404
    );
    assert_eq!(ndjson(&s, "/v1/batches/abc/results", &s.key).await.0, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_a_full_batch_are_streamed_page_by_page() {
    let s = Stack::start().await;
    let requests: Vec<Value> = (0..256)
        .map(|i| completion(&format!("p{i}"), Some(&format!("item-{i:03}"))))
        .collect();
    let (st, b) = s.post("/v1/batches", &json!({"requests": requests})).await;
    assert_eq!(st, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let done = s.wait_done(&id, Duration::from_secs(120)).await;
    let r = s
        .http
        .get(format!("{}/v1/batches/{id}/results", s.url))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Streamed: no length known up front.
    assert!(r.headers().get("content-length").is_none());
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 256 rows span several pages of the gateway's reads: none lost or repeated at the seams.
    assert_eq!(lines.len(), 256);
    let want: Vec<&str> = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    let got: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(got, want);
    let unique: HashSet<&str> = got.iter().copied().collect();
    assert_eq!(unique.len(), 256);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["custom_id"], format!("item-{i:03}"));
        assert_eq!(l["status"], "PROCESSED");
    }
    s.stop().await;
}
