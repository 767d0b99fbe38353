//! What live progress reads: a batch's jobs for its event streams, the `LISTEN` connection that
//! wakes those streams when batch-state commits changes, and the aggregate behind completion
//! estimates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel::{Connection, PgConnection};

use crate::schema::jobs;
use crate::{Db, DbError};

/// The channel batch-state notifies after it commits job state changes; the payload is the
/// changed batches' ids, comma-separated, or [`ALL_BATCHES`] when they would not fit.
pub(crate) const BATCH_CHANNEL: &str = "volley_batches";

/// The payload that stands for "any batch may have changed".
pub(crate) const ALL_BATCHES: &str = "*";

/// PostgreSQL refuses a payload of 8000 bytes or more; past this, [`ALL_BATCHES`] is sent.
pub(crate) const MAX_PAYLOAD: i32 = 7_000;

/// One job of a batch, as its event stream sees it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct StreamJob {
    pub id: i64,
    pub status: String,
    pub custom_id: Option<String>,
}

impl Db {
    /// A batch's jobs in job order (ids ascending), for its event stream: at most 256 rows
    /// through `jobs_by_batch`. The caller has checked the batch's owner.
    pub async fn stream_jobs(&self, batch_id: i64) -> Result<Vec<StreamJob>, DbError> {
        self.run(move |conn| {
            Ok(jobs::table
                .filter(jobs::batch_id.eq(batch_id))
                .order(jobs::id)
                .select((jobs::id, jobs::status, jobs::custom_id))
                .load(&mut **conn)?)
        })
        .await
    }

    /// What completion estimates need, in one round trip each (see [`EtaInputs`]).
    pub async fn eta_inputs(
        &self,
        window_secs: u64,
        sample: i64,
        max_backlog_rows: i64,
    ) -> Result<EtaInputs, DbError> {
        self.run(move |conn| {
            let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
            let types: Vec<&str> = volley_domain::InferenceType::ALL
                .iter()
                .map(|t| t.as_str())
                .collect();
            // The newest `sample` finishes of each type within the window, through
            // `jobs_finished` (a bounded walk of its newest entries per type).
            let throughput: Vec<Throughput> = diesel::sql_query(
                "SELECT t.inference_type, count(f.finished_at) AS finished, \
                   min(f.finished_at) AS oldest \
                 FROM unnest($1::text[]) AS t(inference_type) \
                 LEFT JOIN LATERAL ( \
                   SELECT finished_at FROM jobs \
                   WHERE jobs.inference_type = t.inference_type \
                     AND status IN ('PROCESSED', 'FAILED') \
                     AND finished_at > now() - $2 * interval '1 second' \
                   ORDER BY finished_at DESC LIMIT $3) f ON true \
                 GROUP BY t.inference_type",
            )
            .bind::<Array<Text>, _>(&types)
            .bind::<BigInt, _>(window)
            .bind::<BigInt, _>(sample)
            .load(&mut **conn)?;
            // Unfinished jobs per type and batch, oldest batches first, through
            // `jobs_unfinished`: as many rows as batches with unfinished jobs (capped).
            let backlog: Vec<Backlog> = diesel::sql_query(
                "SELECT inference_type, batch_id, count(*) AS unfinished FROM jobs \
                 WHERE status IN ('QUEUED', 'PROCESSING') \
                 GROUP BY inference_type, batch_id ORDER BY batch_id LIMIT $1",
            )
            .bind::<BigInt, _>(max_backlog_rows)
            .load(&mut **conn)?;
            let now: DateTime<Utc> =
                diesel::select(diesel::dsl::sql::<Timestamptz>("now()")).get_result(&mut **conn)?;
            let truncated = backlog.len() as i64 >= max_backlog_rows;
            Ok(EtaInputs {
                now,
                throughput,
                backlog,
                truncated,
            })
        })
        .await
    }
}

/// Recent finishes of one inference type.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Throughput {
    #[diesel(sql_type = Text)]
    pub inference_type: String,
    /// Jobs finished (PROCESSED or FAILED) within the window, at most the sample size.
    #[diesel(sql_type = BigInt)]
    pub finished: i64,
    /// The oldest of them.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub oldest: Option<DateTime<Utc>>,
}

