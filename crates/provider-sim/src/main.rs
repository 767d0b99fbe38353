//! `provider-sim` binary: serves the simulator until SIGINT/SIGTERM.

use clap::Parser;
use provider_sim::{SimConfig, spawn};
use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "provider-sim",
    about = "Simulated OpenAI/Replicate-style inference provider"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "VOLLEY_SIM_ADDR", default_value = "127.0.0.1:9100")]
    addr: SocketAddr,
    /// Default latency of every inference call, in milliseconds.
    #[arg(long, env = "VOLLEY_SIM_LATENCY_MS", default_value_t = 50)]
    latency_ms: u64,
    /// API key required as `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "VOLLEY_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Actix worker threads.
    #[arg(long, env = "VOLLEY_SIM_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Base URL put in returned file URLs (default: http://<addr>).
    #[arg(long, env = "VOLLEY_SIM_PUBLIC_URL")]
    public_url: Option<String>,
}

/// Listener with a deep accept backlog: benchmarks open thousands of
/// connections at once, and std's default backlog would drop SYNs.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)?.into_std()
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the simulator");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Clap prints a usage error and exits with status 2 on bad flags/env.
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let listener = match bind(cli.addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("provider-sim: cannot listen on {}: {e}", cli.addr);
            return ExitCode::from(1);
        }
    };
    let config = SimConfig {
        latency_ms: cli.latency_ms,
        required_api_key: cli.api_key.filter(|k| !k.is_empty()),
        workers: cli.workers,
        public_url: cli.public_url.filter(|u| !u.is_empty()),
    };
    let auth = config.required_api_key.is_some();
    let handle = match spawn(listener, config).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("provider-sim: cannot start server: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        url = %handle.url(),
        latency_ms = cli.latency_ms,
        api_key_required = auth,
        "provider-sim listening"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    handle.stop().await;
    ExitCode::SUCCESS
}
