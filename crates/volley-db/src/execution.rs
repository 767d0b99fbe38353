//! Running jobs, batch-state's side: claims, leases, outcome events and the sweeper. Each is one
//! conditional statement over many jobs, guarded by status and attempt (the fencing token),
//! so duplicate, stale and late messages change nothing.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Int4, Jsonb, Nullable, Text};
use serde_json::Value;

use volley_domain::{Claim, Dispatch, Event, JobStatus, Outcome, Transition};

use crate::batches::DispatchRow;
use crate::columns::DbStatus;
use crate::guard::{Sql, from, lit, outcome_from, to};
use crate::schema::jobs;
use crate::{Db, DbError, Manager, millis};
use diesel::r2d2::PooledConnection;

// The statements below take every state they test or set from the domain's transition table
// (`crate::guard`); `tests/transitions.rs` runs each against every state.

// `status || ''` rather than `status`: it keeps the planner on the primary key. On a table
// whose statistics are missing or stale (a fresh install, or a backlog that grew since the last
// ANALYZE) it took QUEUED for rare and read every QUEUED entry of `jobs_unfinished` to find
// these few ids: 15,000 entries per claim in the benchmark. The same guard finds jobs by id in
// `mark_dispatched`.
static CLAIM: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, attempt = attempt + 1, \
         started_at = COALESCE(started_at, now()), \
         lease_until = now() + $2 * interval '1 millisecond', updated_at = now() \
         WHERE id = ANY($1) AND {from} \
           AND ($3 = 0 OR started_at IS NOT NULL \
                OR available_at > now() - $3 * interval '1 millisecond') \
         RETURNING id, attempt, attempt - attempt_base AS round_attempt",
        to = to(Transition::Claim),
        from = from("status || ''", Transition::Claim),
    )
});

// A lease belongs to a claimed job: the state a claim leads to.
static RENEW: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs AS j SET lease_until = now() + $3 * interval '1 millisecond' \
         FROM unnest($1::bigint[], $2::int[]) AS v(id, attempt) \
         WHERE j.id = v.id AND j.attempt = v.attempt AND j.status = {held} \
         RETURNING j.id",
        held = lit(Transition::Claim.target()),
    )
});

static FAIL_REFUSED: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, result = NULL, error_type = $3, \
         error_message = $4, last_error = $4, finished_at = now(), \
         lease_until = NULL, outcomes = outcomes + 1, updated_at = now() \
         WHERE id = $1 AND attempt = $2 AND {from} \
         RETURNING id, status",
        to = to(Transition::Fail),
        from = from("status", Transition::Fail),
    )
});

// Through the batch's jobs (`jobs_by_batch`), not every QUEUED entry of `jobs_unfinished`
// (see `CLAIM`): this runs on every pass. Messages are for jobs waiting for a claim. Held
// jobs (`dispatch_holds`) have no message by design: batch-state's dispatcher publishes them.
static UNCONFIRMED: Sql = Sql::new(|| {
    format!(
        "WITH b AS (UPDATE batches SET published_at = now() \
           WHERE published_at IS NULL \
             AND created_at < now() - $1 * interval '1 millisecond' \
           RETURNING id) \
         UPDATE jobs SET dispatched_at = NULL \
         WHERE batch_id IN (SELECT id FROM b) AND {claimable} \
           AND NOT EXISTS (SELECT 1 FROM dispatch_holds h \
             WHERE h.batch_id = jobs.batch_id AND h.inference_type = jobs.inference_type)",
        claimable = from("status || ''", Transition::Claim),
    )
});

static LOST_FAILED: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, finished_at = now(), updated_at = now(), \
         lease_until = NULL, outcomes = outcomes + 1, error_type = 'worker_lost', \
         error_message = 'the worker running the job stopped answering on its last attempt', \
         last_error = 'worker lost' \
         WHERE {from} AND lease_until < now() \
           AND attempt - attempt_base >= $1",
        to = to(Transition::Fail),
        from = from("status", Transition::Fail),
    )
});

