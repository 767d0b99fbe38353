//! Recovery end to end: long jobs against a short consumer timeout (on a RabbitMQ node of the
//! test's own), expiry, operator re-dispatch and retry of failed jobs, and the fencing that
//! keeps stale outcomes out. The fault-injection suite (`crates/volley-chaos`) covers crashes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use volley_chaos::infra::{RabbitNode, RabbitOptions};
use volley_db::NewJob;
use volley_db::testing::TestDatabase;
use volley_domain::Claim;
use volley_domain::InferenceType;
use volley_harness::{Options, Stack};
use volley_proto::{Failed, JobEvent, Succeeded, job_event};

const LONG: Duration = Duration::from_secs(90);

fn item(endpoint: &str, body: Value) -> Value {
    json!({"endpoint": endpoint, "body": body})
}

fn completion(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "qwen3-8b", "prompt": prompt});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    item("/v1/completions", body)
}

fn job_ids(batch: &Value) -> Vec<String> {
    batch["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn submit(s: &Stack, requests: Vec<Value>) -> (String, Vec<String>) {
    let (status, b) = s.post("/v1/batches", &json!({"requests": requests})).await;
    assert_eq!(status, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let (_, view) = s.get(&format!("/v1/batches/{id}")).await;
    (id, job_ids(&view))
}

async fn publish_event(s: &Stack, event: JobEvent) {
    let broker = volley_amqp::Broker::new(&s.settings.amqp_url, "test", s.names());
    let r = broker.publish_events(&[event]).await.unwrap();
    assert!(r[0].is_ok());
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_jobs_outlive_a_short_consumer_timeout_and_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = RabbitNode::start(
        dir.path(),
        RabbitOptions {
            consumer_timeout_ms: Some(2_000),
        },
    )
    .await
    .unwrap();

    // The broker's timeout is real: a consumer that holds a message unacknowledged longer than
    // it loses its channel (and the message goes back to the queue).
    let conn = volley_amqp::connect(&node.url(), "probe").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "probe".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "probe".into(),
        BasicPublishOptions::default(),
        b"held",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "probe".into(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let held = consumer.next().await.unwrap().unwrap();
    assert_eq!(held.data, b"held");
    let closed_within = tokio::time::timeout(Duration::from_secs(30), async {
        let t = Instant::now();
        while ch.status().connected() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.elapsed()
    })
    .await
    .expect("the broker never closed a channel holding a message past its consumer timeout");
    assert!(
        closed_within >= Duration::from_millis(1_500),
        "{closed_within:?}"
    );
    let _ = conn.close(200, "".into()).await;

    // Volley's jobs run three times as long as that timeout, and each runs once.
    let s = Stack::start_with(
        Options {
            workers: vec![InferenceType::Llm, InferenceType::Video],
            ..Default::default()
        },
        |st| st.amqp_url = node.url(),
    )
    .await;
    let (id, jobs) = submit(
        &s,
        vec![
            completion("slow", json!({"sim_latency_ms": 6_500})),
            item(
                "/v1/videos/generations",
                json!({"model": "sim-video", "prompt": "slow", "sim_latency_ms": 6_500}),
            ),
        ],
    )
    .await;
    let done = s.wait_done(&id, LONG).await;
    assert_eq!(done["processed"], 2, "{done}");
    for j in &jobs {
        let (_, job) = s.get(&format!("/v1/jobs/{j}")).await;
        assert_eq!(job["attempts"], 1, "{job}");
    }
    let stats = s.sim().stats();
    assert_eq!(stats.by_path.get("/v1/completions"), Some(&1), "{stats:?}");
    assert_eq!(stats.by_path.get("/v1/predictions"), Some(&1), "{stats:?}");
    s.stop().await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_not_started_in_time_expire_and_are_never_claimed() {
    // No LLM worker: nothing starts the jobs.
    let s = Stack::start_with(
        Options {
            workers: vec![InferenceType::Image],
            ..Default::default()
        },
        |st| {
            st.state.expire_after_ms = 1_500;
            st.state.dispatch_grace_ms = 0;
        },
    )
    .await;
    let (id, jobs) = submit(
        &s,
        vec![
            completion("late 1", json!({})),
            completion("late 2", json!({})),
        ],
    )
    .await;
    let done = s.wait_done(&id, LONG).await;
    assert_eq!(done["failed"], 2, "{done}");
    for j in &jobs {
        let (_, job) = s.get(&format!("/v1/jobs/{j}")).await;
        assert_eq!(job["status"], "FAILED");
        assert_eq!(job["error"]["type"], "expired", "{job}");
        assert_eq!(job["attempts"], 0, "{job}");
    }
    // A worker arriving later finds their messages and is refused: they stay expired.
    let w = worker_runtime::start(
        InferenceType::Llm,
        s.settings.clone(),
        volley_harness::local_listener(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for j in &jobs {
        let (_, job) = s.get(&format!("/v1/jobs/{j}")).await;
        assert_eq!(
            (job["status"].as_str(), job["attempts"].as_i64()),
            (Some("FAILED"), Some(0))
        );
    }
    w.stop().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_refuse_expired_jobs_even_before_the_sweeper_runs() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let new = |p: &str| NewJob {
        inference_type: "LLM".into(),
        endpoint: "/v1/completions".into(),
        model: "qwen3-8b".into(),
        body: json!({"model": "qwen3-8b", "prompt": p}),
        custom_id: None,
    };
    let (_, d) = db
        .create_batch("o", None, vec![new("a"), new("b")], 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = db.claim(vec![d[0].id], 60_000, 200).await.unwrap();
    assert_eq!(refused[0].1, Claim::Refused);
    // Without expiry the same job is claimable; a started job never expires.
    let claimed = db.claim(vec![d[1].id], 60_000, 0).await.unwrap();
    assert!(matches!(claimed[0].1, Claim::Claimed { attempt: 1, .. }));
    assert_eq!(
        db.expire(200).await.unwrap(),
        1,
        "only the job never started"
    );
    let job = db.get_job("o", d[0].id).await.unwrap().unwrap();
    assert_eq!(
        (job.status.as_str(), job.error_type.as_deref()),
        ("FAILED", Some("expired"))
    );
    assert_eq!(db.expire(0).await.unwrap(), 0, "0 turns expiry off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redispatch_recovers_lost_messages_and_leaves_running_jobs_alone() {
    let s = Stack::start_with(
        Options {
            workers: vec![InferenceType::Image],
            ..Default::default()
        },
        |st| st.state.redispatch_after_ms = 3_600_000,
    )
    .await;
    let (lost, _) = submit(
        &s,
        vec![
            completion("a", json!({})),
            completion("b", json!({})),
            completion("c", json!({})),
        ],
    )
    .await;
    // The messages were published and confirmed; now the queue loses them.
    let conn = volley_amqp::connect(&s.settings.amqp_url, "test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let purged = ch
        .queue_purge(
            s.names().job_queue(InferenceType::Llm).as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(purged, 3);
    let _ = conn.close(200, "".into()).await;
    let w = worker_runtime::start(
        InferenceType::Llm,
        s.settings.clone(),
        volley_harness::local_listener(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, b) = s.get(&format!("/v1/batches/{lost}")).await;
    assert_eq!(b["queued"], 3, "nothing to consume: {b}");

    let lost_id: i64 = lost.parse().unwrap();
    let r = s.db.redispatch_batch(lost_id).await.unwrap().unwrap();
    assert_eq!((r.queued, r.abandoned, r.running, r.finished), (3, 0, 0, 0));
    let done = s.wait_done(&lost, LONG).await;
    assert_eq!(done["processed"], 3);
    // Re-dispatching a finished batch changes nothing.
    let r = s.db.redispatch_batch(lost_id).await.unwrap().unwrap();
    assert_eq!((r.queued, r.finished), (0, 3));
    assert!(s.db.redispatch_batch(999_999).await.unwrap().is_none());

    // A running job holds a live lease: re-dispatch leaves it to its worker.
    let (slow, slow_jobs) = submit(
        &s,
        vec![completion("slow", json!({"sim_latency_ms": 3_000}))],
    )
    .await;
    s.wait_batch(&slow, LONG, |b| b["processing"] == 1).await;
    let r =
        s.db.redispatch_batch(slow.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
    assert_eq!((r.queued, r.abandoned, r.running), (0, 0, 1));
    s.wait_done(&slow, LONG).await;
    let (_, job) = s.get(&format!("/v1/jobs/{}", slow_jobs[0])).await;
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_i64()),
        (Some("PROCESSED"), Some(1))
    );
    assert_eq!(s.sim().stats().by_path.get("/v1/completions"), Some(&4));
    w.stop().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_reruns_failed_jobs_under_the_same_ids_with_a_fresh_budget() {
    let s = Stack::start_with(Default::default(), |st| st.worker.max_attempts = 2).await;
    let key = uuid::Uuid::new_v4().simple().to_string();
    let (id, jobs) = submit(
        &s,
        vec![
            // Fails both attempts of the first round, succeeds when re-run.
            completion("flaky", json!({"sim_fail": "retryable", "sim_fail_times": 2, "sim_key": format!("{key}-a")})),
            completion("fine", json!({})),
            completion("bad", json!({"sim_fail": "fatal"})),
            // Fails three times: the re-run needs a retry of its own, so it needs a fresh budget.
            completion("flakier", json!({"sim_fail": "retryable", "sim_fail_times": 3, "sim_key": format!("{key}-b")})),
        ],
    )
    .await;
    let done = s.wait_done(&id, LONG).await;
    assert_eq!(
        (done["processed"].as_i64(), done["failed"].as_i64()),
        (Some(1), Some(3)),
        "{done}"
    );
    let (_, flaky) = s.get(&format!("/v1/jobs/{}", jobs[0])).await;
    assert!(
        flaky["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 2 attempts")
    );

    let batch: i64 = id.parse().unwrap();
    let mut retried = s.db.retry_failed(batch).await.unwrap().unwrap();
    retried.sort_unstable();
    let want: Vec<i64> = [0, 2, 3]
        .iter()
        .map(|i| jobs[*i].parse().unwrap())
        .collect();
    assert_eq!(retried, want);
    let done = s.wait_done(&id, LONG).await;
    assert_eq!(
        (done["processed"].as_i64(), done["failed"].as_i64()),
        (Some(3), Some(1)),
        "{done}"
    );
    let job = |i: usize| {
        let j = jobs[i].clone();
        let s = &s;
        async move { s.get(&format!("/v1/jobs/{j}")).await.1 }
    };
    let flaky = job(0).await;
    assert_eq!(flaky["status"], "PROCESSED");
    assert_eq!(flaky["attempts"], 3, "attempt numbers keep counting");
    assert!(flaky.get("error").is_none_or(Value::is_null), "{flaky}");
    assert!(flaky["result"]["choices"].is_array());
    assert_eq!(job(1).await["attempts"], 1, "a PROCESSED job is not re-run");
    assert_eq!(job(2).await["status"], "FAILED");
    let flakier = job(3).await;
    assert_eq!(
        (flakier["status"].as_str(), flakier["attempts"].as_i64()),
        (Some("PROCESSED"), Some(4))
    );

    // Outcomes of earlier attempts are fenced off: a late failure of attempt 2 changes nothing.
    publish_event(
        &s,
        JobEvent {
            job_id: want[0],
            attempt: 2,
            outcome: Some(job_event::Outcome::Failed(Failed {
                error_type: "provider_error".into(),
                message: "late".into(),
            })),
            ..Default::default()
        },
    )
    .await;
    publish_event(
        &s,
        JobEvent {
            job_id: want[1],
            attempt: 1,
            outcome: Some(job_event::Outcome::Succeeded(Succeeded {
                result_json: b"{\"late\":true}".to_vec(),
                usage: None,
                ..Default::default()
            })),
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(job(0).await["status"], "PROCESSED");
    assert_eq!(job(2).await["status"], "FAILED");

    // Each run applied one outcome; none finished twice on its own.
    for a in s.db.audit_jobs().await.unwrap() {
        assert!(a.outcomes <= 1 + a.operator_retries, "{a:?}");
    }
    // Nothing failed but the fatal job: a second retry re-runs only that one.
    assert_eq!(
        s.db.retry_failed(batch).await.unwrap().unwrap(),
        vec![want[1]]
    );
    s.wait_done(&id, LONG).await;
    assert_eq!(job(1).await["attempts"], 1);
    assert!(s.db.retry_failed(999_999).await.unwrap().is_none());
    s.stop().await;
}
