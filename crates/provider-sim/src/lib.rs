//! Simulator of third-party inference providers for tests, local runs and
//! benchmarks: OpenAI-compatible endpoints and Replicate-style predictions,
//! over real HTTP, with controllable latency and failures.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/images/generations`, `POST /v1/audio/speech` (always WAV),
//! `GET /files/{id}`, `POST /v1/predictions`, `GET /v1/predictions/{id}`,
//! `POST /v1/predictions/{id}/cancel`, `GET /v1/models`, `GET /healthz`,
//! `GET /sim/stats`, `POST /sim/reset`.
//!
//! Simulator-only body fields (predictions also read them inside `input`):
//! - `sim_latency_ms`: latency of this call (prediction run time).
//! - `sim_fail`: `retryable` (500), `fatal` (400; predictions end `failed`),
//!   `rate_limit` (429 + `Retry-After`, see `sim_retry_after`), `malformed`
//!   (2xx with an unexpected body), `timeout` (hangs `sim_latency_ms` or 60 s,
//!   then 504; predictions stay running that long, then fail).
//! - `sim_fail_times` + `sim_key`: fail only the first N requests sharing the
//!   key (default key: hash of route + body without `sim_*` fields).
//! - `sim_media_bytes`: grow produced media to at least this size (cap
//!   512 MiB), streamed as valid padding.
//! - `sim_echo`: `true` makes chat and completions reply with the prompt
//!   verbatim, as an instruction-following model told "reply with exactly ..."
//!   does (tests of hostile provider text).
//! - `sim_nul`: `true` puts U+0000 in chat/completion reply text and in
//!   error messages (a provider's output PostgreSQL cannot store).
//!
//! Hostile ones, for what a worker fetches (each only when asked):
//! - `sim_media_url`: media links in the answer (image `url`, prediction
//!   outputs) are this URL, e.g. an internal address.
//! - `sim_redirect_to`: media links go to `GET /sim/redirect?to=...`, which
//!   answers 302 to this URL.
//! - `sim_answer_bytes`: a chat or completion answer of at least this many
//!   bytes (cap 64 MiB).
//! - `sim_slow_body_ms`: a chat or completion body sent in pieces over this
//!   long.
//! - `sim_poll_url`: a prediction's `urls.get` is this URL.
//!
//! `GET /sim/stats` counts the `sim_*` fields that reached the simulator
//! (`sim_fields`), to show which a caller passed on.
//!
//! Prediction outputs: video and audio models return one URL string, image
//! models a list of URLs. The kind comes from `input.kind` or the model name.

mod error;
mod media;
mod openai;
mod predictions;
mod sim;
mod stats;
mod store;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpResponse, HttpServer, ResponseError, web};
use serde::{Deserialize, Serialize};
use sim::Simulator;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Default latency of every inference call (and prediction run time).
    pub latency_ms: u64,
    /// If set, `/v1/*` requests need `Authorization: Bearer <key>` (or
    /// `Token <key>`), otherwise they get a 401.
    pub required_api_key: Option<String>,
    /// Actix worker threads.
    pub workers: usize,
    /// Base URL used in returned file and prediction URLs; defaults to
    /// `http://<bound addr>`.
    pub public_url: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            latency_ms: 50,
            required_api_key: None,
            workers: 1,
            public_url: None,
        }
    }
}

/// Counters since start (or the last reset).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimStats {
    /// Requests received, excluding `/healthz` and `/sim/*`.
    pub requests: u64,
    /// Inference calls (chat, completions, images, speech, running
    /// predictions) currently in flight.
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// Requests per route template, e.g. "/v1/predictions/{id}"; unrouted
    /// paths count under `"<unmatched>"`.
    pub by_path: BTreeMap<String, u64>,
    /// `sim_*` request fields received, by name.
    #[serde(default)]
    pub sim_fields: BTreeMap<String, u64>,
    pub status_429: u64,
    pub status_5xx: u64,
    pub predictions_cancelled: u64,
}

