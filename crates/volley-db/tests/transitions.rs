//! The database follows the domain's transition table. Every (state, transition) pair is
//! applied through the domain (`JobStatus::apply`) and through each statement that makes that
//! transition, on a real PostgreSQL database, and the resulting states compared: a transition
//! added to, or dropped from, one side only fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::RunQueryDsl;
use diesel::sql_types::{BigInt, Text};
use serde_json::json;
use volley_db::testing::TestDatabase;
use volley_db::{Db, NewJob, Refusal};
use volley_domain::{Event, JobStatus, Outcome, Transition};

/// Every statement of the database layer that changes a job's status.
#[derive(Debug, Clone, Copy)]
enum Statement {
    Claim,
    RetryEvent,
    SweepLeaseLost,
    RedispatchAbandoned,
    SucceededEvent,
    FailedEvent,
    UnstorableOutcome,
    SweepLastAttemptLost,
    Expire,
    CancelJob,
    CancelBatch,
    RetryFailed,
}

/// The statements making each transition. Exhaustive on purpose: a transition added to the
/// domain does not compile here until the database has a statement for it.
fn statements(t: Transition) -> &'static [Statement] {
    use Statement::*;
    match t {
        Transition::Claim => &[Claim],
        Transition::Requeue => &[RetryEvent, SweepLeaseLost, RedispatchAbandoned],
        Transition::Succeed => &[SucceededEvent],
        Transition::Fail => &[FailedEvent, UnstorableOutcome, SweepLastAttemptLost],
        Transition::Expire => &[Expire],
        Transition::Cancel => &[CancelJob, CancelBatch],
        Transition::Retry => &[RetryFailed],
    }
}

const OWNER: &str = "o";

fn event(job_id: i64, outcome: Outcome) -> Event {
    Event {
        job_id,
        attempt: 1,
        outcome,
    }
}

/// A batch of one job, put straight into `status` with every other condition a statement
/// checks already met (attempt 1, lease run out, available an hour ago, never started), so
/// that the status guard alone decides.
async fn job_in(db: &Db, status: JobStatus) -> (i64, i64) {
    let job = NewJob {
        inference_type: "LLM".into(),
        endpoint: "/v1/completions".into(),
        model: "m".into(),
        body: json!({"model": "m", "prompt": "p"}),
        custom_id: None,
    };
    let (batch, d) = db.create_batch(OWNER, None, vec![job], 0).await.unwrap();
    let id = d[0].id;
    db.run(move |conn| {
        diesel::sql_query(
            "UPDATE jobs SET status = $2, attempt = 1, attempt_base = 0, \
             lease_until = now() - interval '1 hour', available_at = now() - interval '1 hour', \
             started_at = NULL, dispatched_at = now() WHERE id = $1",
        )
        .bind::<BigInt, _>(id)
        .bind::<Text, _>(status.as_str())
        .execute(&mut **conn)?;
        Ok(())
    })
    .await
    .unwrap();
    (batch.id, id)
}

async fn run(db: &Db, s: Statement, batch: i64, id: i64) {
    let hour = 3_600_000;
    match s {
        Statement::Claim => drop(db.claim(vec![id], 60_000, 0).await.unwrap()),
        Statement::RetryEvent => {
            let retry = Outcome::Retry {
                error: "busy".into(),
                delay_ms: 0,
            };
            db.apply_events(vec![event(id, retry)]).await.unwrap();
        }
        Statement::SucceededEvent => {
            let ok = Outcome::Succeeded {
                result: json!({"text": "hi"}),
                usage: None,
                media_keys: Vec::new(),
            };
            db.apply_events(vec![event(id, ok)]).await.unwrap();
        }
        Statement::FailedEvent => {
            let failed = Outcome::Failed {
                error_type: "provider_error".into(),
                message: "no".into(),
            };
            db.apply_events(vec![event(id, failed)]).await.unwrap();
        }
        Statement::UnstorableOutcome => {
            // PostgreSQL refuses U+0000, so the job is failed with the refusal instead.
            let unstorable = Outcome::Failed {
                error_type: "provider_error".into(),
                message: "a\u{0}b".into(),
            };
            let refusal = Refusal {
                error_type: "invalid_output".into(),
                message: "could not be stored".into(),
            };
            db.apply_each(vec![event(id, unstorable)], refusal)
                .await
                .unwrap();
        }
        // Attempts left: the lost worker's job goes back to the queue.
        Statement::SweepLeaseLost => drop(db.sweep(5, hour, None).await.unwrap()),
        // The last attempt: it fails.
        Statement::SweepLastAttemptLost => drop(db.sweep(1, hour, None).await.unwrap()),
        Statement::RedispatchAbandoned => drop(db.redispatch_batch(batch).await.unwrap()),
        Statement::Expire => drop(db.expire(1_000).await.unwrap()),
        Statement::CancelJob => drop(db.cancel_job(OWNER, id).await.unwrap()),
        Statement::CancelBatch => drop(db.cancel_batch(OWNER, batch).await.unwrap()),
        Statement::RetryFailed => drop(db.retry_failed(batch).await.unwrap()),
    }
}

#[tokio::test]
async fn every_statement_follows_the_domain_table() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let mut mismatches = Vec::new();
    let mut cases = 0;
    for t in Transition::ALL {
        for &statement in statements(t) {
            for from in JobStatus::ALL {
                let (batch, id) = job_in(&db, from).await;
                run(&db, statement, batch, id).await;
                let got = db.get_job(OWNER, id).await.unwrap().unwrap().status;
                let want = from.apply(t).unwrap_or(from);
                if got != want {
                    mismatches.push(format!(
                        "{t:?} by {statement:?} from {from}: the database left {got}, the domain says {want}"
                    ));
                }
                cases += 1;
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(cases >= Transition::ALL.len() * JobStatus::ALL.len());
}

/// A status outside the domain's names (the CHECK constraint dropped by hand, say) is an
/// error that names it, not a row read as something else or skipped.
#[tokio::test]
async fn an_unknown_status_is_a_clear_error() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let (batch, id) = job_in(&db, JobStatus::Queued).await;
    db.run(move |conn| {
        diesel::sql_query("ALTER TABLE jobs DROP CONSTRAINT jobs_status_check")
            .execute(&mut **conn)?;
        diesel::sql_query("UPDATE jobs SET status = 'PAUSED' WHERE id = $1")
            .bind::<BigInt, _>(id)
            .execute(&mut **conn)?;
        Ok(())
    })
    .await
    .unwrap();
    let err = db.get_job(OWNER, id).await.unwrap_err().to_string();
    assert!(
        err.contains("job status") && err.contains("PAUSED"),
        "{err}"
    );
    let err = db.get_batch(OWNER, batch).await.unwrap_err().to_string();
    assert!(err.contains("PAUSED"), "{err}");
}
