//! Against the real PostgreSQL, one fresh database per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use volley_db::testing::{TestDatabase, completions};
use volley_db::{Db, EachResult, Refusal};
use volley_domain::{BatchStatus, Claim, Event, JobStatus, Outcome, Usage};

async fn setup() -> (TestDatabase, Db) {
    TestDatabase::create().await.unwrap()
}

fn ok(job_id: i64, attempt: i32) -> Event {
    Event {
        job_id,
        attempt,
        outcome: Outcome::Succeeded {
            result: json!({"text": "hi"}),
            usage: Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            }),
            media_keys: Vec::new(),
        },
    }
}

#[tokio::test]
async fn accept_read_and_isolate_owners() {
    let (_t, db) = setup().await;
    let (b, d) = db
        .create_batch("alice", Some("l".into()), completions(3), 5_000)
        .await
        .unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(b.counts.status(), BatchStatus::Pending);
    let (view, summaries) = db.get_batch("alice", b.id).await.unwrap().unwrap();
    assert_eq!(view.counts.queued, 3);
    assert_eq!(summaries.len(), 3);
    assert!(db.get_batch("bob", b.id).await.unwrap().is_none());
    assert!(db.get_job("bob", d[0].id).await.unwrap().is_none());
    assert!(db.get_job("alice", d[0].id).await.unwrap().is_some());
    db.create_batch("alice", None, completions(1), 0)
        .await
        .unwrap();
    let list = db.list_batches("alice", 50).await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].id > list[1].id, "newest first");
    assert!(db.list_batches("bob", 50).await.unwrap().is_empty());
}

#[tokio::test]
async fn claims_are_exclusive_and_outcomes_fenced() {
    let (_t, db) = setup().await;
    let (b, d) = db.create_batch("o", None, completions(3), 0).await.unwrap();
    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
    let first = db
        .claim(vec![ids[0], ids[0], 999_999], 60_000, 0)
        .await
        .unwrap();
    assert_eq!(
        first[0].1,
        Claim::Claimed {
            attempt: 1,
            round_attempt: 1
        }
    );
    assert_eq!(first[1].1, Claim::Refused, "same job twice in one round");
    assert_eq!(first[2].1, Claim::NotFound);
    // A redelivered message cannot claim a running job again.
    assert_eq!(
        db.claim(vec![ids[0]], 60_000, 0).await.unwrap()[0].1,
        Claim::Refused
    );

    // Stale attempt and duplicates change nothing.
    assert!(
        db.apply_events(vec![ok(ids[0], 7)])
            .await
            .unwrap()
            .is_empty()
    );
    let applied = db
        .apply_events(vec![ok(ids[0], 1), ok(ids[0], 1)])
        .await
        .unwrap();
    assert_eq!(applied, vec![(ids[0], JobStatus::Processed)]);
    assert!(
        db.apply_events(vec![ok(ids[0], 1)])
            .await
            .unwrap()
            .is_empty()
    );
    let job = db.get_job("o", ids[0]).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Processed);
    assert_eq!(job.total_tokens, Some(3));

    // Retry hands the job back; the next claim is attempt 2 and the old attempt is fenced off.
    db.claim(vec![ids[1]], 60_000, 0).await.unwrap();
    let retry = Event {
        job_id: ids[1],
        attempt: 1,
        outcome: Outcome::Retry {
            error: "HTTP 500".into(),
            delay_ms: 0,
        },
    };
    assert_eq!(db.apply_events(vec![retry]).await.unwrap().len(), 1);
    assert_eq!(
        db.claim(vec![ids[1]], 60_000, 0).await.unwrap()[0].1,
        Claim::Claimed {
            attempt: 2,
            round_attempt: 2
        }
    );
    assert!(
        db.apply_events(vec![ok(ids[1], 1)])
            .await
            .unwrap()
            .is_empty()
    );
    let failed = Event {
        job_id: ids[1],
        attempt: 2,
        outcome: Outcome::Failed {
            error_type: "provider_error".into(),
            message: "bad".into(),
        },
    };
    db.apply_events(vec![failed]).await.unwrap();
    let j = db.get_job("o", ids[1]).await.unwrap().unwrap();
    assert_eq!((j.status, j.attempt), (JobStatus::Failed, 2));
    assert_eq!(j.error_message.as_deref(), Some("bad"));

    // Cancel: the running job is cancelled, the finished ones stay, a late result is dropped.
    db.claim(vec![ids[2]], 60_000, 0).await.unwrap();
    let (view, _, cancelled) = db.cancel_batch("o", b.id).await.unwrap().unwrap();
    assert_eq!(cancelled, vec![ids[2]]);
    assert_eq!(view.counts.status(), BatchStatus::Done);
    assert_eq!(
        (
            view.counts.processed,
            view.counts.failed,
            view.counts.cancelled
        ),
        (1, 1, 1)
    );
    assert!(
        db.apply_events(vec![ok(ids[2], 1)])
            .await
            .unwrap()
            .is_empty()
    );
    let (_, _, again) = db.cancel_batch("o", b.id).await.unwrap().unwrap();
    assert!(again.is_empty(), "cancel is idempotent");
    assert!(db.cancel_batch("other", b.id).await.unwrap().is_none());
}

