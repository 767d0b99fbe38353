//! The fault-injection run: the real binaries as separate processes on a private broker and
//! database, a steady load of mixed batches from several tenants (API keys with their own
//! priority, webhook secret and, for one, quotas), faults injected meanwhile, then the checks
//! that nothing accepted was lost and every job ended in exactly one consistent terminal state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use volley_amqp::Names;
use volley_db::Db;
use volley_domain::InferenceType;

use crate::infra::{PgCluster, PgStop, Proc, RabbitNode, RabbitOptions, free_ports, run_command};

/// The size and pace of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Batches to get accepted (202).
    pub batches: usize,
    /// Jobs per batch, at least and at most.
    pub jobs: (usize, usize),
    /// Simulated provider latency of a job, uniformly in this range.
    pub latency_ms: (u64, u64),
    /// Jobs that run longer than RabbitMQ's consumer timeout (in the first batch).
    pub long_jobs: usize,
    pub consumer_timeout_ms: u64,
    /// Fault rounds; the first has every kind of fault once, later ones add harsher ones.
    pub rounds: usize,
    /// Pause between faults.
    pub fault_gap_ms: (u64, u64),
    /// Pause between batch submissions.
    pub submit_gap_ms: u64,
    /// How long the stack may take to finish every job after the last fault.
    pub drain: Duration,
    pub concurrency: u16,
    pub seed: u64,
}

impl Plan {
    /// The version `make test` runs: every kind of fault once, a few hundred jobs.
    pub fn short(seed: u64) -> Plan {
        Plan {
            batches: 8,
            jobs: (8, 48),
            latency_ms: (50, 1_000),
            // As many as the video worker's slots: its queue backs up from the first batch on,
            // so that fair dispatch holds later batches' video whatever the seed.
            long_jobs: 4,
            consumer_timeout_ms: 5_000,
            rounds: 1,
            fault_gap_ms: (1_500, 3_000),
            submit_gap_ms: 2_000,
            drain: Duration::from_secs(150),
            // Few slots, so that queues fill and fair dispatch holds work while faults run.
            concurrency: 4,
            seed,
        }
    }

    /// `make chaos`: 40 batches of up to 256 jobs and two rounds of faults.
    pub fn full(seed: u64) -> Plan {
        Plan {
            batches: 40,
            jobs: (64, 256),
            latency_ms: (50, 2_000),
            long_jobs: 4,
            consumer_timeout_ms: 5_000,
            rounds: 2,
            fault_gap_ms: (3_000, 8_000),
            submit_gap_ms: 2_500,
            drain: Duration::from_secs(600),
            concurrency: 64,
            seed,
        }
    }
}

/// What the run found.
#[derive(Debug, Default)]
pub struct Summary {
    pub batches: usize,
    pub accepted: usize,
    pub terminal: usize,
    pub lost: usize,
    /// Jobs that ran more attempts than their own failures explain: a fault interrupted an
    /// attempt (a killed worker, an outcome that could not be reported) and the job ran again.
    pub duplicates: usize,
    pub faults: usize,
    pub processed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub dead_letters: u32,
    /// Submissions refused (a service was down) and left unanswered or answered 5xx.
    pub refused: usize,
    /// Submissions refused with 429 `rate_limited` (a quota): not accepted, not lost.
    pub rate_limited: usize,
    pub unanswered: usize,
    /// Per tenant, in the order of [`TENANTS`].
    pub tenants: Vec<TenantCount>,
    pub problems: Vec<String>,
    pub seconds: u64,
    /// Webhook events the accepted batches caused, and how many arrived verified (`lost`
    /// counts the missing ones too).
    pub webhooks_expected: usize,
    pub webhooks_delivered: usize,
    /// The most jobs fair dispatch held back at once during the load.
    pub held_peak: i64,
}

/// What one tenant got accepted and refused.
#[derive(Debug, Default, Clone)]
pub struct TenantCount {
    pub name: &'static str,
    pub batches: usize,
    pub jobs: usize,
    pub rate_limited: usize,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.problems.is_empty() && self.accepted > 0
    }

    /// One line; `by_tenant` lists each tenant's accepted jobs/batches and 429s.
    pub fn line(&self) -> String {
        let by_tenant: Vec<String> = self
            .tenants
            .iter()
            .map(|t| format!("{}:{}/{}/{}", t.name, t.jobs, t.batches, t.rate_limited))
            .collect();
        format!(
            "chaos: accepted={} terminal={} lost={} duplicates={} faults={} batches={} \
             processed={} failed={} cancelled={} refused={} rate_limited={} unanswered={} \
             dead_letters={} problems={} seconds={} webhooks={}/{} held_peak={} tenants={} \
             by_tenant={}",
            self.accepted,
            self.terminal,
            self.lost,
            self.duplicates,
            self.faults,
            self.batches,
            self.processed,
            self.failed,
            self.cancelled,
            self.refused,
            self.rate_limited,
            self.unanswered,
            self.dead_letters,
            self.problems.len(),
            self.seconds,
            self.webhooks_delivered,
            self.webhooks_expected,
            self.held_peak,
            self.tenants.len(),
            by_tenant.join(",")
        )
    }
}

pub struct RunOptions {
    /// Where the service binaries are (normally next to `chaos` itself).
    pub bin_dir: PathBuf,
    /// Keep the temporary directory (logs, data) instead of removing it.
    pub keep: bool,
}

/// How a job is meant to end, from the `sim_*` fields it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    /// Fails retryably this many times, then succeeds.
    Retry(u32),
    /// Fails for good at once.
    Fatal,
}

impl Kind {
    fn attempts(self) -> i32 {
        match self {
            Kind::Ok | Kind::Fatal => 1,
            Kind::Retry(k) => k as i32 + 1,
        }
    }
}

#[derive(Debug, Clone)]
enum Cancelled {
    /// The batch's counts as the cancel answered them; they must never change after.
    Batch { id: i64, counts: Value },
    /// The job's status as the cancel answered it.
    Job { id: i64, status: String },
}

