//! The gateway's side: accepting batches, reading them, cancelling.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt};
use serde_json::Value;
use volley_domain::{
    BatchCounts, BatchUsage, Dispatch, Endpoint, InferenceType, JobStatus, Priority, Transition,
    Usage,
};

use crate::columns::{DbStatus, Parsed};
use crate::guard::{Sql, from};
use crate::quotas::{Admitted, OverQuota, Submitter, admit};
use crate::schema::{api_keys, batches, jobs};
use crate::{Db, DbError};

/// One job of a batch being accepted.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub inference_type: String,
    pub endpoint: String,
    pub model: String,
    pub body: Value,
    /// The client's name for the job, unique within the batch (validated before).
    pub custom_id: Option<String>,
}

/// The row behind a [`Dispatch`]: what publishing a job needs.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = jobs)]
pub(crate) struct DispatchRow {
    id: i64,
    batch_id: i64,
    #[diesel(deserialize_as = Parsed<InferenceType>)]
    inference_type: InferenceType,
    #[diesel(deserialize_as = Parsed<Endpoint>)]
    endpoint: Endpoint,
    model: String,
    body: Value,
    created_at: DateTime<Utc>,
}

impl From<DispatchRow> for Dispatch {
    fn from(r: DispatchRow) -> Dispatch {
        Dispatch {
            id: r.id,
            batch_id: r.batch_id,
            inference_type: r.inference_type,
            endpoint: r.endpoint,
            model: r.model,
            body: r.body,
            accepted_at_ms: r.created_at.timestamp_millis(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BatchView {
    pub id: i64,
    pub label: Option<String>,
    /// The client's string pairs (`{}` when none were given).
    pub metadata: Value,
    pub total: i64,
    pub created_at: DateTime<Utc>,
    pub counts: BatchCounts,
    pub priority: Priority,
}

#[derive(Debug, Clone, Queryable)]
pub struct JobSummary {
    pub id: i64,
    #[diesel(deserialize_as = DbStatus)]
    pub status: JobStatus,
    pub inference_type: String,
    pub custom_id: Option<String>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = jobs)]
pub struct JobView {
    pub id: i64,
    pub batch_id: i64,
    #[diesel(deserialize_as = DbStatus)]
    pub status: JobStatus,
    pub inference_type: String,
    pub endpoint: String,
    pub model: String,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub result: Option<Value>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub last_error: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    /// Media the job's worker stored: the only `volley-media:` keys that may become links.
    pub media_keys: Option<Vec<String>>,
    pub custom_id: Option<String>,
}

#[derive(Queryable)]
pub(crate) struct BatchRow {
    id: i64,
    label: Option<String>,
    total: i32,
    created_at: DateTime<Utc>,
    metadata: Value,
    priority: i16,
}

type PgConn = diesel::PgConnection;

/// A batch read by key: one row per job of the batch asked for, or a single row with no
/// batch when the key is valid but its owner has no such batch, or no row for a bad key.
type KeyedJob = (
    Option<i64>,
    Option<String>,
    Option<i32>,
    Option<DateTime<Utc>>,
    Option<bool>,
    Option<i16>,
    Option<i64>,
    Option<DbStatus>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn counts_for(conn: &mut PgConn, ids: &[i64]) -> Result<HashMap<i64, BatchCounts>, DbError> {
    let rows: Vec<(i64, DbStatus, i64)> = jobs::table
        .filter(jobs::batch_id.eq_any(ids))
        .group_by((jobs::batch_id, jobs::status))
        .select((jobs::batch_id, jobs::status, diesel::dsl::count_star()))
        .load(conn)?;
    let mut out: HashMap<i64, BatchCounts> = HashMap::new();
    for (batch, Parsed(status), n) in rows {
        out.entry(batch).or_default().add(status, n.max(0) as u64);
    }
    Ok(out)
}

pub(crate) fn batch_views(
    conn: &mut PgConn,
    rows: Vec<BatchRow>,
) -> Result<Vec<BatchView>, DbError> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut counts = counts_for(conn, &ids)?;
    Ok(rows
        .into_iter()
        .map(|r| BatchView {
            id: r.id,
            label: r.label,
            metadata: r.metadata,
            total: i64::from(r.total),
            created_at: r.created_at,
            counts: counts.remove(&r.id).unwrap_or_default(),
            priority: Priority::from_rank(r.priority),
        })
        .collect())
}

/// Inserts a batch and its jobs; the caller holds the transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_batch(
    conn: &mut PgConn,
    owner: &str,
    label: Option<String>,
    metadata: &Value,
    new_jobs: &[NewJob],
    dispatch_grace_ms: u64,
    webhook: Option<&crate::NewWebhook>,
    admitted: Admitted,
    priority: Priority,
    held: &[InferenceType],
) -> Result<(BatchView, Vec<Dispatch>), DbError> {
    let total = new_jobs.len() as i32;
    let row: BatchRow = diesel::insert_into(batches::table)
        .values((
            batches::owner.eq(owner),
            batches::label.eq(&label),
            batches::total.eq(total),
            batches::metadata.eq(metadata),
            batches::webhook_url.eq(webhook.map(|w| w.url.as_str())),
            batches::webhook_types.eq(webhook.map(|w| w.types.clone())),
            batches::webhook_key_id.eq(webhook.map(|w| w.key_id)),
            batches::webhook_pending.eq(webhook.map(|_| total)),
            batches::api_key_id.eq(admitted.api_key_id),
            batches::priority.eq(priority.rank()),
        ))
        .returning(BATCH_COLUMNS)
        .get_result(conn)?;
    let available = row.created_at + chrono::Duration::milliseconds(dispatch_grace_ms as i64);
    let values: Vec<_> = new_jobs
        .iter()
        .map(|j| {
            (
                jobs::batch_id.eq(row.id),
                jobs::owner.eq(owner),
                jobs::inference_type.eq(&j.inference_type),
                jobs::endpoint.eq(&j.endpoint),
                jobs::model.eq(&j.model),
                jobs::body.eq(&j.body),
                jobs::custom_id.eq(&j.custom_id),
                jobs::available_at.eq(available),
                // Out of the outbox from the start: the batch's `published_at`
                // stands for the confirms, so they cost no update per job.
                jobs::dispatched_at.eq(Some(row.created_at)),
                // Lets the webhook trigger skip jobs of batches without one at no cost.
                jobs::webhook.eq(webhook.is_some()),
                jobs::quota_key_id.eq(admitted.quota_key_id),
                jobs::priority.eq(priority.rank()),
            )
        })
        .collect();
    let dispatch: Vec<DispatchRow> = diesel::insert_into(jobs::table)
        .values(&values)
        .returning(DispatchRow::as_returning())
        .get_results(conn)?;
    let dispatch: Vec<Dispatch> = dispatch.into_iter().map(Dispatch::from).collect();
    crate::dispatch::insert_holds(conn, owner, priority, admitted.weight, &dispatch, held)?;
    let mut counts = BatchCounts::default();
    counts.add(JobStatus::Queued, dispatch.len() as u64);
    Ok((
        BatchView {
            id: row.id,
            label: row.label,
            metadata: row.metadata,
            total: i64::from(total),
            created_at: row.created_at,
            counts,
            priority: Priority::from_rank(row.priority),
        },
        dispatch,
    ))
}

pub(crate) const BATCH_COLUMNS: (
    batches::id,
    batches::label,
    batches::total,
    batches::created_at,
    batches::metadata,
    batches::priority,
) = (
    batches::id,
    batches::label,
    batches::total,
    batches::created_at,
    batches::metadata,
    batches::priority,
);

// Only jobs waiting for a claim have messages to confirm. `status || ''`: by primary key,
// whatever the statistics say (see `execution::CLAIM`).
static RECORD_PUBLISH: Sql = Sql::new(|| {
    format!(
        "WITH j AS (UPDATE jobs SET dispatched_at = NULL \
           WHERE id = ANY($1) AND batch_id = $2 AND {claimable}) \
         UPDATE batches SET published_at = now() WHERE id = $2 AND published_at IS NULL",
        claimable = from("status || ''", Transition::Claim),
    )
});

static MARK_DISPATCHED: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET dispatched_at = now() \
         WHERE id = ANY($1) AND {claimable}",
        claimable = from("status || ''", Transition::Claim),
    )
});

