//! Per-key quotas on submission: jobs active at once (QUEUED + PROCESSING) and jobs submitted
//! per minute. Decided in the batch's own transaction under a row lock on the key, so two
//! gateway replicas cannot both admit a batch that together passes a quota; the counts come
//! from PostgreSQL, never from a replica's memory.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};

use crate::schema::api_keys;
use crate::{Db, DbError};

/// A key's quotas; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    pub max_active_jobs: Option<i32>,
    pub max_jobs_per_minute: Option<i32>,
}

impl Quotas {
    fn is_unlimited(&self) -> bool {
        self.max_active_jobs.is_none() && self.max_jobs_per_minute.is_none()
    }
}

/// Who is submitting: the key, its owner, and its quotas as read at authentication (the
/// transaction reads them again under the lock).
#[derive(Debug, Clone)]
pub struct Submitter {
    pub key_id: i64,
    pub owner: String,
    pub quotas: Quotas,
    /// Turns in a row the owner takes in fair dispatch (1 to [`MAX_WEIGHT`]).
    pub weight: i32,
}

/// The largest fair-dispatch weight a key may have (the column's CHECK).
pub const MAX_WEIGHT: i32 = 100;

/// Which quota a batch would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    ActiveJobs,
    JobsPerMinute,
}

/// A batch refused by a quota; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub kind: QuotaKind,
    /// The key's limit.
    pub limit: i64,
    /// What the key has now (active jobs, or jobs submitted in the last minute).
    pub used: i64,
    /// The batch's jobs.
    pub requested: i64,
    /// When a retry can pass, in whole seconds (at least 1).
    pub retry_after_secs: u64,
}

impl OverQuota {
    /// Whether no wait can help: the batch alone is larger than the limit.
    pub fn never_fits(&self) -> bool {
        self.requested > self.limit
    }
}

/// How long a client should wait when its active-job cap is reached. Jobs finish at whatever
/// pace the providers allow, so no exact time exists; this is long enough that a client does
/// not poll the gateway hard and short enough that it notices freed capacity soon.
const ACTIVE_RETRY_AFTER_SECS: u64 = 15;

/// The per-minute window, in seconds.
const WINDOW_SECS: i64 = 60;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Wait {
    #[diesel(sql_type = Nullable<BigInt>)]
    secs: Option<i64>,
}

/// What the key that submits the batch is to record on its rows.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Admitted {
    pub api_key_id: Option<i64>,
    /// Set when the key has an active-job cap: the jobs then count against it.
    pub quota_key_id: Option<i64>,
    /// The key's fair-dispatch weight (0, as without a key, counts as 1).
    pub weight: i32,
}

/// Checks `requested` more jobs against the key's quotas, inside the caller's transaction.
/// With quotas, the key's row is locked (`FOR NO KEY UPDATE`: readers and the foreign keys
/// that point at it do not wait) until the transaction ends, so submissions of one key are
/// decided one after another on every replica; keys without quotas take no lock.
pub(crate) fn admit(
    conn: &mut diesel::PgConnection,
    who: &Submitter,
    requested: i64,
) -> Result<Result<Admitted, OverQuota>, DbError> {
    let mut admitted = Admitted {
        api_key_id: Some(who.key_id),
        quota_key_id: None,
        weight: who.weight,
    };
    if who.quotas.is_unlimited() {
        return Ok(Ok(admitted));
    }
    // The quotas as they are now, under the lock (an update may have come in since the key
    // was authenticated).
    let fresh: Option<(Option<i32>, Option<i32>)> = api_keys::table
        .filter(api_keys::id.eq(who.key_id))
        .select((api_keys::max_active_jobs, api_keys::max_jobs_per_minute))
        .for_no_key_update()
        .first(conn)
        .optional()?;
    let Some((max_active, max_per_minute)) = fresh else {
        return Ok(Ok(admitted));
    };
    if let Some(limit) = max_active {
        let used = diesel::sql_query(
            "SELECT count(*) AS n FROM jobs WHERE quota_key_id = $1 \
             AND status IN ('QUEUED', 'PROCESSING')",
        )
        .bind::<BigInt, _>(who.key_id)
        .get_result::<Count>(conn)?
        .n;
        if used + requested > i64::from(limit) {
            return Ok(Err(OverQuota {
                kind: QuotaKind::ActiveJobs,
                limit: i64::from(limit),
                used,
                requested,
                retry_after_secs: ACTIVE_RETRY_AFTER_SECS,
            }));
        }
        admitted.quota_key_id = Some(who.key_id);
    }
    if let Some(limit) = max_per_minute {
        let limit = i64::from(limit);
        let used = diesel::sql_query(format!(
            "SELECT coalesce(sum(total), 0)::bigint AS n FROM batches \
             WHERE api_key_id = $1 AND created_at > now() - interval '{WINDOW_SECS} seconds'"
        ))
        .bind::<BigInt, _>(who.key_id)
        .get_result::<Count>(conn)?
        .n;
        if used + requested > limit {
            // The window frees the oldest batches first: the retry can pass once enough of
            // them have left it (or in a full window, if the batch is larger than the limit).
            let need = used + requested - limit;
            let secs = if requested > limit {
                None
            } else {
                diesel::sql_query(format!(
                    "SELECT ceil(extract(epoch FROM created_at + interval '{WINDOW_SECS} seconds' \
                       - now()))::bigint AS secs \
                     FROM (SELECT created_at, sum(total) OVER (ORDER BY created_at, id) AS freed \
                           FROM batches WHERE api_key_id = $1 \
                           AND created_at > now() - interval '{WINDOW_SECS} seconds') w \
                     WHERE freed >= $2 ORDER BY created_at LIMIT 1"
                ))
                .bind::<BigInt, _>(who.key_id)
                .bind::<BigInt, _>(need)
                .get_result::<Wait>(conn)
                .optional()?
                .and_then(|w| w.secs)
            };
            let secs = secs.unwrap_or(WINDOW_SECS).clamp(1, WINDOW_SECS);
            return Ok(Err(OverQuota {
                kind: QuotaKind::JobsPerMinute,
                limit,
                used,
                requested,
                retry_after_secs: secs as u64,
            }));
        }
    }
    Ok(Ok(admitted))
}

