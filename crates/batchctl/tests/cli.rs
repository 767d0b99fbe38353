//! `batchctl` as an operator runs it: the real binary against the real PostgreSQL (a fresh
//! database) and RabbitMQ (a queue prefix of the test's own).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use lapin::Channel;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use serde_json::{Value, json};
use volley_amqp::{Broker, Names, connect, declare_topology, delete_topology, queue_depth};
use volley_db::testing::{TestDatabase, completions};
use volley_domain::InferenceType;
use volley_proto::{JobEvent, JobMessage, Message, Succeeded, job_event};

fn amqp_url() -> String {
    std::env::var("VOLLEY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

struct Ctl {
    database_url: String,
    prefix: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_batchctl"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VOLLEY_") {
                c.env_remove(k);
            }
        }
        c.args(["--database-url", &self.database_url])
            .args(["--amqp-url", &amqp_url()])
            .args(["--queue-prefix", &self.prefix])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs and expects `code`; returns stdout and stderr.
    fn expect(&self, code: i32, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert_eq!(out.status.code(), Some(code), "batchctl {args:?}\n{o}\n{e}");
        (o, e)
    }

    fn dead_letters(&self) -> Vec<Value> {
        let (o, _) = self.expect(0, &["dlq", "list", "--json"]);
        o.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Removes the test's queues even if it fails half-way.
struct Queues(String);

impl Drop for Queues {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) = connect(&amqp_url(), "batchctl-test-cleanup").await {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = delete_topology(&ch, &Names::new(&prefix)).await;
                    }
                    let _ = conn.close(200, "done".into()).await;
                }
            });
        })
        .join();
    }
}

