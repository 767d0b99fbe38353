//! Fair dispatch's database side, against the real PostgreSQL: what is held, the order it is
//! released in, and that the sweeper neither publishes held work nor takes it for lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use volley_db::testing::TestDatabase;
use volley_db::{Db, NewJob, Quotas, Submitter, Turns};
use volley_domain::{InferenceType, Priority};

fn job(t: &str, endpoint: &str, i: usize) -> NewJob {
    NewJob {
        inference_type: t.into(),
        endpoint: endpoint.into(),
        model: "m".into(),
        body: json!({"prompt": format!("p{i}")}),
        custom_id: None,
    }
}

fn llm(n: usize) -> Vec<NewJob> {
    (0..n).map(|i| job("LLM", "/v1/completions", i)).collect()
}

async fn tenant(db: &Db, owner: &str) -> Submitter {
    let k = db.create_key(owner, None).await.unwrap();
    Submitter {
        key_id: k.key.id,
        owner: owner.into(),
        quotas: Quotas::default(),
        weight: 1,
    }
}

/// Submits `jobs` for `who`, holding the types in `held`; the batch id.
async fn submit(
    db: &Db,
    who: &Submitter,
    priority: Priority,
    jobs: Vec<NewJob>,
    held: &[InferenceType],
) -> i64 {
    let (view, _) = db
        .submit_batch(who, None, json!({}), None, priority, jobs, 0, held.to_vec())
        .await
        .unwrap()
        .unwrap();
    view.id
}

/// Releases everything of `t`, in order: (batch, owner, jobs published).
async fn drain(db: &Db, t: InferenceType, aging_ms: u64) -> Vec<(i64, String, usize)> {
    let mut out = Vec::new();
    let mut turns = Turns::default();
    while let Some(r) = db
        .release_next(t, &mut turns, aging_ms, usize::MAX)
        .await
        .unwrap()
    {
        assert!(r.jobs.iter().all(|j| j.inference_type == t));
        out.push((r.batch_id, r.owner, r.jobs.len()));
    }
    out
}

#[tokio::test]
async fn only_held_types_are_held_and_counted() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let a = tenant(&db, "a").await;
    let mixed = vec![
        job("LLM", "/v1/completions", 0),
        job("VIDEO", "/v1/videos/generations", 1),
        job("VIDEO", "/v1/videos/generations", 2),
    ];
    // Holding a type the batch does not have holds nothing of it.
    let b = submit(
        &db,
        &a,
        Priority::Normal,
        mixed,
        &[InferenceType::Video, InferenceType::Tts],
    )
    .await;
    let held = db.held_work().await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].inference_type, InferenceType::Video);
    assert_eq!(held[0].jobs, 2);
    assert!(drain(&db, InferenceType::Llm, 60_000).await.is_empty());
    assert_eq!(
        drain(&db, InferenceType::Video, 60_000).await,
        vec![(b, "a".to_owned(), 2)]
    );
    assert!(db.held_work().await.unwrap().is_empty(), "released once");
    assert!(drain(&db, InferenceType::Video, 60_000).await.is_empty());
}

#[tokio::test]
async fn release_is_round_robin_over_owners_then_priority_then_age() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let (a, b, c) = (
        tenant(&db, "a").await,
        tenant(&db, "b").await,
        tenant(&db, "c").await,
    );
    let hold = [InferenceType::Llm];
    // A queued much before B and C; within A, priority first, then the older batch.
    let a1 = submit(&db, &a, Priority::Normal, llm(3), &hold).await;
    let a2 = submit(&db, &a, Priority::Low, llm(3), &hold).await;
    let a3 = submit(&db, &a, Priority::High, llm(3), &hold).await;
    let a4 = submit(&db, &a, Priority::Normal, llm(3), &hold).await;
    let b1 = submit(&db, &b, Priority::Normal, llm(2), &hold).await;
    let c1 = submit(&db, &c, Priority::Low, llm(1), &hold).await;
    let c2 = submit(&db, &c, Priority::Normal, llm(1), &hold).await;
    let order: Vec<i64> = drain(&db, InferenceType::Llm, 3_600_000)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(order, vec![a3, b1, c2, a1, c1, a4, a2]);
}

#[tokio::test]
async fn low_priority_ages_past_fresh_high() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let a = tenant(&db, "a").await;
    let hold = [InferenceType::Llm];
    let low = submit(&db, &a, Priority::Low, llm(1), &hold).await;
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let high = submit(&db, &a, Priority::High, llm(1), &hold).await;
    // Aged by a level per 200 ms, the low batch (3 levels up) outranks the fresh high one.
    let order: Vec<i64> = drain(&db, InferenceType::Llm, 200)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(order, vec![low, high]);
}

