//! The gateway: Volley's public HTTP API.

mod admin;
mod browse;
mod console;
mod dispatch;
mod error;
mod eta;
mod events;
mod limits;
mod openapi;
mod results;
mod routes;
mod views;
mod webhooks;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::dev::Service;
use actix_web::http::header;
use actix_web::{App, HttpResponse, HttpServer, web};
use volley_amqp::{Broker, Names};
use volley_config::Settings;
use volley_db::Db;
use volley_domain::Limits;
use volley_media::{MediaStore, Signer};
use volley_telemetry::Metrics;

pub(crate) use error::ApiError;
use error::ErrorBody;

/// What every request handler shares (actix app data): settings, connections and caches.
pub(crate) struct Shared {
    pub settings: Arc<Settings>,
    pub limits: Limits,
    pub db: Db,
    pub broker: Arc<Broker>,
    pub media: MediaStore,
    pub signer: Signer,
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: `/readyz` answers 503 so the load balancer stops sending requests.
    pub draining: Arc<AtomicBool>,
    /// Bounds the batches being published in the background after their 202.
    pub publishing: Arc<tokio::sync::Semaphore>,
    /// Open event streams and their wake-ups.
    pub hub: Arc<events::Hub>,
    /// Completion estimates' aggregates, read at most every few seconds.
    pub eta: eta::EtaCache,
    /// Where a batch's webhook may point (checked again, by address, at delivery).
    pub webhook_policy: volley_egress::WebhookPolicy,
    /// Which types' jobs are held for fair dispatch rather than published.
    gate: Arc<dispatch::Gate>,
}

/// Batches published in the background at once; past this, a request publishes its own batch
/// before answering, which pushes back on clients instead of queueing without bound.
const BACKGROUND_PUBLISHES: usize = 64;

/// A running gateway.
pub struct Running {
    pub port: u16,
    metrics_port: Option<u16>,
    server: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    broker: Arc<Broker>,
    draining: Arc<AtomicBool>,
    hub: Arc<events::Hub>,
    /// The `LISTEN` connection that wakes event streams; stopped after the server.
    changes: volley_db::progress::Listener,
    /// The fair-dispatch gate's poller.
    gate: (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ),
}

impl Running {
    /// The internal metrics port, when `gateway.metrics_addr` is set.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    /// Turns readiness off, so the load balancer stops routing requests here; [`Running::stop`]
    /// does this first.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        // Event streams end now (a graceful stop would otherwise wait for them); their clients
        // reconnect, with Last-Event-ID, to another replica.
        self.hub.close();
    }

    /// Graceful stop: readiness off, in-flight requests finish (up to 30 s), then the broker
    /// connection closes. `Err` only when the server itself failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.drain();
        self.server.stop(true).await;
        let served = self.task.await;
        self.hub.close();
        self.changes.stop().await;
        self.gate.0.cancel();
        let _ = self.gate.1.await;
        self.broker.close().await;
        served??;
        Ok(())
    }
}