/// A change to one of a key's quotas: leave it, remove it, or set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaChange {
    Keep,
    Unlimited,
    Max(i32),
}

/// A key's id, owner, active-jobs and per-minute quotas, and weight.
type SubmitterRow = (i64, String, Option<i32>, Option<i32>, i32);

#[derive(QueryableByName)]
struct QuotaRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Integer>)]
    max_active_jobs: Option<i32>,
    #[diesel(sql_type = Nullable<Integer>)]
    max_jobs_per_minute: Option<i32>,
    #[diesel(sql_type = Integer)]
    dispatch_weight: i32,
}

impl Db {
    /// The id, owner and quotas of a live key, if the secret is one.
    pub async fn authenticate_submitter(&self, secret: &str) -> Result<Option<Submitter>, DbError> {
        let hash = crate::hash_key(secret);
        self.run(move |conn| {
            let row: Option<SubmitterRow> = api_keys::table
                .filter(api_keys::key_hash.eq(&hash))
                .filter(api_keys::revoked_at.is_null())
                .select((
                    api_keys::id,
                    api_keys::owner,
                    api_keys::max_active_jobs,
                    api_keys::max_jobs_per_minute,
                    api_keys::dispatch_weight,
                ))
                .first(&mut **conn)
                .optional()?;
            Ok(row.map(|(key_id, owner, a, m, weight)| Submitter {
                key_id,
                owner,
                quotas: Quotas {
                    max_active_jobs: a,
                    max_jobs_per_minute: m,
                },
                weight,
            }))
        })
        .await
    }

    /// Changes a key's quotas and, if given, its fair-dispatch weight, by id or by name;
    /// returns the keys changed with their quotas and weight afterwards. Limits must be
    /// positive and weights 1 to [`MAX_WEIGHT`] (the table's CHECKs refuse anything else).
    pub async fn set_quotas(
        &self,
        id_or_name: &str,
        active: QuotaChange,
        per_minute: QuotaChange,
        weight: Option<i32>,
    ) -> Result<Vec<(i64, Quotas, i32)>, DbError> {
        let (id, name) = match id_or_name.parse::<i64>() {
            Ok(id) => (Some(id), None),
            Err(_) => (None, Some(id_or_name.to_owned())),
        };
        let keep = |c: QuotaChange| c == QuotaChange::Keep;
        let value = |c: QuotaChange| match c {
            QuotaChange::Max(n) => Some(n),
            QuotaChange::Keep | QuotaChange::Unlimited => None,
        };
        let (keep_a, a, keep_m, m) = (
            keep(active),
            value(active),
            keep(per_minute),
            value(per_minute),
        );
        self.run(move |conn| {
            // One statement: each column keeps its value or takes the new one (NULL: none).
            let rows: Vec<QuotaRow> = diesel::sql_query(
                "UPDATE api_keys SET \
                   max_active_jobs = CASE WHEN $3 THEN max_active_jobs ELSE $4 END, \
                   max_jobs_per_minute = CASE WHEN $5 THEN max_jobs_per_minute ELSE $6 END, \
                   dispatch_weight = COALESCE($7, dispatch_weight) \
                 WHERE id = $1 OR name = $2 \
                 RETURNING id, max_active_jobs, max_jobs_per_minute, dispatch_weight",
            )
            .bind::<Nullable<BigInt>, _>(id)
            .bind::<Nullable<Text>, _>(name)
            .bind::<Bool, _>(keep_a)
            .bind::<Nullable<Integer>, _>(a)
            .bind::<Bool, _>(keep_m)
            .bind::<Nullable<Integer>, _>(m)
            .bind::<Nullable<Integer>, _>(weight)
            .load(&mut **conn)?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    (
                        r.id,
                        Quotas {
                            max_active_jobs: r.max_active_jobs,
                            max_jobs_per_minute: r.max_jobs_per_minute,
                        },
                        r.dispatch_weight,
                    )
                })
                .collect())
        })
        .await
    }
}
