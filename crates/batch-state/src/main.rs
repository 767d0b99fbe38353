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
    let running = match batch_state::start(settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("batch-state: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(port = running.port, "batch-state listening");
    volley_telemetry::shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    telemetry.shutdown().await;
    ExitCode::SUCCESS
}
