//! Paged reads for browsing (the web console and API clients): a batch's jobs with their
//! results, an owner's batches page by page, one job with its request body, and which keys
//! are operators'.

use diesel::prelude::*;
use serde_json::Value;

use crate::batches::{BatchView, JobView};
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

impl Db {
    /// The owner's batches, newest first, `limit` at a time; `before` is the id of the last
    /// batch of the previous page (batch ids only grow, so a page never repeats a batch).
    pub async fn list_batches_page(
        &self,
        owner: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Page<BatchView>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let mut q = batches::table
                .filter(batches::owner.eq(&owner))
                .order(batches::id.desc())
                .limit(limit + 1)
                .select((
                    batches::id,
                    batches::label,
                    batches::total,
                    batches::created_at,
                    batches::priority,
                ))
                .into_boxed();
            if let Some(before) = before {
                q = q.filter(batches::id.lt(before));
            }
            let rows = q.load(&mut **conn)?;
            let p = page(rows, limit);
            Ok(Page {
                items: crate::batches::batch_views(conn, p.items)?,
                has_more: p.has_more,
            })
        })
        .await
    }

    /// A page of a batch's jobs in submission order, optionally of one status; `after` is the
    /// id of the last job of the previous page. `None` when the owner has no such batch.
    pub async fn list_jobs(
        &self,
        owner: &str,
        batch_id: i64,
        status: Option<String>,
        after: Option<i64>,
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
                .order(jobs::id)
                .limit(limit + 1)
                .select(JobView::as_select())
                .into_boxed();
            if let Some(after) = after {
                q = q.filter(jobs::id.gt(after));
            }
            if let Some(status) = status {
                q = q.filter(jobs::status.eq(status));
            }
            Ok(Some(page(q.load(&mut **conn)?, limit)))
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
