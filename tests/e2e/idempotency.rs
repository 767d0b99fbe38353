//! `Idempotency-Key` on POST /v1/batches against the real stack, with a second gateway replica
//! on the same database and broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;

use serde_json::{Value, json};
use volley_harness::Stack;

fn body(prompt: &str) -> Value {
    json!({"label": "idem", "requests": [
        {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": prompt}},
        {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": prompt}}
    ]})
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    idem: Option<&str>,
    body: &Value,
) -> (u16, Option<String>, Value) {
    let mut rb = http
        .post(format!("{url}/v1/batches"))
        .bearer_auth(key)
        .json(body);
    if let Some(k) = idem {
        rb = rb.header("Idempotency-Key", k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let replayed = r
        .headers()
        .get("Idempotent-Replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, replayed, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_replays_other_body_refused_in_flight_conflicts() {
    let s = Stack::start().await;
    // A second gateway replica on the same database and broker.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url_b = format!("http://{}", listener.local_addr().unwrap());
    let gw = gateway::start(s.settings.clone(), listener).unwrap();

    let (st, replayed, first) = post(&s.http, &s.url, &s.key, Some("retry-1"), &body("a")).await;
    assert_eq!(st, 202, "{first}");
    assert_eq!(replayed, None);

    // The retry lands on the other replica: the original response, nothing created.
    let (st, replayed, again) = post(&s.http, &url_b, &s.key, Some("retry-1"), &body("a")).await;
    assert_eq!(st, 202, "{again}");
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(again, first, "the original response");

    let (st, _, err) = post(&s.http, &s.url, &s.key, Some("retry-1"), &body("b")).await;
    assert_eq!(st, 422, "{err}");
    assert_eq!(err["error"]["type"], "idempotency_mismatch");

    // Another API key with the same idempotency key is another request.
    let other = s.db.create_key("bob", None).await.unwrap().secret;
    let (st, replayed, b) = post(&s.http, &s.url, &other, Some("retry-1"), &body("a")).await;
    assert_eq!((st, replayed), (202, None), "{b}");
    assert_ne!(b["id"], first["id"]);

    // A request with the key still being decided (its lock held, as by a replica mid-request).
    let key_id = s.db.list_keys().await.unwrap()[0].id;
    let lock = {
        use diesel::{Connection, RunQueryDsl};
        let mut c = diesel::PgConnection::establish(&s.settings.database_url).unwrap();
        diesel::sql_query("BEGIN").execute(&mut c).unwrap();
        diesel::sql_query(format!(
            "SELECT pg_advisory_xact_lock(hashtextextended('{key_id}' || ':' || 'retry-2', 7011))"
        ))
        .execute(&mut c)
        .unwrap();
        c
    };
    let (st, _, err) = post(&s.http, &url_b, &s.key, Some("retry-2"), &body("c")).await;
    assert_eq!(st, 409, "{err}");
    assert_eq!(err["error"]["type"], "idempotency_in_flight");
    {
        use diesel::RunQueryDsl;
        let mut lock = lock;
        diesel::sql_query("ROLLBACK").execute(&mut lock).unwrap();
    }
    let (st, replayed, _) = post(&s.http, &url_b, &s.key, Some("retry-2"), &body("c")).await;
    assert_eq!((st, replayed), (202, None));

    // A malformed key is a clear 400, and creates nothing.
    let (st, _, err) = post(&s.http, &s.url, &s.key, Some(&"x".repeat(300)), &body("d")).await;
    assert_eq!(st, 400, "{err}");
    assert_eq!(err["error"]["type"], "invalid_request");

    // Exactly the batches that were accepted, and the replayed one runs to the end once.
    let (_, list) = s.get("/v1/batches").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let done = s
        .wait_done(
            first["id"].as_str().unwrap(),
            std::time::Duration::from_secs(60),
        )
        .await;
    assert_eq!(done["processed"], 2, "{done}");

    gw.stop().await.unwrap();
    s.stop().await;
}
