//! Webhook events: recorded by the `jobs_webhook` trigger in the transaction of the state
//! change that causes them (see the `webhooks` migration), delivered from here by
//! batch-state. Claims take due events with `FOR UPDATE SKIP LOCKED` and move their next
//! attempt forward by a lease, so several replicas share the work and an attempt cut short
//! by a crash is made again.

use std::collections::HashMap;

use base64::Engine;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Int4, Nullable, Text, Timestamptz};
use rand::RngCore;

use crate::batches::{BatchRow, BatchView, JobView, batch_views};
use crate::schema::{api_keys, batches, jobs};
use crate::{Db, DbError, millis};

/// A key's webhook signing secret: `whsec_` and 32 random bytes in base64 (the Standard
/// Webhooks form; the bytes are the HMAC key).
pub(crate) fn new_webhook_secret() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A batch's webhook, as accepted: where, which event types, and the key whose secret signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWebhook {
    pub url: String,
    pub types: Vec<String>,
    pub key_id: i64,
}

/// An event claimed for delivery, with what signing it needs.
#[derive(Debug, Clone, QueryableByName)]
pub struct DueEvent {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub msg_id: String,
    #[diesel(sql_type = BigInt)]
    pub batch_id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub job_id: Option<i64>,
    #[diesel(sql_type = Text)]
    pub owner: String,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = Text)]
    pub url: String,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    /// Attempts so far, this one included.
    #[diesel(sql_type = Int4)]
    pub attempts: i32,
    /// A client asked for this one attempt.
    #[diesel(sql_type = Bool)]
    pub manual: bool,
    #[diesel(sql_type = Text)]
    pub secret: String,
    /// The secret before the last rotation, while its grace lasts: a second signature.
    #[diesel(sql_type = Nullable<Text>)]
    pub previous_secret: Option<String>,
}

/// How one attempt went.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: i64,
    /// A 2xx answer.
    pub delivered: bool,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    /// The start of the response body (capped by the caller).
    pub response: Option<String>,
    /// When not delivered: the delay before the next attempt, or `None` when the schedule is
    /// used up (the event fails and its endpoint is paused; a manual attempt just fails).
    pub retry_in_ms: Option<u64>,
}

/// One event as a client or operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivery {
    pub id: i64,
    pub msg_id: String,
    pub batch_id: i64,
    pub job_id: Option<i64>,
    pub event_type: String,
    pub url: String,
    pub created_at: DateTime<Utc>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub last_response: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Whether the endpoint is paused (an event to it used up its retries).
    pub endpoint_paused: bool,
}

/// The delivery backlog, for `batchctl status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct Backlog {
    /// Events not delivered yet that will be tried again.
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    /// Of those, due now (waiting for the deliverer).
    #[diesel(sql_type = BigInt)]
    pub due: i64,
    /// Events whose retries are used up.
    #[diesel(sql_type = BigInt)]
    pub failed: i64,
    #[diesel(sql_type = BigInt)]
    pub paused_endpoints: i64,
    /// Seconds the oldest due event has been due.
    #[diesel(sql_type = BigInt)]
    pub oldest_due_secs: i64,
}

const DELIVERY_SQL: &str = "SELECT e.id, e.msg_id, e.batch_id, e.job_id, e.type, e.url, \
     e.created_at, e.status, e.attempts, e.next_attempt_at, e.last_attempt_at, \
     e.last_status_code, e.last_error, e.last_response, e.delivered_at, p.paused_at \
     FROM webhook_events e \
     LEFT JOIN webhook_endpoints p ON p.owner = e.owner AND p.url = e.url";

#[derive(QueryableByName)]
struct DeliveryByName {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    msg_id: String,
    #[diesel(sql_type = BigInt)]
    batch_id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    job_id: Option<i64>,
    #[diesel(sql_type = Text)]
    #[diesel(column_name = "type")]
    event_type: String,
    #[diesel(sql_type = Text)]
    url: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Int4)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    next_attempt_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_attempt_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Int4>)]
    last_status_code: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    last_response: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    delivered_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    paused_at: Option<DateTime<Utc>>,
}