impl Db {
    /// Commits a batch and all its jobs in one transaction. The caller publishes the jobs and
    /// then calls [`Db::record_publish`]; until it does, the jobs are not known to have a
    /// confirmed message, and past `dispatch_grace_ms` the sweeper publishes them instead.
    pub async fn create_batch(
        &self,
        owner: &str,
        label: Option<String>,
        new_jobs: Vec<NewJob>,
        dispatch_grace_ms: u64,
    ) -> Result<(BatchView, Vec<Dispatch>), DbError> {
        self.create_batch_with(
            owner,
            label,
            Value::Object(Default::default()),
            None,
            new_jobs,
            dispatch_grace_ms,
        )
        .await
    }

    /// [`Db::create_batch`] with the client's `metadata` (validated before) and, when it asked
    /// for one, a webhook: its events are recorded as the batch's jobs finish (see the
    /// `webhooks` migration).
    pub async fn create_batch_with(
        &self,
        owner: &str,
        label: Option<String>,
        metadata: Value,
        webhook: Option<crate::NewWebhook>,
        new_jobs: Vec<NewJob>,
        dispatch_grace_ms: u64,
    ) -> Result<(BatchView, Vec<Dispatch>), DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            conn.transaction(|conn| {
                insert_batch(
                    conn,
                    &owner,
                    label,
                    &metadata,
                    &new_jobs,
                    dispatch_grace_ms,
                    webhook.as_ref(),
                    Admitted::default(),
                    Priority::Normal,
                    &[],
                )
            })
        })
        .await
    }

    /// [`Db::create_batch`] for an API key: the key's quotas are checked in the same
    /// transaction (see `quotas.rs`), and a batch over one is refused with nothing written.
    /// Its jobs of the types in `held` are held for fair dispatch (`dispatch.rs`): the
    /// caller publishes only the others.
    #[allow(clippy::too_many_arguments)]
    pub async fn submit_batch(
        &self,
        who: &Submitter,
        label: Option<String>,
        metadata: Value,
        webhook: Option<crate::NewWebhook>,
        priority: Priority,
        new_jobs: Vec<NewJob>,
        dispatch_grace_ms: u64,
        held: Vec<InferenceType>,
    ) -> Result<Result<(BatchView, Vec<Dispatch>), OverQuota>, DbError> {
        let who = who.clone();
        self.run(move |conn| {
            conn.transaction(|conn| {
                let admitted = match admit(conn, &who, new_jobs.len() as i64)? {
                    Ok(a) => a,
                    Err(over) => return Ok(Err(over)),
                };
                insert_batch(
                    conn,
                    &who.owner,
                    label,
                    &metadata,
                    &new_jobs,
                    dispatch_grace_ms,
                    webhook.as_ref(),
                    admitted,
                    priority,
                    &held,
                )
                .map(Ok)
            })
        })
        .await
    }

    /// Records that the broker confirmed a new batch's messages except `unconfirmed`, which
    /// go to the outbox (published by the sweeper once the dispatch grace has passed).
    pub async fn record_publish(
        &self,
        batch_id: i64,
        unconfirmed: Vec<i64>,
    ) -> Result<(), DbError> {
        self.run(move |conn| {
            // One statement, so one round trip and atomic: a data-modifying CTE runs whether
            // or not the outer statement reads it.
            diesel::sql_query(RECORD_PUBLISH.as_str())
                .bind::<Array<BigInt>, _>(&unconfirmed)
                .bind::<BigInt, _>(batch_id)
                .execute(&mut **conn)?;
            Ok(())
        })
        .await
    }

    /// Records that the broker confirmed these jobs' messages (jobs the sweeper published).
    pub async fn mark_dispatched(&self, ids: Vec<i64>) -> Result<usize, DbError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.run(move |conn| {
            Ok(diesel::sql_query(MARK_DISPATCHED.as_str())
                .bind::<Array<BigInt>, _>(&ids)
                .execute(&mut **conn)?)
        })
        .await
    }

    /// The owner's newest batches.
    pub async fn list_batches(&self, owner: &str, limit: i64) -> Result<Vec<BatchView>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let rows: Vec<BatchRow> = batches::table
                .filter(batches::owner.eq(&owner))
                .order(batches::id.desc())
                .limit(limit)
                .select(BATCH_COLUMNS)
                .load(&mut **conn)?;
            batch_views(conn, rows)
        })
        .await
    }

    /// A batch of this owner with its jobs, or `None` (missing or someone else's).
    pub async fn get_batch(
        &self,
        owner: &str,
        id: i64,
    ) -> Result<Option<(BatchView, Vec<JobSummary>)>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| batch_with_jobs(conn, &owner, id))
            .await
    }

    /// The read clients poll, in one round trip: the key is checked, and the batch and its
    /// jobs (with their token counts, summed here into the batch's usage) read, by one
    /// statement. Under load every round trip is a wake-up of the backend and of the caller,
    /// which is what a read's latency is made of. `None` when the key is unknown or revoked;
    /// `Some(None)` when the key's owner has no such batch.
    #[allow(clippy::type_complexity)]
    pub async fn get_batch_for_key(
        &self,
        secret: &str,
        id: i64,
    ) -> Result<Option<Option<(BatchView, Vec<JobSummary>, BatchUsage)>>, DbError> {
        let hash = crate::hash_key(secret);
        self.run(move |conn| {
            // The query builder's form (not SQL text) is what diesel keeps prepared per
            // connection, so a poll is not parsed and planned again each time.
            let rows: Vec<KeyedJob> = api_keys::table
                .left_join(
                    batches::table.on(batches::id.eq(id).and(batches::owner.eq(api_keys::owner))),
                )
                .left_join(jobs::table.on(jobs::batch_id.eq(batches::id)))
                .filter(api_keys::key_hash.eq(&hash))
                .filter(api_keys::revoked_at.is_null())
                .order(jobs::id.nullable())
                .select((
                    batches::id.nullable(),
                    batches::label.nullable(),
                    batches::total.nullable(),
                    batches::created_at.nullable(),
                    // Whether the batch has metadata, not the metadata: this row repeats once
                    // per job, and up to 16 pairs of 512 characters 256 times over would make
                    // every poll megabytes. A batch that has some reads it with a second
                    // statement below.
                    batches::metadata
                        .nullable()
                        .eq(Value::Object(Default::default())),
                    batches::priority.nullable(),
                    jobs::id.nullable(),
                    jobs::status.nullable(),
                    jobs::inference_type.nullable(),
                    jobs::custom_id.nullable(),
                    jobs::prompt_tokens.nullable(),
                    jobs::completion_tokens.nullable(),
                    jobs::total_tokens.nullable(),
                ))
                .load(&mut **conn)?;
            let Some(&(batch_id, ref label, total, created_at, no_metadata, priority, ..)) =
                rows.first()
            else {
                return Ok(None);
            };
            let (Some(id), Some(total), Some(created_at)) = (batch_id, total, created_at) else {
                return Ok(Some(None));
            };
            let metadata = if no_metadata == Some(false) {
                batches::table
                    .filter(batches::id.eq(id))
                    .select(batches::metadata)
                    .first(&mut **conn)?
            } else {
                Value::Object(Default::default())
            };
            let label = label.clone();
            let mut counts = BatchCounts::default();
            let mut usage = BatchUsage::default();
            let mut summaries = Vec::with_capacity(rows.len());
            for (.., job_id, status, inference_type, custom_id, pt, ct, tt) in rows {
                let (Some(job_id), Some(status), Some(inference_type)) =
                    (job_id, status, inference_type)
                else {
                    continue;
                };
                let Parsed(status) = status;
                counts.add(status, 1);
                if let Some(tt) = tt {
                    usage.add(Usage {
                        prompt_tokens: pt.unwrap_or(0),
                        completion_tokens: ct.unwrap_or(0),
                        total_tokens: tt,
                    });
                }
                summaries.push(JobSummary {
                    id: job_id,
                    status,
                    inference_type,
                    custom_id,
                });
            }
            let view = BatchView {
                id,
                label,
                metadata,
                total: i64::from(total),
                created_at,
                counts,
                priority: Priority::from_rank(priority.unwrap_or(0)),
            };
            Ok(Some(Some((view, summaries, usage))))
        })
        .await
    }

    pub async fn get_job(&self, owner: &str, id: i64) -> Result<Option<JobView>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            Ok(jobs::table
                .filter(jobs::id.eq(id))
                .filter(jobs::owner.eq(&owner))
                .select(JobView::as_select())
                .first(&mut **conn)
                .optional()?)
        })
        .await
    }

    /// Cancels every QUEUED or PROCESSING job of the batch. Returns the batch afterwards and
    /// the ids just cancelled (empty when there was nothing left to cancel), or `None`.
    pub async fn cancel_batch(
        &self,
        owner: &str,
        id: i64,
    ) -> Result<Option<(BatchView, Vec<JobSummary>, Vec<i64>)>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            conn.transaction(|conn| {
                let cancelled: Vec<i64> = diesel::update(jobs::table)
                    .filter(jobs::batch_id.eq(id))
                    .filter(jobs::owner.eq(&owner))
                    .filter(jobs::status.eq_any(cancellable()))
                    .set(cancel_set())
                    .returning(jobs::id)
                    .get_results(conn)?;
                if !cancelled.is_empty() {
                    // Delivered at commit: every gateway's event streams of this batch wake.
                    crate::progress::notify_on(conn, &[id])?;
                }
                Ok(batch_with_jobs(conn, &owner, id)?.map(|(b, j)| (b, j, cancelled)))
            })
        })
        .await
    }

    /// Cancels one job if it is QUEUED or PROCESSING. `None` if it does not exist for this
    /// owner; otherwise the job afterwards and whether this call cancelled it.
    pub async fn cancel_job(
        &self,
        owner: &str,
        id: i64,
    ) -> Result<Option<(JobView, bool)>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            conn.transaction(|conn| {
                let n = diesel::update(jobs::table)
                    .filter(jobs::id.eq(id))
                    .filter(jobs::owner.eq(&owner))
                    .filter(jobs::status.eq_any(cancellable()))
                    .set(cancel_set())
                    .execute(conn)?;
                let job = jobs::table
                    .filter(jobs::id.eq(id))
                    .filter(jobs::owner.eq(&owner))
                    .select(JobView::as_select())
                    .first(conn)
                    .optional()?;
                if let Some(j) = job.as_ref().filter(|_| n > 0) {
                    crate::progress::notify_on(conn, &[j.batch_id])?;
                }
                Ok(job.map(|j| (j, n > 0)))
            })
        })
        .await
    }
}

