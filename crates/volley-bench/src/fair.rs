//! The fair-share scenario: tenant A queues many slow jobs, then tenant B submits one batch of
//! 256. B's time to start and to finish, and A's throughput, with fair dispatch off (one FIFO
//! queue per modality) and on, against B alone on an idle stack, each on a fresh stack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use volley_db::Db;
use volley_db::testing::TestDatabase;

use crate::stack::{Stack, StackOptions};

/// What one run measured.
pub struct Run {
    /// B's jobs, acceptance to claim, sorted (ms).
    pub b_start_ms: Vec<f64>,
    /// B's first acceptance to its last job's end (ms).
    pub b_done_ms: f64,
    /// A's jobs per second, first acceptance to last end.
    pub a_per_sec: Option<f64>,
    /// All jobs (A's and B's) per second, first acceptance to last end.
    pub all_per_sec: f64,
    /// CPU seconds each service, the broker and the database used over the run.
    pub cpu_secs: Vec<(String, f64)>,
}

/// Makes the body of batch `b` with `n` items.
pub type Make = Arc<dyn Fn(usize, usize) -> Value + Send + Sync>;

/// Submits `jobs` jobs as 256-item batches from `clients` concurrent clients.
async fn submit(
    gateway: &str,
    key: &str,
    jobs: usize,
    clients: usize,
    make: &Make,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let batches = jobs.div_ceil(256);
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (http, next, url, key, make) = (
                http.clone(),
                next.clone(),
                gateway.to_owned(),
                key.to_owned(),
                make.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok::<_, anyhow::Error>(());
                    }
                    crate::post_batch(&http, &url, &key, &make(b, 256.min(jobs - b * 256))).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[derive(diesel::QueryableByName)]
struct Ms {
    #[diesel(sql_type = diesel::sql_types::Double)]
    ms: f64,
}

/// Milliseconds per row of `sql` (one float8 column `ms`).
async fn millis(db: &Db, sql: &'static str) -> anyhow::Result<Vec<f64>> {
    Ok(db
        .run(move |c| {
            use diesel::RunQueryDsl;
            let rows: Vec<Ms> = diesel::sql_query(sql).load(&mut **c)?;
            Ok(rows.into_iter().map(|r| r.ms).collect())
        })
        .await?)
}

/// One run on a fresh stack and database: A's `a_jobs` (0: none), then B's 256.
pub async fn run(
    opts: &StackOptions,
    a_jobs: usize,
    clients: usize,
    make: &Make,
) -> anyhow::Result<Run> {
    let (tdb, db) = TestDatabase::create().await?;
    let opts = StackOptions {
        database_url: tdb.url.clone(),
        ..opts.clone()
    };
    let a = db.create_key("tenant-a", None).await?.secret;
    let b = db.create_key("tenant-b", None).await?.secret;
    let stack = Stack::start(&opts).await?;
    let servers_before = crate::server_processes();
    let r = async {
        if a_jobs > 0 {
            submit(&stack.gateway, &a, a_jobs, clients, make).await?;
        }
        submit(&stack.gateway, &b, 256, 1, make).await?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        while crate::any_unfinished(&db).await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "jobs unfinished after 30 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut b_start_ms = millis(
            &db,
            "SELECT EXTRACT(EPOCH FROM (started_at - created_at))::float8 * 1000 AS ms \
             FROM jobs WHERE owner = 'tenant-b'",
        )
        .await?;
        b_start_ms.sort_by(f64::total_cmp);
        let b_done_ms = millis(
            &db,
            "SELECT EXTRACT(EPOCH FROM (max(finished_at) - min(created_at)))::float8 * 1000 \
             AS ms FROM jobs WHERE owner = 'tenant-b'",
        )
        .await?
        .first()
        .copied()
        .unwrap_or(f64::NAN);
        let a_per_sec = if a_jobs > 0 {
            millis(
                &db,
                "SELECT count(*)::float8 * 1000 / \
                   (EXTRACT(EPOCH FROM (max(finished_at) - min(created_at)))::float8 * 1000) \
                   AS ms FROM jobs WHERE owner = 'tenant-a'",
            )
            .await?
            .first()
            .copied()
        } else {
            None
        };
        let all_per_sec = millis(
            &db,
            "SELECT count(*)::float8 * 1000 / \
               (EXTRACT(EPOCH FROM (max(finished_at) - min(created_at)))::float8 * 1000) \
               AS ms FROM jobs",
        )
        .await?
        .first()
        .copied()
        .unwrap_or(f64::NAN);
        let (beam, pg) = crate::server_cpu_since(&servers_before);
        let mut cpu_secs: Vec<(String, f64)> = stack
            .usage()
            .into_iter()
            .map(|(name, u)| (name, u.cpu_secs))
            .collect();
        cpu_secs.push(("rabbitmq".into(), beam));
        cpu_secs.push(("postgres".into(), pg));
        Ok(Run {
            b_start_ms,
            b_done_ms,
            a_per_sec,
            all_per_sec,
            cpu_secs,
        })
    }
    .await;
    let prefix = stack.prefix.clone();
    stack.stop();
    crate::delete_queues(&opts.amqp_url, &prefix).await;
    drop(db);
    drop(tdb);
    r
}
