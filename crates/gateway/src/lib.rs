//! The gateway: Volley's public HTTP API.

mod error;
mod routes;
mod views;

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use volley_amqp::{Broker, Names};
use volley_config::Settings;
use volley_db::Db;
use volley_domain::Limits;
use volley_media::{MediaStore, Signer};

pub use actix_web::dev::ServerHandle;
pub use error::ApiError;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub limits: Limits,
    pub db: Db,
    pub broker: Arc<Broker>,
    pub media: MediaStore,
    pub signer: Signer,
}

/// A built gateway, bound but not yet serving.
pub struct Gateway {
    port: u16,
    server: Server,
    broker: Arc<Broker>,
}

impl Gateway {
    /// Binds `settings.gateway.addr` (port 0 picks one) and builds the app. Nothing here waits
    /// for PostgreSQL or RabbitMQ: `/readyz` reports them until they are there.
    pub fn build(settings: Settings) -> anyhow::Result<Gateway> {
        let listener = TcpListener::bind(&settings.gateway.addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.gateway.addr))?;
        Gateway::build_on(settings, listener)
    }

    /// [`Gateway::build`] on a listener the caller bound (tests bind port 0 first, to know
    /// the public URL before building).
    pub fn build_on(settings: Settings, listener: TcpListener) -> anyhow::Result<Gateway> {
        let port = listener.local_addr()?.port();
        let db = Db::new(&settings.database_url, settings.database_pool_size)?;
        let broker = Arc::new(Broker::new(
            &settings.amqp_url,
            "volley-gateway",
            Names::new(&settings.queue_prefix),
        ));
        let media = MediaStore::local(&settings.media.dir, settings.media.max_bytes)?;
        let signer = Signer::new(settings.media.signing_key.expose().as_bytes());
        let workers = settings.gateway.workers.max(1);
        let state = web::Data::new(AppState {
            settings: Arc::new(settings),
            limits: Limits::default(),
            db,
            broker: broker.clone(),
            media,
            signer,
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(routes::configure)
                .default_service(web::to(|| async {
                    HttpResponse::NotFound().json(serde_json::json!({
                        "error": {"type": "not_found", "message": "no such route"}
                    }))
                }))
        })
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(30)
        .listen(listener)?
        .run();
        Ok(Gateway {
            port,
            server,
            broker,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the handle stops it.
    pub async fn run(self) -> std::io::Result<()> {
        let r = self.server.await;
        self.broker.close().await;

        r
    }
}
