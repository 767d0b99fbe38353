//! Settings for every Volley process.
//!
//! One file (`config/volley.toml` by default, `VOLLEY_CONFIG` to choose another) gives the
//! providers and the model catalog; `VOLLEY_*` environment variables override the scalar
//! settings (see [`ENV_KEYS`]). Settings are passed by value; nothing reads a global.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use volley_domain::{Endpoint, ModelCatalog, ModelCheck};

mod dispatch;
mod webhooks;
pub use dispatch::DispatchSettings;
pub use webhooks::WebhookSettings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {key}={value:?} is not valid: {message}")]
    Env {
        key: String,
        value: String,
        message: String,
    },
    #[error("configuration is not consistent: {0}")]
    Invalid(String),
}

/// The shortest media signing key accepted outside development mode.
const MIN_MEDIA_SIGNING_KEY_BYTES: usize = 32;

/// Media signing keys published in this repository (configuration, Compose, examples).
const KNOWN_MEDIA_SIGNING_KEYS: &[&str] = &[
    "dev-only-signing-key",
    "compose-dev-signing-key-change-me",
    "CHANGE-ME-32-random-bytes-hex",
];

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database_url: String,
    /// Connections in each r2d2 pool.
    pub database_pool_size: u32,
    pub amqp_url: String,
    /// Prefix of every queue and exchange name, so that stacks (and tests) can share a broker.
    pub queue_prefix: String,
    /// Development mode (`make run`, Docker Compose, tests): lets services start with the
    /// shipped development secrets. Never set it in production: outside it, services refuse
    /// to start with an empty, short or known secret.
    pub dev_mode: bool,
    pub gateway: GatewaySettings,
    pub state: StateSettings,
    pub worker: WorkerSettings,
    pub media: MediaSettings,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub webhooks: WebhookSettings,
    pub dispatch: DispatchSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    pub addr: String,
    /// Base of the URLs the gateway hands out (media links).
    pub public_url: String,
    /// When false, `POST /v1/batches` answers 503 `async_disabled`.
    pub async_enabled: bool,
    pub max_body_bytes: usize,
    pub workers: usize,
    /// When set, `/metrics` is served on this address only (an internal port), not on `addr`.
    pub metrics_addr: Option<String>,
    /// A request body must arrive whole within this long, else 408 `request_timeout`.
    pub body_timeout_ms: u64,
    /// Requests per second each API key may make on average (0: no limit).
    pub key_rate_per_sec: u32,
    /// Requests an API key may make at once above its rate, after a quiet spell.
    pub key_burst: u32,
    /// Requests of one API key in progress at once (0: no limit).
    pub key_max_in_flight: u32,
    /// Event streams (`GET /v1/batches/{id}/events`) one API key may hold open at once on
    /// one gateway replica; past it, 429 `rate_limited`.
    pub sse_max_streams_per_key: u32,
    /// A comment line on every event stream this often, so that proxies and clients see a
    /// quiet stream is alive.
    pub sse_heartbeat_ms: u64,
    /// Each stream re-reads its batch this often even without a notification (one missed
    /// while the LISTEN connection was down, or a change nothing notifies, such as a claim).
    pub sse_recheck_ms: u64,
    /// A stream whose client has not taken its next event within this long is dropped.
    pub sse_send_timeout_ms: u64,
    /// Completion estimates: finishes within this window measure each modality's throughput.
    pub eta_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    pub addr: String,
    /// Where workers reach batch-state to claim jobs.
    pub url: String,
    pub sweep_interval_ms: u64,
    /// Jobs committed but not confirmed on the broker for this long are published again.
    pub dispatch_grace_ms: u64,
    /// A claim lasts this long unless the worker renews it; then the job is handed out again.
    pub lease_ms: u64,
    /// A QUEUED job whose message was published this long ago is published again.
    pub redispatch_after_ms: u64,
    /// Events applied in one transaction at most.
    pub event_batch: usize,
    /// A job not started this long after it was accepted fails with type `expired`
    /// (0: never).
    pub expire_after_ms: u64,
    /// The shared secret workers present to batch-state's internal API (`Authorization:
    /// Bearer`). At least `MIN_INTERNAL_TOKEN_CHARS` characters outside `dev_mode`; empty
    /// (dev mode only) leaves the internal API open.
    pub internal_token: Secret,
}

/// The shortest internal token batch-state and workers accept outside `dev_mode`.
const MIN_INTERNAL_TOKEN_CHARS: usize = 32;

