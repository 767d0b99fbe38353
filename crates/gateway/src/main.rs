use std::net::TcpListener;
use std::process::ExitCode;

use volley_config::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    let telemetry = volley_telemetry::init("gateway");
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    // The gateway signs media links: a known or guessable key would let anyone forge them.
    if let Err(e) = settings.check_media_signing_key() {
        eprintln!("gateway: {e}");
        return ExitCode::from(2);
    }
    let running = match TcpListener::bind(&settings.gateway.addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.gateway.addr))
        .and_then(|listener| gateway::start(settings, listener))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(port = running.port, "gateway listening");
    volley_telemetry::shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    let code = match running.stop().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway stopped");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