#[tokio::test]
async fn cancelled_jobs_are_not_released_and_replicas_never_share_a_release() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let a = tenant(&db, "a").await;
    let hold = [InferenceType::Llm];
    let gone = submit(&db, &a, Priority::Normal, llm(4), &hold).await;
    db.cancel_batch("a", gone).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&db, &a, Priority::Normal, llm(2), &hold).await);
    }
    // Two dispatchers (batch-state replicas) drain at once: every batch exactly once.
    let (x, y) = tokio::join!(
        drain(&db, InferenceType::Llm, 60_000),
        drain(&db, InferenceType::Llm, 60_000)
    );
    let mut all: Vec<(i64, usize)> = x.iter().chain(&y).map(|(b, _, n)| (*b, *n)).collect();
    all.sort_unstable();
    let mut want: Vec<(i64, usize)> = ids.iter().map(|b| (*b, 2)).collect();
    want.push((gone, 0));
    want.sort_unstable();
    assert_eq!(all, want);
}

#[tokio::test]
async fn the_sweeper_leaves_held_work_to_the_dispatcher() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let a = tenant(&db, "a").await;
    let mixed = vec![
        job("LLM", "/v1/completions", 0),
        job("VIDEO", "/v1/videos/generations", 1),
    ];
    let b = submit(&db, &a, Priority::Normal, mixed, &[InferenceType::Video]).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // The gateway never recorded its publish: only the job it was to publish is handed to the
    // outbox, not the held one.
    let r = db.sweep(4, 10, Some(10)).await.unwrap();
    assert_eq!((r.unconfirmed, r.redispatched), (1, 0), "{r:?}");
    let due = db.due_for_dispatch(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].inference_type, InferenceType::Llm);
    db.mark_dispatched(vec![due[0].id]).await.unwrap();

    // A held job's `dispatched_at` is its batch's creation; it is not a lost message while
    // held, nor right after its release, only once the release is as old as the limit.
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    assert_eq!(
        db.sweep(4, 10, Some(10)).await.unwrap().redispatched,
        1,
        "the LLM job, not the held one"
    );
    db.mark_dispatched(vec![due[0].id]).await.unwrap();
    let released = drain(&db, InferenceType::Video, 60_000).await;
    assert_eq!(released, vec![(b, "a".to_owned(), 1)]);
    // The held job's `dispatched_at` is older than 30 ms, its release is not.
    assert_eq!(db.sweep(4, 10, Some(30)).await.unwrap().redispatched, 0);
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    let r = db.sweep(4, 10, Some(30)).await.unwrap();
    assert_eq!(r.redispatched, 2, "both are now old: {r:?}");

    // Released rows are purged once past the limit.
    assert_eq!(db.purge_released_holds(60_000, 100).await.unwrap(), 0);
    assert_eq!(db.purge_released_holds(10, 100).await.unwrap(), 1);
}

#[tokio::test]
async fn unconfirmed_releases_go_to_the_outbox() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let a = tenant(&db, "a").await;
    submit(&db, &a, Priority::Normal, llm(3), &[InferenceType::Llm]).await;
    let r = db
        .release_next(InferenceType::Llm, &mut Turns::default(), 60_000, 256)
        .await
        .unwrap()
        .unwrap();
    assert!(db.due_for_dispatch(10).await.unwrap().is_empty());
    let ids: Vec<i64> = r.jobs.iter().map(|j| j.id).take(2).collect();
    assert_eq!(db.to_outbox(ids.clone()).await.unwrap(), 2);
    let mut due: Vec<i64> = db
        .due_for_dispatch(10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    due.sort_unstable();
    assert_eq!(due, ids);
}

/// One release of at most `max` LLM jobs, the next turn after `turns`: (owner, job ids).
async fn release(db: &Db, turns: &mut Turns, max: usize) -> Option<(String, Vec<i64>)> {
    db.release_next(InferenceType::Llm, turns, 60_000, max)
        .await
        .unwrap()
        .map(|r| (r.owner, r.jobs.iter().map(|j| j.id).collect()))
}