/// One API key of the run. Tenants differ in what a service must keep apart: the priority
/// their batches ask for, the secret their webhooks are signed with (each verified at its own
/// receiver path), and quotas, whose 429s are refusals and never losses.
#[derive(Debug, Clone, Copy)]
pub struct TenantSpec {
    pub name: &'static str,
    pub priority: &'static str,
    pub quota: bool,
}

pub const TENANTS: [TenantSpec; 3] = [
    TenantSpec {
        name: "high",
        priority: "high",
        quota: false,
    },
    TenantSpec {
        name: "normal",
        priority: "normal",
        quota: false,
    },
    TenantSpec {
        name: "low-capped",
        priority: "low",
        quota: true,
    },
];

impl Plan {
    /// The capped tenant's quotas: its first batch always fits, and at the suite's pace later
    /// ones within a minute mostly do not, so every run sees 429s.
    fn quota(&self) -> (usize, usize) {
        let biggest = self.jobs.1;
        (biggest * 2, biggest)
    }
}

/// A tenant with its key, ready to submit.
struct Tenant {
    spec: TenantSpec,
    client: Arc<Client>,
    /// Its webhook endpoint at the receiver.
    hook: String,
}

/// An accepted batch.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub jobs: usize,
    /// Index into [`TENANTS`].
    pub tenant: usize,
}

#[derive(Default)]
struct Ledger {
    /// Accepted batches: id → jobs submitted and by whom.
    accepted: BTreeMap<i64, Accepted>,
    /// `sim_key` → how the job should end.
    kinds: HashMap<String, Kind>,
    rejected: usize,
    /// 429 `rate_limited` answers, per tenant: nothing was created.
    rate_limited: Vec<usize>,
    /// What the load saw that is wrong (e.g. a 429 that is not a quota refusal).
    problems: Vec<String>,
    /// Submissions whose answer never came or was a 5xx (the batch may or may not exist).
    uncertain: usize,
    cancels: Vec<Cancelled>,
}

const SERVICES: [&str; 8] = [
    "provider-sim",
    "batch-state",
    "gateway",
    "worker-llm",
    "worker-image",
    "worker-video",
    "worker-music",
    "worker-tts",
];

fn worker(t: InferenceType) -> String {
    format!("worker-{}", t.key())
}

/// The services as separate processes.
struct Services {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    ports: HashMap<&'static str, u16>,
    procs: HashMap<String, Proc>,
    http: reqwest::Client,
    grace: Duration,
}

impl Services {
    fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        // Only what the configuration file says counts; overrides from the caller's
        // environment would point the stack elsewhere.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VOLLEY_") {
                c.env_remove(k);
            }
        }
        c.env("VOLLEY_CONFIG", &self.config)
            .env("RUST_LOG", "info")
            .current_dir(&self.dir);
        if let Some(port) = self.ports.get(name) {
            match name {
                "provider-sim" => {
                    c.env("VOLLEY_SIM_ADDR", format!("127.0.0.1:{port}"))
                        .env("VOLLEY_SIM_LATENCY_MS", "50");
                }
                n if n.starts_with("worker-") => {
                    c.env("VOLLEY_WORKER_ADDR", format!("127.0.0.1:{port}"));
                }
                _ => {}
            }
        }
        c
    }

    fn start(&mut self, name: &str) -> anyhow::Result<()> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let p = Proc::spawn(name, self.command(name), &log)?;
        self.procs.insert(name.to_owned(), p);
        Ok(())
    }

    fn ready_url(&self, name: &str) -> anyhow::Result<String> {
        let port = self
            .ports
            .get(name)
            .with_context(|| format!("no port for {name}"))?;
        let path = if name == "provider-sim" {
            "healthz"
        } else {
            "readyz"
        };
        Ok(format!("http://127.0.0.1:{port}/{path}"))
    }

    async fn wait_ready(&mut self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let url = self.ready_url(name)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.procs.get_mut(name)
                && let Some(s) = p.poll()
            {
                bail!("{name} exited ({s}); see logs/{name}.log");
            }
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{name} was not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn kill(&mut self, name: &str) {
        if let Some(mut p) = self.procs.remove(name) {
            p.kill().await;
        }
    }

    /// SIGTERM; the service must exit 0 within its grace period (plus start-up slack).
    async fn terminate(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(mut p) = self.procs.remove(name) else {
            return Ok(());
        };
        let limit = self.grace + Duration::from_secs(30);
        let status = p.stop(libc::SIGTERM, limit).await?;
        if !status.success() {
            bail!("{name} exited with {status} after SIGTERM (expected 0)");
        }
        Ok(())
    }

    async fn restart(&mut self, name: &str, how: Restart) -> anyhow::Result<()> {
        match how {
            Restart::Kill => self.kill(name).await,
            Restart::Term => self.terminate(name).await?,
        }
        // A moment down, as when an orchestrator restarts a container.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.start(name)?;
        Ok(())
    }

    fn batchctl(&self, args: &[&str]) -> Command {
        let mut c = self.command("batchctl");
        c.args(args);
        c
    }
}

#[derive(Debug, Clone, Copy)]
enum Restart {
    Kill,
    Term,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillWorker(InferenceType),
    TermWorker(InferenceType),
    KillBatchState,
    TermBatchState,
    RestartGateway,
    RestartRabbit,
    KillRabbit,
    RestartPostgres,
    CrashPostgres,
    CloseConnections,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::KillWorker(t) => write!(f, "kill -9 worker-{} and restart it", t.key()),
            Fault::TermWorker(t) => write!(f, "SIGTERM worker-{} and restart it", t.key()),
            Fault::KillBatchState => f.write_str("kill -9 batch-state and restart it"),
            Fault::TermBatchState => f.write_str("SIGTERM batch-state and restart it"),
            Fault::RestartGateway => f.write_str("SIGTERM the gateway and restart it"),
            Fault::RestartRabbit => f.write_str("restart RabbitMQ"),
            Fault::KillRabbit => f.write_str("kill -9 RabbitMQ and start it again"),
            Fault::RestartPostgres => f.write_str("restart PostgreSQL (fast shutdown)"),
            Fault::CrashPostgres => f.write_str("kill -9 PostgreSQL and start it again"),
            Fault::CloseConnections => f.write_str("close every connection from the broker's side"),
        }
    }
}