#[tokio::test]
async fn sweeper_finds_undispatched_and_lost_jobs() {
    let (_t, db) = setup().await;
    let due_ids = async |db: &Db| -> Vec<i64> {
        let mut v: Vec<i64> = db
            .due_for_dispatch(100)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        v.sort_unstable();
        v
    };
    // A batch whose publish was never recorded (the gateway failed or stopped) goes to the
    // outbox once the dispatch grace has passed, and only then.
    let (_, d) = db.create_batch("o", None, completions(3), 0).await.unwrap();
    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
    assert!(due_ids(&db).await.is_empty(), "the gateway publishes first");
    assert_eq!(db.sweep(4, 600_000, None).await.unwrap().unconfirmed, 0);
    assert!(due_ids(&db).await.is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(db.sweep(4, 10, None).await.unwrap().unconfirmed, 3);
    assert_eq!(due_ids(&db).await, ids);
    assert_eq!(db.sweep(4, 10, None).await.unwrap().unconfirmed, 0, "once");
    db.mark_dispatched(ids.clone()).await.unwrap();
    assert!(due_ids(&db).await.is_empty());

    // A recorded publish: only the jobs the broker did not confirm go to the outbox.
    let (b2, d2) = db.create_batch("o", None, completions(3), 0).await.unwrap();
    let ids2: Vec<i64> = d2.iter().map(|j| j.id).collect();
    db.record_publish(b2.id, vec![ids2[1]]).await.unwrap();
    assert_eq!(due_ids(&db).await, vec![ids2[1]]);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(db.sweep(4, 10, None).await.unwrap().unconfirmed, 0);
    assert_eq!(due_ids(&db).await, vec![ids2[1]]);
    db.mark_dispatched(vec![ids2[1]]).await.unwrap();
    let (_, d3) = db.create_batch("o", None, completions(1), 0).await.unwrap();
    db.record_publish(d3[0].batch_id, vec![]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(db.sweep(4, 10, None).await.unwrap().unconfirmed, 0);
    assert!(due_ids(&db).await.is_empty());

    // Lost messages are looked for only when asked (the search reads the whole backlog).
    db.cancel_batch("o", b2.id).await.unwrap();
    db.cancel_batch("o", d3[0].batch_id).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(db.sweep(4, 10, None).await.unwrap().redispatched, 0);
    assert_eq!(
        db.sweep(4, 10, Some(600_000)).await.unwrap().redispatched,
        0
    );
    assert_eq!(db.sweep(4, 10, Some(10)).await.unwrap().redispatched, 3);
    assert_eq!(due_ids(&db).await, ids);
    db.mark_dispatched(vec![ids[0], ids[1]]).await.unwrap();

    // A claim whose lease runs out goes back to the queue.
    db.claim(vec![ids[0]], 1, 0).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let r = db.sweep(4, 600_000, Some(600_000)).await.unwrap();
    assert_eq!(r.leases_expired, 1);
    assert!(due_ids(&db).await.contains(&ids[0]));
    // Renewal: a live claim stays, a stale attempt is not renewed.
    db.claim(vec![ids[0]], 60_000, 0).await.unwrap();
    assert_eq!(
        db.renew(vec![(ids[0], 2), (ids[1], 1)], 60_000)
            .await
            .unwrap(),
        vec![ids[0]]
    );
    // On the last attempt a lost worker fails the job instead.
    db.claim(vec![ids[1]], 1, 0).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let r = db.sweep(1, 600_000, Some(600_000)).await.unwrap();
    assert_eq!(r.lost_failed, 1);
    assert_eq!(
        db.get_job("o", ids[1]).await.unwrap().unwrap().status,
        JobStatus::Failed
    );
}

#[tokio::test]
async fn keys_are_hashed_and_revocable() {
    let (_t, db) = setup().await;
    let k = db.create_key("ci", None).await.unwrap();
    assert!(k.secret.starts_with("vk_"));
    assert_eq!(
        db.authenticate(&k.secret).await.unwrap().as_deref(),
        Some("ci")
    );
    assert_eq!(db.authenticate("vk_wrong").await.unwrap(), None);
    let listed = db.list_keys().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!format!("{listed:?}").contains(&k.secret));
    assert_eq!(db.revoke_key("ci").await.unwrap(), 1);
    assert_eq!(db.authenticate(&k.secret).await.unwrap(), None);
}

#[tokio::test]
async fn a_batch_read_by_key_checks_the_key_and_sums_usage() {
    let (_t, db) = setup().await;
    let alice = db.create_key("alice", None).await.unwrap().secret;
    let bob = db.create_key("bob", None).await.unwrap().secret;
    let (b, d) = db
        .create_batch("alice", None, completions(3), 0)
        .await
        .unwrap();
    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
    db.claim(ids.clone(), 60_000, 0).await.unwrap();
    db.apply_events(vec![ok(ids[0], 1), ok(ids[1], 1)])
        .await
        .unwrap();

    let (view, summaries, usage) = db
        .get_batch_for_key(&alice, b.id)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(view.id, b.id);
    assert_eq!((view.counts.processed, view.counts.processing), (2, 1));
    assert_eq!(summaries.iter().map(|j| j.id).collect::<Vec<_>>(), ids);
    assert_eq!(
        (
            usage.tokens.prompt_tokens,
            usage.tokens.completion_tokens,
            usage.tokens.total_tokens,
            usage.jobs
        ),
        (2, 4, 6, 2)
    );

    // Another owner's key: no such batch. Unknown or revoked keys: no answer at all.
    assert!(
        db.get_batch_for_key(&bob, b.id)
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    assert!(
        db.get_batch_for_key(&alice, b.id + 1)
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    assert!(
        db.get_batch_for_key("vk_wrong", b.id)
            .await
            .unwrap()
            .is_none()
    );
    db.revoke_key("alice").await.unwrap();
    assert!(db.get_batch_for_key(&alice, b.id).await.unwrap().is_none());
}

async fn backend_pid(db: &Db) -> Result<i32, volley_db::DbError> {
    db.run(|c| {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Pid {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            pid: i32,
        }
        let p: Pid = diesel::sql_query("SELECT pg_backend_pid() AS pid").get_result(&mut **c)?;
        Ok(p.pid)
    })
    .await
}

/// The server ends a pooled session (as a restart does to all of them): the next caller gets
/// a fresh connection, not the dead one's error.
#[tokio::test]
async fn a_connection_the_server_ended_is_replaced_on_checkout() {
    let (t, _) = setup().await;
    let db = Db::new(&t.url, 1).unwrap();
    let first = backend_pid(&db).await.unwrap();
    let admin = Db::new(&t.url, 1).unwrap();
    admin
        .run(move |c| {
            use diesel::RunQueryDsl;
            diesel::sql_query(format!("SELECT pg_terminate_backend({first})")).execute(&mut **c)?;
            Ok(())
        })
        .await
        .unwrap();
    // The server's goodbye reaches the idle socket asynchronously.
    let mut second = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let gone = admin
            .run(move |c| {
                use diesel::RunQueryDsl;
                #[derive(diesel::QueryableByName)]
                struct N {
                    #[diesel(sql_type = diesel::sql_types::BigInt)]
                    n: i64,
                }
                let n: N = diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = {first}"
                ))
                .get_result(&mut **c)?;
                Ok(n.n == 0)
            })
            .await
            .unwrap();
        if gone {
            second = Some(backend_pid(&db).await.expect("a fresh connection answers"));
            break;
        }
    }
    let second = second.expect("the terminated backend went away");
    assert_ne!(first, second);
}

