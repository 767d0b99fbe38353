//! `volley-bench`: measures Volley end to end on this machine against the machine's own
//! ceiling, in the same run. Run it with `make bench` (release build); not part of `make test`.

mod ceiling;
mod fair;
mod stack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use volley_db::Db;
use volley_db::testing::TestDatabase;

use stack::{Stack, StackOptions, Usage};

#[derive(Parser)]
#[command(
    name = "volley-bench",
    about = "Benchmark Volley against this machine's ceiling"
)]
struct Cli {
    /// Jobs in the throughput scenario (rounded up to whole 256-item batches).
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Jobs each worker runs at once in the throughput scenario (media jobs wait on polls and
    /// downloads, so more than cores).
    #[arg(long, default_value_t = 256)]
    worker_concurrency: u16,
    /// Seconds of the steady-load latency phase.
    #[arg(long, default_value_t = 20.0)]
    paced_secs: f64,
    /// Jobs in the slow-job scenario, in 256-item batches and one smaller last batch (0 skips
    /// it).
    #[arg(long, default_value_t = 20_000)]
    slow_jobs: usize,
    /// Simulator latency in the slow-job scenario.
    #[arg(long, default_value_t = 2_000)]
    slow_latency_ms: u64,
    /// Provider and worker concurrency in the slow-job scenario.
    #[arg(long, default_value_t = 2_000)]
    slow_concurrency: usize,
    /// Tenant A's jobs in the fair-share scenario (slow jobs, as above), before tenant B's
    /// 256 (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    fair_jobs: usize,
    /// The fair-share scenario again with each job's latency spread evenly over the slow
    /// latency ± this (0 skips it). Real providers' latencies vary; with one fixed latency
    /// the slots turn over in waves, and a job pushed out of one wave waits a whole latency.
    #[arg(long, default_value_t = 500)]
    fair_latency_spread_ms: u64,
    #[arg(
        long,
        env = "VOLLEY_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The configuration the stack runs with (its providers are pointed at the simulator).
    #[arg(long, default_value = "config/volley.toml")]
    config: PathBuf,
    /// Where the local media store goes. By default a memory file system (/dev/shm) where
    /// there is one, standing in for the object store a cluster uses: on a local disk,
    /// creating a file per media job measures the file system (after a run deletes its
    /// files, ext4 scans its recently freed inodes on every create), not Volley.
    #[arg(long)]
    media_dir: Option<PathBuf>,
}

/// The media store's folder: `--media-dir`, else /dev/shm if it is there, else the temp dir.
fn media_root(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

fn mixed_batch(b: usize, items: usize) -> Value {
    let requests: Vec<Value> = (0..items)
        .map(|i| {
            let n = b * 256 + i;
            match i % 6 {
                0 => json!({"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "user", "content": format!("Describe lamp {n}.")}]}}),
                1 => json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": format!("Once upon a time {n}")}}),
                2 => json!({"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": format!("a desk lamp {n}")}}),
                3 => json!({"endpoint": "/v1/videos/generations", "body": {"model": "sim-video", "prompt": format!("waves {n}")}}),
                4 => json!({"endpoint": "/v1/music/generations", "body": {"model": "sim-music", "prompt": format!("jazz {n}")}}),
                _ => json!({"endpoint": "/v1/audio/speech", "body": {"model": "tts-1", "input": format!("Hello number {n}"), "voice": "alloy"}}),
            }
        })
        .collect();
    json!({"label": format!("bench {b}"), "requests": requests})
}

fn llm_batch(b: usize, items: usize) -> Value {
    let requests: Vec<Value> = (0..items)
        .map(|i| json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": format!("slow {b}-{i}")}}))
        .collect();
    json!({"requests": requests})
}

/// [`llm_batch`] with each job's simulated latency spread evenly over `mean ± spread` ms
/// (the same for the same batch and item, so runs compare).
fn spread_llm_batch(b: usize, items: usize, mean: u64, spread: u64) -> Value {
    let mut body = llm_batch(b, items);
    if let Some(requests) = body["requests"].as_array_mut() {
        for (i, r) in requests.iter_mut().enumerate() {
            // A multiplicative hash walks the range evenly without a random generator.
            let step = ((b * 256 + i) as u64).wrapping_mul(2_654_435_761) % (2 * spread + 1);
            r["body"]["sim_latency_ms"] = json!(mean.saturating_sub(spread) + step);
        }
    }
    body
}

struct LoadReport {
    jobs: usize,
    submit_secs: f64,
    total_secs: f64,
    submit_ms: Vec<f64>,
    get_ms: Vec<f64>,
    job_ms: Vec<f64>,
}

/// The server's WAL position in bytes: the write volume between two readings, which unlike CPU
/// time does not depend on what else the machine is doing. Cluster-wide, so it counts
/// whatever else writes meanwhile, and full-page images after each checkpoint.
async fn wal_bytes(db: &Db) -> anyhow::Result<i64> {
    Ok(db
        .run(|c| {
            use diesel::RunQueryDsl;
            Ok(
                diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "(pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
                ))
                .get_result(&mut **c)?,
            )
        })
        .await?)
}

/// Whether any job is still QUEUED or PROCESSING. `EXISTS` stops at the first one, so
/// polling it costs the database little while the load runs.
async fn any_unfinished(db: &Db) -> anyhow::Result<bool> {
    Ok(db
        .run(|c| {
            use diesel::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct Any {
                #[diesel(sql_type = diesel::sql_types::Bool)]
                any: bool,
            }
            let r: Any = diesel::sql_query(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE status IN ('QUEUED', 'PROCESSING')) AS any",
            )
            .get_result(&mut **c)?;
            Ok(r.any)
        })
        .await?)
}

async fn job_latencies(db: &Db) -> anyhow::Result<(Vec<f64>, i64)> {
    db.run(|c| {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct L {
            #[diesel(sql_type = diesel::sql_types::Double)]
            ms: f64,
            #[diesel(sql_type = diesel::sql_types::Text)]
            status: String,
        }
        let rows: Vec<L> = diesel::sql_query(
            "SELECT EXTRACT(EPOCH FROM (finished_at - created_at))::float8 * 1000 AS ms, status \
             FROM jobs WHERE owner = 'bench'",
        )
        .load(&mut **c)?;
        let not_processed = rows.iter().filter(|r| r.status != "PROCESSED").count() as i64;
        let mut ms: Vec<f64> = rows.into_iter().map(|r| r.ms).collect();
        ms.sort_by(f64::total_cmp);
        Ok((ms, not_processed))
    })
    .await
    .map_err(Into::into)
}

/// Latencies measured under the steady load, each sorted, in milliseconds.
struct Paced {
    submit: Vec<f64>,
    get: Vec<f64>,
    /// `GET /healthz` on the same gateway at the same rate as the batch reads: a request that
    /// touches no database, so the machine's own floor for any request under this load.
    floor: Vec<f64>,
}

fn sorted(v: Arc<Mutex<Vec<f64>>>) -> Vec<f64> {
    let mut v = Arc::try_unwrap(v)
        .map(|m| m.into_inner())
        .unwrap_or_default();
    v.sort_by(f64::total_cmp);
    v
}

/// Submits batches at a steady rate (open loop) for `secs`, measuring each submit and the
/// latency of batch reads meanwhile: the latency a client sees while the system is busy but
/// not saturated by the measuring clients themselves.
async fn paced(gateway: &str, key: &str, jobs_per_sec: f64, secs: f64) -> anyhow::Result<Paced> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let every = Duration::from_secs_f64(256.0 / jobs_per_sec.max(1.0));
    let n = ((secs / every.as_secs_f64()).ceil() as usize).max(10);
    let submit = Arc::new(Mutex::new(Vec::new()));
    let gets = Arc::new(Mutex::new(Vec::new()));
    let floor = {
        // Five reads per batch below, so the probe runs at five per batch interval too.
        let (http, url) = (http.clone(), format!("{gateway}/healthz"));
        let mut tick = tokio::time::interval(every / 5);
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n * 5);
            for _ in 0..n * 5 {
                tick.tick().await;
                let t = Instant::now();
                if let Ok(r) = http.get(&url).send().await
                    && r.status().is_success()
                    && r.bytes().await.is_ok()
                {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            lat.sort_by(f64::total_cmp);
            lat
        })
    };
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(every);
    for b in 0..n {
        tick.tick().await;
        let (http, submit, gets, url, key) = (
            http.clone(),
            submit.clone(),
            gets.clone(),
            gateway.to_owned(),
            key.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&mixed_batch(1_000_000 + b, 256))?;
            let t = Instant::now();
            let r = http
                .post(format!("{url}/v1/batches"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let v: Value = r.json().await?;
            submit.lock().await.push(t.elapsed().as_secs_f64() * 1000.0);
            let id = v["id"].as_str().unwrap_or_default().to_owned();
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let t = Instant::now();
                let r = http
                    .get(format!("{url}/v1/batches/{id}"))
                    .bearer_auth(&key)
                    .send()
                    .await?;
                if r.status().is_success() && r.bytes().await.is_ok() {
                    gets.lock().await.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Paced {
        submit: sorted(submit),
        get: sorted(gets),
        floor: floor.await?,
    })
}

/// CPU seconds used so far by the broker and the database server (their processes alive now).
fn server_cpu() -> (f64, f64) {
    server_processes()
        .values()
        .fold((0.0, 0.0), |(beam, pg), (is_pg, cpu)| {
            if *is_pg {
                (beam, pg + cpu)
            } else {
                (beam + cpu, pg)
            }
        })
}

/// The broker's and the database server's processes alive now: pid -> (is PostgreSQL, CPU s).
fn server_processes() -> HashMap<u32, (bool, f64)> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let is_pg = match comm.trim() {
                "beam.smp" => false,
                "postgres" => true,
                _ => continue,
            };
            out.insert(pid, (is_pg, stack::proc_usage(pid).cpu_secs));
        }
    }
    out
}