fn faults(rounds: usize, rng: &mut StdRng) -> Vec<Fault> {
    let mut all = Vec::new();
    for round in 0..rounds.max(1) {
        let mut r: Vec<Fault> = InferenceType::ALL
            .into_iter()
            .map(Fault::KillWorker)
            .collect();
        r.extend([
            Fault::KillBatchState,
            Fault::RestartGateway,
            Fault::RestartRabbit,
            Fault::RestartPostgres,
            Fault::CloseConnections,
        ]);
        let pick = InferenceType::ALL[rng.random_range(0..InferenceType::ALL.len())];
        r.push(Fault::TermWorker(pick));
        if round > 0 {
            r.extend([
                Fault::KillRabbit,
                Fault::CrashPostgres,
                Fault::TermBatchState,
            ]);
        }
        r.shuffle(rng);
        all.extend(r);
    }
    all
}

fn config(
    plan: &Plan,
    dir: &Path,
    pg: &PgCluster,
    mq: &RabbitNode,
    ports: &HashMap<&str, u16>,
) -> anyhow::Result<String> {
    let port = |name: &str| {
        ports
            .get(name)
            .copied()
            .with_context(|| format!("no port for {name}"))
    };
    let (sim, gw, st) = (
        port("provider-sim")?,
        port("gateway")?,
        port("batch-state")?,
    );
    Ok(format!(
        r#"# Written by the chaos suite for one run.
database_url = "{db}"
database_pool_size = 6
amqp_url = "{mq}"
queue_prefix = "chaos"
# A test stack: its development signing key is allowed.
dev_mode = true

[gateway]
addr = "127.0.0.1:{gw}"
public_url = "http://127.0.0.1:{gw}"
workers = 2

[state]
addr = "127.0.0.1:{st}"
url = "http://127.0.0.1:{st}"
sweep_interval_ms = 500
dispatch_grace_ms = 2000
# Longer than a batch-state restart, so that restarting it does not expire every lease.
lease_ms = 10000
redispatch_after_ms = 30000
expire_after_ms = 3600000
# Workers present it to batch-state's internal API (32+ characters outside dev mode).
internal_token = "chaos-internal-token-0123456789abcdef"

[worker]
concurrency = {conc}
max_attempts = 8
retry_base_ms = 100
retry_max_ms = 2000
shutdown_grace_secs = 3

[media]
dir = "{media}"
signing_key = "chaos-signing-key"

# Queues count as full at once, so that fair dispatch holds most of the load and releases it
# while services are killed and restarted.
[dispatch]
min_queue_depth = 1
queue_depth_per_slot = 0
interval_ms = 100

# The suite's receiver is on loopback; retries are quick so that the drain sees them through.
[webhooks]
http_hosts = ["127.0.0.1"]
allow_private_network = true
schedule_ms = [200, 500, 1000, 2000, 3000, 5000, 5000, 5000, 5000, 5000, 5000, 5000]
poll_interval_ms = 100
lease_ms = 15000

[[providers]]
name = "sim-openai"
kind = "openai"
base_url = "http://127.0.0.1:{sim}/v1"
api_key = "sim-key"
timeout_ms = 30000
max_concurrency = 512
simulator = true
allow_private_network = true

[[providers]]
name = "sim-predictions"
kind = "predictions"
base_url = "http://127.0.0.1:{sim}/v1"
api_key = "sim-key"
timeout_ms = 120000
max_concurrency = 512
simulator = true
allow_private_network = true
poll_interval_ms = 200

[[models]]
name = "qwen3-8b"
endpoints = ["/v1/chat/completions", "/v1/completions"]
routes = [{{ provider = "sim-openai" }}]

[[models]]
name = "flux-dev"
endpoints = ["/v1/images/generations"]
routes = [{{ provider = "sim-openai" }}]

[[models]]
name = "sim-video"
endpoints = ["/v1/videos/generations"]
routes = [{{ provider = "sim-predictions", upstream_model = "sim/video-1" }}]

[[models]]
name = "sim-music"
endpoints = ["/v1/music/generations"]
routes = [{{ provider = "sim-predictions", upstream_model = "sim/music-1" }}]

[[models]]
name = "tts-1"
endpoints = ["/v1/audio/speech"]
routes = [{{ provider = "sim-openai" }}]
"#,
        db = pg.url("volley"),
        mq = mq.url(),
        conc = plan.concurrency,
        media = dir.join("media").display(),
    ))
}