/// The development token of the shipped Compose file: refused outside `dev_mode`.
pub const DEV_INTERNAL_TOKEN: &str = "compose-dev-internal-token-change-me";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Health endpoint address.
    pub addr: String,
    /// Jobs a worker runs at once (and its AMQP prefetch).
    pub concurrency: u16,
    /// Attempts per job before it fails for good.
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// On SIGTERM, how long running jobs may take to finish before they are handed back.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSettings {
    /// Where media is kept: a local directory (default) or an S3-compatible bucket.
    pub store: MediaStoreKind,
    /// Local directory of the media store (`store = "local"`).
    pub dir: String,
    /// The bucket (`store = "s3"`).
    pub s3: S3Settings,
    /// Key for signing media URLs; must be the same on the gateway and workers.
    pub signing_key: Secret,
    pub url_ttl_secs: u64,
    /// Largest media file a worker stores.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaStoreKind {
    #[default]
    Local,
    S3,
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...). Credentials left empty fall back to
/// the standard `AWS_*` environment variables and instance or pod credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    pub bucket: String,
    /// Empty: `us-east-1`, or `AWS_REGION`.
    pub region: String,
    /// An S3-compatible server's URL (MinIO: `http://minio:9000`); empty for AWS itself.
    /// `http://` endpoints are allowed, for in-cluster servers.
    pub endpoint: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI-compatible HTTP (OpenAI, vLLM, llama.cpp, Ollama, Together, Groq, ...).
    Openai,
    /// Replicate-style create-and-poll predictions.
    Predictions,
    /// Local text-to-speech with the espeak-ng program (no HTTP; WAV output).
    Espeak,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Predictions => "predictions",
            ProviderKind::Espeak => "espeak",
        }
    }

    /// Whether an adapter of this kind implements `endpoint`.
    pub fn serves(self, endpoint: Endpoint) -> bool {
        match self {
            ProviderKind::Openai => !matches!(
                endpoint,
                Endpoint::VideosGenerations | Endpoint::MusicGenerations
            ),
            ProviderKind::Predictions => {
                !matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
            }
            ProviderKind::Espeak => endpoint == Endpoint::AudioSpeech,
        }
    }

    /// Kinds reached over HTTP, which need a `base_url`.
    pub fn is_http(self) -> bool {
        !matches!(self, ProviderKind::Espeak)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Where the API lives (HTTP kinds only), e.g. `http://localhost:8000/v1`.
    #[serde(default)]
    pub base_url: String,
    #[serde(default)]
    pub api_key: Secret,
    /// One request (a whole prediction, an espeak-ng run) may take this long.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Calls in flight at once, per worker process. 429s lower it for a while (see
    /// docs/providers.md); it never goes above this.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// LLM tokens per minute (`openai` only): each chat or completion reserves an estimate
    /// before it starts, corrected by the usage the provider reports.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// How often a prediction is polled at first (grows by half up to 10 s).
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// The espeak-ng program (`espeak` only): a name looked up on PATH, or a path.
    #[serde(default)]
    pub command: Option<String>,
    /// Hosts the provider's media links may point to (`host`, `host:port` or `*.domain`);
    /// empty: any host with public addresses. Links in an answer are the tenant's to steer.
    #[serde(default)]
    pub media_hosts: Vec<String>,
    /// Lets media links reach loopback, private and CGNAT addresses: for a provider that is
    /// on the local network (the simulator). Metadata and link-local addresses stay refused.
    #[serde(default)]
    pub allow_private_network: bool,
    /// This provider is Volley's simulator: requests keep their `sim_*` fields (every other
    /// provider has them stripped).
    #[serde(default)]
    pub simulator: bool,
}

impl ProviderConfig {
    /// The program an `espeak` provider runs.
    pub fn command(&self) -> &str {
        self.command.as_deref().unwrap_or("espeak-ng")
    }
}

fn default_timeout_ms() -> u64 {
    120_000
}
fn default_max_concurrency() -> usize {
    64
}
fn default_poll_ms() -> u64 {
    250
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The public model name clients send.
    pub name: String,
    /// Endpoint paths this model accepts.
    pub endpoints: Vec<String>,
    /// Providers serving it, in order of preference.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub provider: String,
    /// The provider's own name for the model; the public name if absent.
    #[serde(default)]
    pub upstream_model: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database_url: "postgres://postgres@127.0.0.1:5432/volley".into(),
            database_pool_size: 8,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue_prefix: "volley".into(),
            dev_mode: false,
            gateway: GatewaySettings::default(),
            state: StateSettings::default(),
            worker: WorkerSettings::default(),
            media: MediaSettings::default(),
            providers: Vec::new(),
            models: Vec::new(),
            webhooks: WebhookSettings::default(),
            dispatch: DispatchSettings::default(),
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            addr: "127.0.0.1:8080".into(),
            public_url: "http://127.0.0.1:8080".into(),
            async_enabled: true,
            max_body_bytes: 16 * 1024 * 1024,
            workers: 2,
            metrics_addr: None,
            body_timeout_ms: 10_000,
            key_rate_per_sec: 100,
            key_burst: 200,
            key_max_in_flight: 64,
            sse_max_streams_per_key: 16,
            sse_heartbeat_ms: 15_000,
            sse_recheck_ms: 5_000,
            sse_send_timeout_ms: 10_000,
            eta_window_secs: 300,
        }
    }
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            addr: "127.0.0.1:8081".into(),
            url: "http://127.0.0.1:8081".into(),
            sweep_interval_ms: 2_000,
            dispatch_grace_ms: 5_000,
            lease_ms: 60_000,
            redispatch_after_ms: 600_000,
            event_batch: 256,
            expire_after_ms: 86_400_000,
            internal_token: Secret::default(),
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            addr: "127.0.0.1:8090".into(),
            concurrency: 64,
            max_attempts: 4,
            retry_base_ms: 500,
            retry_max_ms: 30_000,
            shutdown_grace_secs: 30,
        }
    }
}

