//! The webhook trigger against the real PostgreSQL: events recorded with the transitions that
//! cause them, whichever statement makes them, exactly once per batch end even when two
//! transactions finish a batch's last jobs at the same moment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use serde_json::json;
use volley_db::testing::{TestDatabase, completions};
use volley_db::{Db, NewWebhook};
use volley_domain::{Claim, Event, Outcome};

fn hook(key_id: i64, types: &[&str]) -> NewWebhook {
    NewWebhook {
        url: "https://hooks.example.com/x".into(),
        types: types.iter().map(|t| (*t).to_owned()).collect(),
        key_id,
    }
}

const ALL: [&str; 4] = [
    "batch.completed",
    "batch.cancelled",
    "job.completed",
    "job.failed",
];

fn succeeded(job_id: i64, attempt: i32) -> Event {
    Event {
        job_id,
        attempt,
        outcome: Outcome::Succeeded {
            result: json!({"text": "hi"}),
            usage: None,
            media_keys: Vec::new(),
        },
    }
}

fn failed(job_id: i64, attempt: i32) -> Event {
    Event {
        job_id,
        attempt,
        outcome: Outcome::Failed {
            error_type: "provider_error".into(),
            message: "no".into(),
        },
    }
}

/// Event types recorded for a batch, in order.
async fn events(db: &Db, owner: &str, batch: i64) -> Vec<String> {
    db.webhook_deliveries(owner, batch)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|d| d.event_type)
        .collect()
}

async fn claim(db: &Db, ids: Vec<i64>) -> HashMap<i64, i32> {
    db.claim(ids, 60_000, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, c)| match c {
            Claim::Claimed { attempt, .. } => (id, attempt),
            other => panic!("{id}: {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_two_jobs_finishing_at_once_record_one_batch_event() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let key = db.create_key("k", Some("o")).await.unwrap();
    for _ in 0..20 {
        let (b, d) = db
            .create_batch_with(
                "o",
                None,
                json!({}),
                Some(hook(key.key.id, &ALL)),
                completions(2),
                0,
            )
            .await
            .unwrap();
        let attempts = claim(&db, d.iter().map(|j| j.id).collect()).await;
        // Each job's outcome in its own transaction, at the same time.
        let (a, b2) = tokio::join!(
            db.apply_events(vec![succeeded(d[0].id, attempts[&d[0].id])]),
            db.apply_events(vec![failed(d[1].id, attempts[&d[1].id])]),
        );
        assert_eq!(a.unwrap().len(), 1);
        assert_eq!(b2.unwrap().len(), 1);
        let mut got = events(&db, "o", b.id).await;
        got.sort();
        assert_eq!(got, ["batch.completed", "job.completed", "job.failed"]);
    }
}

#[tokio::test]
async fn every_path_to_a_terminal_state_records_its_event() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let key = db.create_key("k", Some("o")).await.unwrap();
    let id = key.key.id;

    // No webhook: nothing, whatever happens.
    let (plain, d) = db.create_batch("o", None, completions(1), 0).await.unwrap();
    let a = claim(&db, vec![d[0].id]).await;
    db.apply_events(vec![succeeded(d[0].id, a[&d[0].id])])
        .await
        .unwrap();
    assert!(events(&db, "o", plain.id).await.is_empty());

    // A batch cancel ends the batch: batch.cancelled; cancelled jobs have no job event.
    let (b, _) = db
        .create_batch_with(
            "o",
            None,
            json!({}),
            Some(hook(id, &ALL)),
            completions(3),
            0,
        )
        .await
        .unwrap();
    db.cancel_batch("o", b.id).await.unwrap().unwrap();
    assert_eq!(events(&db, "o", b.id).await, ["batch.cancelled"]);
    // A second cancel changes nothing and records nothing.
    db.cancel_batch("o", b.id).await.unwrap().unwrap();
    assert_eq!(events(&db, "o", b.id).await, ["batch.cancelled"]);

    // Only the subscribed types are recorded.
    let (b, d) = db
        .create_batch_with(
            "o",
            None,
            json!({}),
            Some(hook(id, &["job.failed"])),
            completions(2),
            0,
        )
        .await
        .unwrap();
    let a = claim(&db, d.iter().map(|j| j.id).collect()).await;
    db.apply_events(vec![
        succeeded(d[0].id, a[&d[0].id]),
        failed(d[1].id, a[&d[1].id]),
    ])
    .await
    .unwrap();
    assert_eq!(events(&db, "o", b.id).await, ["job.failed"]);

    // Expiry fails a job never started: job.failed, and the batch ends with it.
    let (b, d) = db
        .create_batch_with(
            "o",
            None,
            json!({}),
            Some(hook(id, &ALL)),
            completions(1),
            0,
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(db.expire(1).await.unwrap(), 1);
    assert_eq!(
        events(&db, "o", b.id).await,
        ["job.failed", "batch.completed"]
    );

    // An operator retry reopens the batch; its second end is a second batch event.
    db.retry_failed(b.id).await.unwrap().unwrap();
    let a = claim(&db, vec![d[0].id]).await;
    db.apply_events(vec![succeeded(d[0].id, a[&d[0].id])])
        .await
        .unwrap();
    assert_eq!(
        events(&db, "o", b.id).await,
        [
            "job.failed",
            "batch.completed",
            "job.completed",
            "batch.completed"
        ]
    );
    // Each event has its own webhook-id.
    let ids: std::collections::HashSet<String> = db
        .webhook_deliveries("o", b.id)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|d| d.msg_id)
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(ids.iter().all(|i| i.starts_with("msg_")));
    // Another owner sees no deliveries of it.
    assert!(
        db.webhook_deliveries("other", b.id)
            .await
            .unwrap()
            .is_none()
    );
}
