//! Fair dispatch: work held back from a full queue (`dispatch_holds`, one row per batch and
//! inference type) and released round-robin over owners. See ARCHITECTURE.md, "Tenants".

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Int8, Nullable, Text};
use volley_domain::{Dispatch, InferenceType, Priority, Transition};

use crate::batches::DispatchRow;
use crate::guard::{Sql, from};
use crate::schema::{dispatch_holds, jobs};
use crate::{Db, DbError, millis};

type PgConn = diesel::PgConnection;

/// Records the held part of a new batch; the caller holds the batch's transaction.
pub(crate) fn insert_holds(
    conn: &mut PgConn,
    owner: &str,
    priority: Priority,
    weight: i32,
    jobs: &[Dispatch],
    held: &[InferenceType],
) -> Result<(), DbError> {
    let mut counts: BTreeMap<InferenceType, i32> = BTreeMap::new();
    for j in jobs.iter().filter(|j| held.contains(&j.inference_type)) {
        *counts.entry(j.inference_type).or_default() += 1;
    }
    let Some(batch_id) = jobs.first().map(|j| j.batch_id) else {
        return Ok(());
    };
    if counts.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = counts
        .into_iter()
        .map(|(t, n)| {
            (
                dispatch_holds::batch_id.eq(batch_id),
                dispatch_holds::inference_type.eq(t.as_str()),
                dispatch_holds::owner.eq(owner),
                dispatch_holds::priority.eq(priority.rank()),
                dispatch_holds::jobs.eq(n),
                dispatch_holds::weight.eq(weight.max(1)),
            )
        })
        .collect();
    diesel::insert_into(dispatch_holds::table)
        .values(&rows)
        .execute(conn)?;
    Ok(())
}

/// Held work of one inference type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub inference_type: InferenceType,
    /// Jobs in the held rows not yet released (counted at submission; some may have been
    /// cancelled since).
    pub jobs: i64,
}

/// A held batch's jobs of one type, released: the caller publishes them.
#[derive(Debug)]
pub struct Released {
    pub batch_id: i64,
    pub owner: String,
    /// Its jobs still waiting for a claim (cancelled ones are left out).
    pub jobs: Vec<Dispatch>,
}

/// Whose turn it is in one inference type's fair order: the owner served last, the turns it
/// has taken in a row, and its weight (turns it may take in a row).
#[derive(Debug, Default, Clone)]
pub struct Turns {
    owner: String,
    taken: i32,
    weight: i32,
}

impl Turns {
    fn served(&mut self, owner: &str, weight: i32) {
        if self.owner == owner {
            self.taken = self.taken.saturating_add(1);
        } else {
            self.owner = owner.to_owned();
            self.taken = 1;
        }
        self.weight = weight;
    }
}

#[derive(QueryableByName)]
struct HeldRow {
    #[diesel(sql_type = Text)]
    inference_type: String,
    #[diesel(sql_type = BigInt)]
    jobs: i64,
}

#[derive(QueryableByName)]
struct PickedRow {
    #[diesel(sql_type = Int8)]
    batch_id: i64,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = Nullable<Int8>)]
    released_upto: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    weight: i32,
}

// The next owner after `$2` in name order that has work of this type waiting (wrapping round
// to the first), or `$2` itself while `$4` (it has turns left of its weight), and that owner's
// oldest batch of the highest priority, a level higher for each `$3` ms waited. SKIP LOCKED:
// two batch-state replicas never release the same row.
const PICK: &str = "SELECT batch_id, owner, released_upto, weight FROM dispatch_holds \
     WHERE inference_type = $1 AND released_at IS NULL \
     ORDER BY $4 AND owner = $2 DESC, owner <= $2, owner, \
       priority + floor(extract(epoch FROM now() - created_at) * 1000 / $3) DESC, batch_id \
     LIMIT 1 FOR UPDATE SKIP LOCKED";

// What a release took: through which job, how many, and whether that was the row's last.
const RELEASED: &str = "UPDATE dispatch_holds \
     SET released_upto = COALESCE($3, released_upto), released_jobs = released_jobs + $4, \
       released_at = CASE WHEN $5 THEN now() END \
     WHERE batch_id = $1 AND inference_type = $2";

// A released job whose message the broker did not confirm goes to the outbox.
static TO_OUTBOX: Sql = Sql::new(|| {
    format!(
        "UPDATE jobs SET dispatched_at = NULL WHERE id = ANY($1) AND {claimable}",
        claimable = from("status || ''", Transition::Claim),
    )
});

