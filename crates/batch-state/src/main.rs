use std::net::TcpListener;
use std::process::ExitCode;

use volley_config::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    let telemetry = volley_telemetry::init("batch-state");
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("batch-state: {e}");
            return ExitCode::from(2);
        }
    };
    let running = match TcpListener::bind(&settings.state.addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.state.addr))
        .and_then(|listener| batch_state::start(settings, listener))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("batch-state: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(port = running.port, "batch-state listening");
    volley_telemetry::shutdown_signal().await;
    tracing::info!("shutting down");
    let code = match running.stop().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "batch-state stopped");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