/// Unfinished jobs of one inference type in one batch.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Backlog {
    #[diesel(sql_type = Text)]
    pub inference_type: String,
    #[diesel(sql_type = BigInt)]
    pub batch_id: i64,
    #[diesel(sql_type = BigInt)]
    pub unfinished: i64,
}

/// What completion estimates are computed from: throughput per inference type and the
/// unfinished work per type and batch, in batch order.
#[derive(Debug, Clone)]
pub struct EtaInputs {
    /// The database's clock when read.
    pub now: DateTime<Utc>,
    pub throughput: Vec<Throughput>,
    pub backlog: Vec<Backlog>,
    /// The backlog was cut at the row cap: batches after its last one are not covered.
    pub truncated: bool,
}

/// `NOTIFY` the batch channel about `ids`, on a connection (inside the caller's transaction,
/// it is delivered at commit).
pub(crate) fn notify_on(conn: &mut PgConnection, ids: &[i64]) -> Result<(), DbError> {
    let mut payload = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    if payload.len() > MAX_PAYLOAD as usize {
        payload = ALL_BATCHES.to_owned();
    }
    diesel::sql_query("SELECT pg_notify($1, $2)")
        .bind::<Text, _>(BATCH_CHANNEL)
        .bind::<Text, _>(&payload)
        .execute(conn)?;
    Ok(())
}

/// What a notification says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    Batches(Vec<i64>),
    /// Anything may have changed: notifications may have been missed (the listener
    /// (re)connected) or the payload said so.
    All,
}

/// Parses a notification's payload; anything unexpected counts as [`Changed::All`].
fn parse_payload(payload: &str) -> Changed {
    let ids: Result<Vec<i64>, _> = payload.split(',').map(|s| s.trim().parse()).collect();
    match ids {
        Ok(ids) if payload != ALL_BATCHES => Changed::Batches(ids),
        _ => Changed::All,
    }
}

/// How the listener polls its connection: notifications are read without blocking this often.
const POLL: Duration = Duration::from_millis(100);
/// A round trip on the listening connection this often, to find a connection that died
/// without a goodbye (a network partition) sooner than TCP would.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// A running `LISTEN` on its own connection and thread; see [`listen`].
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Stops listening and waits for the thread (at most one poll interval).
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Listens on `BATCH_CHANNEL` on a connection of its own (not the pool's: a pooled
/// connection would hand notifications to whoever borrowed it) and calls `on_change` with
/// what each notification says. After every (re)connection it calls `on_change(Changed::All)`,
/// since notifications sent meanwhile are lost. libpq reads notifications without blocking;
/// a dedicated thread polls every 100 ms, which costs a system call, not a round trip.
pub fn listen(
    url: String,
    on_change: impl Fn(Changed) + Send + 'static,
) -> std::io::Result<Listener> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("volley-listen".into())
        .spawn(move || listen_loop(&url, &flag, &on_change))?;
    Ok(Listener {
        stop,
        thread: Some(thread),
    })
}

fn listen_loop(url: &str, stop: &AtomicBool, on_change: &dyn Fn(Changed)) {
    let mut backoff = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match PgConnection::establish(url).and_then(|mut c| {
            diesel::sql_query(format!("LISTEN {BATCH_CHANNEL}"))
                .execute(&mut c)
                .map(|_| c)
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for batch changes; retrying");
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        on_change(Changed::All);
        let mut last_keepalive = Instant::now();
        'conn: while !stop.load(Ordering::Relaxed) {
            for n in conn.notifications_iter() {
                match n {
                    Ok(n) => on_change(parse_payload(&n.payload)),
                    Err(e) => {
                        tracing::warn!(error = %e, "the LISTEN connection failed; reconnecting");
                        break 'conn;
                    }
                }
            }
            if last_keepalive.elapsed() >= KEEPALIVE {
                if let Err(e) = diesel::sql_query("SELECT 1").execute(&mut conn) {
                    tracing::warn!(error = %e, "the LISTEN connection failed; reconnecting");
                    break 'conn;
                }
                last_keepalive = Instant::now();
            }
            sleep_unless_stopped(POLL, stop);
        }
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(parse_payload("7"), Changed::Batches(vec![7]));
        assert_eq!(parse_payload("7,12"), Changed::Batches(vec![7, 12]));
        assert_eq!(parse_payload("*"), Changed::All);
        assert_eq!(parse_payload(""), Changed::All);
        assert_eq!(parse_payload("7,x"), Changed::All);
    }
}