impl Db {
    /// Inference types with held work, and how much.
    pub async fn held_work(&self) -> Result<Vec<Held>, DbError> {
        self.run(|conn| {
            let rows: Vec<HeldRow> = diesel::sql_query(
                "SELECT inference_type, sum(jobs - released_jobs)::bigint AS jobs \
                 FROM dispatch_holds WHERE released_at IS NULL GROUP BY inference_type",
            )
            .load(&mut **conn)?;
            Ok(rows
                .into_iter()
                .filter_map(|r| {
                    Some(Held {
                        inference_type: r.inference_type.parse().ok()?,
                        jobs: r.jobs,
                    })
                })
                .collect())
        })
        .await
    }

    /// Releases up to `max_jobs` jobs of the next held batch of type `t` in fair order, and
    /// records the turn in `turns` (the caller keeps one per type): the owner served last
    /// again while it has turns left of its weight, else the next owner after it (name order,
    /// wrapping); within the owner its highest (aged) priority, then its oldest batch. A batch
    /// with more waiting stays held for its owner's next turn. `None`: nothing waits.
    pub async fn release_next(
        &self,
        t: InferenceType,
        turns: &mut Turns,
        aging_ms: u64,
        max_jobs: usize,
    ) -> Result<Option<Released>, DbError> {
        let after = turns.owner.clone();
        let again = turns.taken < turns.weight;
        let max_jobs = max_jobs.clamp(1, 100_000);
        let released = self
            .run(move |conn| {
                conn.transaction(|conn| {
                    let picked: Option<PickedRow> = diesel::sql_query(PICK)
                        .bind::<Text, _>(t.as_str())
                        .bind::<Text, _>(&after)
                        .bind::<BigInt, _>(millis(aging_ms.max(1)))
                        .bind::<diesel::sql_types::Bool, _>(again)
                        .get_result(conn)
                        .optional()?;
                    let Some(p) = picked else {
                        return Ok(None);
                    };
                    // All the row's waiting jobs (a batch has at most 256), cut here: the
                    // statement stays the plain range of the batch's index (batch_id, id).
                    let mut rows: Vec<DispatchRow> = jobs::table
                        .filter(jobs::batch_id.eq(p.batch_id))
                        .filter(jobs::inference_type.eq(t.as_str()))
                        .filter(jobs::status.eq(volley_domain::JobStatus::Queued.as_str()))
                        .filter(jobs::id.gt(p.released_upto.unwrap_or(0)))
                        .order(jobs::id)
                        .select(DispatchRow::as_select())
                        .load(conn)?;
                    let last = rows.len() <= max_jobs;
                    rows.truncate(max_jobs);
                    let jobs: Vec<Dispatch> = rows.into_iter().map(Dispatch::from).collect();
                    diesel::sql_query(RELEASED)
                        .bind::<Int8, _>(p.batch_id)
                        .bind::<Text, _>(t.as_str())
                        .bind::<Nullable<Int8>, _>(jobs.last().map(|j| j.id))
                        .bind::<diesel::sql_types::Integer, _>(
                            i32::try_from(jobs.len()).unwrap_or(i32::MAX),
                        )
                        .bind::<diesel::sql_types::Bool, _>(last)
                        .execute(conn)?;
                    Ok(Some((
                        Released {
                            batch_id: p.batch_id,
                            owner: p.owner,
                            jobs,
                        },
                        p.weight,
                    )))
                })
            })
            .await?;
        Ok(released.map(|(r, weight)| {
            turns.served(&r.owner, weight);
            r
        }))
    }

    /// Hands released jobs whose messages were not confirmed to the outbox (the sweeper
    /// publishes them).
    pub async fn to_outbox(&self, ids: Vec<i64>) -> Result<usize, DbError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.run(move |conn| {
            Ok(diesel::sql_query(TO_OUTBOX.as_str())
                .bind::<Array<BigInt>, _>(&ids)
                .execute(&mut **conn)?)
        })
        .await
    }

    /// Deletes up to `limit` rows of work released more than `older_than_ms` ago (by then
    /// the sweeper's lost-message check no longer needs them).
    pub async fn purge_released_holds(
        &self,
        older_than_ms: u64,
        limit: i64,
    ) -> Result<usize, DbError> {
        self.run(move |conn| {
            Ok(diesel::sql_query(
                "DELETE FROM dispatch_holds WHERE (batch_id, inference_type) IN (\
                   SELECT batch_id, inference_type FROM dispatch_holds \
                   WHERE released_at < now() - $1 * interval '1 millisecond' LIMIT $2)",
            )
            .bind::<BigInt, _>(millis(older_than_ms))
            .bind::<BigInt, _>(limit)
            .execute(&mut **conn)?)
        })
        .await
    }
}