impl Default for MediaSettings {
    fn default() -> Self {
        MediaSettings {
            store: MediaStoreKind::Local,
            dir: ".volley/media".into(),
            s3: S3Settings::default(),
            signing_key: Secret::default(),
            url_ttl_secs: 3_600,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Every environment variable Volley reads, with what it sets. Deploy files are checked
/// against this list.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("VOLLEY_CONFIG", "path of the TOML configuration file"),
    ("VOLLEY_DATABASE_URL", "PostgreSQL URL"),
    ("VOLLEY_DATABASE_POOL_SIZE", "connections per pool"),
    ("VOLLEY_AMQP_URL", "RabbitMQ URL"),
    ("VOLLEY_QUEUE_PREFIX", "prefix of queue and exchange names"),
    (
        "VOLLEY_DEV_MODE",
        "true allows development secrets (never in production)",
    ),
    ("VOLLEY_GATEWAY_ADDR", "gateway listen address"),
    (
        "VOLLEY_PUBLIC_URL",
        "base URL of links the gateway hands out",
    ),
    (
        "VOLLEY_ASYNC_ENABLED",
        "false turns batch submission off (503)",
    ),
    (
        "VOLLEY_GATEWAY_METRICS_ADDR",
        "internal address serving the gateway's /metrics (then not on the public port)",
    ),
    (
        "VOLLEY_GATEWAY_BODY_TIMEOUT_MS",
        "a request body must arrive within this long (408)",
    ),
    (
        "VOLLEY_GATEWAY_KEY_RATE_PER_SEC",
        "requests per second per API key (0: no limit; 429)",
    ),
    (
        "VOLLEY_GATEWAY_KEY_BURST",
        "requests per API key allowed at once above the rate",
    ),
    (
        "VOLLEY_GATEWAY_KEY_MAX_IN_FLIGHT",
        "requests per API key in progress at once (0: no limit; 429)",
    ),
    (
        "VOLLEY_GATEWAY_SSE_MAX_STREAMS_PER_KEY",
        "event streams per API key open at once on one gateway (429 past it)",
    ),
    (
        "VOLLEY_DISPATCH_FAIR",
        "false publishes every job at once (one FIFO queue per modality, no fair share)",
    ),
    (
        "VOLLEY_DISPATCH_MIN_QUEUE_DEPTH",
        "ready messages at which a modality's queue counts as full (at least)",
    ),
    ("VOLLEY_STATE_ADDR", "batch-state listen address"),
    ("VOLLEY_STATE_URL", "where workers reach batch-state"),
    ("VOLLEY_LEASE_MS", "how long a claim lasts without renewal"),
    (
        "VOLLEY_EXPIRE_AFTER_MS",
        "a job not started this long after acceptance fails as expired (0: never)",
    ),
    (
        "VOLLEY_INTERNAL_TOKEN",
        "shared secret of workers and batch-state's internal API (32+ characters)",
    ),
    (
        "VOLLEY_WEBHOOK_HTTP_HOSTS",
        "comma-separated hosts webhooks may reach over plain http, on any port",
    ),
    (
        "VOLLEY_WEBHOOK_ALLOW_PRIVATE_NETWORK",
        "true lets webhooks go to loopback and private addresses",
    ),
    ("VOLLEY_WORKER_ADDR", "worker health listen address"),
    ("VOLLEY_WORKER_CONCURRENCY", "jobs a worker runs at once"),
    ("VOLLEY_MAX_ATTEMPTS", "attempts per job"),
    (
        "VOLLEY_SHUTDOWN_GRACE_SECS",
        "how long a stopping worker lets jobs finish",
    ),
    ("VOLLEY_MEDIA_STORE", "media store: local or s3"),
    ("VOLLEY_MEDIA_DIR", "local media store directory"),
    ("VOLLEY_MEDIA_S3_BUCKET", "S3 bucket of the media store"),
    ("VOLLEY_MEDIA_S3_REGION", "S3 region of the media store"),
    (
        "VOLLEY_MEDIA_S3_ENDPOINT",
        "URL of an S3-compatible server (MinIO, ...)",
    ),
    ("VOLLEY_MEDIA_S3_ACCESS_KEY_ID", "S3 access key id"),
    ("VOLLEY_MEDIA_S3_SECRET_ACCESS_KEY", "S3 secret access key"),
    ("VOLLEY_MEDIA_SIGNING_KEY", "key that signs media URLs"),
    (
        "VOLLEY_PROVIDER_<NAME>_BASE_URL",
        "override a provider's base URL",
    ),
    ("VOLLEY_PROVIDER_<NAME>_API_KEY", "a provider's API key"),
];

impl Settings {
    /// Reads the file named by `VOLLEY_CONFIG` (or `config/volley.toml` if it exists), then
    /// applies environment overrides.
    pub fn load() -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Settings::load_from(&env)
    }

    /// [`Settings::load`] with an explicit environment, for tests.
    pub fn load_from(env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        let mut s = match env.get("VOLLEY_CONFIG") {
            Some(path) => Settings::from_file(Path::new(path))?,
            None if Path::new("config/volley.toml").exists() => {
                Settings::from_file(Path::new("config/volley.toml"))?
            }
            None => Settings::default(),
        };
        s.apply_env(env)?;
        s.validate()?;
        Ok(s)
    }

    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.to_string(),
        })
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: fmt::Display,
        {
            v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                key: key.into(),
                value: v.into(),
                message: e.to_string(),
            })
        }
        for (key, v) in env {
            let v = v.as_str();
            match key.as_str() {
                "VOLLEY_DATABASE_URL" => self.database_url = v.into(),
                "VOLLEY_DATABASE_POOL_SIZE" => self.database_pool_size = parse(key, v)?,
                "VOLLEY_AMQP_URL" => self.amqp_url = v.into(),
                "VOLLEY_QUEUE_PREFIX" => self.queue_prefix = v.into(),
                "VOLLEY_DEV_MODE" => self.dev_mode = parse(key, v)?,
                "VOLLEY_GATEWAY_ADDR" => self.gateway.addr = v.into(),
                "VOLLEY_PUBLIC_URL" => self.gateway.public_url = v.into(),
                "VOLLEY_ASYNC_ENABLED" => self.gateway.async_enabled = parse(key, v)?,
                "VOLLEY_GATEWAY_METRICS_ADDR" => {
                    self.gateway.metrics_addr = Some(v.trim().to_owned()).filter(|a| !a.is_empty())
                }
                "VOLLEY_GATEWAY_BODY_TIMEOUT_MS" => self.gateway.body_timeout_ms = parse(key, v)?,
                "VOLLEY_GATEWAY_KEY_RATE_PER_SEC" => self.gateway.key_rate_per_sec = parse(key, v)?,
                "VOLLEY_GATEWAY_KEY_BURST" => self.gateway.key_burst = parse(key, v)?,
                "VOLLEY_GATEWAY_KEY_MAX_IN_FLIGHT" => {
                    self.gateway.key_max_in_flight = parse(key, v)?
                }
                "VOLLEY_GATEWAY_SSE_MAX_STREAMS_PER_KEY" => {
                    self.gateway.sse_max_streams_per_key = parse(key, v)?
                }
                "VOLLEY_STATE_ADDR" => self.state.addr = v.into(),
                "VOLLEY_STATE_URL" => self.state.url = v.into(),
                "VOLLEY_LEASE_MS" => self.state.lease_ms = parse(key, v)?,
                "VOLLEY_EXPIRE_AFTER_MS" => self.state.expire_after_ms = parse(key, v)?,
                "VOLLEY_INTERNAL_TOKEN" => self.state.internal_token = Secret::new(v),
                "VOLLEY_WEBHOOK_HTTP_HOSTS" => {
                    self.webhooks.http_hosts = v
                        .split(',')
                        .map(str::trim)
                        .filter(|h| !h.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "VOLLEY_WEBHOOK_ALLOW_PRIVATE_NETWORK" => {
                    self.webhooks.allow_private_network = parse(key, v)?
                }
                "VOLLEY_DISPATCH_FAIR" => self.dispatch.fair = parse(key, v)?,
                "VOLLEY_DISPATCH_MIN_QUEUE_DEPTH" => self.dispatch.min_queue_depth = parse(key, v)?,
                "VOLLEY_WORKER_ADDR" => self.worker.addr = v.into(),
                "VOLLEY_WORKER_CONCURRENCY" => self.worker.concurrency = parse(key, v)?,
                "VOLLEY_MAX_ATTEMPTS" => self.worker.max_attempts = parse(key, v)?,
                "VOLLEY_SHUTDOWN_GRACE_SECS" => self.worker.shutdown_grace_secs = parse(key, v)?,
                "VOLLEY_MEDIA_STORE" => {
                    self.media.store = match v.trim() {
                        "local" => MediaStoreKind::Local,
                        "s3" => MediaStoreKind::S3,
                        _ => {
                            return Err(ConfigError::Env {
                                key: key.into(),
                                value: v.into(),
                                message: "expected local or s3".into(),
                            });
                        }
                    }
                }
                "VOLLEY_MEDIA_DIR" => self.media.dir = v.into(),
                "VOLLEY_MEDIA_S3_BUCKET" => self.media.s3.bucket = v.into(),
                "VOLLEY_MEDIA_S3_REGION" => self.media.s3.region = v.into(),
                "VOLLEY_MEDIA_S3_ENDPOINT" => self.media.s3.endpoint = v.into(),
                "VOLLEY_MEDIA_S3_ACCESS_KEY_ID" => self.media.s3.access_key_id = Secret::new(v),
                "VOLLEY_MEDIA_S3_SECRET_ACCESS_KEY" => {
                    self.media.s3.secret_access_key = Secret::new(v)
                }
                "VOLLEY_MEDIA_SIGNING_KEY" => self.media.signing_key = Secret::new(v),
                _ => {
                    if let Some(rest) = key.strip_prefix("VOLLEY_PROVIDER_") {
                        self.apply_provider_env(key, rest, v)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_provider_env(&mut self, key: &str, rest: &str, v: &str) -> Result<(), ConfigError> {
        let (name, field) = if let Some(n) = rest.strip_suffix("_BASE_URL") {
            (n, "base_url")
        } else if let Some(n) = rest.strip_suffix("_API_KEY") {
            (n, "api_key")
        } else {
            return Err(ConfigError::Env {
                key: key.into(),
                value: "<hidden>".into(),
                message: "expected VOLLEY_PROVIDER_<NAME>_BASE_URL or _API_KEY".into(),
            });
        };
        let wanted = name.to_ascii_lowercase().replace('_', "-");
        let Some(p) = self
            .providers
            .iter_mut()
            .find(|p| p.name.to_ascii_lowercase().replace('_', "-") == wanted)
        else {
            return Err(ConfigError::Env {
                key: key.into(),
                value: "<hidden>".into(),
                message: format!("no provider named {wanted:?} is configured"),
            });
        };
        match field {
            "base_url" => p.base_url = v.into(),
            _ => p.api_key = Secret::new(v),
        }
        Ok(())
    }

    /// Consistency checks that would otherwise surface as confusing runtime errors.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.queue_prefix.is_empty()
            || !self
                .queue_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(format!(
                "queue_prefix {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.queue_prefix
            ));
        }
        if self.worker.concurrency == 0 || self.worker.max_attempts == 0 {
            return bad("worker.concurrency and worker.max_attempts must be at least 1".into());
        }
        if self.database_pool_size == 0 {
            return bad("database_pool_size must be at least 1".into());
        }
        if self.gateway.body_timeout_ms == 0 {
            return bad("gateway.body_timeout_ms must be at least 1".into());
        }
        if self.gateway.key_rate_per_sec > 0 && self.gateway.key_burst == 0 {
            return bad("gateway.key_burst must be at least 1 when key_rate_per_sec is set".into());
        }
        let g = &self.gateway;
        if g.sse_heartbeat_ms == 0
            || g.sse_recheck_ms == 0
            || g.sse_send_timeout_ms == 0
            || g.eta_window_secs == 0
        {
            return bad(
                "gateway.sse_heartbeat_ms, sse_recheck_ms, sse_send_timeout_ms and \
                 eta_window_secs must be at least 1"
                    .into(),
            );
        }
        self.validate_media()?;
        self.dispatch.validate().map_err(ConfigError::Invalid)?;
        let w = &self.webhooks;
        if w.concurrency == 0 || w.timeout_ms == 0 || w.schedule_ms.is_empty() {
            return bad(
                "webhooks: concurrency, timeout_ms and schedule_ms must not be 0 or empty".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.providers {
            if !names.insert(p.name.as_str()) {
                return bad(format!("provider {:?} is defined twice", p.name));
            }
            p.validate().map_err(ConfigError::Invalid)?;
        }
        let mut models = std::collections::HashSet::new();
        for m in &self.models {
            if !models.insert(m.name.as_str()) {
                return bad(format!("model {:?} is defined twice", m.name));
            }
            if m.endpoints.is_empty() || m.routes.is_empty() {
                return bad(format!(
                    "model {:?} needs at least one endpoint and one route",
                    m.name
                ));
            }
            for e in &m.endpoints {
                if e.parse::<Endpoint>().is_err() {
                    return bad(format!("model {:?}: unknown endpoint {e:?}", m.name));
                }
            }
            for r in &m.routes {
                let Some(p) = self.provider(&r.provider) else {
                    return bad(format!(
                        "model {:?} routes to unknown provider {:?}",
                        m.name, r.provider
                    ));
                };
                // A route that cannot serve one of the model's endpoints would fail every such
                // job at run time; say so at start-up instead.
                for e in m.endpoints() {
                    if !p.kind.serves(e) {
                        return bad(format!(
                            "model {:?}: provider {:?} (kind {}) cannot serve {e}",
                            m.name,
                            p.name,
                            p.kind.as_str()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses a media signing key anyone could know or guess: empty, shorter than
    /// `MIN_MEDIA_SIGNING_KEY_BYTES`, or one shipped in this repository (the development
    /// configuration, Compose file and example Secret). With such a key anyone can forge
    /// media links. Allowed in [`Settings::dev_mode`] only. The gateway, which signs and
    /// checks links, runs this at start-up.
    pub fn check_media_signing_key(&self) -> Result<(), ConfigError> {
        if self.dev_mode {
            return Ok(());
        }
        let key = self.media.signing_key.expose();
        let why = if key.is_empty() {
            "is empty"
        } else if key.len() < MIN_MEDIA_SIGNING_KEY_BYTES {
            "is shorter than 32 bytes"
        } else if KNOWN_MEDIA_SIGNING_KEYS.contains(&key) || key.contains("CHANGE-ME") {
            "is a development default published with Volley"
        } else {
            return Ok(());
        };
        Err(ConfigError::Invalid(format!(
            "media.signing_key (VOLLEY_MEDIA_SIGNING_KEY) {why}, so media links could be \
             forged: set at least 32 random bytes (e.g. `openssl rand -hex 32`), or \
             VOLLEY_DEV_MODE=true on a development machine"
        )))
    }

    /// For batch-state and workers at start-up: outside `dev_mode`, the internal token must
    /// be set, long enough, and not the shipped development one. Anyone who can reach
    /// batch-state could otherwise claim and hold other tenants' jobs.
    pub fn check_internal_token(&self) -> Result<(), ConfigError> {
        let t = self.state.internal_token.expose();
        if self.dev_mode {
            return Ok(());
        }
        if t.chars().count() < MIN_INTERNAL_TOKEN_CHARS
            || t.starts_with(DEV_INTERNAL_TOKEN)
            || t.contains("CHANGE-ME")
        {
            return Err(ConfigError::Invalid(format!(
                "state.internal_token (VOLLEY_INTERNAL_TOKEN) must be a random secret of at \
                 least {MIN_INTERNAL_TOKEN_CHARS} characters shared by batch-state and the \
                 workers (empty, short or development tokens are allowed only with \
                 VOLLEY_DEV_MODE=true)"
            )));
        }
        Ok(())
    }

    fn validate_media(&self) -> Result<(), ConfigError> {
        let m = &self.media;
        let bad = |m: &str| Err(ConfigError::Invalid(format!("media: {m}")));
        if m.max_bytes == 0 || m.url_ttl_secs == 0 {
            return bad("max_bytes and url_ttl_secs must be at least 1");
        }
        match m.store {
            MediaStoreKind::Local if m.dir.trim().is_empty() => {
                bad("dir must name a directory when store = \"local\"")
            }
            MediaStoreKind::Local => Ok(()),
            MediaStoreKind::S3 => {
                let s3 = &m.s3;
                // S3 bucket names: 3-63 lowercase letters, digits, '-' and '.'.
                if s3.bucket.len() < 3
                    || s3.bucket.len() > 63
                    || !s3
                        .bucket
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
                {
                    return bad(&format!(
                        "store = \"s3\" needs s3.bucket (VOLLEY_MEDIA_S3_BUCKET): 3-63 lowercase \
                         letters, digits, '-' or '.', got {:?}",
                        s3.bucket
                    ));
                }
                let http = ["http://", "https://"];
                if !s3.endpoint.is_empty() && !http.iter().any(|p| s3.endpoint.starts_with(p)) {
                    return bad("s3.endpoint must start with http:// or https://");
                }
                if s3.access_key_id.is_empty() != s3.secret_access_key.is_empty() {
                    return bad(
                        "set both s3 access_key_id and secret_access_key, or neither (to use \
                         AWS_* variables or instance credentials)",
                    );
                }
                Ok(())
            }
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

impl ProviderConfig {
    /// One provider's own consistency: every error names the provider and the setting.
    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "provider name {name:?} must be letters, digits, '-' or '_' (it names the \
                 VOLLEY_PROVIDER_<NAME>_* variables)"
            ));
        }
        let kind = self.kind.as_str();
        if self.kind.is_http() {
            if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
                return Err(format!(
                    "provider {name:?}: base_url must start with http:// or https://"
                ));
            }
        } else if !self.base_url.is_empty() {
            return Err(format!(
                "provider {name:?}: kind {kind} runs locally and takes no base_url"
            ));
        }
        if self.max_concurrency == 0 || self.timeout_ms == 0 {
            return Err(format!(
                "provider {name:?}: max_concurrency and timeout_ms must be at least 1"
            ));
        }
        if self.max_concurrency > 100_000 {
            return Err(format!(
                "provider {name:?}: max_concurrency {} is beyond any sensible limit (100000)",
                self.max_concurrency
            ));
        }
        if self.requests_per_minute == Some(0) || self.tokens_per_minute == Some(0) {
            return Err(format!(
                "provider {name:?}: requests_per_minute and tokens_per_minute must be at least 1 \
                 (leave them out for no limit)"
            ));
        }
        if self.tokens_per_minute.is_some() && self.kind != ProviderKind::Openai {
            return Err(format!(
                "provider {name:?}: tokens_per_minute applies to kind openai only, not {kind}"
            ));
        }
        if self.poll_interval_ms == 0 {
            return Err(format!(
                "provider {name:?}: poll_interval_ms must be at least 1"
            ));
        }
        if !self.kind.is_http() && (!self.media_hosts.is_empty() || self.allow_private_network) {
            return Err(format!(
                "provider {name:?}: media_hosts and allow_private_network apply to HTTP kinds \
                 only, not {kind}"
            ));
        }
        for h in &self.media_hosts {
            let h = h.trim();
            let host = h.strip_prefix("*.").unwrap_or(h);
            if host.is_empty()
                || host.contains(['/', '@', '?', '#', '*'])
                || host.chars().any(char::is_whitespace)
            {
                return Err(format!(
                    "provider {name:?}: media host {h:?} must be host, host:port or *.domain"
                ));
            }
        }
        match (&self.command, self.kind) {
            (Some(_), k) if k != ProviderKind::Espeak => Err(format!(
                "provider {name:?}: command applies to kind espeak only, not {kind}"
            )),
            (Some(c), _) if c.trim().is_empty() || c.chars().any(char::is_control) => Err(format!(
                "provider {name:?}: command {c:?} must name a program"
            )),
            _ => Ok(()),
        }
    }
}

impl ModelConfig {
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter_map(|e| e.parse().ok())
            .collect()
    }
}

impl ModelCatalog for Settings {
    fn check(&self, model: &str, endpoint: Endpoint) -> ModelCheck {
        match self.model(model) {
            None => ModelCheck::UnknownModel,
            Some(m) => {
                let eps = m.endpoints();
                if eps.contains(&endpoint) {
                    ModelCheck::Served
                } else {
                    ModelCheck::WrongEndpoint(eps)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
queue_prefix = "t1"
[worker]
concurrency = 8
[[providers]]
name = "local-sim"
kind = "openai"
base_url = "http://127.0.0.1:9100"
api_key = "sk-secret"
[[models]]
name = "qwen3-8b"
endpoints = ["/v1/chat/completions"]
routes = [{ provider = "local-sim", upstream_model = "qwen" }]
"#;

    #[test]
    fn weak_media_signing_keys_are_refused_outside_dev_mode() {
        let mut s = Settings::default();
        let strong = "0123456789abcdef0123456789abcdef";
        for (key, ok) in [
            ("", false),
            ("short-key", false),
            (&"x".repeat(31), false),
            ("compose-dev-signing-key-change-me", false),
            ("dev-only-signing-key", false),
            ("prefix-CHANGE-ME-and-long-enough-to-pass-length", false),
            (strong, true),
        ] {
            s.media.signing_key = Secret::new(key);
            s.dev_mode = false;
            let r = s.check_media_signing_key();
            assert_eq!(r.is_ok(), ok, "{key:?}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("VOLLEY_MEDIA_SIGNING_KEY"), "{e}");
                if !key.is_empty() {
                    assert!(
                        !e.to_string().contains(key),
                        "the key itself is never shown"
                    );
                }
            }
            s.dev_mode = true;
            assert!(
                s.check_media_signing_key().is_ok(),
                "dev mode allows {key:?}"
            );
        }
        // Every key this repository ships is refused.
        for file in ["../../config/volley.toml", "../../deploy/base/volley.toml"] {
            let text = std::fs::read_to_string(file).unwrap();
            let shipped = Settings::from_toml(&text).unwrap();
            assert!(shipped.check_media_signing_key().is_err(), "{file}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env() {
        let mut s = Settings::from_toml(FILE).unwrap();
        s.apply_env(&env(&[
            ("VOLLEY_WORKER_CONCURRENCY", "3"),
            ("VOLLEY_EXPIRE_AFTER_MS", "0"),
            ("VOLLEY_PROVIDER_LOCAL_SIM_BASE_URL", "http://127.0.0.1:1"),
            ("VOLLEY_WEBHOOK_HTTP_HOSTS", " 127.0.0.1, localhost:9000,,"),
            ("VOLLEY_WEBHOOK_ALLOW_PRIVATE_NETWORK", "true"),
            ("UNRELATED", "x"),
        ]))
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.webhooks.http_hosts, ["127.0.0.1", "localhost:9000"]);
        assert!(s.webhooks.allow_private_network);
        assert_eq!(s.webhooks.allowed_ports, [443]);
        assert_eq!(s.queue_prefix, "t1");
        assert_eq!(s.worker.concurrency, 3);
        assert_eq!(s.state.expire_after_ms, 0);
        assert_eq!(s.providers[0].base_url, "http://127.0.0.1:1");
        assert_eq!(
            s.check("qwen3-8b", Endpoint::ChatCompletions),
            ModelCheck::Served
        );
        assert_eq!(
            s.check("other", Endpoint::ChatCompletions),
            ModelCheck::UnknownModel
        );
    }

    #[test]
    fn dispatch_settings_from_file_and_env_and_their_hostile_values() {
        let s = Settings::from_toml(&format!(
            "{FILE}\n[dispatch]\nfair = false\nmin_queue_depth = 8\naging_ms = 500\n\
             [dispatch.queue_depth]\nvideo = 2\n"
        ))
        .unwrap();
        s.validate().unwrap();
        assert!(!s.dispatch.fair);
        assert_eq!(
            s.dispatch
                .queue_limit(volley_domain::InferenceType::Llm, 1, 2),
            8
        );
        assert_eq!(
            s.dispatch
                .queue_limit(volley_domain::InferenceType::Video, 1, 2),
            2
        );
        let mut s = Settings::from_toml(FILE).unwrap();
        assert!(s.dispatch.fair, "on by default");
        s.apply_env(&env(&[
            ("VOLLEY_DISPATCH_FAIR", "false"),
            ("VOLLEY_DISPATCH_MIN_QUEUE_DEPTH", "16"),
        ]))
        .unwrap();
        assert!(!s.dispatch.fair);
        assert_eq!(s.dispatch.min_queue_depth, 16);
        for (k, v) in [
            ("VOLLEY_DISPATCH_FAIR", "maybe"),
            ("VOLLEY_DISPATCH_MIN_QUEUE_DEPTH", "-1"),
            ("VOLLEY_DISPATCH_MIN_QUEUE_DEPTH", "99999999999"),
        ] {
            let e = s.apply_env(&env(&[(k, v)])).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
        for (field, value) in [
            ("interval_ms", "0"),
            ("interval_ms", "60001"),
            ("min_queue_depth", "0"),
            ("aging_ms", "0"),
        ] {
            let s =
                Settings::from_toml(&format!("{FILE}\n[dispatch]\n{field} = {value}\n")).unwrap();
            let e = s.validate().unwrap_err();
            assert!(e.to_string().contains(&format!("dispatch.{field}")), "{e}");
        }
        for bad in [
            "min_queue_depth = -4",
            "fair = \"yes\"",
            "weights = 3",
            "queue_depth = 16",
            "queue_depth = { video = -1 }",
            "queue_depth = { video = \"16\" }",
            "queue_depth = { video = 4294967296 }",
        ] {
            assert!(
                Settings::from_toml(&format!("{FILE}\n[dispatch]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_do_not_leak_into_debug() {
        let s = Settings::from_toml(FILE).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("sk-secret"), "{dbg}");
    }

    #[test]
    fn the_internal_token_must_be_a_real_secret_outside_dev_mode() {
        let mut s = Settings::from_toml(FILE).unwrap();
        s.dev_mode = false;
        for bad in [
            "",
            "x7Kq2",
            DEV_INTERNAL_TOKEN,
            &format!("{DEV_INTERNAL_TOKEN}-0000"),
        ] {
            s.apply_env(&env(&[("VOLLEY_INTERNAL_TOKEN", bad)]))
                .unwrap();
            let e = s.check_internal_token().unwrap_err();
            assert!(e.to_string().contains("VOLLEY_INTERNAL_TOKEN"), "{e}");
            assert!(!e.to_string().contains(bad) || bad.is_empty(), "{e}");
        }
        s.dev_mode = true;
        assert!(
            s.check_internal_token().is_ok(),
            "development stacks may use anything"
        );
        s.dev_mode = false;
        let good = "f3b1c9d2e8a74c6b9e0d1a2b3c4d5e6f";
        s.apply_env(&env(&[("VOLLEY_INTERNAL_TOKEN", good)]))
            .unwrap();
        assert!(s.check_internal_token().is_ok());
        assert!(
            !format!("{s:?}").contains(good),
            "the token never shows in Debug"
        );
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let mut s = Settings::from_toml(FILE).unwrap();
        let e = s
            .apply_env(&env(&[("VOLLEY_WORKER_CONCURRENCY", "lots")]))
            .unwrap_err();
        assert!(e.to_string().contains("VOLLEY_WORKER_CONCURRENCY"), "{e}");
        let e = s
            .apply_env(&env(&[("VOLLEY_PROVIDER_NOPE_API_KEY", "k")]))
            .unwrap_err();
        assert!(e.to_string().contains("no provider named"), "{e}");
        assert!(!e.to_string().contains("\"k\""));

        for (text, want) in [
            ("queue_prefix = 5", "invalid type"),
            ("nonsense = true", "unknown field"),
            (
                "[[models]]\nname='m'\nendpoints=['/v1/x']\nroutes=[]",
                "needs at least one",
            ),
            ("queue_prefix = 'a b'", "queue_prefix"),
            (
                "[[providers]]\nname='p'\nkind='openai'\nbase_url='ftp://x'",
                "base_url",
            ),
            (
                "[[providers]]\nname='p'\nkind='magic'\nbase_url='http://x'",
                "unknown variant",
            ),
            (
                "[[models]]\nname='m'\nendpoints=['/v1/completions']\nroutes=[{provider='ghost'}]",
                "unknown provider",
            ),
            ("[[models", "TOML parse error"),
            (
                "[[providers]]\nname='p'\nkind='openai'\nbase_url='http://x'\nmedia_hosts=['https://cdn/']",
                "media host",
            ),
            (
                "[[providers]]\nname='e'\nkind='espeak'\nallow_private_network=true",
                "HTTP kinds only",
            ),
        ] {
            let r = Settings::from_toml(text).and_then(|s| s.validate().map(|_| s));
            let e = r.expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    const KINDS: &str = r#"
[[providers]]
name = "vllm"
kind = "openai"
base_url = "http://localhost:8000/v1"
tokens_per_minute = 100000
[[providers]]
name = "replicate"
kind = "predictions"
base_url = "https://api.replicate.com/v1"
[[providers]]
name = "espeak"
kind = "espeak"
max_concurrency = 2
[[models]]
name = "say"
endpoints = ["/v1/audio/speech"]
routes = [{ provider = "espeak" }, { provider = "vllm" }]
"#;

    #[test]
    fn every_provider_kind_parses() {
        let mut s = Settings::from_toml(KINDS).unwrap();
        s.apply_env(&env(&[("VOLLEY_PROVIDER_REPLICATE_API_KEY", "r8_x")]))
            .unwrap();
        s.validate().unwrap();
        assert_eq!(s.providers[0].tokens_per_minute, Some(100_000));
        assert_eq!(s.providers[1].api_key.expose(), "r8_x");
        assert_eq!(s.providers[2].kind, ProviderKind::Espeak);
        assert_eq!(s.providers[2].command(), "espeak-ng");
        assert!(s.providers[2].base_url.is_empty());
        assert_eq!(s.check("say", Endpoint::AudioSpeech), ModelCheck::Served);
    }

    #[test]
    fn provider_kinds_are_checked_against_their_settings_and_models() {
        for (extra, want) in [
            (
                "[[providers]]\nname='e2'\nkind='espeak'\nbase_url='http://x'",
                "runs locally and takes no base_url",
            ),
            (
                "[[providers]]\nname='p2'\nkind='predictions'\nbase_url='http://x'\ntokens_per_minute=5",
                "tokens_per_minute applies to kind openai only",
            ),
            (
                "[[providers]]\nname='o2'\nkind='openai'\nbase_url='http://x'\ncommand='espeak-ng'",
                "command applies to kind espeak only",
            ),
            (
                "[[providers]]\nname='e2'\nkind='espeak'\ncommand='  '",
                "must name a program",
            ),
            (
                "[[providers]]\nname='o2'\nkind='openai'\nbase_url='http://x'\nrequests_per_minute=0",
                "must be at least 1",
            ),
            (
                "[[providers]]\nname='bad name'\nkind='openai'\nbase_url='http://x'",
                "must be letters, digits",
            ),
            (
                "[[providers]]\nname='o2'\nkind='openai'\nbase_url='http://x'\nmax_concurrency=-1",
                "invalid value",
            ),
            (
                "[[models]]\nname='v'\nendpoints=['/v1/videos/generations']\nroutes=[{provider='vllm'}]",
                "cannot serve /v1/videos/generations",
            ),
            (
                "[[models]]\nname='c'\nendpoints=['/v1/completions']\nroutes=[{provider='espeak'}]",
                "cannot serve /v1/completions",
            ),
            (
                "[[models]]\nname='c'\nendpoints=['/v1/chat/completions']\nroutes=[{provider='replicate'}]",
                "cannot serve /v1/chat/completions",
            ),
        ] {
            let text = format!("{KINDS}\n{extra}");
            let r = Settings::from_toml(&text).and_then(|s| s.validate().map(|_| s));
            let e = r.expect_err(extra).to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let mut s = Settings::from_toml(KINDS).unwrap();
        let e = s
            .apply_env(&env(&[("VOLLEY_PROVIDER_ESPEAK_BASE_URL", "http://x")]))
            .and_then(|_| s.validate())
            .unwrap_err();
        assert!(e.to_string().contains("takes no base_url"), "{e}");
    }

    #[test]
    fn media_store_settings() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.media.store, MediaStoreKind::Local);
        let text = r#"
[media]
store = "s3"
[media.s3]
bucket = "volley-media"
region = "eu-west-1"
endpoint = "http://minio:9000"
"#;
        let mut s = Settings::from_toml(text).unwrap();
        s.apply_env(&env(&[
            ("VOLLEY_MEDIA_S3_ACCESS_KEY_ID", "AKIA-EXAMPLE"),
            ("VOLLEY_MEDIA_S3_SECRET_ACCESS_KEY", "very-secret"),
        ]))
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.media.s3.bucket, "volley-media");
        assert_eq!(s.media.s3.secret_access_key.expose(), "very-secret");
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("very-secret") && !dbg.contains("AKIA-EXAMPLE"),
            "{dbg}"
        );

        let mut s = Settings::from_toml("").unwrap();
        s.apply_env(&env(&[
            ("VOLLEY_MEDIA_STORE", "s3"),
            ("VOLLEY_MEDIA_S3_BUCKET", "b-1.x"),
        ]))
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.media.store, MediaStoreKind::S3);

        let e = Settings::from_toml("")
            .unwrap()
            .apply_env(&env(&[("VOLLEY_MEDIA_STORE", "ftp")]))
            .unwrap_err();
        assert!(e.to_string().contains("expected local or s3"), "{e}");
        for (text, want) in [
            ("[media]\nstore='s3'", "needs s3.bucket"),
            (
                "[media]\nstore='s3'\ns3.bucket='Bad_Bucket'",
                "needs s3.bucket",
            ),
            (
                "[media]\nstore='s3'\ns3.bucket='ok-bucket'\ns3.endpoint='minio:9000'",
                "s3.endpoint must start with",
            ),
            (
                "[media]\nstore='s3'\ns3.bucket='ok-bucket'\ns3.access_key_id='a'",
                "set both",
            ),
            ("[media]\nstore='gcs'", "unknown variant"),
            ("[media]\ndir=''", "dir must name a directory"),
            ("[media]\nmax_bytes=0", "max_bytes"),
        ] {
            let r = Settings::from_toml(text).and_then(|s| s.validate().map(|_| s));
            let e = r.expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/volley.toml");
        let s = Settings::from_file(&path).unwrap();
        s.validate().unwrap();
        // The contract's example models and one model for every endpoint.
        assert_eq!(
            s.check("flux-dev", Endpoint::ImagesGenerations),
            ModelCheck::Served
        );
        assert_eq!(
            s.check("qwen3-8b", Endpoint::ChatCompletions),
            ModelCheck::Served
        );
        for e in Endpoint::ALL {
            assert!(
                s.models.iter().any(|m| m.endpoints().contains(&e)),
                "no model serves {e}"
            );
        }
    }
}