/// One batch item and how it should end.
fn item(rng: &mut StdRng, plan: &Plan, key: String, long: bool) -> (Value, Kind) {
    let latency = if long {
        // Twice the consumer timeout: if anything held the message unacknowledged while the
        // job ran, the broker would close the channel and the job would run again.
        plan.consumer_timeout_ms * 2 + rng.random_range(0..2_000)
    } else {
        rng.random_range(plan.latency_ms.0..=plan.latency_ms.1)
    };
    let roll: u32 = rng.random_range(0..100);
    let kind = if long || roll >= 12 {
        Kind::Ok
    } else if roll < 8 {
        Kind::Retry(rng.random_range(1..=2))
    } else {
        Kind::Fatal
    };
    let (endpoint, mut body) = if long {
        (
            "/v1/videos/generations",
            json!({"model": "sim-video", "prompt": "a long shot"}),
        )
    } else {
        match rng.random_range(0..100) {
            0..30 => (
                "/v1/chat/completions",
                json!({"model": "qwen3-8b", "messages": [{"role": "user", "content": "hello"}]}),
            ),
            30..45 => (
                "/v1/completions",
                json!({"model": "qwen3-8b", "prompt": "once"}),
            ),
            45..65 => (
                "/v1/images/generations",
                json!({"model": "flux-dev", "prompt": "a lamp"}),
            ),
            65..75 => (
                "/v1/videos/generations",
                json!({"model": "sim-video", "prompt": "a wave"}),
            ),
            75..85 => (
                "/v1/music/generations",
                json!({"model": "sim-music", "prompt": "a tune"}),
            ),
            _ => (
                "/v1/audio/speech",
                json!({"model": "tts-1", "input": "hello", "voice": "alloy"}),
            ),
        }
    };
    body["sim_latency_ms"] = json!(latency);
    body["sim_key"] = json!(key);
    match kind {
        Kind::Ok => {}
        Kind::Retry(k) => {
            body["sim_fail"] = json!("retryable");
            body["sim_fail_times"] = json!(k);
        }
        Kind::Fatal => body["sim_fail"] = json!("fatal"),
    }
    (json!({"endpoint": endpoint, "body": body}), kind)
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: String,
}

impl Client {
    async fn post(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value), reqwest::Error> {
        let (status, v, _) = self.post_full(path, body).await?;
        Ok((status, v))
    }

