//! Recovery and operator actions: expiry (run by the sweeper), re-dispatching a batch and
//! re-running its failed jobs (`batchctl`), and the audit the fault-injection suite checks.
//!
//! Like every state change, each is one conditional statement guarded by the job's status, so
//! it is safe beside running workers, events and sweeps: nothing here moves a job that is not
//! in the state the action starts from.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use serde_json::Value;
use volley_domain::{JobStatus, Transition};

use crate::columns::{DbStatus, Parsed};
use crate::guard::{Sql, from, to};
use crate::schema::{batches, jobs};
use crate::{Db, DbError};

/// What `batchctl batches redispatch` did to one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redispatch {
    /// QUEUED jobs marked for publishing again.
    pub queued: usize,
    /// PROCESSING jobs whose lease had run out (their worker is gone), handed back to QUEUED.
    pub abandoned: usize,
    /// PROCESSING jobs with a live lease, left alone: a worker runs them, and handing them out
    /// again would run them twice.
    pub running: usize,
    /// Jobs already finished (PROCESSED, FAILED or CANCELLED): nothing to do.
    pub finished: usize,
}

/// One job as the fault-injection suite checks it.
#[derive(Debug, Clone, Queryable)]
pub struct JobAudit {
    pub id: i64,
    pub batch_id: i64,
    pub status: String,
    pub attempt: i32,
    pub outcomes: i32,
    pub operator_retries: i32,
    pub finished: bool,
    pub has_result: bool,
    pub error_type: Option<String>,
    pub body: Value,
}

/// One batch as the fault-injection suite checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchAudit {
    pub id: i64,
    pub total: i64,
    /// Job rows per status.
    pub by_status: HashMap<String, i64>,
}

fn statuses(t: Transition) -> Vec<&'static str> {
    JobStatus::sources(t)
        .into_iter()
        .map(JobStatus::as_str)
        .collect()
}

static EXPIRE: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, finished_at = now(), updated_at = now(), \
         outcomes = outcomes + 1, lease_until = NULL, error_type = 'expired', \
         error_message = 'the job was not started within ' || ($1 / 1000) || \
           ' s of being accepted', \
         last_error = COALESCE(last_error, 'expired') \
         WHERE {from} AND started_at IS NULL \
           AND available_at < now() - $1 * interval '1 millisecond'",
        to = to(Transition::Expire),
        from = from("status", Transition::Expire),
    )
});

// `LEAST`: a job waiting out a retry backoff becomes due now, and a job never started keeps
// its expiry clock. Messages are for jobs waiting for a claim.
static REDISPATCH_QUEUED: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET dispatched_at = NULL, available_at = LEAST(available_at, now()), \
         updated_at = now() WHERE batch_id = $1 AND {claimable}",
        claimable = from("status", Transition::Claim),
    )
});

static REDISPATCH_ABANDONED: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, dispatched_at = NULL, available_at = now(), \
         lease_until = NULL, updated_at = now(), \
         last_error = 'worker lost; re-dispatched by an operator' \
         WHERE batch_id = $1 AND {from} AND lease_until < now()",
        to = to(Transition::Requeue),
        from = from("status", Transition::Requeue),
    )
});

// The sources are bound (`$2`), as they were before the statements were rendered.
// `started_at = NULL` restarts the expiry clock from now (`available_at`).
static RETRY: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET status = {to}, attempt_base = attempt, \
         operator_retries = operator_retries + 1, \
         last_error = COALESCE(error_message, last_error), \
         result = NULL, error_type = NULL, error_message = NULL, \
         prompt_tokens = NULL, completion_tokens = NULL, total_tokens = NULL, \
         started_at = NULL, finished_at = NULL, lease_until = NULL, \
         dispatched_at = NULL, available_at = now(), updated_at = now() \
         WHERE batch_id = $1 AND status = ANY($2) RETURNING id",
        to = to(Transition::Retry),
    )
});

impl Db {
    /// Fails every QUEUED job not started within `expire_after_ms` of becoming available
    /// (accepted, or re-run by an operator) with type `expired`; 0 turns expiry off. Claims
    /// refuse such jobs meanwhile ([`Db::claim`]), so none starts late.
    pub async fn expire(&self, expire_after_ms: u64) -> Result<usize, DbError> {
        if expire_after_ms == 0 {
            return Ok(0);
        }
        let ms = crate::millis(expire_after_ms);
        self.run(move |conn| {
            Ok(diesel::sql_query(EXPIRE.as_str())
                .bind::<BigInt, _>(ms)
                .execute(&mut **conn)?)
        })
        .await
    }

