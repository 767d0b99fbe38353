use volley_config::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let telemetry = volley_telemetry::init("gateway");
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gateway: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The gateway signs media links: a known or guessable key would let anyone forge them.
    if let Err(e) = settings.check_media_signing_key() {
        eprintln!("gateway: {e}");
        return std::process::ExitCode::from(2);
    }
    let gateway = match gateway::Gateway::build(settings) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            return std::process::ExitCode::from(1);
        }
    };
    tracing::info!(port = gateway.port(), "gateway listening");
    let handle = gateway.handle();
    let drain = gateway.drain_switch();
    tokio::spawn(async move {
        volley_telemetry::shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        drain.drain();
        handle.stop(true).await;
    });
    let code = match gateway.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway stopped");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