    /// Also returns the `Retry-After` header, if any.
    async fn post_full(
        &self,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value, Option<String>), reqwest::Error> {
        let mut rb = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            retry_after,
        ))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value), reqwest::Error> {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Retries through the gateway's restarts and the database's (bounded).
    async fn post_retrying(&self, path: &str) -> Option<Value> {
        for _ in 0..60 {
            if let Ok((200, v)) = self.post(path, None).await {
                return Some(v);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        None
    }
}

fn counts(b: &Value) -> Value {
    json!({
        "queued": b["queued"], "processing": b["processing"], "processed": b["processed"],
        "failed": b["failed"], "cancelled": b["cancelled"]
    })
}

fn db_counts(by: &HashMap<String, i64>) -> Value {
    let n = |s: &str| by.get(s).copied().unwrap_or(0);
    json!({
        "queued": n("QUEUED"), "processing": n("PROCESSING"), "processed": n("PROCESSED"),
        "failed": n("FAILED"), "cancelled": n("CANCELLED")
    })
}

/// Submits `plan.batches` batches at a steady pace, the tenants taking turns, cancelling some
/// batches and jobs along the way. Failed submissions (a service is down) and those over a
/// quota (429) are simply not accepted, and that tenant's turn is skipped; the load goes on
/// until the count is reached and every tenant has had a batch accepted.
async fn load(plan: Plan, tenants: Arc<Vec<Tenant>>, ledger: Arc<Mutex<Ledger>>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cancels = Vec::new();
    let mut seq = 0usize;
    // Bounded: every try takes at least the submission gap.
    for _ in 0..plan.batches * 6 {
        let done = ledger
            .lock()
            .map(|l| {
                l.accepted.len() >= plan.batches
                    && (0..tenants.len()).all(|t| l.accepted.values().any(|a| a.tenant == t))
            })
            .unwrap_or(false);
        if done {
            break;
        }
        let t = seq % tenants.len();
        let tenant = &tenants[t];
        let client = &tenant.client;
        seq += 1;
        let n = rng.random_range(plan.jobs.0..=plan.jobs.1);
        let mut items = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        for i in 0..n {
            let key = format!("c{seed}-{seq}-{i}");
            let long = seq == 1 && i < plan.long_jobs;
            let (it, kind) = item(&mut rng, &plan, key.clone(), long);
            items.push(it);
            kinds.push((key, kind));
        }
        let body = json!({"label": format!("chaos {seq}"), "requests": items,
            "priority": tenant.spec.priority,
            "webhook": {"url": tenant.hook, "events": crate::webhooks::EVENTS}});
        match client.post_full("/v1/batches", Some(&body)).await {
            Ok((202, b, _)) => {
                let id = b["id"].as_str().and_then(|s| s.parse::<i64>().ok());
                if let (Some(id), Ok(mut l)) = (id, ledger.lock()) {
                    l.accepted.insert(id, Accepted { jobs: n, tenant: t });
                    l.kinds.extend(kinds);
                    let roll: u32 = rng.random_range(0..100);
                    let wait = Duration::from_millis(rng.random_range(300..4_000));
                    if roll < 12 {
                        cancels.push(tokio::spawn(cancel_batch(
                            client.clone(),
                            ledger.clone(),
                            id,
                            wait,
                        )));
                    } else if roll < 30 {
                        let pick = rng.random_range(0..n);
                        cancels.push(tokio::spawn(cancel_job(
                            client.clone(),
                            ledger.clone(),
                            id,
                            pick,
                            wait,
                        )));
                    }
                }
            }
            // Over a quota: refused whole, nothing created (the phantom check would see a
            // batch that exists after all). Skipped, not retried: the next turns try again.
            Ok((429, b, retry_after)) => {
                if let Ok(mut l) = ledger.lock() {
                    l.rate_limited[t] += 1;
                    if b["error"]["type"] != "rate_limited" || retry_after.is_none() {
                        l.problems.push(format!(
                            "tenant {}: a 429 without type rate_limited and Retry-After \
                             (Retry-After {retry_after:?}): {b}",
                            tenant.spec.name
                        ));
                    }
                    if !tenant.spec.quota {
                        say(format!(
                            "tenant {} (no quota) was refused with 429: {b}",
                            tenant.spec.name
                        ));
                    }
                }
            }
            // A 5xx may hide a commit whose answer was lost (the database went away between
            // COMMIT and its reply): such a batch exists, and must still finish.
            Ok((status, _, _)) if status >= 500 => {
                if let Ok(mut l) = ledger.lock() {
                    l.uncertain += 1;
                }
            }
            Ok(_) => {
                if let Ok(mut l) = ledger.lock() {
                    l.rejected += 1;
                }
            }
            Err(e) => {
                // Refused before sending: nothing was accepted. Anything else: maybe.
                if let Ok(mut l) = ledger.lock() {
                    if e.is_connect() {
                        l.rejected += 1;
                    } else {
                        l.uncertain += 1;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(plan.submit_gap_ms)).await;
    }
    for c in cancels {
        let _ = c.await;
    }
}

async fn cancel_batch(client: Arc<Client>, ledger: Arc<Mutex<Ledger>>, id: i64, wait: Duration) {
    tokio::time::sleep(wait).await;
    if let Some(b) = client
        .post_retrying(&format!("/v1/batches/{id}/cancel"))
        .await
        && let Ok(mut l) = ledger.lock()
    {
        l.cancels.push(Cancelled::Batch {
            id,
            counts: counts(&b),
        });
    }
}

async fn cancel_job(
    client: Arc<Client>,
    ledger: Arc<Mutex<Ledger>>,
    batch: i64,
    index: usize,
    wait: Duration,
) {
    tokio::time::sleep(wait).await;
    let mut job = None;
    for _ in 0..60 {
        if let Ok((200, b)) = client.get(&format!("/v1/batches/{batch}")).await {
            job = b["jobs"][index]["id"]
                .as_str()
                .and_then(|s| s.parse::<i64>().ok());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let Some(id) = job else { return };
    if let Some(j) = client.post_retrying(&format!("/v1/jobs/{id}/cancel")).await
        && let (Some(status), Ok(mut l)) = (j["status"].as_str(), ledger.lock())
    {
        l.cancels.push(Cancelled::Job {
            id,
            status: status.to_owned(),
        });
    }
}

/// Everything the run started, torn down on drop in any case.
struct World {
    services: Services,
    rabbit: RabbitNode,
    pg: PgCluster,
    dir: tempfile::TempDir,
}

async fn inject(w: &mut World, fault: Fault) -> anyhow::Result<()> {
    let s = &mut w.services;
    let ready = Duration::from_secs(90);
    match fault {
        Fault::KillWorker(t) | Fault::TermWorker(t) => {
            let how = if matches!(fault, Fault::KillWorker(_)) {
                Restart::Kill
            } else {
                Restart::Term
            };
            s.restart(&worker(t), how).await?;
            s.wait_ready(&worker(t), ready).await?;
        }
        Fault::KillBatchState | Fault::TermBatchState => {
            let how = if matches!(fault, Fault::KillBatchState) {
                Restart::Kill
            } else {
                Restart::Term
            };
            s.restart("batch-state", how).await?;
            s.wait_ready("batch-state", ready).await?;
        }
        Fault::RestartGateway => {
            s.restart("gateway", Restart::Term).await?;
            s.wait_ready("gateway", ready).await?;
        }
        Fault::RestartRabbit => {
            w.rabbit.stop().await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.rabbit.start_again().await?;
        }
        Fault::KillRabbit => {
            w.rabbit.kill().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.rabbit.start_again().await?;
        }
        Fault::RestartPostgres | Fault::CrashPostgres => {
            let how = if matches!(fault, Fault::RestartPostgres) {
                PgStop::Fast
            } else {
                PgStop::Crash
            };
            w.pg.stop(how).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.pg.start_again().await?;
        }
        Fault::CloseConnections => {
            w.rabbit
                .ctl(&[
                    "close_all_connections",
                    "chaos: connections closed by the broker",
                ])
                .await?;
        }
    }
    Ok(())
}

fn say(msg: impl AsRef<str>) {
    eprintln!("chaos: {}", msg.as_ref());
}

/// Starts everything, runs the load and the faults, checks, and tears everything down.
pub async fn run(plan: Plan, opts: RunOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    for name in SERVICES.iter().chain(&["batchctl"]) {
        let p = opts.bin_dir.join(name);
        if !p.exists() {
            bail!(
                "{} is missing: build the services first (cargo build --workspace --bins)",
                p.display()
            );
        }
    }
    let dir = tempfile::Builder::new().prefix("volley-chaos-").tempdir()?;
    say(format!("working in {}", dir.path().display()));
    std::fs::create_dir_all(dir.path().join("logs"))?;
    std::fs::create_dir_all(dir.path().join("media"))?;
    let rabbit = RabbitNode::start(
        &dir.path().join("rabbitmq"),
        RabbitOptions {
            consumer_timeout_ms: Some(plan.consumer_timeout_ms),
        },
    )
    .await
    .context("starting a RabbitMQ node")?;
    let pg = PgCluster::start(&dir.path().join("pg"))
        .await
        .context("starting a PostgreSQL cluster")?;
    pg.psql("postgres", "CREATE DATABASE volley").await?;
    say(format!(
        "RabbitMQ node {} on port {}, PostgreSQL on port {}",
        rabbit.node(),
        rabbit.port,
        pg.port
    ));

    let port_list = free_ports(SERVICES.len())?;
    let ports: HashMap<&'static str, u16> = SERVICES.iter().copied().zip(port_list).collect();
    let config_path = dir.path().join("volley.toml");
    std::fs::write(
        &config_path,
        config(&plan, dir.path(), &pg, &rabbit, &ports)?,
    )?;
    let services = Services {
        bin: opts.bin_dir.clone(),
        dir: dir.path().to_owned(),
        config: config_path,
        ports,
        procs: HashMap::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
        grace: Duration::from_secs(3),
    };
    let mut w = World {
        services,
        rabbit,
        pg,
        dir,
    };
    let result = exercise(&plan, &mut w).await;
    // Whatever happened: the service logs tell why, while the directory still exists.
    if !matches!(&result, Ok(s) if s.ok()) {
        print_log_tails(w.dir.path());
    }
    let mut summary = result?;
    summary.seconds = started.elapsed().as_secs();
    // Processes first (their drop kills them), then the directories.
    let World {
        services,
        rabbit,
        pg,
        dir,
    } = w;
    drop(services);
    drop(rabbit);
    drop(pg);
    if opts.keep {
        say(format!("kept {}", dir.keep().display()));
    }
    Ok(summary)
}

fn print_log_tails(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join("logs")) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let interesting: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("ERROR") || l.contains("\"level\":\"WARN\"") || l.contains("panicked")
            })
            .collect();
        let tail = &interesting[interesting.len().saturating_sub(8)..];
        if !tail.is_empty() {
            eprintln!(
                "--- {} (last warnings) ---",
                e.file_name().to_string_lossy()
            );
            for l in tail {
                eprintln!("{}", &l[..l.len().min(400)]);
            }
        }
    }
}

/// Creates a tenant's API key with `batchctl keys create` (and its quotas, if it has them);
/// returns the key and its webhook signing secret.
async fn create_key(w: &World, plan: &Plan, spec: TenantSpec) -> anyhow::Result<(String, String)> {
    let mut args = vec![
        "keys".to_owned(),
        "create".to_owned(),
        "--name".to_owned(),
        spec.name.to_owned(),
    ];
    if spec.quota {
        let (active, per_minute) = plan.quota();
        args.extend([
            "--max-active-jobs".to_owned(),
            active.to_string(),
            "--max-jobs-per-minute".to_owned(),
            per_minute.to_string(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_command(w.services.batchctl(&args), Duration::from_secs(60)).await?;
    let key = out
        .lines()
        .last()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .with_context(|| format!("batchctl printed no key for {}", spec.name))?
        .to_owned();
    let whsec = out
        .split_whitespace()
        .find(|w| w.starts_with("whsec_"))
        .with_context(|| format!("batchctl printed no webhook secret for {}", spec.name))?
        .to_owned();
    if spec.quota {
        let (active, per_minute) = plan.quota();
        say(format!(
            "tenant {}: {} priority, at most {active} active jobs and {per_minute} jobs a minute",
            spec.name, spec.priority
        ));
    } else {
        say(format!("tenant {}: {} priority", spec.name, spec.priority));
    }
    Ok((key, whsec))
}

async fn exercise(plan: &Plan, w: &mut World) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let mut rng = StdRng::seed_from_u64(plan.seed);

    let migrate = run_command(w.services.batchctl(&["migrate"]), Duration::from_secs(120)).await?;
    say(migrate.trim());
    let mut keys = Vec::with_capacity(TENANTS.len());
    for spec in TENANTS {
        keys.push(create_key(w, plan, spec).await?);
    }
    let secrets: Vec<(String, String)> = TENANTS
        .iter()
        .zip(&keys)
        .map(|(t, (_, whsec))| (t.name.to_owned(), whsec.clone()))
        .collect();
    // Answers 500 to the first few deliveries, so retries happen from the start.
    let mut rx =
        crate::webhooks::Receiver::start(&w.dir.path().join("webhooks.jsonl"), &secrets, 5, 0)?;
    for name in SERVICES {
        w.services.start(name)?;
    }
    for name in SERVICES {
        w.services
            .wait_ready(name, Duration::from_secs(120))
            .await?;
    }
    say("stack ready");

    // A message no worker can decode: it must land in the dead-letter queue, not loop.
    let names = Names::new("chaos");
    let broker = volley_amqp::Broker::new(&w.rabbit.url(), "volley-chaos", names.clone());
    broker
        .publish_raw(
            &names.job_queue(InferenceType::Llm),
            b"chaos: not a job message".to_vec(),
            Some("chaos-poison".into()),
        )
        .await?;
    broker.close().await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(3))
        .build()?;
    let url = w
        .services
        .ready_url("gateway")?
        .trim_end_matches("/readyz")
        .to_owned();
    let tenants: Arc<Vec<Tenant>> = Arc::new(
        TENANTS
            .into_iter()
            .zip(keys)
            .map(|(spec, (key, _))| Tenant {
                spec,
                client: Arc::new(Client {
                    http: http.clone(),
                    url: url.clone(),
                    key,
                }),
                hook: rx.url(spec.name),
            })
            .collect(),
    );
    let ledger = Arc::new(Mutex::new(Ledger {
        rate_limited: vec![0; TENANTS.len()],
        ..Ledger::default()
    }));
    let loader = tokio::spawn(load(
        plan.clone(),
        tenants.clone(),
        ledger.clone(),
        plan.seed,
    ));
    // How much work fair dispatch held at most: the summary shows that the faults met it.
    let held_peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampler = {
        let (peak, url) = (held_peak.clone(), w.pg.url("volley"));
        tokio::spawn(async move {
            let Ok(db) = Db::new(&url, 1) else { return };
            loop {
                if let Ok(held) = db.held_work().await {
                    let n: i64 = held.iter().map(|h| h.jobs).sum();
                    peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Faults start once the load has begun.
    let wait_first = Instant::now() + Duration::from_secs(60);
    while ledger.lock().map(|l| l.accepted.is_empty()).unwrap_or(true)
        && Instant::now() < wait_first
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list = faults(plan.rounds, &mut rng);
    for (i, f) in list.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(plan.fault_gap_ms.0..=plan.fault_gap_ms.1),
        ))
        .await;
        say(format!("fault {}/{}: {f}", i + 1, list.len()));
        let t = Instant::now();
        if let Err(e) = inject(w, *f).await {
            summary.problems.push(format!("fault {f}: {e:#}"));
            say(format!("fault {f} went wrong: {e:#}"));
        }
        summary.faults += 1;
        say(format!("  recovered in {} ms", t.elapsed().as_millis()));
        // The webhook receiver is down from the second fault to the fourth.
        if i == 1 {
            say("webhook receiver down");
            rx.kill();
        } else if i == 3 {
            say("webhook receiver up");
            if let Err(e) = rx.restart() {
                summary
                    .problems
                    .push(format!("restarting the webhook receiver: {e:#}"));
            }
        }
    }
    if rx.is_down()
        && let Err(e) = rx.restart()
    {
        summary
            .problems
            .push(format!("restarting the webhook receiver: {e:#}"));
    }
    say("faults done; waiting for the load to finish");
    if tokio::time::timeout(Duration::from_secs(600), loader)
        .await
        .is_err()
    {
        summary
            .problems
            .push("the load did not finish in 600 s".into());
    }

    sampler.abort();
    summary.held_peak = held_peak.load(std::sync::atomic::Ordering::Relaxed);
    let db = Db::new(&w.pg.url("volley"), 4)?;
    // Every accepted job must reach a terminal state without help.
    let deadline = Instant::now() + plan.drain;
    let mut last_note = Instant::now();
    loop {
        let open = match db.audit_batches().await {
            Ok(b) => b
                .iter()
                .map(|b| {
                    b.by_status.get("QUEUED").copied().unwrap_or(0)
                        + b.by_status.get("PROCESSING").copied().unwrap_or(0)
                })
                .sum::<i64>(),
            Err(_) => i64::MAX,
        };
        if open == 0 {
            break;
        }
        if Instant::now() >= deadline {
            say(format!(
                "{open} jobs still unfinished after {:?}",
                plan.drain
            ));
            break;
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            say(format!("waiting for {open} unfinished jobs"));
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let ledger = Arc::try_unwrap(ledger)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .context("the load still holds its ledger")?;
    check(&db, &tenants, &ledger, &mut summary).await?;
    check_dead_letters(w, &mut summary).await;
    let hooks = crate::webhooks::check(
        &db,
        &rx,
        &ledger.accepted,
        &TENANTS.map(|t| t.name),
        Duration::from_secs(90),
    )
    .await?;
    say(format!(
        "webhook events: {} expected, {} delivered and verified",
        hooks.expected, hooks.delivered
    ));
    summary.webhooks_expected = hooks.expected;
    summary.webhooks_delivered = hooks.delivered;
    summary.lost += hooks.lost;
    if hooks.lost > 0 {
        summary
            .problems
            .push(format!("{} webhook events never arrived", hooks.lost));
    }
    summary.problems.extend(hooks.problems);

    // Graceful shutdown of every service: SIGTERM, exit 0 within the grace period.
    for name in [
        "gateway",
        "worker-llm",
        "worker-image",
        "worker-video",
        "worker-music",
        "worker-tts",
        "batch-state",
        "provider-sim",
    ] {
        if let Err(e) = w.services.terminate(name).await {
            summary.problems.push(format!("shutdown: {e:#}"));
        }
    }
    Ok(summary)
}

async fn check(
    db: &Db,
    tenants: &[Tenant],
    ledger: &Ledger,
    s: &mut Summary,
) -> anyhow::Result<()> {
    let jobs = db.audit_jobs().await?;
    let batches = db.audit_batches().await?;
    let by_batch: HashMap<i64, &volley_db::ops::BatchAudit> =
        batches.iter().map(|b| (b.id, b)).collect();
    s.batches = ledger.accepted.len();
    s.accepted = ledger.accepted.values().map(|a| a.jobs).sum();
    s.refused = ledger.rejected;
    s.rate_limited = ledger.rate_limited.iter().sum();
    s.unanswered = ledger.uncertain;
    s.tenants = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mine = || ledger.accepted.values().filter(move |a| a.tenant == i);
            TenantCount {
                name: t.spec.name,
                batches: mine().count(),
                jobs: mine().map(|a| a.jobs).sum(),
                rate_limited: ledger.rate_limited.get(i).copied().unwrap_or(0),
            }
        })
        .collect();
    let mut problems: Vec<String> = ledger.problems.clone();
    for t in &s.tenants {
        if t.batches == 0 {
            problems.push(format!("tenant {} had no batch accepted", t.name));
        }
    }
    // The tenant that submitted a batch: only its key reaches the batch.
    let owner = |id: i64| ledger.accepted.get(&id).and_then(|a| tenants.get(a.tenant));

    // No 202 batch is missing, and each has all its jobs.
    for (&id, &Accepted { jobs: n, .. }) in &ledger.accepted {
        match by_batch.get(&id) {
            None => {
                s.lost += n;
                problems.push(format!(
                    "batch {id} was accepted (202) but is not in PostgreSQL"
                ));
            }
            Some(b) => {
                let rows: i64 = b.by_status.values().sum();
                if b.total != n as i64 || rows != n as i64 {
                    problems.push(format!(
                        "batch {id}: {n} jobs submitted, total {}, {rows} job rows",
                        b.total
                    ));
                    s.lost += n.saturating_sub(rows.max(0) as usize);
                }
            }
        }
    }
    // Batches nobody was told about can only come from answers that never arrived.
    let phantom = batches
        .iter()
        .filter(|b| !ledger.accepted.contains_key(&b.id))
        .count();
    if phantom > ledger.uncertain {
        problems.push(format!(
            "{phantom} batches exist that were never accepted, but only {} submissions went unanswered",
            ledger.uncertain
        ));
    }

    let terminal = ["PROCESSED", "FAILED", "CANCELLED"];
    let mut cancelled_jobs = HashSet::new();
    for c in &ledger.cancels {
        if let Cancelled::Job { id, .. } = c {
            cancelled_jobs.insert(*id);
        }
    }
    for j in &jobs {
        let accepted = ledger.accepted.contains_key(&j.batch_id);
        if !terminal.contains(&j.status.as_str()) {
            if accepted {
                s.lost += 1;
            }
            problems.push(format!(
                "job {} (batch {}) is still {}",
                j.id, j.batch_id, j.status
            ));
            continue;
        }
        if accepted {
            s.terminal += 1;
        }
        match j.status.as_str() {
            "PROCESSED" => s.processed += 1,
            "FAILED" => s.failed += 1,
            _ => s.cancelled += 1,
        }
        if !j.finished {
            problems.push(format!(
                "job {} is {} without a finish time",
                j.id, j.status
            ));
        }
        if j.outcomes > 1 + j.operator_retries {
            problems.push(format!("job {} finished {} times", j.id, j.outcomes));
        }
        match j.status.as_str() {
            "PROCESSED" if !j.has_result => {
                problems.push(format!("job {} PROCESSED without a result", j.id))
            }
            "FAILED" if j.error_type.is_none() => {
                problems.push(format!("job {} FAILED without an error", j.id))
            }
            "CANCELLED" if j.has_result => problems.push(format!(
                "job {} is CANCELLED but a late result was stored",
                j.id
            )),
            _ => {}
        }
        let Some(kind) = j.body["sim_key"].as_str().and_then(|k| ledger.kinds.get(k)) else {
            continue;
        };
        if j.status == "CANCELLED" {
            continue;
        }
        match (kind, j.status.as_str()) {
            (Kind::Fatal, "PROCESSED") => {
                problems.push(format!("job {} should have failed but PROCESSED", j.id))
            }
            (Kind::Ok | Kind::Retry(_), "FAILED") => problems.push(format!(
                "job {} should have succeeded but FAILED ({}) after {} attempts",
                j.id,
                j.error_type.as_deref().unwrap_or("?"),
                j.attempt
            )),
            _ => {}
        }
        if j.attempt > kind.attempts() {
            s.duplicates += 1;
        }
    }

    // Cancels: a cancelled batch's counts never change after the cancel answered, and a
    // second cancel (like one on a DONE batch) changes nothing.
    for c in &ledger.cancels {
        match c {
            Cancelled::Batch { id, counts: then } => {
                if then["queued"] != 0 || then["processing"] != 0 {
                    problems.push(format!(
                        "batch {id}: cancel answered with unfinished jobs: {then}"
                    ));
                }
                if let Some(b) = by_batch.get(id) {
                    let now = db_counts(&b.by_status);
                    if &now != then {
                        problems.push(format!(
                            "batch {id} changed after its cancel: {then} then {now}"
                        ));
                    }
                }
                let Some(t) = owner(*id) else { continue };
                match t
                    .client
                    .post(&format!("/v1/batches/{id}/cancel"), None)
                    .await
                {
                    Ok((200, again)) if &counts(&again) == then => {}
                    other => {
                        problems.push(format!("batch {id}: a second cancel answered {other:?}"))
                    }
                }
            }
            Cancelled::Job { id, status } => {
                if let Some(j) = jobs.iter().find(|j| j.id == *id)
                    && &j.status != status
                {
                    problems.push(format!(
                        "job {id} was {status} when cancelled, is {} now",
                        j.status
                    ));
                }
            }
        }
    }

    // The API agrees with the rows: every accepted batch DONE, counts equal to job states,
    // the priority its tenant asked for.
    for (&id, a) in &ledger.accepted {
        let Some(b) = by_batch.get(&id) else { continue };
        let Some(t) = tenants.get(a.tenant) else {
            continue;
        };
        match t.client.get(&format!("/v1/batches/{id}")).await {
            Ok((200, v)) => {
                let want = db_counts(&b.by_status);
                if counts(&v) != want || v["total"] != b.total || v["status"] != "DONE" {
                    problems.push(format!(
                        "batch {id}: the API says {} {} (total {}), the rows say {want}",
                        v["status"],
                        counts(&v),
                        v["total"]
                    ));
                }
                if v["priority"] != t.spec.priority {
                    problems.push(format!(
                        "batch {id} of tenant {}: priority {} (submitted {})",
                        t.spec.name, v["priority"], t.spec.priority
                    ));
                }
            }
            other => problems.push(format!("GET /v1/batches/{id}: {other:?}")),
        }
    }
    // Per tenant: cancelling its first (DONE) batch changes nothing, and the next tenant's key
    // neither sees it nor cancels it.
    for (i, t) in tenants.iter().enumerate() {
        let Some((&first, _)) = ledger.accepted.iter().find(|(_, a)| a.tenant == i) else {
            continue;
        };
        if let (Ok((200, before)), Ok((200, after))) = (
            t.client.get(&format!("/v1/batches/{first}")).await,
            t.client
                .post(&format!("/v1/batches/{first}/cancel"), None)
                .await,
        ) && counts(&before) != counts(&after)
        {
            problems.push(format!("cancelling DONE batch {first} changed it"));
        }
        let other = &tenants[(i + 1) % tenants.len()];
        for answer in [
            other.client.get(&format!("/v1/batches/{first}")).await,
            other
                .client
                .post(&format!("/v1/batches/{first}/cancel"), None)
                .await,
        ] {
            if !matches!(answer, Ok((404, _))) {
                problems.push(format!(
                    "tenant {} reached batch {first} of tenant {}: {answer:?}",
                    other.spec.name, t.spec.name
                ));
            }
        }
    }
    s.problems.extend(problems);
    Ok(())
}

async fn check_dead_letters(w: &World, s: &mut Summary) {
    let names = Names::new("chaos");
    if let Ok(conn) = volley_amqp::connect(&w.rabbit.url(), "volley-chaos-check").await {
        if let Ok(ch) = conn.create_channel().await {
            for q in names.work_queues() {
                if let Ok((n, _)) = volley_amqp::queue_depth(&ch, &Names::dlq(&q)).await {
                    s.dead_letters += n;
                }
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }
    let list = run_command(
        w.services
            .batchctl(&["dlq", "list", "--queue", "llm", "--json"]),
        Duration::from_secs(60),
    )
    .await;
    match list {
        Ok(out) if out.lines().any(|l| l.contains("undecodable")) => {}
        Ok(out) => s.problems.push(format!(
            "the undecodable message is not dead-lettered: {out}"
        )),
        Err(e) => s.problems.push(format!("batchctl dlq list: {e:#}")),
    }
}
