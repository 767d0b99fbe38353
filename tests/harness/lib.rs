//! Test harness: starts a whole Volley stack in-process — gateway, batch-state, the five
//! workers and the provider simulator — against the real RabbitMQ and PostgreSQL. Each stack
//! gets its own database and its own queue prefix, so tests run in parallel; both are removed
//! when the stack is dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use volley_amqp::{Names, connect, delete_topology};
use volley_config::Settings;
use volley_db::Db;
use volley_db::testing::TestDatabase;
use volley_domain::InferenceType;

pub use provider_sim::{SimConfig, SimHandle};
pub use trace::spans;

mod trace;

pub fn amqp_url() -> String {
    std::env::var("VOLLEY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The repository's root (this crate is `tests/harness`).
fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The shipped configuration, with test-friendly timings.
pub fn base_settings() -> Settings {
    let path = workspace_root().join("config/volley.toml");
    let mut s = Settings::from_file(&path).unwrap();
    s.amqp_url = amqp_url();
    s.dev_mode = true;
    s.database_pool_size = 4;
    s.gateway.workers = 1;
    s.state.sweep_interval_ms = 200;
    s.state.dispatch_grace_ms = 1_000;
    s.state.lease_ms = 3_000;
    s.worker.concurrency = 32;
    s.worker.retry_base_ms = 20;
    s.worker.retry_max_ms = 200;
    s.worker.shutdown_grace_secs = 1;
    s
}

/// A listener on a free loopback port, for a service to serve on.
pub fn local_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

pub struct Stack {
    pub url: String,
    pub key: String,
    pub db: Db,
    pub settings: Settings,
    pub sim: Option<SimHandle>,
    pub http: reqwest::Client,
    gateway: Option<gateway::Running>,
    state: Option<batch_state::Running>,
    workers: Vec<worker_runtime::Running>,
    _media: tempfile::TempDir,
    _database: TestDatabase,
}

/// Another gateway replica on a stack's database and broker (see [`Stack::replica`]).
pub struct Replica {
    pub url: String,
    gateway: gateway::Running,
}

impl Replica {
    /// Drains (readiness off, event streams ended) and stops it.
    pub async fn stop(self) {
        self.gateway.stop().await.unwrap();
    }
}

/// What a test may change before the stack starts.
pub struct Options {
    pub sim: SimConfig,
    pub workers: Vec<InferenceType>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sim: SimConfig {
                latency_ms: 5,
                ..SimConfig::default()
            },
            workers: InferenceType::ALL.to_vec(),
        }
    }
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(Options::default(), |_| {}).await
    }

    pub async fn start_with(opts: Options, tweak: impl FnOnce(&mut Settings)) -> Stack {
        trace::logs_if_asked();
        let (database, db) = TestDatabase::create().await.unwrap();
        let sim = provider_sim::spawn(TcpListener::bind("127.0.0.1:0").unwrap(), opts.sim)
            .await
            .unwrap();
        let media = tempfile::tempdir().unwrap();
        let gw_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let st_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let gw_port = gw_listener.local_addr().unwrap().port();
        let st_port = st_listener.local_addr().unwrap().port();

        let mut s = base_settings();
        s.database_url = database.url.clone();
        s.queue_prefix = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        s.gateway.addr = format!("127.0.0.1:{gw_port}");
        s.gateway.public_url = format!("http://127.0.0.1:{gw_port}");
        s.state.addr = format!("127.0.0.1:{st_port}");
        s.state.url = format!("http://127.0.0.1:{st_port}");
        s.worker.addr = "127.0.0.1:0".into();
        s.media.dir = media.path().to_string_lossy().into_owned();
        s.media.signing_key = volley_config::Secret::new(uuid::Uuid::new_v4().to_string());
        // Workers authenticate to batch-state as in production.
        s.state.internal_token =
            volley_config::Secret::new(uuid::Uuid::new_v4().simple().to_string());
        // HTTP providers go to this stack's simulator; local ones (espeak-ng) stay local.
        for p in s.providers.iter_mut().filter(|p| p.kind.is_http()) {
            p.base_url = format!("{}/v1", sim.url());
        }
        tweak(&mut s);
        s.validate().unwrap();

        let state = batch_state::start(s.clone(), st_listener).unwrap();
        let gateway = gateway::start(s.clone(), gw_listener).unwrap();
        let workers = opts
            .workers
            .iter()
            .map(|k| worker_runtime::start(*k, s.clone(), local_listener()).unwrap())
            .collect();
        let key = db.create_key("alice", None).await.unwrap().secret;
        let stack = Stack {
            url: format!("http://127.0.0.1:{gw_port}"),
            key,
            db,
            settings: s,
            sim: Some(sim),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            gateway: Some(gateway),
            state: Some(state),
            workers,
            _media: media,
            _database: database,
        };
        stack.wait_ready().await;
        stack
    }

    /// Starts another gateway replica on this stack's settings (database, broker), as a
    /// load balancer would have in front of several; `tweak` may change its gateway settings.
    pub async fn replica(&self, tweak: impl FnOnce(&mut Settings)) -> Replica {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut s = self.settings.clone();
        s.gateway.addr = listener.local_addr().unwrap().to_string();
        tweak(&mut s);
        let gateway = gateway::start(s, listener).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{url}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "{url} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Replica { url, gateway }
    }

    /// Waits until the gateway, batch-state and every worker report ready.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut urls = vec![
            format!("{}/readyz", self.url),
            format!("{}/readyz", self.settings.state.url),
        ];
        for w in &self.workers {
            urls.push(format!("http://127.0.0.1:{}/readyz", w.port));
        }
        for u in urls {
            loop {
                if let Ok(r) = self.http.get(&u).send().await
                    && r.status().is_success()
                {
                    break;
                }
                assert!(Instant::now() < deadline, "{u} never became ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Jobs each worker is running now (from its `/readyz`).
    pub async fn worker_in_flight(&self) -> u64 {
        let mut n = 0;
        for w in &self.workers {
            let r = self
                .http
                .get(format!("http://127.0.0.1:{}/readyz", w.port))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            n += v["in_flight"].as_u64().unwrap();
        }
        n
    }

    /// The base URL of the running worker of `kind` (its `/readyz`, `/metrics`...).
    pub fn worker_url(&self, kind: InferenceType) -> Option<String> {
        self.workers
            .iter()
            .find(|w| w.worker().kind == kind)
            .map(|w| format!("http://127.0.0.1:{}", w.port))
    }

    pub fn names(&self) -> Names {
        Names::new(&self.settings.queue_prefix)
    }

    pub fn sim(&self) -> &SimHandle {
        self.sim.as_ref().unwrap()
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.http.post(format!("{}{path}", self.url)).json(body),
            &self.key,
        )
        .await
    }

    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.url)), &self.key)
            .await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.url)), &self.key)
            .await
    }

    pub async fn get_as(&self, path: &str, key: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.url)), key)
            .await
    }

    async fn send(&self, rb: reqwest::RequestBuilder, key: &str) -> (u16, Value) {
        let r = rb.bearer_auth(key).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// Submits a batch as `key`, expects 202 and returns the batch id.
    pub async fn submit_as(&self, key: &str, requests: &[Value]) -> String {
        let (status, b) = self
            .send(
                self.http
                    .post(format!("{}/v1/batches", self.url))
                    .json(&serde_json::json!({ "requests": requests })),
                key,
            )
            .await;
        assert_eq!(status, 202, "{b}");
        b["id"].as_str().unwrap().to_owned()
    }

    /// Each job of `batch` as its owner `key` reads it, in the batch's order.
    pub async fn jobs_as(&self, key: &str, batch: &Value) -> Vec<Value> {
        let mut jobs = Vec::new();
        for j in batch["jobs"].as_array().unwrap() {
            let (status, job) = self
                .get_as(&format!("/v1/jobs/{}", j["id"].as_str().unwrap()), key)
                .await;
            assert_eq!(status, 200, "{job}");
            jobs.push(job);
        }
        jobs
    }

    /// Submits a batch as `key`, waits until it is DONE and returns its jobs in order.
    pub async fn run_batch_as(
        &self,
        key: &str,
        requests: &[Value],
        timeout: Duration,
    ) -> Vec<Value> {
        let id = self.submit_as(key, requests).await;
        let batch = self.wait_done_as(key, &id, timeout).await;
        self.jobs_as(key, &batch).await
    }

    /// Polls a batch until `done(batch)` or the timeout.
    pub async fn wait_batch(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_batch_as(&self.key, id, timeout, done).await
    }

    /// Polls a batch as its owner `key` until `done(batch)` or the timeout.
    pub async fn wait_batch_as(
        &self,
        key: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, b) = self.get_as(&format!("/v1/batches/{id}"), key).await;
            assert_eq!(status, 200, "{b}");
            if done(&b) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "batch {id} did not get there in {timeout:?}: {}",
                serde_json::json!({
                    "status": b["status"], "queued": b["queued"], "processing": b["processing"],
                    "processed": b["processed"], "failed": b["failed"], "cancelled": b["cancelled"]
                })
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_done(&self, id: &str, timeout: Duration) -> Value {
        self.wait_batch(id, timeout, |b| b["status"] == "DONE")
            .await
    }

    pub async fn wait_done_as(&self, key: &str, id: &str, timeout: Duration) -> Value {
        self.wait_batch_as(key, id, timeout, |b| b["status"] == "DONE")
            .await
    }

    /// Stops everything in order and removes the stack's queues and database.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        for w in self.workers.drain(..) {
            w.stop().await.unwrap();
        }
        if let Some(g) = self.gateway.take() {
            g.stop().await.unwrap();
        }
        if let Some(s) = self.state.take() {
            s.stop().await.unwrap();
        }
        if let Some(sim) = self.sim.take() {
            sim.stop().await;
        }
        cleanup_queues(&self.settings.queue_prefix).await;
    }
}

async fn cleanup_queues(prefix: &str) {
    if let Ok(conn) = connect(&amqp_url(), "volley-test-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = delete_topology(&ch, &Names::new(prefix)).await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A test that panicked did not call `stop`: still remove its queues.
        if self.state.is_some() {
            let prefix = self.settings.queue_prefix.clone();
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(cleanup_queues(&prefix));
                }
            })
            .join();
        }
    }
}