/// A success stores the media keys its worker reported (the only keys the gateway links);
/// a success without media and a failure store none.
#[tokio::test]
async fn media_keys_are_stored_with_the_outcome() {
    let (_t, db) = setup().await;
    let (_, d) = db.create_batch("o", None, completions(3), 0).await.unwrap();
    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
    db.claim(ids.clone(), 60_000, 0).await.unwrap();
    let keys = vec![
        "batches/1/2-a1-0-aa.png".to_owned(),
        "batches/1/2-a1-1-bb.png".to_owned(),
    ];
    let mut with_media = ok(ids[0], 1);
    if let Outcome::Succeeded { media_keys, .. } = &mut with_media.outcome {
        media_keys.clone_from(&keys);
    }
    let failed = Event {
        job_id: ids[2],
        attempt: 1,
        outcome: Outcome::Failed {
            error_type: "provider_error".into(),
            message: "no".into(),
        },
    };
    let applied = db
        .apply_events(vec![with_media, ok(ids[1], 1), failed])
        .await
        .unwrap();
    assert_eq!(applied.len(), 3);
    let stored = |i: usize| {
        let db = db.clone();
        let id = ids[i];
        async move { db.get_job("o", id).await.unwrap().unwrap().media_keys }
    };
    assert_eq!(stored(0).await, Some(keys));
    assert_eq!(stored(1).await, None);
    assert_eq!(stored(2).await, None);
}

