//! Paged reads for browsing (the web console and API clients): a batch's jobs with their
//! results, an owner's batches page by page, one job with its request body, and which keys
//! are operators'.

use diesel::dsl::{exists, not};
use diesel::prelude::*;
use serde_json::Value;
use volley_domain::{BatchStatus, JobStatus};

use crate::batches::{BATCH_COLUMNS, BatchRow, BatchView, JobView};
use crate::schema::{api_keys, batches, jobs};
use crate::{Db, DbError};

/// A page of rows and whether more follow it.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

/// One more row than asked for tells whether another page follows, without a count.
fn page<T>(mut rows: Vec<T>, limit: i64) -> Page<T> {
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    Page {
        items: rows,
        has_more,
    }
}

/// Where a page starts, as an id of the listing: `After` continues past it in the listing's
/// order, `Before` is the page just ahead of it (still answered in the listing's order). Ids
/// only grow, so a page never repeats a row and rows inserted meanwhile never shift one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cursor {
    #[default]
    First,
    After(i64),
    Before(i64),
}

/// What an owner's batches are filtered by.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub status: Option<BatchStatus>,
    pub label: Option<String>,
}

/// What a batch's jobs are filtered by.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub custom_id: Option<String>,
}

fn names(pick: impl Fn(JobStatus) -> bool) -> Vec<&'static str> {
    JobStatus::ALL
        .into_iter()
        .filter(|s| pick(*s))
        .map(JobStatus::as_str)
        .collect()
}

/// A page read in reverse (`Cursor::Before`) put back in the listing's order.
fn backwards<T>(mut p: Page<T>) -> Page<T> {
    p.items.reverse();
    p
}

