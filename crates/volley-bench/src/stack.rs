//! Runs the release binaries as separate processes, so each service's memory and CPU can be
//! read from /proc, on a database and queue prefix of the benchmark's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Service {
    pub name: String,
    pub child: Child,
    pub health: String,
}

pub struct Stack {
    pub services: Vec<Service>,
    pub gateway: String,
    pub prefix: String,
    pub media_dir: PathBuf,
}

/// Resource use of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
    pub cpu_secs: f64,
}

pub fn proc_usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let cpu_ticks = ticks(11) + ticks(12);
    Usage {
        rss_kb: field("VmRSS:"),
        peak_rss_kb: field("VmHWM:"),
        cpu_secs: cpu_ticks as f64 / 100.0,
    }
}

/// `n` distinct free ports below Linux's ephemeral range (32768 and up), so that no outgoing
/// connection made while the services start can take one before its service binds it.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n * 1000 {
        if held.len() == n {
            break;
        }
        let r = uuid::Uuid::new_v4().as_u128();
        let port = 20_000 + (r % 12_000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push((port, l));
        }
    }
    anyhow::ensure!(held.len() == n, "could not find {n} free ports");
    Ok(held.into_iter().map(|(p, _)| p).collect())
}

#[derive(Clone)]
pub struct StackOptions {
    pub database_url: String,
    pub amqp_url: String,
    pub sim_latency_ms: u64,
    pub worker_concurrency: u16,
    pub bin_dir: PathBuf,
    pub config: PathBuf,
    /// Where the stack's local media store lives (a folder per run is made inside).
    pub media_root: PathBuf,
    /// Fair dispatch (`dispatch.fair`); off, each modality is one FIFO queue.
    pub fair: bool,
}

impl Stack {
    pub async fn start(o: &StackOptions) -> anyhow::Result<Stack> {
        let prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let media_dir = o.media_root.join(&prefix);
        std::fs::create_dir_all(&media_dir)?;
        let ports = free_ports(8)?;
        let (sim_port, gw_port, st_port) = (ports[0], ports[1], ports[2]);
        let mut common: BTreeMap<&str, String> = BTreeMap::new();
        common.insert("VOLLEY_CONFIG", o.config.display().to_string());
        common.insert("VOLLEY_DATABASE_URL", o.database_url.clone());
        common.insert("VOLLEY_AMQP_URL", o.amqp_url.clone());
        common.insert("VOLLEY_QUEUE_PREFIX", prefix.clone());
        common.insert("VOLLEY_GATEWAY_ADDR", format!("127.0.0.1:{gw_port}"));
        common.insert("VOLLEY_PUBLIC_URL", format!("http://127.0.0.1:{gw_port}"));
        common.insert("VOLLEY_STATE_ADDR", format!("127.0.0.1:{st_port}"));
        common.insert("VOLLEY_STATE_URL", format!("http://127.0.0.1:{st_port}"));
        common.insert("VOLLEY_MEDIA_DIR", media_dir.display().to_string());
        common.insert("VOLLEY_MEDIA_SIGNING_KEY", uuid::Uuid::new_v4().to_string());
        // Workers present it to batch-state's internal API (32+ characters).
        common.insert(
            "VOLLEY_INTERNAL_TOKEN",
            uuid::Uuid::new_v4().simple().to_string(),
        );
        common.insert(
            "VOLLEY_WORKER_CONCURRENCY",
            o.worker_concurrency.to_string(),
        );
        let sim_url = format!("http://127.0.0.1:{sim_port}/v1");
        common.insert("VOLLEY_PROVIDER_SIM_OPENAI_BASE_URL", sim_url.clone());
        common.insert("VOLLEY_PROVIDER_SIM_PREDICTIONS_BASE_URL", sim_url);
        common.insert("VOLLEY_DISPATCH_FAIR", o.fair.to_string());
        // The services' log filter: warnings, unless VOLLEY_BENCH_LOG says otherwise.
        common.insert(
            "RUST_LOG",
            std::env::var("VOLLEY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        );
        // One key drives the whole load: the per-key limits would measure themselves.
        common.insert("VOLLEY_GATEWAY_KEY_RATE_PER_SEC", "0".into());
        common.insert("VOLLEY_GATEWAY_KEY_MAX_IN_FLIGHT", "0".into());

        let mut services = Vec::new();
        let mut spawn =
            |name: &str, extra: &[(&str, String)], health: String| -> anyhow::Result<()> {
                let mut cmd = Command::new(o.bin_dir.join(name));
                cmd.envs(common.iter().map(|(k, v)| (*k, v.as_str())));
                for (k, v) in extra {
                    cmd.env(k, v);
                }
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
                let child = cmd.spawn().map_err(|e| {
                    anyhow::anyhow!("cannot start {name} from {}: {e}", o.bin_dir.display())
                })?;
                services.push(Service {
                    name: name.to_owned(),
                    child,
                    health: health.to_owned(),
                });
                Ok(())
            };
        spawn(
            "provider-sim",
            &[
                ("VOLLEY_SIM_ADDR", format!("127.0.0.1:{sim_port}")),
                ("VOLLEY_SIM_LATENCY_MS", o.sim_latency_ms.to_string()),
                ("VOLLEY_SIM_WORKERS", "1".into()),
            ],
            format!("http://127.0.0.1:{sim_port}/healthz"),
        )?;
        spawn(
            "batch-state",
            &[],
            format!("http://127.0.0.1:{st_port}/readyz"),
        )?;
        spawn("gateway", &[], format!("http://127.0.0.1:{gw_port}/readyz"))?;
        for (w, port) in ["llm", "image", "video", "music", "tts"]
            .into_iter()
            .zip(ports[3..].iter().copied())
        {
            let extra = vec![("VOLLEY_WORKER_ADDR", format!("127.0.0.1:{port}"))];
            spawn(
                &format!("worker-{w}"),
                &extra,
                format!("http://127.0.0.1:{port}/readyz"),
            )?;
        }
        let mut stack = Stack {
            services,
            gateway: format!("http://127.0.0.1:{gw_port}"),
            prefix,
            media_dir,
        };
        if let Err(e) = stack.wait_ready().await {
            stack.stop();
            return Err(e);
        }
        Ok(stack)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for s in &mut self.services {
            loop {
                // A service that could not start would otherwise leave the run waiting forever
                // for its jobs.
                if let Ok(Some(status)) = s.child.try_wait() {
                    anyhow::bail!("{} exited at start ({status})", s.name);
                }
                if let Ok(r) = http.get(&s.health).send().await
                    && r.status().is_success()
                {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!("{} did not become ready ({})", s.name, s.health);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub fn usage(&self) -> Vec<(String, Usage)> {
        self.services
            .iter()
            .map(|s| (s.name.clone(), proc_usage(s.child.id())))
            .collect()
    }

    pub fn stop(mut self) {
        for s in &self.services {
            // SIGTERM: graceful shutdown, as in production.
            let _ = Command::new("kill").arg(s.child.id().to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for s in &mut self.services {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = s.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.media_dir);
    }
}
