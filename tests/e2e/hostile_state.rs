//! Hostile input against batch-state and the job pipeline (issue 14, items 2, 3 and 12):
//! U+0000 in provider output does not stop other tenants' outcomes, the internal API refuses
//! callers without the token, and a huge `max_tokens` cannot strand a job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::time::Duration;

use serde_json::{Value, json};
use volley_amqp::Broker;
use volley_domain::{InferenceType, JobStatus};
use volley_harness::{Options, Stack};
use volley_proto::state_api::{ClaimResult, ClaimsAnswer, ClaimsRequest, ErrorBody, LeasesRequest};
use volley_proto::{Failed, JobEvent, Succeeded, job_event};

const WAIT: Duration = Duration::from_secs(40);

fn llm_only() -> Options {
    Options {
        workers: vec![InferenceType::Llm],
        ..Options::default()
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"endpoint": "/v1/chat/completions", "body": body})
}

/// A provider reply or error with U+0000 (which PostgreSQL refuses in text and jsonb) used to
/// fail the whole batched event update for ever: every tenant's outcomes queued behind it.
/// Now the text is cleaned, the job ends, and another tenant's batch finishes meanwhile. Raw
/// events carrying U+0000 (as an old or hostile worker could publish) are cleaned by
/// batch-state too.
#[tokio::test]
async fn nul_in_provider_output_stops_no_ones_outcomes() {
    let s = Stack::start_with(llm_only(), |_| {}).await;
    let bob = s.db.create_key("bob", None).await.unwrap().secret;

    // Jobs claimed "by hand" (no worker will run them), then given outcomes with U+0000
    // published straight to the events queue.
    let (_, raw) =
        s.db.create_batch(
            "alice",
            None,
            (0..2)
                .map(|i| volley_db::NewJob {
                    inference_type: "LLM".into(),
                    endpoint: "/v1/completions".into(),
                    model: "qwen3-8b".into(),
                    body: json!({"model": "qwen3-8b", "prompt": format!("raw {i}")}),
                    custom_id: None,
                })
                .collect(),
            0,
        )
        .await
        .unwrap();
    let raw_ids: Vec<i64> = raw.iter().map(|j| j.id).collect();
    s.db.claim(raw_ids.clone(), 600_000, 0).await.unwrap();
    let broker = Broker::new(&s.settings.amqp_url, "hostile-test", s.names());
    let events = vec![
        JobEvent {
            job_id: raw_ids[0],
            attempt: 1,
            outcome: Some(job_event::Outcome::Succeeded(Succeeded {
                result_json: br#"{"text":"raw\u0000reply","k\u0000":1}"#.to_vec(),
                usage: None,
                ..Default::default()
            })),
            ..Default::default()
        },
        JobEvent {
            job_id: raw_ids[1],
            attempt: 1,
            outcome: Some(job_event::Outcome::Failed(Failed {
                error_type: "provider_error".into(),
                message: "raw\0error".into(),
            })),
            ..Default::default()
        },
    ];
    let confirmed = broker.publish_events(&events).await.unwrap();
    assert!(confirmed.iter().all(Result::is_ok));
    broker.close().await;

    let alice = s
        .submit_as(
            &s.key,
            &[
                chat(json!({"sim_nul": true})),
                chat(json!({"sim_nul": true, "sim_fail": "fatal"})),
                chat(json!({"sim_nul": true, "sim_fail": "retryable", "sim_fail_times": 1})),
            ],
        )
        .await;
    let bobs = s.submit_as(&bob, &[chat(json!({})), chat(json!({}))]).await;

    let b = s.wait_done_as(&bob, &bobs, WAIT).await;
    assert_eq!(b["processed"], 2, "{b}");
    let a = s.wait_done_as(&s.key, &alice, WAIT).await;
    let jobs = s.jobs_as(&s.key, &a).await;
    assert_eq!(jobs[0]["status"], "PROCESSED", "{}", jobs[0]);
    let content = jobs[0]["result"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(content.ends_with('\u{FFFD}'), "{content:?}");
    assert_eq!(jobs[1]["status"], "FAILED", "{}", jobs[1]);
    assert_eq!(jobs[1]["error"]["type"], "invalid_request", "{}", jobs[1]);
    let msg = jobs[1]["error"]["message"].as_str().unwrap();
    assert!(msg.contains('\u{FFFD}') && !msg.contains('\0'), "{msg:?}");
    assert_eq!(jobs[2]["status"], "PROCESSED", "{}", jobs[2]);
    assert_eq!(
        jobs[2]["attempts"], 2,
        "the retry's event (U+0000 in its error) applied"
    );

    // The raw events applied, cleaned.
    let deadline = std::time::Instant::now() + WAIT;
    let (ok, failed) = loop {
        let ok = s.db.get_job("alice", raw_ids[0]).await.unwrap().unwrap();
        let failed = s.db.get_job("alice", raw_ids[1]).await.unwrap().unwrap();
        if ok.status != JobStatus::Processing && failed.status != JobStatus::Processing {
            break (ok, failed);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "raw events never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ok.status, JobStatus::Processed);
    assert_eq!(
        ok.result,
        Some(json!({"text": "raw\u{FFFD}reply", "k\u{FFFD}": 1}))
    );
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error_message.as_deref(), Some("raw\u{FFFD}error"));
    // Nothing was left behind on the events queue nor dead-lettered.
    assert_eq!(s.worker_in_flight().await, 0);
    s.stop().await;
}

/// `/internal/claims` and `/internal/leases` without the token (or with a wrong one) answer
/// 401 before reading the body, and change nothing; the workers' token works.
#[tokio::test]
async fn internal_api_refuses_callers_without_the_token() {
    let s = Stack::start_with(
        Options {
            workers: vec![],
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let id = s.submit_as(&s.key, &[chat(json!({}))]).await;
    let (_, b) = s.get(&format!("/v1/batches/{id}")).await;
    let job_id: i64 = b["jobs"][0]["id"].as_str().unwrap().parse().unwrap();
    let base = &s.settings.state.url;
    let token = s.settings.state.internal_token.expose().to_owned();
    let claim = serde_json::to_value(ClaimsRequest {
        job_ids: vec![job_id],
    })
    .unwrap();
    let leases = serde_json::to_value(LeasesRequest {
        held: vec![(job_id, 1)],
    })
    .unwrap();
    let wrong = format!("{}x", &token[..token.len() - 1]);
    for (path, body) in [("/internal/claims", &claim), ("/internal/leases", &leases)] {
        let url = format!("{base}{path}");
        let attempts = [
            s.http.post(&url).json(body),
            s.http.post(&url).bearer_auth(&wrong).json(body),
            s.http.post(&url).bearer_auth("").json(body),
            s.http.post(&url).header("authorization", &token).json(body),
            // Unauthenticated garbage is refused as unauthenticated, not parsed.
            s.http.post(&url).body("{not json"),
        ];
        for rb in attempts {
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
            let e: ErrorBody = r.json().await.unwrap();
            assert!(e.error.contains("token"), "{e:?}");
        }
    }
    let job = s.db.get_job("alice", job_id).await.unwrap().unwrap();
    assert_eq!(
        job.status,
        JobStatus::Queued,
        "an unauthenticated claim changed the job"
    );
    assert_eq!(job.attempt, 0);

    // The workers' token is admitted.
    let r = s
        .http
        .post(format!("{base}/internal/claims"))
        .bearer_auth(&token)
        .json(&claim)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a: ClaimsAnswer = r.json().await.unwrap();
    assert_eq!(a.claims[0].result, ClaimResult::Claimed, "{a:?}");
    // Health and metrics stay open (probes, the scraper).
    let r = s.http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

/// Outside dev mode batch-state and workers refuse to start with an empty, short or shipped
/// development token.
#[tokio::test]
async fn services_refuse_weak_internal_tokens_outside_dev_mode() {
    for token in ["", "short", volley_config::DEV_INTERNAL_TOKEN] {
        let mut s = volley_harness::base_settings();
        s.dev_mode = false;
        s.state.internal_token = volley_config::Secret::new(token);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = batch_state::start(s.clone(), listener)
            .err()
            .expect("batch-state started with a weak token");
        assert!(err.to_string().contains("VOLLEY_INTERNAL_TOKEN"), "{err}");
        let err = worker_runtime::start(InferenceType::Llm, s, volley_harness::local_listener())
            .err()
            .expect("a worker started with a weak token");
        assert!(err.to_string().contains("VOLLEY_INTERNAL_TOKEN"), "{err}");
    }
}

/// A `max_tokens` near u64::MAX overflowed the token estimate of a provider with a token
/// rate: a panic in debug builds that left the job PROCESSING for ever. It now runs.
#[tokio::test]
async fn a_huge_max_tokens_does_not_strand_the_job() {
    let s = Stack::start_with(llm_only(), |s| {
        for p in s.providers.iter_mut().filter(|p| p.name == "sim-openai") {
            p.tokens_per_minute = Some(1_000_000);
        }
    })
    .await;
    // One at a time: a request this large reserves the provider's whole minute of tokens
    // (the estimate is capped by the bucket), so a second one would wait out that minute.
    for field in ["max_tokens", "max_completion_tokens"] {
        let id = s.submit_as(&s.key, &[chat(json!({field: u64::MAX}))]).await;
        let b = s.wait_done_as(&s.key, &id, WAIT).await;
        // Saturated, the estimate lets it run. (Were it to overflow again, the panic would
        // fail the job as internal_error rather than strand it: still not PROCESSED.)
        assert_eq!(b["processed"], 1, "{field}: {b}");
    }
    assert_eq!(s.worker_in_flight().await, 0, "no job left running");
    s.stop().await;
}