/// Holds the advisory lock a create with this (API key, idempotency key) takes, as a request
/// still in flight on another replica would, until the returned connection is dropped.
fn hold_idempotency_lock(url: &str, key_id: i64, key: &str) -> diesel::PgConnection {
    use diesel::{Connection, RunQueryDsl};
    let mut c = diesel::PgConnection::establish(url).unwrap();
    diesel::sql_query("BEGIN").execute(&mut c).unwrap();
    diesel::sql_query(format!(
        "SELECT pg_advisory_xact_lock(hashtextextended('{key_id}' || ':' || '{key}', 7011))"
    ))
    .execute(&mut c)
    .unwrap();
    c
}

/// Ends the holder's transaction (closing the socket alone releases the lock only once the
/// server notices).
fn release(mut c: diesel::PgConnection) {
    use diesel::RunQueryDsl;
    diesel::sql_query("ROLLBACK").execute(&mut c).unwrap();
}

#[tokio::test]
async fn idempotency_keys_replay_refuse_and_expire() {
    use volley_db::Idempotent;
    let (t, db) = setup().await;
    let alice = db.create_key("alice", None).await.unwrap().key.id;
    let bob = db.create_key("bob", None).await.unwrap().key.id;
    let create = |key_id: i64, key: &str, body: &'static [u8]| {
        let (db, key) = (db.clone(), key.to_owned());
        async move {
            let who = volley_db::Submitter {
                key_id,
                owner: "o".into(),
                quotas: volley_db::Quotas::default(),
                weight: 1,
            };
            db.create_batch_idempotent(
                &who,
                key,
                body,
                None,
                json!({}),
                Default::default(),
                completions(2),
                0,
                None,
                Vec::new(),
            )
            .await
            .unwrap()
        }
    };
    let Idempotent::Created(first, d) = create(alice, "k1", b"body-a").await else {
        panic!("the first use creates")
    };
    assert_eq!(d.len(), 2);
    match create(alice, "k1", b"body-a").await {
        Idempotent::Replayed(v) => {
            assert_eq!(v.id, first.id);
            assert_eq!(v.counts.queued, 2, "the original response: all queued");
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    assert!(matches!(
        create(alice, "k1", b"body-b").await,
        Idempotent::Mismatch
    ));
    // Keys are per API key.
    let Idempotent::Created(other, _) = create(bob, "k1", b"body-a").await else {
        panic!("another API key's k1 is another key")
    };
    assert_ne!(other.id, first.id);
    // Nothing more was created by the replay and the mismatch.
    assert_eq!(db.list_batches("o", 50).await.unwrap().len(), 2);

    // In flight: another transaction holds the key.
    let lock = hold_idempotency_lock(&t.url, alice, "k2");
    assert!(matches!(
        create(alice, "k2", b"x").await,
        Idempotent::InFlight
    ));
    release(lock);
    assert!(matches!(
        create(alice, "k2", b"x").await,
        Idempotent::Created(..)
    ));

    // Past 24 hours a key no longer counts, and the purge removes it in bounded batches.
    db.run(|conn| {
        use diesel::RunQueryDsl;
        diesel::sql_query(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' \
             WHERE idempotency_key = 'k1'",
        )
        .execute(&mut **conn)?;
        Ok(())
    })
    .await
    .unwrap();
    let Idempotent::Created(again, _) = create(alice, "k1", b"body-b").await else {
        panic!("an expired key is free again")
    };
    assert_ne!(again.id, first.id);
    assert_eq!(db.purge_idempotency_keys(1).await.unwrap(), 1, "bob's k1");
    assert_eq!(db.purge_idempotency_keys(10).await.unwrap(), 0);
    match create(alice, "k1", b"body-b").await {
        Idempotent::Replayed(v) => assert_eq!(v.id, again.id),
        other => panic!("the fresh k1 replays, got {other:?}"),
    }
}

/// One event PostgreSQL cannot store (U+0000 in a jsonb string and in a text column) fails
/// the batched statement; applied one by one, the others still apply and the bad event's job
/// fails cleanly instead of wedging every outcome behind it.
#[tokio::test]
async fn an_unstorable_event_fails_only_its_own_job() {
    let (_t, db) = setup().await;
    let (_, d) = db.create_batch("o", None, completions(4), 0).await.unwrap();
    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
    db.claim(ids.clone(), 60_000, 0).await.unwrap();
    let nul_result = Event {
        job_id: ids[1],
        attempt: 1,
        outcome: Outcome::Succeeded {
            result: json!({"text": "a\u{0}b"}),
            usage: None,
            media_keys: vec![],
        },
    };
    let nul_error = Event {
        job_id: ids[2],
        attempt: 1,
        outcome: Outcome::Failed {
            error_type: "provider_error".into(),
            message: "bad\u{0}".into(),
        },
    };
    let events = vec![
        ok(ids[0], 1),
        nul_result,
        nul_error,
        ok(ids[3], 1),
        ok(ids[3], 9),
    ];
    assert!(
        db.apply_events(events.clone()).await.is_err(),
        "PostgreSQL refuses the whole statement"
    );
    let refusal = Refusal {
        error_type: "invalid_output".into(),
        message: "the outcome could not be stored".into(),
    };
    let each = db
        .apply_each(events.clone(), refusal.clone())
        .await
        .unwrap();
    assert_eq!(each.len(), 5);
    assert_eq!(each[0], EachResult::Applied(JobStatus::Processed));
    assert!(matches!(each[1], EachResult::FailedInstead(_)), "{each:?}");
    assert!(matches!(each[2], EachResult::FailedInstead(_)), "{each:?}");
    assert_eq!(each[3], EachResult::Applied(JobStatus::Processed));
    assert_eq!(
        each[4],
        EachResult::Ignored,
        "a stale attempt stays fenced off"
    );
    for (i, want) in [
        (0, JobStatus::Processed),
        (1, JobStatus::Failed),
        (2, JobStatus::Failed),
        (3, JobStatus::Processed),
    ] {
        let job = db.get_job("o", ids[i]).await.unwrap().unwrap();
        assert_eq!(job.status, want, "job {i}");
        if want == JobStatus::Failed {
            assert_eq!(job.error_type.as_deref(), Some("invalid_output"));
        }
    }
    // Applying the same events again (a redelivery) changes nothing and refuses nothing.
    let again = db.apply_each(events, refusal).await.unwrap();
    assert!(again.iter().all(|r| *r == EachResult::Ignored), "{again:?}");
}

#[tokio::test]
async fn finished_jobs_are_read_in_pages_and_custom_ids_kept() {
    use volley_db::listing::{BatchFilter, Cursor, JobFilter};
    use volley_domain::JobStatus;
    let (_t, db) = setup().await;
    let mut new = completions(7);
    for (i, j) in new.iter_mut().enumerate() {
        j.custom_id = (i != 3).then(|| format!("c{i}"));
    }
    let (b, d) = db
        .create_batch_with("o", None, json!({"k": "v"}), None, new, 0)
        .await
        .unwrap();
    assert_eq!(b.metadata, json!({"k": "v"}));
    let ids: Vec<i64> = d.iter().map(|j| j.id).collect();
    // Jobs 0, 2, 4, 5 succeed; 6 is cancelled; 1 and 3 stay queued.
    let done = [ids[0], ids[2], ids[4], ids[5]];
    db.claim(done.to_vec(), 60_000, 0).await.unwrap();
    db.apply_events(done.iter().map(|id| ok(*id, 1)).collect())
        .await
        .unwrap();
    db.cancel_job("o", ids[6]).await.unwrap();

    // Pages of two, each after the last id of the one before: every finished job once.
    let mut seen = Vec::new();
    let mut after = None;
    let mut reads = 0;
    loop {
        let page = db
            .finished_jobs_page(b.id, Vec::new(), after, 2)
            .await
            .unwrap();
        reads += 1;
        seen.extend(page.iter().map(|j| (j.id, j.custom_id.clone())));
        if page.len() < 2 {
            break;
        }
        after = page.last().map(|j| j.id);
    }
    assert_eq!(reads, 3);
    let want: Vec<(i64, Option<String>)> = [0, 2, 4, 5, 6]
        .iter()
        .map(|i| (ids[*i], Some(format!("c{i}"))))
        .collect();
    assert_eq!(seen, want);
    let cancelled = db
        .finished_jobs_page(b.id, vec![JobStatus::Cancelled], None, 10)
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].id, ids[6]);

    // The custom_id lookup and the unique index.
    let found = db
        .list_jobs(
            "o",
            b.id,
            JobFilter {
                custom_id: Some("c4".into()),
                ..Default::default()
            },
            Cursor::First,
            10,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(found.items[0].id, ids[4]);
    let mut twice = completions(2);
    for j in &mut twice {
        j.custom_id = Some("same".into());
    }
    assert!(db.create_batch("o", None, twice, 0).await.is_err());
    // A custom_id is unique per batch only.
    let mut again = completions(1);
    again[0].custom_id = Some("c4".into());
    db.create_batch("o", None, again, 0).await.unwrap();
    let all = db
        .list_batches_page("o", BatchFilter::default(), Cursor::First, 10)
        .await
        .unwrap();
    assert_eq!(all.items.len(), 2, "the refused batch left nothing");
    assert_eq!(all.items[1].metadata, json!({"k": "v"}));
    assert_eq!(all.items[0].metadata, json!({}));
}