/// A running simulator. Dropping it stops the server without waiting.
pub struct SimHandle {
    pub addr: SocketAddr,
    state: Arc<Simulator>,
    server: ServerHandle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl SimHandle {
    /// `http://IP:PORT`, with loopback substituted for an unspecified bind IP.
    pub fn url(&self) -> String {
        format!("http://{}", connect_addr(self.addr))
    }

    pub fn stats(&self) -> SimStats {
        self.state.stats.snapshot()
    }

    pub fn reset_stats(&self) {
        self.state.stats.reset();
    }

    /// Graceful stop: in-flight requests get up to 1 s to finish.
    pub async fn stop(mut self) {
        self.server.stop(true).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if self.task.is_some() {
            // The stop command is sent when called; the returned future only
            // waits for completion, which a destructor cannot do.
            drop(self.server.stop(false));
        }
    }
}

fn connect_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Starts serving on an already-bound `listener` (port 0 is fine) on the
/// current tokio runtime.
pub async fn spawn(listener: TcpListener, config: SimConfig) -> std::io::Result<SimHandle> {
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let base_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", connect_addr(addr)));
    let state = Arc::new(Simulator::new(
        Duration::from_millis(config.latency_ms),
        config.required_api_key.clone(),
        base_url,
    ));
    let data = web::Data::from(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap(from_fn(track))
            .route("/healthz", web::get().to(healthz))
            .route("/sim/stats", web::get().to(sim_stats))
            .route("/sim/reset", web::post().to(sim_reset))
            .route("/sim/redirect", web::get().to(sim_redirect))
            .route("/v1/models", web::get().to(openai::models))
            .route("/v1/chat/completions", web::post().to(openai::chat))
            .route("/v1/completions", web::post().to(openai::completions))
            .route("/v1/images/generations", web::post().to(openai::images))
            .route("/v1/audio/speech", web::post().to(openai::speech))
            .route("/v1/predictions", web::post().to(predictions::create))
            .route("/v1/predictions/{id}", web::get().to(predictions::get))
            .route(
                "/v1/predictions/{id}/cancel",
                web::post().to(predictions::cancel),
            )
            .route("/files/{id}", web::get().to(openai::file))
            .default_service(web::to(unknown_route))
    })
    .workers(config.workers.max(1))
    // Signals belong to the embedding program (the binary handles them).
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    Ok(SimHandle {
        addr,
        state,
        server: handle,
        task: Some(task),
    })
}

/// Counts requests and statuses, and enforces the API key on `/v1/*`.
async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<Simulator>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let path = req.path();
    // Health and control traffic would pollute the counts tests assert on.
    let counted = path != "/healthz" && !path.starts_with("/sim/");
    if counted {
        let route = req
            .match_pattern()
            .unwrap_or_else(|| "<unmatched>".to_owned());
        state.stats.record_request(&route);
    }
    if path.starts_with("/v1/") && !state.authorized(req.headers()) {
        state.stats.record_status(401);
        let resp = error::ApiError::unauthorized().error_response();
        return Ok(req.into_response(resp));
    }
    let res = next.call(req).await?;
    if counted {
        state.stats.record_status(res.status().as_u16());
    }
    Ok(res.map_into_boxed_body())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn sim_stats(st: web::Data<Simulator>) -> HttpResponse {
    HttpResponse::Ok().json(st.stats.snapshot())
}

async fn sim_reset(st: web::Data<Simulator>) -> HttpResponse {
    st.stats.reset();
    HttpResponse::Ok().json(st.stats.snapshot())
}

/// `sim_redirect_to`'s hop: 302 to `?to=`.
async fn sim_redirect(q: web::Query<BTreeMap<String, String>>) -> HttpResponse {
    match q.get("to") {
        Some(to) => HttpResponse::Found()
            .insert_header(("location", to.as_str()))
            .finish(),
        None => error::ApiError::missing("to").error_response(),
    }
}

async fn unknown_route(req: actix_web::HttpRequest) -> HttpResponse {
    error::ApiError::not_found(format!(
        "Unknown request URL: {} {}",
        req.method(),
        req.path()
    ))
    .error_response()
}
