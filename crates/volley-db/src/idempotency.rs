//! `Idempotency-Key` on batch creation (the IETF httpapi draft's semantics): per API key, kept
//! 24 hours. Decided in the batch's own transaction, so it holds across gateway replicas.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use sha2::{Digest, Sha256};
use volley_domain::{BatchCounts, Dispatch, InferenceType, JobStatus, Priority};

use crate::batches::insert_batch;
use crate::quotas::{OverQuota, Submitter, admit};
use crate::schema::{batches, idempotency_keys};
use crate::{BatchView, Db, DbError, NewJob};

/// How long a key is remembered, in hours.
const IDEMPOTENCY_TTL_HOURS: i64 = 24;

/// What a create with an idempotency key came to.
#[derive(Debug)]
pub enum Idempotent {
    /// A new batch (the key is now bound to it).
    Created(BatchView, Vec<Dispatch>),
    /// The key was used before with the same body: the original response's batch, as it was
    /// when it was created.
    Replayed(BatchView),
    /// The key was used before with another body.
    Mismatch,
    /// Another request with the same key is being decided right now.
    InFlight,
    /// A new batch that a quota of the key refused; nothing was written.
    OverQuota(OverQuota),
}

/// An earlier use of the key: its body hash, and its batch's id, label, total, creation,
/// metadata and priority.
type Earlier = (
    Vec<u8>,
    i64,
    Option<String>,
    i32,
    DateTime<Utc>,
    serde_json::Value,
    i16,
);

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

impl Db {
    /// Creates a batch unless `key` was already used by this API key in the last 24 hours.
    /// `body` is the request body as received; its SHA-256 tells a replay from a mismatch.
    #[allow(clippy::too_many_arguments)]
    /// A replay is answered whatever the quotas say (it creates nothing); a new batch is
    /// checked against them after the key's lock is taken.
    pub async fn create_batch_idempotent(
        &self,
        who: &Submitter,
        key: String,
        body: &[u8],
        label: Option<String>,
        metadata: serde_json::Value,
        priority: Priority,
        new_jobs: Vec<NewJob>,
        dispatch_grace_ms: u64,
        webhook: Option<crate::NewWebhook>,
        held: Vec<InferenceType>,
    ) -> Result<Idempotent, DbError> {
        let hash = Sha256::digest(body).to_vec();
        let who = who.clone();
        let api_key_id = who.key_id;
        self.run(move |conn| {
            conn.transaction(|conn| {
                // A transaction-scoped advisory lock on (API key, idempotency key): a second
                // request with the same key does not wait behind the first but is told it is
                // in flight. Held until this transaction ends, so whoever takes it next sees
                // the committed row. A hash collision only costs a spurious 409.
                let locked: Locked = diesel::sql_query(
                    "SELECT pg_try_advisory_xact_lock(\
                       hashtextextended($1::text || ':' || $2, 7011)) AS locked",
                )
                .bind::<BigInt, _>(api_key_id)
                .bind::<Text, _>(&key)
                .get_result(conn)?;
                if !locked.locked {
                    return Ok(Idempotent::InFlight);
                }
                let since = Utc::now() - chrono::Duration::hours(IDEMPOTENCY_TTL_HOURS);
                let earlier: Option<Earlier> = idempotency_keys::table
                    .inner_join(batches::table)
                    .filter(idempotency_keys::api_key_id.eq(api_key_id))
                    .filter(idempotency_keys::idempotency_key.eq(&key))
                    .filter(idempotency_keys::created_at.gt(since))
                    .select((
                        idempotency_keys::request_hash,
                        batches::id,
                        batches::label,
                        batches::total,
                        batches::created_at,
                        batches::metadata,
                        batches::priority,
                    ))
                    .first(conn)
                    .optional()?;
                if let Some((earlier_hash, id, label, total, created_at, metadata, rank)) = earlier
                {
                    if earlier_hash != hash {
                        return Ok(Idempotent::Mismatch);
                    }
                    // The response the first request got: every job still queued.
                    let mut counts = BatchCounts::default();
                    counts.add(JobStatus::Queued, total.max(0) as u64);
                    return Ok(Idempotent::Replayed(BatchView {
                        id,
                        label,
                        metadata,
                        total: i64::from(total),
                        created_at,
                        counts,
                        priority: Priority::from_rank(rank),
                    }));
                }
                let admitted = match admit(conn, &who, new_jobs.len() as i64)? {
                    Ok(a) => a,
                    Err(over) => return Ok(Idempotent::OverQuota(over)),
                };
                let (view, dispatch) = insert_batch(
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
                )?;
                // An expired row not purged yet is taken over.
                diesel::insert_into(idempotency_keys::table)
                    .values((
                        idempotency_keys::api_key_id.eq(api_key_id),
                        idempotency_keys::idempotency_key.eq(&key),
                        idempotency_keys::request_hash.eq(&hash),
                        idempotency_keys::batch_id.eq(view.id),
                    ))
                    .on_conflict((
                        idempotency_keys::api_key_id,
                        idempotency_keys::idempotency_key,
                    ))
                    .do_update()
                    .set((
                        idempotency_keys::request_hash.eq(&hash),
                        idempotency_keys::batch_id.eq(view.id),
                        idempotency_keys::created_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)?;
                Ok(Idempotent::Created(view, dispatch))
            })
        })
        .await
    }

    /// Deletes at most `limit` keys older than 24 hours; returns how many. Bounded so that a
    /// backlog is worked off in short statements that hold few locks.
    pub async fn purge_idempotency_keys(&self, limit: i64) -> Result<usize, DbError> {
        self.run(move |conn| {
            Ok(diesel::sql_query(format!(
                "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(\
                   SELECT ctid FROM idempotency_keys \
                   WHERE created_at < now() - interval '{IDEMPOTENCY_TTL_HOURS} hours' \
                   ORDER BY created_at LIMIT $1))"
            ))
            .bind::<BigInt, _>(limit)
            .execute(&mut **conn)?)
        })
        .await
    }
}