/// The statement that applies outcomes notifies the changed batches once (stale events and
/// unchanged batches are not named); a listener hears it, after the `All` of its connection.
#[tokio::test]
async fn applying_outcomes_notifies_the_changed_batches_once() {
    use volley_db::progress::{Changed, listen};
    let (t, db) = setup().await;
    let (a, da) = db
        .create_batch("alice", None, completions(2), 0)
        .await
        .unwrap();
    let (b, db_jobs) = db
        .create_batch("alice", None, completions(1), 0)
        .await
        .unwrap();
    let (c, dc) = db
        .create_batch("alice", None, completions(1), 0)
        .await
        .unwrap();
    let ids: Vec<i64> = da.iter().chain(&db_jobs).chain(&dc).map(|j| j.id).collect();
    db.claim(ids, 60_000, 0).await.unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = listen(t.url.clone(), move |c| {
        let _ = tx.send(c);
    })
    .unwrap();
    let next = || rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(next(), Changed::All);
    // Batch c's event is stale (wrong attempt): c did not change.
    let applied = db
        .apply_events(vec![
            ok(da[0].id, 1),
            ok(da[1].id, 1),
            ok(db_jobs[0].id, 1),
            ok(dc[0].id, 7),
        ])
        .await
        .unwrap();
    assert_eq!(applied.len(), 3);
    let Changed::Batches(mut named) = next() else {
        panic!("expected batch ids");
    };
    named.sort();
    assert_eq!(named, vec![a.id, b.id]);
    // Nothing changed: no notification.
    assert!(
        db.apply_events(vec![ok(da[0].id, 1)])
            .await
            .unwrap()
            .is_empty()
    );
    db.cancel_batch("alice", c.id).await.unwrap();
    assert_eq!(next(), Changed::Batches(vec![c.id]));
    assert!(rx.try_recv().is_err());
    listener.stop().await;
}