/// Builds the gateway on a listener the caller bound (the binary binds `gateway.addr`, tests
/// port 0) and starts serving on the current runtime. Nothing here waits for PostgreSQL or
/// RabbitMQ: `/readyz` reports them until they are there.
pub fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<Running> {
    let port = listener.local_addr()?.port();
    // An internal listener for `/metrics` alone, kept off the public port.
    let metrics_listener = match &settings.gateway.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?,
        ),
        None => None,
    };
    let metrics_port = match &metrics_listener {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    let limiter = limits::KeyLimiter::new(&settings.gateway);
    let db = Db::new(&settings.database_url, settings.database_pool_size)?;
    let metrics = Metrics::new()?;
    let broker = Arc::new(
        Broker::new(
            &settings.amqp_url,
            "volley-gateway",
            Names::new(&settings.queue_prefix),
        )
        .with_metrics(metrics.clone()),
    );
    let draining = Arc::new(AtomicBool::new(false));
    let media = MediaStore::from_settings(&settings.media)?;
    let signer = Signer::new(settings.media.signing_key.expose().as_bytes());
    let workers = settings.gateway.workers.max(1);
    let document = web::Data::new(openapi::build(&settings)?);
    let hub = Arc::new(events::Hub::new(
        settings.gateway.sse_max_streams_per_key,
        &metrics,
    )?);
    let changes = {
        let hub = hub.clone();
        volley_db::progress::listen(settings.database_url.clone(), move |c| hub.changed(c))?
    };
    let eta = eta::EtaCache::new(settings.gateway.eta_window_secs);
    let webhook_policy = webhooks::policy(&settings)?;
    let settings = Arc::new(settings);
    let gate = Arc::new(dispatch::Gate::default());
    let gate_stop = tokio_util::sync::CancellationToken::new();
    let gate_task = tokio::spawn(dispatch::watch(
        gate.clone(),
        settings.clone(),
        db.clone(),
        gate_stop.clone(),
    ));
    let state = web::Data::new(Shared {
        settings,
        limits: Limits::default(),
        db,
        broker: broker.clone(),
        media,
        signer,
        metrics: metrics.clone(),
        draining: draining.clone(),
        publishing: Arc::new(tokio::sync::Semaphore::new(BACKGROUND_PUBLISHES)),
        hub: hub.clone(),
        eta,
        webhook_policy,
        gate,
    });
    let server = HttpServer::new(move || {
        let limiter = limiter.clone();
        App::new()
            // Inside Observe, so refused requests are counted too.
            .wrap_fn(move |req, srv| {
                let admitted = match port_role(&req, metrics_port) {
                    PortRole::Public => req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .map(|h| limiter.admit(h.as_bytes()))
                        .transpose()
                        .map(Option::flatten),
                    PortRole::NotHere => Err(ApiError::NotFound("route")),
                    PortRole::Internal => Ok(None),
                };
                let call = admitted.map(|slot| (srv.call(req), slot));
                async move {
                    let (call, slot) = call?;
                    let res = call.await;
                    // The key's in-flight slot is held until the handler has answered.
                    drop(slot);
                    res
                }
            })
            .wrap(volley_telemetry::http::Observe::new(
                "gateway",
                metrics.clone(),
            ))
            .app_data(state.clone())
            .app_data(document.clone())
            // A path segment that does not decode (`%ff`) is no such thing, in our shape.
            .app_data(
                web::PathConfig::default().error_handler(|_, _| ApiError::NotFound("route").into()),
            )
            .service(volley_telemetry::http::metrics_resource(metrics.clone()))
            .configure(routes::configure)
            .configure(admin::configure)
            .configure(console::configure)
            .route("/openapi.json", web::get().to(openapi::openapi_json))
            .default_service(web::to(not_routed))
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(30)
    .listen(listener)?;
    let server = match metrics_listener {
        Some(l) => server.listen(l)?,
        None => server,
    }
    .run();
    let handle = server.handle();
    Ok(Running {
        port,
        metrics_port,
        server: handle,
        task: tokio::spawn(server),
        broker,
        draining,
        hub,
        changes,
        gate: (gate_stop, gate_task),
    })
}

/// What a request may reach, by the listener it came in on.
enum PortRole {
    /// The public API, under the per-key limits.
    Public,
    /// `/metrics` on the public port while an internal metrics port is set, or anything but
    /// `/metrics` on that internal port: 404.
    NotHere,
    /// `/metrics` on the internal metrics port.
    Internal,
}

fn port_role(req: &actix_web::dev::ServiceRequest, metrics_port: Option<u16>) -> PortRole {
    let Some(mp) = metrics_port else {
        return PortRole::Public;
    };
    let internal = req.app_config().local_addr().port() == mp;
    match (internal, req.path() == "/metrics") {
        (true, true) => PortRole::Internal,
        (false, false) => PortRole::Public,
        _ => PortRole::NotHere,
    }
}

/// What no route took: 405 with `Allow` when the path is a route's but the method is not
/// (the methods come from the API document, which a test keeps equal to the routes), else 404.
async fn not_routed(
    req: actix_web::HttpRequest,
    doc: web::Data<openapi::Document>,
) -> Result<HttpResponse, ApiError> {
    let allow = req
        .resource_map()
        .match_pattern(req.path())
        .and_then(|p| doc.allowed(&p).map(str::to_owned));
    match allow {
        Some(allow) => Err(ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            allow,
        }),
        None => Ok(HttpResponse::NotFound().json(ErrorBody::new("not_found", "no such route"))),
    }
}