#[tokio::test]
async fn a_turn_releases_at_most_the_room_and_the_rest_waits_its_next_turn() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let (a, b) = (tenant(&db, "a").await, tenant(&db, "b").await);
    let hold = [InferenceType::Llm];
    submit(&db, &a, Priority::Normal, llm(10), &hold).await;
    submit(&db, &b, Priority::Normal, llm(3), &hold).await;

    let mut turns = Turns::default();
    let (who, first) = release(&db, &mut turns, 4).await.unwrap();
    assert_eq!((who.as_str(), first.len()), ("a", 4));
    assert_eq!(
        db.held_work().await.unwrap()[0].jobs,
        9,
        "13 held, 4 released"
    );
    // b's turn, then a's again from where it stopped.
    let (who, bs) = release(&db, &mut turns, 4).await.unwrap();
    assert_eq!((who.as_str(), bs.len()), ("b", 3));
    let (who, second) = release(&db, &mut turns, 4).await.unwrap();
    assert_eq!((who.as_str(), second.len()), ("a", 4));
    assert!(first.iter().max() < second.iter().min(), "in job order");
    let (who, third) = release(&db, &mut turns, 4).await.unwrap();
    assert_eq!((who.as_str(), third.len()), ("a", 2));
    assert!(release(&db, &mut turns, 4).await.is_none());
    assert!(db.held_work().await.unwrap().is_empty());
    let mut all: Vec<i64> = [first, second, third].concat();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 10, "each of a's jobs exactly once");

    // A batch cancelled halfway: its remaining jobs are not released and its row closes.
    let c = submit(&db, &a, Priority::Normal, llm(5), &hold).await;
    let mut turns = Turns::default();
    assert_eq!(release(&db, &mut turns, 2).await.unwrap().1.len(), 2);
    db.cancel_batch("a", c).await.unwrap();
    assert_eq!(
        release(&db, &mut turns, 2).await,
        Some(("a".to_owned(), vec![]))
    );
    assert!(release(&db, &mut turns, 2).await.is_none());
}

#[tokio::test]
async fn part_released_jobs_are_not_taken_for_lost_while_the_rest_is_held() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let a = tenant(&db, "a").await;
    submit(&db, &a, Priority::Normal, llm(4), &[InferenceType::Llm]).await;
    let mut turns = Turns::default();
    let (_, part) = release(&db, &mut turns, 2).await.unwrap();
    assert_eq!(part.len(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    // Older than the limit, but their row is still partly held: the dispatcher's, not lost.
    assert_eq!(db.sweep(4, 10, Some(10)).await.unwrap().redispatched, 0);
    assert_eq!(release(&db, &mut turns, 2).await.unwrap().1.len(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    // Once the whole row is released and that is old, all four count as lost messages.
    assert_eq!(db.sweep(4, 10, Some(10)).await.unwrap().redispatched, 4);
}

#[tokio::test]
async fn an_owner_takes_as_many_turns_in_a_row_as_its_weight() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    let heavy = db.create_key("heavy", None).await.unwrap();
    db.set_quotas(
        "heavy",
        volley_db::QuotaChange::Keep,
        volley_db::QuotaChange::Keep,
        Some(3),
    )
    .await
    .unwrap();
    // The weight is read at authentication, as the gateway does.
    let heavy = db
        .authenticate_submitter(&heavy.secret)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(heavy.weight, 3);
    let light = tenant(&db, "light").await;
    let hold = [InferenceType::Llm];
    for _ in 0..6 {
        submit(&db, &heavy, Priority::Normal, llm(1), &hold).await;
        submit(&db, &light, Priority::Normal, llm(1), &hold).await;
    }
    let order: Vec<String> = drain(&db, InferenceType::Llm, 60_000)
        .await
        .into_iter()
        .map(|(_, owner, _)| owner)
        .collect();
    // Three of heavy's for each of light's while both wait, then the rest of light's.
    assert_eq!(
        order.join(" "),
        "heavy heavy heavy light heavy heavy heavy light light light light light"
    );
}

#[tokio::test]
async fn weights_outside_one_to_a_hundred_are_refused_and_change_nothing() {
    let (_t, db) = TestDatabase::create().await.unwrap();
    db.create_key("k", None).await.unwrap();
    for bad in [0, -1, volley_db::MAX_WEIGHT + 1, i32::MAX, i32::MIN] {
        let keep = volley_db::QuotaChange::Keep;
        assert!(
            db.set_quotas("k", keep, keep, Some(bad)).await.is_err(),
            "{bad}"
        );
    }
    let keys = db.list_keys().await.unwrap();
    assert_eq!(keys[0].dispatch_weight, 1);
}