    /// Makes a batch's unfinished jobs due for publishing again (the sweeper publishes them on
    /// its next pass): QUEUED jobs lose their `dispatched_at`, and PROCESSING jobs whose lease
    /// ran out go back to QUEUED. Running jobs with a live lease are left alone. `None` if
    /// the batch does not exist.
    pub async fn redispatch_batch(&self, batch_id: i64) -> Result<Option<Redispatch>, DbError> {
        self.run(move |conn| {
            conn.transaction(|conn| {
                let exists = batches::table
                    .filter(batches::id.eq(batch_id))
                    .select(batches::id)
                    .first::<i64>(conn)
                    .optional()?
                    .is_some();
                if !exists {
                    return Ok(None);
                }
                let queued = diesel::sql_query(REDISPATCH_QUEUED.as_str())
                    .bind::<BigInt, _>(batch_id)
                    .execute(conn)?;
                let abandoned = diesel::sql_query(REDISPATCH_ABANDONED.as_str())
                    .bind::<BigInt, _>(batch_id)
                    .execute(conn)?;
                let rows: Vec<(DbStatus, i64)> = jobs::table
                    .filter(jobs::batch_id.eq(batch_id))
                    .group_by(jobs::status)
                    .select((jobs::status, diesel::dsl::count_star()))
                    .load(conn)?;
                let count = |pred: &dyn Fn(JobStatus) -> bool| -> usize {
                    rows.iter()
                        .filter(|(Parsed(s), _)| pred(*s))
                        .map(|(_, n)| *n as usize)
                        .sum()
                };
                Ok(Some(Redispatch {
                    queued,
                    abandoned,
                    running: count(&|s| s == JobStatus::Processing),
                    finished: count(&|s| s.is_terminal()),
                }))
            })
        })
        .await
    }

    /// Re-runs a batch's FAILED jobs under the same ids: each goes back to QUEUED with its
    /// error and result cleared and a fresh retry budget. The attempt number keeps counting,
    /// so an outcome of an earlier attempt that arrives late still matches nothing. Returns
    /// the ids re-queued, or `None` if the batch does not exist.
    pub async fn retry_failed(&self, batch_id: i64) -> Result<Option<Vec<i64>>, DbError> {
        let from = statuses(Transition::Retry);
        self.run(move |conn| {
            conn.transaction(|conn| {
                let exists = batches::table
                    .filter(batches::id.eq(batch_id))
                    .select(batches::id)
                    .first::<i64>(conn)
                    .optional()?
                    .is_some();
                if !exists {
                    return Ok(None);
                }
                #[derive(QueryableByName)]
                struct Id {
                    #[diesel(sql_type = BigInt)]
                    id: i64,
                }
                let ids: Vec<Id> = diesel::sql_query(RETRY.as_str())
                    .bind::<BigInt, _>(batch_id)
                    .bind::<Array<Text>, _>(&from)
                    .load(conn)?;
                let mut ids: Vec<i64> = ids.into_iter().map(|r| r.id).collect();
                ids.sort_unstable();
                Ok(Some(ids))
            })
        })
        .await
    }

    /// The batch of each of these jobs (jobs that do not exist are missing from the answer).
    pub async fn batches_of_jobs(&self, ids: Vec<i64>) -> Result<HashMap<i64, i64>, DbError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.run(move |conn| {
            Ok(jobs::table
                .filter(jobs::id.eq_any(&ids))
                .select((jobs::id, jobs::batch_id))
                .load::<(i64, i64)>(&mut **conn)?
                .into_iter()
                .collect())
        })
        .await
    }

    /// Every job of every batch, for the fault-injection suite's final check.
    pub async fn audit_jobs(&self) -> Result<Vec<JobAudit>, DbError> {
        self.run(|conn| {
            Ok(jobs::table
                .order(jobs::id)
                .select((
                    jobs::id,
                    jobs::batch_id,
                    jobs::status,
                    jobs::attempt,
                    jobs::outcomes,
                    jobs::operator_retries,
                    jobs::finished_at.is_not_null(),
                    jobs::result.is_not_null(),
                    jobs::error_type,
                    jobs::body,
                ))
                .load(&mut **conn)?)
        })
        .await
    }

    /// Every batch with its job rows counted per status.
    pub async fn audit_batches(&self) -> Result<Vec<BatchAudit>, DbError> {
        self.run(|conn| {
            let totals: Vec<(i64, i32)> = batches::table
                .order(batches::id)
                .select((batches::id, batches::total))
                .load(&mut **conn)?;
            let rows: Vec<(i64, String, i64)> = jobs::table
                .group_by((jobs::batch_id, jobs::status))
                .select((jobs::batch_id, jobs::status, diesel::dsl::count_star()))
                .load(&mut **conn)?;
            let mut by: HashMap<i64, HashMap<String, i64>> = HashMap::new();
            for (b, s, n) in rows {
                by.entry(b).or_default().insert(s, n);
            }
            Ok(totals
                .into_iter()
                .map(|(id, total)| BatchAudit {
                    id,
                    total: i64::from(total),
                    by_status: by.remove(&id).unwrap_or_default(),
                })
                .collect())
        })
        .await
    }
}