static LEASES_EXPIRED: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, dispatched_at = NULL, available_at = now(), \
         lease_until = NULL, updated_at = now(), last_error = 'worker lost; retrying' \
         WHERE {from} AND lease_until < now()",
        to = to(Transition::Requeue),
        from = from("status", Transition::Requeue),
    )
});

// A held job's `dispatched_at` is its batch's creation: its message is as old as its release,
// so it counts as lost only that long after the release.
static REDISPATCH_LOST: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET dispatched_at = NULL WHERE {claimable} \
         AND dispatched_at < now() - $1 * interval '1 millisecond' \
         AND NOT EXISTS (SELECT 1 FROM dispatch_holds h \
           WHERE h.batch_id = jobs.batch_id AND h.inference_type = jobs.inference_type \
             AND (h.released_at IS NULL \
                  OR h.released_at >= now() - $1 * interval '1 millisecond'))",
        claimable = from("status", Transition::Claim),
    )
});

// `v.status` is each event's target state; a requeue (`Transition::Requeue`) goes back to the
// outbox instead of finishing.
// The same statement tells every gateway which batches changed (`NOTIFY`, delivered at commit,
// one per statement whatever the number of jobs), so their event streams wake up. A SELECT in
// WITH runs only as far as it is read: the count reads it whole.
static APPLY_EVENTS: Sql = Sql::new(|| {
    format!(
        "WITH u AS (UPDATE jobs AS j SET \
           status = v.status, \
           result = v.result, \
           error_type = v.error_type, \
           error_message = v.error_message, \
           last_error = COALESCE(v.last_error, j.last_error), \
           prompt_tokens = v.pt, completion_tokens = v.ct, total_tokens = v.tt, \
           finished_at = CASE WHEN v.status = {requeued} THEN NULL ELSE now() END, \
           available_at = CASE WHEN v.status = {requeued} \
             THEN now() + v.delay_ms * interval '1 millisecond' ELSE j.available_at END, \
           dispatched_at = CASE WHEN v.status = {requeued} THEN NULL ELSE j.dispatched_at END, \
           lease_until = NULL, \
           outcomes = j.outcomes + CASE WHEN v.status = {requeued} THEN 0 ELSE 1 END, \
           media_keys = CASE WHEN v.media_keys IS NULL THEN NULL \
             ELSE ARRAY(SELECT jsonb_array_elements_text(v.media_keys)) END, \
           updated_at = now() \
         FROM unnest($1::bigint[], $2::int[], $3::text[], $4::jsonb[], $5::text[], \
                     $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], \
                     $11::bigint[], $12::jsonb[]) \
           AS v(id, attempt, status, result, error_type, error_message, last_error, \
                pt, ct, tt, delay_ms, media_keys) \
         WHERE j.id = v.id AND j.attempt = v.attempt AND {from} \
         RETURNING j.id, j.status, j.batch_id), \
         b AS (SELECT string_agg(DISTINCT batch_id::text, ',') AS ids FROM u), \
         n AS (SELECT pg_notify($13, CASE WHEN length(ids) > $14 THEN $15 ELSE ids END) \
               FROM b WHERE ids IS NOT NULL) \
         SELECT u.id, u.status FROM u CROSS JOIN (SELECT count(*) AS k FROM n) c",
        requeued = to(Transition::Requeue),
        from = outcome_from("j.status", "v.status"),
    )
});

/// How [`Db::apply_each`] fails a job whose event the database refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error_type: String,
    pub message: String,
}

/// What became of one event in [`Db::apply_each`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EachResult {
    /// Applied: the job's new status.
    Applied(JobStatus),
    /// Duplicate, stale or late: nothing to change.
    Ignored,
    /// Refused (why); the job was failed with the [`Refusal`] instead.
    FailedInstead(String),
    /// Refused, and failing the job was refused too (why): the event can never apply.
    Refused(String),
}