impl Db {
    /// The owner's batches, newest first, `limit` at a time, from `cursor` (`After` the last id
    /// of the previous page goes to older batches, `Before` the first id to newer ones).
    /// A batch's status is derived from its jobs, so the status filter asks the jobs
    /// (`jobs_by_batch`) of each batch the walk meets.
    pub async fn list_batches_page(
        &self,
        owner: &str,
        filter: BatchFilter,
        cursor: Cursor,
        limit: i64,
    ) -> Result<Page<BatchView>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let mut q = batches::table
                .filter(batches::owner.eq(&owner))
                .limit(limit + 1)
                .select(BATCH_COLUMNS)
                .into_boxed();
            q = match cursor {
                Cursor::First => q.order(batches::id.desc()),
                Cursor::After(id) => q.filter(batches::id.lt(id)).order(batches::id.desc()),
                Cursor::Before(id) => q.filter(batches::id.gt(id)).order(batches::id.asc()),
            };
            if let Some(label) = filter.label {
                q = q.filter(batches::label.eq(label));
            }
            // The same rule as `BatchCounts::status`, asked of the rows.
            let unfinished = || {
                jobs::table
                    .filter(jobs::batch_id.eq(batches::id))
                    .filter(jobs::status.eq_any(names(|s| !s.is_terminal())))
            };
            let started = || {
                jobs::table
                    .filter(jobs::batch_id.eq(batches::id))
                    .filter(jobs::status.eq_any(names(|s| s != JobStatus::Queued)))
            };
            q = match filter.status {
                None => q,
                Some(BatchStatus::Done) => q.filter(not(exists(unfinished()))),
                Some(BatchStatus::Pending) => q.filter(not(exists(started()))),
                Some(BatchStatus::Processing) => {
                    q.filter(exists(unfinished())).filter(exists(started()))
                }
            };
            let rows: Vec<BatchRow> = q.load(&mut **conn)?;
            let mut p = page(rows, limit);
            if matches!(cursor, Cursor::Before(_)) {
                p = backwards(p);
            }
            Ok(Page {
                items: crate::batches::batch_views(conn, p.items)?,
                has_more: p.has_more,
            })
        })
        .await
    }

    /// A page of a batch's jobs in submission order, filtered, from `cursor` (`After` the last
    /// id of the previous page, `Before` the first). `None` when the owner has no such batch.
    pub async fn list_jobs(
        &self,
        owner: &str,
        batch_id: i64,
        filter: JobFilter,
        cursor: Cursor,
        limit: i64,
    ) -> Result<Option<Page<JobView>>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let exists: Option<i64> = batches::table
                .filter(batches::id.eq(batch_id))
                .filter(batches::owner.eq(&owner))
                .select(batches::id)
                .first(&mut **conn)
                .optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut q = jobs::table
                .filter(jobs::batch_id.eq(batch_id))
                .limit(limit + 1)
                .select(JobView::as_select())
                .into_boxed();
            q = match cursor {
                Cursor::First => q.order(jobs::id.asc()),
                Cursor::After(id) => q.filter(jobs::id.gt(id)).order(jobs::id.asc()),
                Cursor::Before(id) => q.filter(jobs::id.lt(id)).order(jobs::id.desc()),
            };
            if let Some(status) = filter.status {
                q = q.filter(jobs::status.eq(status.as_str()));
            }
            if let Some(custom_id) = filter.custom_id {
                q = q.filter(jobs::custom_id.eq(custom_id));
            }
            let p = page(q.load(&mut **conn)?, limit);
            Ok(Some(if matches!(cursor, Cursor::Before(_)) {
                backwards(p)
            } else {
                p
            }))
        })
        .await
    }

    /// Whether the owner has this batch.
    pub async fn owns_batch(&self, owner: &str, batch_id: i64) -> Result<bool, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            Ok(batches::table
                .filter(batches::id.eq(batch_id))
                .filter(batches::owner.eq(&owner))
                .select(batches::id)
                .first::<i64>(&mut **conn)
                .optional()?
                .is_some())
        })
        .await
    }

    /// Up to `limit` finished jobs of a batch in submission order, after the job id `after`,
    /// of the given terminal `statuses` (all terminal ones when empty). One page of the bulk
    /// results: the caller reads the next page only once this one is sent, so memory stays at
    /// one page however large the results. Ownership is the caller's to check first.
    pub async fn finished_jobs_page(
        &self,
        batch_id: i64,
        statuses: Vec<JobStatus>,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<JobView>, DbError> {
        let statuses: Vec<&'static str> = if statuses.is_empty() {
            names(JobStatus::is_terminal)
        } else {
            statuses
                .into_iter()
                .filter(|s| s.is_terminal())
                .map(JobStatus::as_str)
                .collect()
        };
        self.run(move |conn| {
            let mut q = jobs::table
                .filter(jobs::batch_id.eq(batch_id))
                .filter(jobs::status.eq_any(statuses))
                .order(jobs::id.asc())
                .limit(limit)
                .select(JobView::as_select())
                .into_boxed();
            if let Some(after) = after {
                q = q.filter(jobs::id.gt(after));
            }
            Ok(q.load(&mut **conn)?)
        })
        .await
    }

    /// One job of this owner with the request body it was submitted with.
    pub async fn get_job_with_request(
        &self,
        owner: &str,
        id: i64,
    ) -> Result<Option<(JobView, Value)>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            Ok(jobs::table
                .filter(jobs::id.eq(id))
                .filter(jobs::owner.eq(&owner))
                .select((JobView::as_select(), jobs::body))
                .first(&mut **conn)
                .optional()?)
        })
        .await
    }

    /// Marks a key an operator's (or not); returns how many keys changed.
    pub async fn set_admin(&self, key_id: i64, admin: bool) -> Result<usize, DbError> {
        self.run(move |conn| {
            Ok(
                diesel::update(api_keys::table.filter(api_keys::id.eq(key_id)))
                    .set(api_keys::admin.eq(admin))
                    .execute(&mut **conn)?,
            )
        })
        .await
    }

    /// Whether a live key is an operator's; `None` when the key is unknown or revoked.
    pub async fn key_is_admin(&self, secret: &str) -> Result<Option<bool>, DbError> {
        let hash = crate::hash_key(secret);
        self.run(move |conn| {
            Ok(api_keys::table
                .filter(api_keys::key_hash.eq(&hash))
                .filter(api_keys::revoked_at.is_null())
                .select(api_keys::admin)
                .first(&mut **conn)
                .optional()?)
        })
        .await
    }
}