/// CPU seconds the broker and the database used since `before`, counting only processes
/// alive now (a database backend that exits takes its time with it; one that started since
/// counts whole).
fn server_cpu_since(before: &HashMap<u32, (bool, f64)>) -> (f64, f64) {
    server_processes()
        .into_iter()
        .fold((0.0, 0.0), |(beam, pg), (pid, (is_pg, cpu))| {
            let d = cpu - before.get(&pid).map_or(0.0, |b| b.1);
            if is_pg {
                (beam, pg + d)
            } else {
                (beam + d, pg)
            }
        })
}

/// Submits one batch as `key`: the accepted batch object and how long the request took
/// (ms). Anything but 202 is an error.
async fn post_batch(
    http: &reqwest::Client,
    gateway: &str,
    key: &str,
    body: &Value,
) -> anyhow::Result<(Value, f64)> {
    let body = serde_json::to_vec(body)?;
    let t = Instant::now();
    let r = http
        .post(format!("{gateway}/v1/batches"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = r.status();
    let bytes = r.bytes().await?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if status.as_u16() != 202 {
        anyhow::bail!(
            "batch refused: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok((serde_json::from_slice(&bytes)?, ms))
}

async fn run_load(
    gateway: &str,
    key: &str,
    db: &Db,
    jobs: usize,
    clients: usize,
    make: fn(usize, usize) -> Value,
) -> anyhow::Result<LoadReport> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let ids: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let submit_ms = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(AtomicBool::new(true));
    let batches = jobs.div_ceil(256);
    let start = Instant::now();

    // A reader polls batches while the load runs, as a client watching progress would.
    let poller = {
        let (http, ids, running, url, key) = (
            http.clone(),
            ids.clone(),
            running.clone(),
            gateway.to_owned(),
            key.to_owned(),
        );
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0usize;
            while running.load(Ordering::Relaxed) {
                let id = {
                    let ids = ids.lock().await;
                    if ids.is_empty() {
                        None
                    } else {
                        Some(ids[i % ids.len()].clone())
                    }
                };
                i += 7;
                if let Some(id) = id {
                    let t = Instant::now();
                    if let Ok(r) = http
                        .get(format!("{url}/v1/batches/{id}"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        && r.status().is_success()
                        && r.bytes().await.is_ok()
                    {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lat
        })
    };

    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, next, ids, submit_ms, url, key) = (
                http.clone(),
                next.clone(),
                ids.clone(),
                submit_ms.clone(),
                gateway.to_owned(),
                key.to_owned(),
            );
            tokio::spawn(async move {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let (v, ms) =
                        post_batch(&http, &url, &key, &make(b, 256.min(jobs - b * 256))).await?;
                    submit_ms.lock().await.push(ms);
                    ids.lock()
                        .await
                        .push(v["id"].as_str().unwrap_or_default().to_owned());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let submit_secs = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while any_unfinished(db).await? {
        if Instant::now() > deadline {
            anyhow::bail!("jobs still unfinished after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total_secs = start.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    let mut get_ms = poller.await?;
    get_ms.sort_by(f64::total_cmp);
    let submit_ms = sorted(submit_ms);
    let (job_ms, not_processed) = job_latencies(db).await?;
    if not_processed > 0 {
        eprintln!("warning: {not_processed} jobs did not end PROCESSED");
    }
    Ok(LoadReport {
        jobs,
        submit_secs,
        total_secs,
        submit_ms,
        get_ms,
        job_ms,
    })
}

/// Removes a finished stack's queues and exchanges from the broker.
async fn delete_queues(amqp_url: &str, prefix: &str) {
    if let Ok(conn) = volley_amqp::connect(amqp_url, "volley-bench-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = volley_amqp::delete_topology(&ch, &volley_amqp::Names::new(prefix)).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

fn cpu_per_1000(
    before: &[(String, Usage)],
    after: &[(String, Usage)],
    jobs: usize,
) -> Vec<(String, f64, u64)> {
    before
        .iter()
        .zip(after)
        .map(|((name, b), (_, a))| {
            (
                name.clone(),
                (a.cpu_secs - b.cpu_secs) * 1000.0 / jobs as f64,
                a.peak_rss_kb,
            )
        })
        .collect()
}

async fn fresh_db() -> anyhow::Result<(TestDatabase, Db, String)> {
    let (t, db) = TestDatabase::create().await?;
    let key = db.create_key("bench", None).await?.secret;
    Ok((t, db, key))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("cannot find the binaries' directory"))?;
    let batches = cli.jobs.div_ceil(256);
    let media = media_root(cli.media_dir.clone());
    println!(
        "volley-bench: release build, {} cores; throughput scenario {} jobs ({} batches of 256, six endpoints mixed), {} clients, simulator latency 0; media store: local folder in {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        batches * 256,
        batches,
        cli.clients,
        media.display()
    );

    // Scenario 1: throughput, with the ceiling measured in the same run.
    let (tdb, db, key) = fresh_db().await?;
    let opts = StackOptions {
        database_url: tdb.url.clone(),
        amqp_url: cli.amqp_url.clone(),
        sim_latency_ms: 0,
        worker_concurrency: cli.worker_concurrency,
        bin_dir: bin_dir.clone(),
        config: cli.config.clone(),
        media_root: media.clone(),
        fair: true,
    };
    let stack = Stack::start(&opts).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = stack.usage();
    let before = stack.usage();
    let servers_before = server_cpu();
    let wal_before = wal_bytes(&db).await?;
    let load = run_load(
        &stack.gateway,
        &key,
        &db,
        batches * 256,
        cli.clients,
        mixed_batch,
    )
    .await?;
    let after = stack.usage();
    let servers_after = server_cpu();
    let wal_after = wal_bytes(&db).await?;
    // Latency under a steady load of half the throughput just measured.
    let steady = load.jobs as f64 / load.total_secs * 0.5;
    let steady_lat = paced(&stack.gateway, &key, steady, cli.paced_secs).await?;
    let prefix = stack.prefix.clone();
    stack.stop();
    delete_queues(&cli.amqp_url, &prefix).await;
    drop(db);
    drop(tdb);

    let (ctdb, cdb) = TestDatabase::create().await?;
    let sample = volley_proto::JobMessage {
        job_id: 1_000_000,
        batch_id: 10_000,
        inference_type: "LLM".into(),
        endpoint: "/v1/chat/completions".into(),
        model: "qwen3-8b".into(),
        body_json:
            br#"{"model":"qwen3-8b","messages":[{"role":"user","content":"Describe lamp 12345."}]}"#
                .to_vec(),
        accepted_at_ms: 1_795_000_000_000,
    };
    let job_len = prost::Message::encoded_len(&sample);
    let (servers_c0, own_c0) = (server_cpu(), stack::proc_usage(std::process::id()).cpu_secs);
    let wal_c0 = wal_bytes(&cdb).await?;
    let ceiling = ceiling::measure(&cdb, &cli.amqp_url, load.jobs, job_len, 300).await?;
    let (servers_c1, own_c1) = (server_cpu(), stack::proc_usage(std::process::id()).cpu_secs);
    let wal_c1 = wal_bytes(&cdb).await?;
    drop(cdb);
    drop(ctdb);

    let accepted = load.jobs as f64 / load.submit_secs;
    let completed = load.jobs as f64 / load.total_secs;
    let ratio = completed / ceiling.jobs_per_sec();
    println!();
    println!("== throughput ({} jobs) ==", load.jobs);
    println!("jobs accepted          {accepted:>9.0} jobs/s");
    println!(
        "jobs completed         {completed:>9.0} jobs/s end to end (first submit to last job terminal)"
    );
    println!(
        "ceiling                {:>9.0} jobs/s  (RabbitMQ: 2 messages/job, confirms + acks, quorum queue: {:.1} s; PostgreSQL: insert + claim + outcome, batched: {:.1} s; run together)",
        ceiling.jobs_per_sec(),
        ceiling.amqp_secs,
        ceiling.pg_secs
    );
    println!(
        "volley / ceiling       {:>9.0} %       target >= 50 %           {}",
        ratio * 100.0,
        verdict(ratio >= 0.5)
    );
    println!(
        "job latency p50 / p99  {:>6.0} / {:.0} ms   (accept to terminal)",
        pct(&load.job_ms, 0.5),
        pct(&load.job_ms, 0.99)
    );
    println!(
        "  during the burst ({} closed-loop clients): submit p50/p99 {:.1} / {:.1} ms, GET batch p50/p99 {:.2} / {:.2} ms",
        cli.clients,
        pct(&load.submit_ms, 0.5),
        pct(&load.submit_ms, 0.99),
        pct(&load.get_ms, 0.5),
        pct(&load.get_ms, 0.99)
    );
    println!(
        "under a steady load of {steady:.0} jobs/s (half the measured throughput) for {:.0} s:",
        cli.paced_secs
    );
    let (s50, s99) = (pct(&steady_lat.submit, 0.5), pct(&steady_lat.submit, 0.99));
    println!(
        "submit 256 p50 / p99   {s50:>6.1} / {s99:.1} ms   target < 25 / 60 ms      {}   ({} batches)",
        verdict(s50 < 25.0 && s99 < 60.0),
        steady_lat.submit.len()
    );
    let (g50, g99) = (pct(&steady_lat.get, 0.5), pct(&steady_lat.get, 0.99));
    println!(
        "GET batch p50 / p99    {g50:>6.2} / {g99:.2} ms   target p99 < 5 ms        {}   ({} samples; p90 {:.2}, max {:.2} ms)",
        verdict(g99 < 5.0),
        steady_lat.get.len(),
        pct(&steady_lat.get, 0.9),
        pct(&steady_lat.get, 1.0)
    );
    println!(
        "  floor: GET /healthz   {:>6.2} / {:.2} ms   (same gateway, load and rate, no database: what any request waits for on this machine)",
        pct(&steady_lat.floor, 0.5),
        pct(&steady_lat.floor, 0.99)
    );
    // Where the CPU goes, against the ceiling's own: the gap in the ratio, part by part.
    let per_1000 = |secs: f64| secs * 1000.0 / load.jobs as f64;
    let (rabbit, pg) = (
        per_1000(servers_after.0 - servers_before.0),
        per_1000(servers_after.1 - servers_before.1),
    );
    let services = cpu_per_1000(&before, &after, load.jobs);
    let own: f64 = services.iter().map(|(_, cpu, _)| cpu).sum();
    let (c_rabbit, c_pg, c_client) = (
        per_1000(servers_c1.0 - servers_c0.0),
        per_1000(servers_c1.1 - servers_c0.1),
        per_1000(own_c1 - own_c0),
    );
    println!(
        "cpu s/1000 jobs        Volley {:.2} (RabbitMQ {rabbit:.2}, PostgreSQL {pg:.2}, services {own:.2}); ceiling {:.2} (RabbitMQ {c_rabbit:.2}, PostgreSQL {c_pg:.2}, its client {c_client:.2})",
        rabbit + pg + own,
        c_rabbit + c_pg + c_client
    );
    let per_job = |bytes: i64| bytes.max(0) as f64 / load.jobs as f64;
    println!(
        "PostgreSQL WAL/job     Volley {:.0} B; ceiling {:.0} B   (write volume; steadier than CPU on a shared machine)",
        per_job(wal_after - wal_before),
        per_job(wal_c1 - wal_c0)
    );
    println!("per service            cpu s/1000 jobs   peak RSS    idle RSS (target < 30 MB)");
    for ((name, cpu, peak), (_, idle)) in services.into_iter().zip(&idle) {
        println!(
            "  {name:<20} {cpu:>10.2}      {:>7.1} MB    {:>5.1} MB   {}",
            peak as f64 / 1024.0,
            idle.rss_kb as f64 / 1024.0,
            verdict(idle.rss_kb < 30 * 1024)
        );
    }

    // Scenarios 2 and 3: many slow jobs, and fair share between two tenants.
    if cli.slow_jobs > 0 || cli.fair_jobs > 0 {
        let (tdb, db, key) = fresh_db().await?;
        let text = std::fs::read_to_string(&cli.config)?;
        let lifted: String = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("max_concurrency") {
                    format!("max_concurrency = {}", cli.slow_concurrency)
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = std::env::temp_dir().join(format!("volley-bench-{}.toml", std::process::id()));
        std::fs::write(&cfg, lifted)?;
        let opts = StackOptions {
            database_url: tdb.url.clone(),
            amqp_url: cli.amqp_url.clone(),
            sim_latency_ms: cli.slow_latency_ms,
            worker_concurrency: u16::try_from(cli.slow_concurrency).unwrap_or(u16::MAX),
            bin_dir,
            config: cfg.clone(),
            media_root: media.clone(),
            fair: true,
        };
        if cli.slow_jobs > 0 {
            slow(&cli, &opts, &db, &key).await?;
        }
        if cli.fair_jobs > 0 {
            fair_share(&cli, &opts).await?;
        }
        let _ = std::fs::remove_file(&cfg);
        drop(db);
        drop(tdb);
    }
    Ok(())
}

/// Scenario 2: many slow jobs on one tenant.
async fn slow(cli: &Cli, opts: &StackOptions, db: &Db, key: &str) -> anyhow::Result<()> {
    {
        let stack = Stack::start(opts).await?;
        let load = run_load(
            &stack.gateway,
            key,
            db,
            cli.slow_jobs,
            cli.clients,
            llm_batch,
        )
        .await?;
        let usage = stack.usage();
        let prefix = stack.prefix.clone();
        stack.stop();
        delete_queues(&cli.amqp_url, &prefix).await;
        let ideal = cli.slow_concurrency as f64 / (cli.slow_latency_ms as f64 / 1000.0);
        let achieved = load.jobs as f64 / load.total_secs;
        println!();
        println!(
            "== slow jobs ({} jobs, {} ms each, {} concurrent) ==",
            load.jobs, cli.slow_latency_ms, cli.slow_concurrency
        );
        println!(
            "throughput             {achieved:>9.0} jobs/s of ideal {ideal:.0} = {:.0} %   target >= 90 %   {}",
            achieved / ideal * 100.0,
            verdict(achieved >= 0.9 * ideal)
        );
        for (name, u) in usage.iter().filter(|(n, _)| n.starts_with("worker-")) {
            println!(
                "  {name:<20} peak RSS {:>7.1} MB   target < 150 MB   {}",
                u.peak_rss_kb as f64 / 1024.0,
                verdict(u.peak_rss_kb < 150 * 1024)
            );
        }
    }
    Ok(())
}

/// Scenario 3: tenant A's backlog, then tenant B's batch; B alone, then with fair dispatch
/// off and on; with one fixed latency, then with latencies spread around it.
async fn fair_share(cli: &Cli, opts: &StackOptions) -> anyhow::Result<()> {
    let fixed: fair::Make = Arc::new(llm_batch);
    let title = format!("{} ms", cli.slow_latency_ms);
    fair_share_with(cli, opts, &fixed, &title).await?;
    if cli.fair_latency_spread_ms > 0 {
        // At most the mean: latencies stay positive.
        let mean = cli.slow_latency_ms;
        let spread = cli.fair_latency_spread_ms.min(mean);
        let spread_make: fair::Make = Arc::new(move |b, n| spread_llm_batch(b, n, mean, spread));
        let title = format!("{mean} ± {spread} ms");
        fair_share_with(cli, opts, &spread_make, &title).await?;
    }
    Ok(())
}

async fn fair_share_with(
    cli: &Cli,
    opts: &StackOptions,
    make: &fair::Make,
    latencies: &str,
) -> anyhow::Result<()> {
    let alone = fair::run(opts, 0, cli.clients, make).await?;
    let unfair_opts = StackOptions {
        fair: false,
        ..opts.clone()
    };
    let unfair = fair::run(&unfair_opts, cli.fair_jobs, cli.clients, make).await?;
    let fair = fair::run(opts, cli.fair_jobs, cli.clients, make).await?;
    let latency = cli.slow_latency_ms as f64;
    println!();
    println!(
        "== fair share (tenant A: {} jobs of {latencies}, then tenant B: 256; {} concurrent) ==",
        cli.fair_jobs, cli.slow_concurrency
    );
    println!("                       B start p50 / p99        B done      A throughput");
    for (name, r) in [
        ("B alone", &alone),
        ("FIFO (fair off)", &unfair),
        ("fair", &fair),
    ] {
        println!(
            "  {name:<20} {:>8.0} / {:<8.0} ms  {:>8.0} ms   {}",
            pct(&r.b_start_ms, 0.5),
            pct(&r.b_start_ms, 0.99),
            r.b_done_ms,
            r.a_per_sec
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0} jobs/s"))
        );
    }
    let start_ok = pct(&fair.b_start_ms, 0.99) <= pct(&alone.b_start_ms, 0.99) + 2.0 * latency;
    println!(
        "B p99 start, fair      {:>6.0} ms   target <= B alone + 2 job latencies ({:.0} ms)   {}",
        pct(&fair.b_start_ms, 0.99),
        pct(&alone.b_start_ms, 0.99) + 2.0 * latency,
        verdict(start_ok)
    );
    if let (Some(f), Some(u)) = (fair.a_per_sec, unfair.a_per_sec) {
        println!(
            "A throughput fair/FIFO {:>6.1} %    target >= 95 %   {}",
            f / u * 100.0,
            verdict(f >= 0.95 * u)
        );
    }
    // A's figure carries B's 256 jobs, run inside A's window instead of after it. With one
    // fixed latency the slots turn over in waves, so they push A's last jobs into one more,
    // mostly empty wave. All jobs per second is what fair dispatch itself costs.
    println!(
        "all jobs fair/FIFO     {:>6.1} %    ({:.0} / {:.0} jobs/s; B's jobs inside A's window cost A {:.1} % at best)",
        fair.all_per_sec / unfair.all_per_sec * 100.0,
        fair.all_per_sec,
        unfair.all_per_sec,
        256.0 / (cli.fair_jobs as f64 + 256.0) * 100.0
    );
    // What fair dispatch adds in CPU (the dispatcher is batch-state; the broker and database
    // answer its reads).
    for (name, r) in [("FIFO", &unfair), ("fair", &fair)] {
        let cpu: Vec<String> = r
            .cpu_secs
            .iter()
            .map(|(service, s)| format!("{service} {s:.1}"))
            .collect();
        println!("  cpu s, {name:<5} {}", cpu.join(", "));
    }
    Ok(())
}
