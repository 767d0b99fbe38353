//! The runtime every worker binary shares. A worker consumes only its inference type's queue:
//!
//! 1. decode the message (undecodable: dead-letter it, never loop);
//! 2. claim the job from batch-state, which hands out the attempt number (a redelivered
//!    message finds the job taken and is dropped);
//! 3. ack the message: from here the claim in PostgreSQL is what keeps the job alive, so a
//!    long job never meets RabbitMQ's consumer timeout; a worker that dies stops renewing its
//!    lease and batch-state hands the job out again;
//! 4. call the provider (capacity-limited), store media, publish the outcome event.

pub mod providers;
mod run;
mod state_client;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use volley_amqp::{Broker, Names};
use volley_config::Settings;
use volley_domain::InferenceType;
use volley_media::MediaStore;
use volley_telemetry::Metrics;
use volley_telemetry::metrics::JobMeters;

pub use providers::{Job, Output, ProviderError, Providers};
/// The queue boundary's decoder, public for the property tests.
pub use run::decode;
pub use state_client::StateClient;

/// A job this worker is running.
struct InFlight {
    batch_id: i64,
    attempt: i32,
    cancel: CancellationToken,
}

pub struct Worker {
    pub kind: InferenceType,
    pub settings: Arc<Settings>,
    pub providers: Providers,
    pub state: StateClient,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    /// This worker's job metrics, labels resolved once.
    meters: JobMeters,
    in_flight: Mutex<HashMap<i64, InFlight>>,
    /// Outcomes being reported. Reporting does not hold a run slot (the next job starts while
    /// an event awaits its confirm), so it has its own bound: a broker outage cannot pile up
    /// more than `concurrency` unreported outcomes.
    reporting: Arc<tokio::sync::Semaphore>,
    /// Outcomes on their way to the reporter task (bounded by `reporting` as well).
    reports: tokio::sync::mpsc::Sender<run::Report>,
    consuming: AtomicBool,
    draining: AtomicBool,
}

/// The service name in logs, traces and connection names: `worker-<type>`.
pub(crate) fn service_name(kind: InferenceType) -> &'static str {
    match kind {
        InferenceType::Llm => "worker-llm",
        InferenceType::Image => "worker-image",
        InferenceType::Video => "worker-video",
        InferenceType::Music => "worker-music",
        InferenceType::Tts => "worker-tts",
    }
}

/// A started worker.
pub struct Running {
    pub port: u16,
    worker: Arc<Worker>,
    stop_consuming: CancellationToken,
    stop_all: CancellationToken,
    consumer: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    server: actix_web::dev::ServerHandle,
}

impl Running {
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// Graceful stop: stop taking jobs, let running ones finish within
    /// `worker.shutdown_grace_secs`, hand the rest back to the queue, then close. `Result`
    /// for the shape every service shares; nothing here fails.
    pub async fn stop(self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(self.worker.settings.worker.shutdown_grace_secs);
        self.worker.draining.store(true, Ordering::Relaxed);
        self.stop_consuming.cancel();
        let _ = self.consumer.await;
        let deadline = tokio::time::Instant::now() + grace;
        while !self.worker.in_flight.lock().await.is_empty()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run::hand_back_all(&self.worker).await;
        self.stop_all.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.server.stop(true).await;
        self.worker.broker.close().await;
        Ok(())
    }
}

/// Builds the worker for `kind` and starts consuming on the current runtime, serving its
/// health endpoints on a listener the caller bound (the binary binds `worker.addr`, tests
/// port 0).
pub fn start(
    kind: InferenceType,
    settings: Settings,
    listener: TcpListener,
) -> anyhow::Result<Running> {
    settings.check_internal_token()?;
    let port = listener.local_addr()?.port();
    let settings = Arc::new(settings);
    let report_slots = usize::from(settings.worker.concurrency);
    let media = MediaStore::from_settings(&settings.media)?;
    let metrics = Metrics::new()?;
    let (reports, reports_rx) = tokio::sync::mpsc::channel(report_slots);
    let worker = Arc::new(Worker {
        kind,
        providers: Providers::new(settings.clone(), media)?.with_metrics(&metrics),
        state: StateClient::new(&settings.state.url, settings.state.internal_token.expose())?,
        broker: Broker::new(
            &settings.amqp_url,
            &format!("volley-worker-{}", kind.key()),
            Names::new(&settings.queue_prefix),
        )
        .with_metrics(metrics.clone()),
        meters: metrics.jobs.for_type(kind),
        metrics: metrics.clone(),
        settings,
        in_flight: Mutex::new(HashMap::new()),
        reporting: Arc::new(tokio::sync::Semaphore::new(report_slots)),
        reports,
        consuming: AtomicBool::new(false),
        draining: AtomicBool::new(false),
    });
    let stop_consuming = CancellationToken::new();
    let stop_all = CancellationToken::new();
    let consumer = tokio::spawn(run::consume_forever(worker.clone(), stop_consuming.clone()));
    let tasks = vec![
        tokio::spawn(run::renew_leases(worker.clone(), stop_all.clone())),
        tokio::spawn(run::control_forever(worker.clone(), stop_all.clone())),
        tokio::spawn(run::report_forever(
            worker.clone(),
            reports_rx,
            stop_all.clone(),
        )),
    ];
    let data = web::Data::from(worker.clone());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(volley_telemetry::http::Observe::new(
                service_name(kind),
                metrics.clone(),
            ))
            .app_data(data.clone())
            .service(volley_telemetry::http::metrics_resource(metrics.clone()))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(Running {
        port,
        worker,
        stop_consuming,
        stop_all,
        consumer,
        tasks,
        server: handle,
    })
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(w: web::Data<Worker>) -> HttpResponse {
    let consuming = w.consuming.load(Ordering::Relaxed);
    let draining = w.draining.load(Ordering::Relaxed);
    let state = w.state.ready().await;
    let in_flight = w.in_flight.lock().await.len();
    let body = json!({
        "rabbitmq": consuming,
        "batch_state": state,
        "draining": draining,
        "in_flight": in_flight,
    });
    if consuming && state && !draining {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The whole `main` of a worker binary.
pub async fn main(kind: InferenceType) -> std::process::ExitCode {
    let telemetry = volley_telemetry::init(service_name(kind));
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker-{}: {e}", kind.key());
            return std::process::ExitCode::from(2);
        }
    };
    let running = match TcpListener::bind(&settings.worker.addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.worker.addr))
        .and_then(|listener| start(kind, settings, listener))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("worker-{}: {e:#}", kind.key());
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(port = running.port, inference_type = %kind, "worker started");
    volley_telemetry::shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight jobs");
    let code = match running.stop().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker stopped");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
