//! batch-state: the only writer of job state after submission. It hands out claims (with the
//! attempt number that fences outcomes), renews leases, applies outcome events from RabbitMQ in
//! batches, and sweeps for work that was committed but not published or whose worker was lost.

mod auth;
pub mod dispatch;
pub mod events;
mod sweeper;
mod webhooks;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{App, HttpResponse, HttpServer, web};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use volley_amqp::{Broker, Names};
use volley_config::Settings;
use volley_db::Db;
use volley_domain::Claim;
use volley_proto::state_api::{
    ClaimAnswer, ClaimsAnswer, ClaimsRequest, ErrorBody, Health, LeasesAnswer, LeasesRequest,
    Readiness,
};
use volley_telemetry::Metrics;

/// Claims waiting to be batched into one statement; bounded so a flood pushes back on workers.
const CLAIM_QUEUE: usize = 4096;
const CLAIM_BATCH: usize = 512;
/// How often queue depths and consumer counts are read from RabbitMQ for `/metrics`.
const QUEUE_POLL: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Shared {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    consuming: AtomicBool,
    draining: AtomicBool,
    claims: mpsc::Sender<ClaimRequest>,
    /// Who may use `/internal/*` (workers holding the shared token).
    internal: auth::InternalToken,
}

impl Shared {
    fn set_consuming(&self, v: bool) {
        self.consuming.store(v, Ordering::Relaxed);
    }
}

type ClaimReply = oneshot::Sender<Result<Vec<(i64, Claim)>, String>>;
struct ClaimRequest {
    ids: Vec<i64>,
    reply: ClaimReply,
}

/// A running batch-state service.
pub struct Running {
    pub port: u16,
    stop: CancellationToken,
    server: actix_web::dev::ServerHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Running {
    /// Graceful stop: readiness off, stops consuming (unapplied events stay on the queue),
    /// lets in-flight requests finish, waits for the loops to end, closes the broker
    /// connection. `Result` for the shape every service shares; nothing here fails.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.stop.cancel();
        self.server.stop(true).await;
        for t in self.tasks {
            let _ = t.await;
        }
        self.shared.broker.close().await;
        Ok(())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Starts everything on the current runtime, serving on a listener the caller bound (the
/// binary binds `state.addr`, tests port 0).
pub fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<Running> {
    settings.check_internal_token()?;
    let internal = auth::InternalToken::new(settings.state.internal_token.expose());
    if internal.is_open() {
        tracing::warn!(
            "no internal token (VOLLEY_INTERNAL_TOKEN): /internal/* is open to anyone who can reach it (dev mode)"
        );
    }
    let port = listener.local_addr()?.port();
    let db = Db::new(&settings.database_url, settings.database_pool_size)?;
    let metrics = Metrics::new()?;
    let broker = Broker::new(
        &settings.amqp_url,
        "volley-batch-state",
        Names::new(&settings.queue_prefix),
    )
    .with_metrics(metrics.clone());
    let (tx, rx) = mpsc::channel(CLAIM_QUEUE);
    let shared = Arc::new(Shared {
        settings: Arc::new(settings),
        db,
        broker,
        metrics: metrics.clone(),
        consuming: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        claims: tx,
        internal,
    });
    let stop = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(events::run(shared.clone(), stop.clone())),
        tokio::spawn(sweeper::run(shared.clone(), stop.clone())),
        tokio::spawn(dispatch::run(shared.clone(), stop.clone())),
        tokio::spawn(webhooks::run(shared.clone(), stop.clone())),
        tokio::spawn(claim_batcher(shared.clone(), rx, stop.clone())),
        tokio::spawn(volley_amqp::depths::watch(
            shared.settings.amqp_url.clone(),
            Names::new(&shared.settings.queue_prefix),
            metrics.clone(),
            QUEUE_POLL,
            stop.clone().cancelled_owned(),
        )),
    ];
    let data = web::Data::from(shared.clone());
    let server = HttpServer::new(move || {
        App::new()
            .wrap(volley_telemetry::http::Observe::new(
                "batch-state",
                metrics.clone(),
            ))
            .app_data(data.clone())
            .app_data(web::JsonConfig::default().limit(1024 * 1024))
            .service(volley_telemetry::http::metrics_resource(metrics.clone()))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .service(
                web::scope("/internal")
                    .wrap(actix_web::middleware::from_fn(auth::require_token))
                    .route("/claims", web::post().to(claim))
                    .route("/leases", web::post().to(renew)),
            )
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(10)
    .listen(listener)?
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    Ok(Running {
        port,
        stop,
        server: handle,
        tasks,
        shared,
    })
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health::ok())
}

async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
    let body = Readiness {
        database: shared.db.ping().await,
        draining: shared.draining.load(Ordering::Relaxed),
        rabbitmq: shared.consuming.load(Ordering::Relaxed),
    };
    if body.is_ready() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn claim(shared: web::Data<Shared>, body: web::Json<ClaimsRequest>) -> HttpResponse {
    let ids = body.into_inner().job_ids;
    if ids.is_empty() || ids.len() > CLAIM_BATCH {
        return HttpResponse::BadRequest().json(ErrorBody::new(format!(
            "job_ids must hold 1 to {CLAIM_BATCH} ids"
        )));
    }
    let (reply, answer) = oneshot::channel();
    if shared
        .claims
        .send(ClaimRequest { ids, reply })
        .await
        .is_err()
    {
        return HttpResponse::ServiceUnavailable().json(ErrorBody::new("shutting down"));
    }
    match answer.await {
        Ok(Ok(claims)) => {
            let claims: Vec<ClaimAnswer> = claims
                .into_iter()
                .map(|(job_id, c)| ClaimAnswer::new(job_id, c))
                .collect();
            for a in &claims {
                shared.metrics.state.claims(a.result.as_str(), 1);
            }
            HttpResponse::Ok().json(ClaimsAnswer { claims })
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "claim failed");
            HttpResponse::ServiceUnavailable().json(ErrorBody::new("database unavailable"))
        }
        Err(_) => HttpResponse::ServiceUnavailable().json(ErrorBody::new("shutting down")),
    }
}

async fn renew(shared: web::Data<Shared>, body: web::Json<LeasesRequest>) -> HttpResponse {
    let held = body.into_inner().held;
    if held.len() > 10_000 {
        return HttpResponse::BadRequest().json(ErrorBody::new("at most 10000 leases per call"));
    }
    match shared.db.renew(held, shared.settings.state.lease_ms).await {
        Ok(alive) => HttpResponse::Ok().json(LeasesAnswer { alive }),
        Err(e) => {
            tracing::warn!(error = %e, "lease renewal failed");
            HttpResponse::ServiceUnavailable().json(ErrorBody::new("database unavailable"))
        }
    }
}

/// Merges concurrent claim requests into one UPDATE: many workers each claiming one job cost
/// one round trip instead of one transaction each.
async fn claim_batcher(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<ClaimRequest>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            // Requests still queued are answered "shutting down" when their sender drops.
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { return };
        let mut reqs = vec![first];
        let mut n = reqs[0].ids.len();
        while n < CLAIM_BATCH {
            match rx.try_recv() {
                Ok(r) => {
                    n += r.ids.len();
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        let ids: Vec<i64> = reqs.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let st = &shared.settings.state;
        let result = shared.db.claim(ids, st.lease_ms, st.expire_after_ms).await;
        match result {
            Ok(all) => {
                let mut it = all.into_iter();
                for r in reqs {
                    let mine: Vec<(i64, Claim)> = it.by_ref().take(r.ids.len()).collect();
                    let _ = r.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for r in reqs {
                    let _ = r.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