fn cancellable() -> Vec<&'static str> {
    JobStatus::sources(Transition::Cancel)
        .into_iter()
        .map(JobStatus::as_str)
        .collect()
}

#[allow(clippy::type_complexity)]
fn cancel_set() -> (
    diesel::dsl::Eq<jobs::status, &'static str>,
    diesel::dsl::Eq<jobs::finished_at, diesel::dsl::now>,
    diesel::dsl::Eq<jobs::updated_at, diesel::dsl::now>,
    diesel::dsl::Eq<jobs::lease_until, Option<DateTime<Utc>>>,
) {
    (
        jobs::status.eq(Transition::Cancel.target().as_str()),
        jobs::finished_at.eq(diesel::dsl::now),
        jobs::updated_at.eq(diesel::dsl::now),
        jobs::lease_until.eq(None),
    )
}

fn batch_with_jobs(
    conn: &mut PgConn,
    owner: &str,
    id: i64,
) -> Result<Option<(BatchView, Vec<JobSummary>)>, DbError> {
    let row: Option<BatchRow> = batches::table
        .filter(batches::id.eq(id))
        .filter(batches::owner.eq(owner))
        .select(BATCH_COLUMNS)
        .first(conn)
        .optional()?;
    let Some(row) = row else { return Ok(None) };
    let summaries: Vec<JobSummary> = jobs::table
        .filter(jobs::batch_id.eq(id))
        .order(jobs::id)
        .select((
            jobs::id,
            jobs::status,
            jobs::inference_type,
            jobs::custom_id,
        ))
        .load(conn)?;
    let mut counts = BatchCounts::default();
    for j in &summaries {
        counts.add(j.status, 1);
    }
    Ok(Some((
        BatchView {
            id: row.id,
            label: row.label,
            metadata: row.metadata,
            total: i64::from(row.total),
            created_at: row.created_at,
            counts,
            priority: Priority::from_rank(row.priority),
        },
        summaries,
    )))
}