impl From<DeliveryByName> for Delivery {
    fn from(r: DeliveryByName) -> Delivery {
        Delivery {
            id: r.id,
            msg_id: r.msg_id,
            batch_id: r.batch_id,
            job_id: r.job_id,
            event_type: r.event_type,
            url: r.url,
            created_at: r.created_at,
            status: r.status,
            attempts: r.attempts,
            next_attempt_at: r.next_attempt_at,
            last_attempt_at: r.last_attempt_at,
            last_status_code: r.last_status_code,
            last_error: r.last_error,
            last_response: r.last_response,
            delivered_at: r.delivered_at,
            endpoint_paused: r.paused_at.is_some(),
        }
    }
}

impl Db {
    /// Replaces the webhook secret of the live key(s) with this id or name; the old secret
    /// keeps signing (as a second signature) for the configured grace. Returns each key's id
    /// and new secret.
    pub async fn rotate_webhook_secret(
        &self,
        id_or_name: &str,
    ) -> Result<Vec<(i64, String)>, DbError> {
        let target = id_or_name.to_owned();
        self.run(move |conn| {
            conn.transaction(|conn| {
                let ids: Vec<i64> = match target.parse::<i64>() {
                    Ok(id) => api_keys::table
                        .filter(api_keys::id.eq(id))
                        .filter(api_keys::revoked_at.is_null())
                        .select(api_keys::id)
                        .load(conn)?,
                    Err(_) => api_keys::table
                        .filter(api_keys::name.eq(&target))
                        .filter(api_keys::revoked_at.is_null())
                        .select(api_keys::id)
                        .load(conn)?,
                };
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let secret = new_webhook_secret();
                    diesel::update(api_keys::table.filter(api_keys::id.eq(id)))
                        .set((
                            api_keys::webhook_secret_previous
                                .eq(api_keys::webhook_secret.nullable()),
                            api_keys::webhook_secret.eq(&secret),
                            api_keys::webhook_secret_rotated_at.eq(diesel::dsl::now),
                        ))
                        .execute(conn)?;
                    out.push((id, secret));
                }
                Ok(out)
            })
        })
        .await
    }

    /// Claims up to `limit` due events for delivery: their next attempt moves `lease_ms`
    /// ahead (another replica, or this one after a crash, takes them again then) and their
    /// attempt count goes up. Events of a paused endpoint wait, except a client's redelivery.
    pub async fn claim_webhook_events(
        &self,
        limit: i64,
        lease_ms: u64,
        secret_grace_secs: u64,
    ) -> Result<Vec<DueEvent>, DbError> {
        self.run(move |conn| {
            Ok(diesel::sql_query(
                "UPDATE webhook_events AS e \
                 SET next_attempt_at = now() + $2 * interval '1 millisecond', \
                     attempts = e.attempts + 1, last_attempt_at = now() \
                 FROM api_keys AS k \
                 WHERE k.id = e.key_id AND e.id IN ( \
                   SELECT w.id FROM webhook_events w \
                   WHERE w.status = 'pending' AND w.next_attempt_at <= now() \
                     AND (w.manual OR NOT EXISTS (SELECT 1 FROM webhook_endpoints p \
                       WHERE p.owner = w.owner AND p.url = w.url AND p.paused_at IS NOT NULL)) \
                   ORDER BY w.next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 RETURNING e.id, e.msg_id, e.batch_id, e.job_id, e.owner, \
                   e.type AS event_type, e.url, e.created_at, e.attempts, e.manual, \
                   k.webhook_secret AS secret, \
                   CASE WHEN k.webhook_secret_rotated_at > now() - $3 * interval '1 second' \
                     THEN k.webhook_secret_previous END AS previous_secret",
            )
            .bind::<BigInt, _>(limit)
            .bind::<BigInt, _>(millis(lease_ms))
            .bind::<BigInt, _>(millis(secret_grace_secs))
            .load(&mut **conn)?)
        })
        .await
    }

    /// What the payloads of `events` show, read at delivery time (so media links are signed
    /// afresh): the batches of batch events and the jobs of job events.
    pub async fn webhook_data(
        &self,
        batch_ids: Vec<i64>,
        job_ids: Vec<i64>,
    ) -> Result<(HashMap<i64, BatchView>, HashMap<i64, JobView>), DbError> {
        self.run(move |conn| {
            let rows: Vec<BatchRow> = if batch_ids.is_empty() {
                Vec::new()
            } else {
                batches::table
                    .filter(batches::id.eq_any(&batch_ids))
                    .select(crate::batches::BATCH_COLUMNS)
                    .load(&mut **conn)?
            };
            let batches = batch_views(conn, rows)?
                .into_iter()
                .map(|b| (b.id, b))
                .collect();
            let jobs = if job_ids.is_empty() {
                HashMap::new()
            } else {
                jobs::table
                    .filter(jobs::id.eq_any(&job_ids))
                    .select(JobView::as_select())
                    .load::<JobView>(&mut **conn)?
                    .into_iter()
                    .map(|j| (j.id, j))
                    .collect()
            };
            Ok((batches, jobs))
        })
        .await
    }

    /// Records attempts in one transaction: delivered events are done and un-pause their
    /// endpoint; failed ones are due again after their delay, or fail (and pause their
    /// endpoint) when the schedule is used up.
    pub async fn record_webhook_attempts(&self, attempts: Vec<Attempt>) -> Result<(), DbError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::new();
        let mut statuses = Vec::new();
        let mut delays: Vec<Option<i64>> = Vec::new();
        let mut codes = Vec::new();
        let mut errors = Vec::new();
        let mut responses = Vec::new();
        for a in attempts {
            ids.push(a.id);
            let status = match (a.delivered, a.retry_in_ms) {
                (true, _) => "delivered",
                (false, Some(_)) => "pending",
                (false, None) => "failed",
            };
            statuses.push(status.to_owned());
            delays.push(a.retry_in_ms.map(millis));
            codes.push(a.status_code);
            errors.push(a.error.map(|e| volley_domain::text::clean_for_pg(&e)));
            responses.push(a.response.map(|r| volley_domain::text::clean_for_pg(&r)));
        }
        self.run(move |conn| {
            conn.transaction(|conn| {
                #[derive(QueryableByName)]
                struct Done {
                    #[diesel(sql_type = Text)]
                    owner: String,
                    #[diesel(sql_type = Text)]
                    url: String,
                    #[diesel(sql_type = Text)]
                    status: String,
                    #[diesel(sql_type = Bool)]
                    was_manual: bool,
                }
                let done: Vec<Done> = diesel::sql_query(
                    "UPDATE webhook_events AS e SET status = v.status, \
                       next_attempt_at = CASE WHEN v.status = 'pending' \
                         THEN now() + v.delay_ms * interval '1 millisecond' END, \
                       delivered_at = CASE WHEN v.status = 'delivered' THEN now() END, \
                       manual = false, last_status_code = v.code, last_error = v.error, \
                       last_response = v.response \
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::int[], \
                                 $5::text[], $6::text[]) \
                       AS v(id, status, delay_ms, code, error, response), \
                       (SELECT id, manual FROM webhook_events WHERE id = ANY($1)) AS o \
                     WHERE e.id = v.id AND o.id = v.id \
                     RETURNING e.owner, e.url, e.status, o.manual AS was_manual",
                )
                .bind::<Array<BigInt>, _>(&ids)
                .bind::<Array<Text>, _>(&statuses)
                .bind::<Array<Nullable<BigInt>>, _>(&delays)
                .bind::<Array<Nullable<Int4>>, _>(&codes)
                .bind::<Array<Nullable<Text>>, _>(&errors)
                .bind::<Array<Nullable<Text>>, _>(&responses)
                .load(conn)?;
                for d in done {
                    if d.status == "delivered" {
                        diesel::sql_query(
                            "DELETE FROM webhook_endpoints WHERE owner = $1 AND url = $2",
                        )
                        .bind::<Text, _>(&d.owner)
                        .bind::<Text, _>(&d.url)
                        .execute(conn)?;
                    } else if d.status == "failed" && !d.was_manual {
                        diesel::sql_query(
                            "INSERT INTO webhook_endpoints (owner, url, paused_at, paused_reason) \
                             VALUES ($1, $2, now(), 'an event used up its retries') \
                             ON CONFLICT (owner, url) DO UPDATE \
                               SET paused_at = now(), paused_reason = EXCLUDED.paused_reason",
                        )
                        .bind::<Text, _>(&d.owner)
                        .bind::<Text, _>(&d.url)
                        .execute(conn)?;
                    }
                }
                Ok(())
            })
        })
        .await
    }

    /// A batch's webhook events, oldest first; `None` if `owner` has no such batch.
    pub async fn webhook_deliveries(
        &self,
        owner: &str,
        batch_id: i64,
    ) -> Result<Option<Vec<Delivery>>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let mine = batches::table
                .filter(batches::id.eq(batch_id))
                .filter(batches::owner.eq(&owner))
                .select(batches::id)
                .first::<i64>(&mut **conn)
                .optional()?;
            if mine.is_none() {
                return Ok(None);
            }
            let rows: Vec<DeliveryByName> = diesel::sql_query(format!(
                "{DELIVERY_SQL} WHERE e.batch_id = $1 ORDER BY e.id"
            ))
            .bind::<BigInt, _>(batch_id)
            .load(&mut **conn)?;
            Ok(Some(rows.into_iter().map(Delivery::from).collect()))
        })
        .await
    }

    /// Makes one of `owner`'s events due now for one more attempt (same `webhook-id`), even
    /// to a paused endpoint; `None` if there is no such event.
    pub async fn retry_webhook_delivery(
        &self,
        owner: &str,
        id: i64,
    ) -> Result<Option<Delivery>, DbError> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let n = diesel::sql_query(
                "UPDATE webhook_events SET status = 'pending', manual = true, \
                   next_attempt_at = now(), delivered_at = NULL \
                 WHERE id = $1 AND owner = $2",
            )
            .bind::<BigInt, _>(id)
            .bind::<Text, _>(&owner)
            .execute(&mut **conn)?;
            if n == 0 {
                return Ok(None);
            }
            let row: DeliveryByName = diesel::sql_query(format!("{DELIVERY_SQL} WHERE e.id = $1"))
                .bind::<BigInt, _>(id)
                .get_result(&mut **conn)?;
            Ok(Some(row.into()))
        })
        .await
    }

    /// Counts for the operator: what waits, what is due, what failed, paused endpoints.
    pub async fn webhook_backlog(&self) -> Result<Backlog, DbError> {
        self.run(|conn| {
            Ok(diesel::sql_query(
                "SELECT \
                   (SELECT count(*) FROM webhook_events WHERE status = 'pending') AS pending, \
                   (SELECT count(*) FROM webhook_events \
                     WHERE status = 'pending' AND next_attempt_at <= now()) AS due, \
                   (SELECT count(*) FROM webhook_events WHERE status = 'failed') AS failed, \
                   (SELECT count(*) FROM webhook_endpoints WHERE paused_at IS NOT NULL) \
                     AS paused_endpoints, \
                   COALESCE((SELECT EXTRACT(EPOCH FROM now() - min(next_attempt_at))::bigint \
                     FROM webhook_events \
                     WHERE status = 'pending' AND next_attempt_at <= now()), 0) \
                     AS oldest_due_secs",
            )
            .get_result(&mut **conn)?)
        })
        .await
    }
}