async fn setup() -> (TestDatabase, volley_db::Db, Ctl, Queues) {
    let (t, db) = TestDatabase::create().await.unwrap();
    let prefix = format!("ctl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let ctl = Ctl {
        database_url: t.url.clone(),
        prefix: prefix.clone(),
    };
    (t, db, ctl, Queues(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let (_t, _db, ctl, _q) = setup().await;
    let (_, e) = ctl.expect(2, &["batches", "redispatch", "abc"]);
    assert!(e.contains("invalid value 'abc'"), "{e}");
    let (_, e) = ctl.expect(2, &["batches", "retry-failed", "0"]);
    assert!(e.contains("invalid value '0'"), "{e}");
    let (_, e) = ctl.expect(1, &["batches", "redispatch", "424242"]);
    assert!(e.contains("no batch 424242"), "{e}");
    let (_, e) = ctl.expect(1, &["batches", "retry-failed", "424242"]);
    assert!(e.contains("no batch 424242"), "{e}");
    let (_, e) = ctl.expect(2, &["dlq", "list", "--queue", "audio"]);
    assert!(e.contains("unknown queue \"audio\""), "{e}");
    assert!(e.contains("llm, image, video, music, tts, events"), "{e}");
    let (_, e) = ctl.expect(2, &["dlq", "replay", "--reason", "nope"]);
    assert!(
        e.contains("delivery_limit"),
        "the valid reasons are listed: {e}"
    );
    let (_, e) = ctl.expect(2, &["dlq", "replay", "--batch=-3"]);
    assert!(e.contains("--batch"), "{e}");
    ctl.expect(2, &["dlq", "list", "--limit", "0"]);
    // An unreachable database is an error that says so, not a panic.
    let down = Ctl {
        database_url: "postgres://postgres@127.0.0.1:1/none".into(),
        prefix: ctl.prefix.clone(),
    };
    let (_, e) = down.expect(1, &["batches", "redispatch", "5"]);
    assert!(e.starts_with("batchctl: database"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redispatch_and_retry_failed_report_what_they_did() {
    let (_t, db, ctl, _q) = setup().await;
    let (b, d) = db.create_batch("o", None, completions(3), 0).await.unwrap();
    let id = b.id.to_string();
    let (o, _) = ctl.expect(0, &["batches", "redispatch", &id]);
    assert!(o.contains("3 queued job(s)"), "{o}");
    // One job fails, one finishes, one stays queued.
    db.claim(vec![d[0].id, d[1].id], 60_000, 0).await.unwrap();
    let fail = volley_domain::Event {
        job_id: d[0].id,
        attempt: 1,
        outcome: volley_domain::Outcome::Failed {
            error_type: "provider_error".into(),
            message: "boom".into(),
        },
    };
    let ok = volley_domain::Event {
        job_id: d[1].id,
        attempt: 1,
        outcome: volley_domain::Outcome::Succeeded {
            result: json!({"ok": true}),
            usage: None,
            media_keys: Vec::new(),
        },
    };
    db.apply_events(vec![fail, ok]).await.unwrap();
    let (o, _) = ctl.expect(0, &["batches", "retry-failed", &id]);
    assert!(
        o.contains(&format!(
            "1 failed job(s) queued again as new attempts: {}",
            d[0].id
        )),
        "{o}"
    );
    let (o, _) = ctl.expect(0, &["batches", "retry-failed", &id]);
    assert!(o.contains("has no FAILED jobs; nothing changed"), "{o}");
    let j = db.get_job("o", d[0].id).await.unwrap().unwrap();
    assert_eq!(
        (j.status.as_str(), j.attempt, j.error_type),
        ("QUEUED", 1, None)
    );
    let j = db.get_job("o", d[1].id).await.unwrap().unwrap();
    assert_eq!(
        j.status,
        volley_domain::JobStatus::Processed,
        "finished jobs do not change"
    );
}

/// Takes the next message of `queue` and rejects it, so RabbitMQ dead-letters it.
async fn reject_next(ch: &Channel, queue: &str, requeue: bool) -> bool {
    let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    else {
        return false;
    };
    ch.basic_nack(
        m.delivery.delivery_tag,
        BasicNackOptions {
            requeue,
            multiple: false,
        },
    )
    .await
    .unwrap();
    true
}

async fn depth(ch: &Channel, queue: &str) -> u32 {
    queue_depth(ch, queue).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_with_filters() {
    let (_t, db, ctl, _q) = setup().await;
    let names = Names::new(&ctl.prefix);
    let llm = names.job_queue(InferenceType::Llm);
    let events = names.events_queue();
    let (b, d) = db.create_batch("o", None, completions(2), 0).await.unwrap();
    let conn = connect(&amqp_url(), "batchctl-test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare_topology(&ch, &names).await.unwrap();
    let broker = Broker::new(&amqp_url(), "batchctl-test", names.clone());

    // Undecodable, rejected at once.
    broker
        .publish_raw(&llm, b"garbage".to_vec(), None)
        .await
        .unwrap();
    assert!(reject_next(&ch, &llm, false).await);
    // A job message whose consumer keeps failing: the delivery limit ends the loop.
    let job = JobMessage {
        job_id: d[0].id,
        batch_id: b.id,
        inference_type: "LLM".into(),
        endpoint: "/v1/completions".into(),
        model: "qwen3-8b".into(),
        body_json: br#"{"model":"qwen3-8b","prompt":"p0"}"#.to_vec(),
        ..Default::default()
    };
    broker
        .publish_raw(&llm, job.encode_to_vec(), Some(d[0].id.to_string()))
        .await
        .unwrap();
    let mut deliveries = 0;
    while deliveries < 50 && reject_next(&ch, &llm, true).await {
        deliveries += 1;
    }
    assert!(
        (volley_amqp::DELIVERY_LIMIT as usize..=volley_amqp::DELIVERY_LIMIT as usize + 1)
            .contains(&deliveries),
        "delivered {deliveries} times"
    );
    // An outcome event nobody could apply.
    let event = JobEvent {
        job_id: d[1].id,
        attempt: 1,
        outcome: Some(job_event::Outcome::Succeeded(Succeeded {
            result_json: b"{}".to_vec(),
            usage: None,
            ..Default::default()
        })),
        ..Default::default()
    };
    broker
        .publish_raw(&events, event.encode_to_vec(), None)
        .await
        .unwrap();
    assert!(reject_next(&ch, &events, false).await);
    broker.close().await;
    // Dead-lettering is asynchronous.
    for _ in 0..100 {
        if depth(&ch, &Names::dlq(&llm)).await == 2 && depth(&ch, &Names::dlq(&events)).await == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let listed = ctl.dead_letters();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let find = |job: Value| listed.iter().find(|l| l["job_id"] == job).unwrap().clone();
    let junk = find(Value::Null);
    assert_eq!(
        (junk["queue"].as_str(), junk["reason"].as_str()),
        (Some(llm.as_str()), Some("rejected"))
    );
    assert!(
        junk["content"]
            .as_str()
            .unwrap()
            .starts_with("undecodable: not a JobMessage")
    );
    let limit = find(json!(d[0].id));
    assert_eq!(limit["reason"], "delivery_limit");
    assert_eq!(
        (limit["batch_id"].clone(), limit["count"].clone()),
        (json!(b.id), json!(1))
    );
    let ev = find(json!(d[1].id));
    assert_eq!(
        (ev["queue"].as_str(), ev["reason"].as_str()),
        (Some(events.as_str()), Some("rejected"))
    );
    assert_eq!(
        ev["batch_id"],
        json!(b.id),
        "an event's batch comes from PostgreSQL"
    );
    let (table, _) = ctl.expect(0, &["dlq", "list"]);
    assert!(
        table.contains("delivery_limit") && table.contains("3 dead-lettered message(s)"),
        "{table}"
    );
    assert_eq!(ctl.dead_letters().len(), 3, "listing takes nothing away");

    let (o, _) = ctl.expect(0, &["dlq", "replay", "--dry-run"]);
    assert!(
        o.contains("would replay 2") && o.contains("1 undecodable"),
        "{o}"
    );
    assert_eq!(ctl.dead_letters().len(), 3, "a dry run changes nothing");
    let (o, _) = ctl.expect(
        0,
        &["dlq", "replay", "--queue", "llm", "--reason", "rejected"],
    );
    assert!(o.contains("replayed 0"), "{o}");
    let other = (b.id + 1).to_string();
    let (o, _) = ctl.expect(0, &["dlq", "replay", "--batch", &other]);
    assert!(
        o.contains("replayed 0; left in place: 3 not matching"),
        "{o}"
    );

    let (o, _) = ctl.expect(0, &["dlq", "replay", "--batch", &b.id.to_string()]);
    assert!(o.contains("replayed 2"), "{o}");
    let left = ctl.dead_letters();
    assert_eq!(left.len(), 1);
    assert!(left[0]["job_id"].is_null());
    assert_eq!((depth(&ch, &llm).await, depth(&ch, &events).await), (1, 1));
    // The copy is the original: same payload, so a consumer sees the same job.
    let m = ch
        .basic_get(llm.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(JobMessage::decode(m.delivery.data.as_slice()).unwrap(), job);
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(d[0].id.to_string())
    );
    let (o, _) = ctl.expect(0, &["dlq", "replay", "--batch", &b.id.to_string()]);
    assert!(
        o.contains("replayed 0"),
        "replaying again finds nothing: {o}"
    );

    let (o, _) = ctl.expect(
        0,
        &["dlq", "replay", "--queue", "llm", "--include-undecodable"],
    );
    assert!(o.contains("replayed 1"), "{o}");
    assert!(ctl.dead_letters().is_empty());
    let (o, _) = ctl.expect(0, &["queues"]);
    let row = o.lines().find(|l| l.starts_with(&llm)).unwrap().to_owned();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>()[1..],
        ["1", "0", "0"],
        "{o}"
    );
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_are_made_only_when_asked() {
    let (_t, db, ctl, _q) = setup().await;
    let (o, _) = ctl.expect(0, &["keys", "create", "--name", "ops", "--admin"]);
    assert!(o.starts_with("created admin key"), "{o}");
    let ops = o.lines().last().unwrap().to_owned();
    let (o, _) = ctl.expect(0, &["keys", "create", "--name", "ci"]);
    let ci = o.lines().last().unwrap().to_owned();
    assert_eq!(db.key_is_admin(&ops).await.unwrap(), Some(true));
    assert_eq!(db.key_is_admin(&ci).await.unwrap(), Some(false));
    assert_eq!(db.key_is_admin("vk_unknown").await.unwrap(), None);
    let (o, _) = ctl.expect(0, &["keys", "list"]);
    let admin_of = |name: &str| -> String {
        let row: Vec<&str> = o
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap()
            .split_whitespace()
            .collect();
        row[4].to_owned()
    };
    assert_eq!(admin_of("ops"), "yes", "{o}");
    assert_eq!(admin_of("ci"), "-", "{o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_quotas_are_set_changed_and_checked() {
    let (_t, db, ctl, _q) = setup().await;
    let quotas = |name: &'static str| {
        let db = db.clone();
        async move {
            let k = db
                .list_keys()
                .await
                .unwrap()
                .into_iter()
                .find(|k| k.name == name)
                .unwrap();
            (k.max_active_jobs, k.max_jobs_per_minute)
        }
    };
    ctl.expect(
        0,
        &[
            "keys",
            "create",
            "--name",
            "tenant",
            "--max-active-jobs",
            "100",
            "--max-jobs-per-minute",
            "2147483647",
        ],
    );
    assert_eq!(quotas("tenant").await, (Some(100), Some(i32::MAX)));
    ctl.expect(0, &["keys", "create", "--name", "free"]);
    assert_eq!(quotas("free").await, (None, None));

    let (o, _) = ctl.expect(0, &["keys", "update", "tenant", "--max-active-jobs", "7"]);
    assert!(o.contains("max active jobs 7"), "{o}");
    assert_eq!(
        quotas("tenant").await,
        (Some(7), Some(i32::MAX)),
        "the other stays"
    );
    ctl.expect(
        0,
        &["keys", "update", "tenant", "--max-jobs-per-minute", "none"],
    );
    assert_eq!(quotas("tenant").await, (Some(7), None));
    let (o, _) = ctl.expect(0, &["keys", "list"]);
    assert!(
        o.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("tenant") && l.contains(" 7 ")),
        "{o}"
    );

    // Hostile values are refused by the parser (exit 2) and change nothing.
    for bad in [
        "0",
        "-1",
        "2147483648",
        "99999999999999999999999",
        "ten",
        "",
        "1.5",
        "0x10",
        "7\u{7}",
        "NaN",
    ] {
        // `--flag=value`, so that a leading `-` reaches the value parser.
        let active = format!("--max-active-jobs={bad}");
        let (_, e) = ctl.expect(2, &["keys", "update", "tenant", &active]);
        assert!(e.contains("--max-active-jobs"), "{bad:?}: {e}");
        let per_minute = format!("--max-jobs-per-minute={bad}");
        ctl.expect(2, &["keys", "create", "--name", "x", &per_minute]);
    }
    assert_eq!(quotas("tenant").await, (Some(7), None));
    assert!(db.list_keys().await.unwrap().iter().all(|k| k.name != "x"));
    // Nothing to change is bad usage; an unknown key is a failure.
    ctl.expect(2, &["keys", "update", "tenant"]);
    ctl.expect(1, &["keys", "update", "nobody", "--max-active-jobs", "3"]);

    // The fair-dispatch weight: 1 by default, set at creation or later, 1 to 100 only.
    let weight = |name: &'static str| {
        let db = db.clone();
        async move {
            db.list_keys()
                .await
                .unwrap()
                .into_iter()
                .find(|k| k.name == name)
                .unwrap()
                .dispatch_weight
        }
    };
    assert_eq!(weight("free").await, 1);
    ctl.expect(0, &["keys", "create", "--name", "heavy", "--weight", "5"]);
    assert_eq!(weight("heavy").await, 5);
    let (o, _) = ctl.expect(0, &["keys", "update", "free", "--weight", "100"]);
    assert!(o.contains("weight 100"), "{o}");
    assert_eq!(weight("free").await, 100);
    assert_eq!(quotas("free").await, (None, None), "quotas stay");
    let (o, _) = ctl.expect(0, &["keys", "list"]);
    assert!(o.lines().next().unwrap().contains("WEIGHT"), "{o}");
    for bad in ["0", "-1", "101", "2147483648", "ten", "", "1.5", "none"] {
        let arg = format!("--weight={bad}");
        let (_, e) = ctl.expect(2, &["keys", "update", "free", &arg]);
        assert!(e.contains("--weight"), "{bad:?}: {e}");
        ctl.expect(2, &["keys", "create", "--name", "y", &arg]);
    }
    assert_eq!(weight("free").await, 100);
    assert!(db.list_keys().await.unwrap().iter().all(|k| k.name != "y"));
}