#[derive(Debug, Default, Clone)]
pub struct SweepReport {
    /// Jobs whose worker stopped renewing its claim, handed back to the queue.
    pub leases_expired: usize,
    /// Jobs failed because their claim expired on their last attempt.
    pub lost_failed: usize,
    /// QUEUED jobs whose message went out long ago with no claim since.
    pub redispatched: usize,
    /// QUEUED jobs of batches whose publish was never recorded within the dispatch grace.
    pub unconfirmed: usize,
}

#[derive(QueryableByName)]
struct JobId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Int4)]
    attempt: i32,
    #[diesel(sql_type = Int4)]
    round_attempt: i32,
}

#[derive(QueryableByName)]
struct IdStatus {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    status: DbStatus,
}

impl Db {
    /// Claims many jobs in one statement; answers in the order asked. Refuses jobs not
    /// started within `expire_after_ms` of becoming available (accepted, or re-run by an
    /// operator; 0: no expiry); the sweeper then fails them as `expired` (see [`Db::expire`]).
    pub async fn claim(
        &self,
        ids: Vec<i64>,
        lease_ms: u64,
        expire_after_ms: u64,
    ) -> Result<Vec<(i64, Claim)>, DbError> {
        self.run(move |conn| {
            let claimed: Vec<Claimed> = diesel::sql_query(CLAIM.as_str())
                .bind::<Array<BigInt>, _>(&ids)
                .bind::<BigInt, _>(lease_ms as i64)
                .bind::<BigInt, _>(millis(expire_after_ms))
                .load(&mut **conn)?;
            let claimed: HashMap<i64, (i32, i32)> = claimed
                .into_iter()
                .map(|r| (r.id, (r.attempt, r.round_attempt)))
                .collect();
            let rest: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !claimed.contains_key(id))
                .collect();
            let existing: HashSet<i64> = if rest.is_empty() {
                HashSet::new()
            } else {
                jobs::table
                    .filter(jobs::id.eq_any(&rest))
                    .select(jobs::id)
                    .load::<i64>(&mut **conn)?
                    .into_iter()
                    .collect()
            };
            // A job asked for twice in one round is claimed once; the second ask is refused.
            let mut given = HashSet::new();
            Ok(ids
                .into_iter()
                .map(|id| {
                    let c = match claimed.get(&id) {
                        Some(&(attempt, round_attempt)) if given.insert(id) => Claim::Claimed {
                            attempt,
                            round_attempt,
                        },
                        Some(_) => Claim::Refused,
                        None if existing.contains(&id) => Claim::Refused,
                        None => Claim::NotFound,
                    };
                    (id, c)
                })
                .collect())
        })
        .await
    }

    /// Renews the claims still held; returns the job ids whose claim is still valid (a job
    /// missing from the answer was cancelled, finished, or handed to someone else).
    pub async fn renew(&self, held: Vec<(i64, i32)>, lease_ms: u64) -> Result<Vec<i64>, DbError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = held.into_iter().unzip();
        self.run(move |conn| {
            let rows: Vec<JobId> = diesel::sql_query(RENEW.as_str())
                .bind::<Array<BigInt>, _>(&ids)
                .bind::<Array<Int4>, _>(&attempts)
                .bind::<BigInt, _>(lease_ms as i64)
                .load(&mut **conn)?;
            Ok(rows.into_iter().map(|r| r.id).collect())
        })
        .await
    }

    /// Applies outcome events in one statement. Returns `(job id, new status)` for each event
    /// that changed something; the others were duplicates, stale or late (job cancelled).
    pub async fn apply_events(&self, events: Vec<Event>) -> Result<Vec<(i64, JobStatus)>, DbError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.run(move |conn| Ok(apply_on(conn, events)?)).await
    }

    /// [`Db::apply_events`] one statement per event, for a batch whose one statement the
    /// database refused: a value it cannot store in one event fails only that event. An
    /// event refused on its own fails its job as `refusal` says (the job must not wait for an
    /// outcome that can never be stored); if even that is refused, the event is answered
    /// [`EachResult::Refused`] for the caller to dead-letter. An error of the connection
    /// itself (an outage, not the event) is returned as `Err`, to retry the whole batch.
    pub async fn apply_each(
        &self,
        events: Vec<Event>,
        refusal: Refusal,
    ) -> Result<Vec<EachResult>, DbError> {
        self.run(move |conn| {
            let mut out = Vec::with_capacity(events.len());
            for e in events {
                let (job_id, attempt) = (e.job_id, e.attempt);
                let refused = match apply_on(conn, vec![e]) {
                    Ok(rows) => {
                        out.push(match rows.into_iter().next() {
                            Some((_, status)) => EachResult::Applied(status),
                            None => EachResult::Ignored,
                        });
                        continue;
                    }
                    Err(err) => event_error(conn, err)?,
                };
                let failed: Result<Vec<IdStatus>, diesel::result::Error> =
                    diesel::sql_query(FAIL_REFUSED.as_str())
                        .bind::<BigInt, _>(job_id)
                        .bind::<Int4, _>(attempt)
                        .bind::<Text, _>(&refusal.error_type)
                        .bind::<Text, _>(&refusal.message)
                        .load(&mut **conn);
                out.push(match failed {
                    Ok(rows) if rows.is_empty() => EachResult::Ignored,
                    Ok(_) => EachResult::FailedInstead(refused),
                    Err(err) => EachResult::Refused(format!("{refused}; failing the job: {}", {
                        event_error(conn, err)?
                    })),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Jobs that are QUEUED with no confirmed message and due: committed but never
    /// confirmed on the broker, handed back by a retry, or marked for re-dispatch.
    pub async fn due_for_dispatch(&self, limit: i64) -> Result<Vec<Dispatch>, DbError> {
        self.run(move |conn| {
            let rows: Vec<DispatchRow> = jobs::table
                .filter(jobs::status.eq(JobStatus::Queued.as_str()))
                .filter(jobs::dispatched_at.is_null())
                .filter(jobs::available_at.le(diesel::dsl::now))
                .order(jobs::available_at)
                .limit(limit)
                .select(DispatchRow::as_select())
                .load(&mut **conn)?;
            Ok(rows.into_iter().map(Dispatch::from).collect())
        })
        .await
    }

    /// Recovers jobs from lost workers, jobs of batches whose publish was not recorded within
    /// `dispatch_grace_ms` (the gateway failed or stopped) and, with `redispatch_after_ms`,
    /// lost messages; what it hands back is then found by [`Db::due_for_dispatch`]. Looking
    /// for lost messages reads every QUEUED job (the whole backlog), so callers do it less
    /// often than the rest.
    pub async fn sweep(
        &self,
        max_attempts: u32,
        dispatch_grace_ms: u64,
        redispatch_after_ms: Option<u64>,
    ) -> Result<SweepReport, DbError> {
        self.run(move |conn| {
            let unconfirmed = diesel::sql_query(UNCONFIRMED.as_str())
                .bind::<BigInt, _>(millis(dispatch_grace_ms))
                .execute(&mut **conn)?;
            let lost_failed = diesel::sql_query(LOST_FAILED.as_str())
                .bind::<Int4, _>(max_attempts as i32)
                .execute(&mut **conn)?;
            let leases_expired = diesel::sql_query(LEASES_EXPIRED.as_str()).execute(&mut **conn)?;
            let redispatched = match redispatch_after_ms {
                Some(ms) => diesel::sql_query(REDISPATCH_LOST.as_str())
                    .bind::<BigInt, _>(millis(ms))
                    .execute(&mut **conn)?,
                None => 0,
            };
            Ok(SweepReport {
                leases_expired,
                lost_failed,
                redispatched,
                unconfirmed,
            })
        })
        .await
    }
}

/// The statement of [`Db::apply_events`], on a connection.
fn apply_on(
    conn: &mut PooledConnection<Manager>,
    events: Vec<Event>,
) -> Result<Vec<(i64, JobStatus)>, diesel::result::Error> {
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    let mut attempts = Vec::new();
    let mut statuses = Vec::new();
    let mut results: Vec<Option<Value>> = Vec::new();
    let mut error_types: Vec<Option<String>> = Vec::new();
    let mut error_messages: Vec<Option<String>> = Vec::new();
    let mut last_errors: Vec<Option<String>> = Vec::new();
    let mut tokens: [Vec<Option<i64>>; 3] = Default::default();
    let mut delays = Vec::new();
    // One JSON array per event: PostgreSQL has no arrays of differently sized arrays.
    let mut media_keys: Vec<Option<Value>> = Vec::new();
    for e in events {
        // UPDATE ... FROM applies one arbitrary row per job; keep the first per attempt.
        if !seen.insert(e.job_id) {
            continue;
        }
        ids.push(e.job_id);
        attempts.push(e.attempt);
        let mut keys = None;
        // The state the outcome's transition leads to: `v.status` in the statement.
        statuses.push(e.outcome.transition().target().as_str());
        let (result, et, em, le, usage, delay) = match e.outcome {
            Outcome::Succeeded {
                result,
                usage,
                media_keys,
            } => {
                keys = (!media_keys.is_empty()).then(|| Value::from(media_keys));
                (Some(result), None, None, None, usage, 0)
            }
            Outcome::Failed {
                error_type,
                message,
            } => (
                None,
                Some(error_type),
                Some(message.clone()),
                Some(message),
                None,
                0,
            ),
            Outcome::Retry { error, delay_ms } => (None, None, None, Some(error), None, delay_ms),
        };
        results.push(result);
        error_types.push(et);
        error_messages.push(em);
        last_errors.push(le);
        tokens[0].push(usage.map(|u| u.prompt_tokens));
        tokens[1].push(usage.map(|u| u.completion_tokens));
        tokens[2].push(usage.map(|u| u.total_tokens));
        delays.push(delay.max(0));
        media_keys.push(keys);
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<IdStatus> = diesel::sql_query(APPLY_EVENTS.as_str())
        .bind::<Array<BigInt>, _>(&ids)
        .bind::<Array<Int4>, _>(&attempts)
        .bind::<Array<Text>, _>(&statuses)
        .bind::<Array<Nullable<Jsonb>>, _>(&results)
        .bind::<Array<Nullable<Text>>, _>(&error_types)
        .bind::<Array<Nullable<Text>>, _>(&error_messages)
        .bind::<Array<Nullable<Text>>, _>(&last_errors)
        .bind::<Array<Nullable<BigInt>>, _>(&tokens[0])
        .bind::<Array<Nullable<BigInt>>, _>(&tokens[1])
        .bind::<Array<Nullable<BigInt>>, _>(&tokens[2])
        .bind::<Array<BigInt>, _>(&delays)
        .bind::<Array<Nullable<Jsonb>>, _>(&media_keys)
        .bind::<Text, _>(crate::progress::BATCH_CHANNEL)
        .bind::<Int4, _>(crate::progress::MAX_PAYLOAD)
        .bind::<Text, _>(crate::progress::ALL_BATCHES)
        .load(&mut **conn)?;
    Ok(rows.into_iter().map(|r| (r.id, r.status.0)).collect())
}

/// Why an event's statement failed, when the event is at fault rather than the connection
/// ([`DbError::is_refusal`]). The connection is checked then, so that an outage showing as a
/// plain error (a server shutting down) is not blamed on the event; otherwise `Err`.
fn event_error(
    conn: &mut PooledConnection<Manager>,
    err: diesel::result::Error,
) -> Result<String, DbError> {
    let err = DbError::from(err);
    if !err.is_refusal() {
        return Err(err);
    }
    diesel::sql_query("SELECT 1").execute(&mut **conn)?;
    Ok(err.to_string())
}
