//! Child processes and private servers: a RabbitMQ node and a PostgreSQL cluster of our own on
//! spare loopback ports, so that stopping, killing and restarting them disturbs nothing else on
//! the machine. Every process runs in its own process group and is killed with it when its
//! handle drops, so a failed run leaves nothing behind.

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Spare loopback ports, all different: every listener is held until all are chosen.
pub(crate) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("no spare port on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// A child process in its own process group (so a signal reaches its children too).
pub struct Proc {
    pub name: String,
    child: Child,
    pgid: libc::pid_t,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            pgid: child.id() as libc::pid_t,
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether any process of the group is still there. A group id is not reused while the
    /// group has members, so asking is safe even after the leader was reaped.
    fn group_alive(&self) -> bool {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::killpg(self.pgid, 0) == 0 }
    }

    /// Sends `sig` to every process of the group.
    pub fn signal(&mut self, sig: i32) {
        if self.poll().is_some() && !self.group_alive() {
            return;
        }
        // SAFETY: killpg only sends a signal, to a group we created (process_group(0) at
        // spawn) that still exists.
        unsafe {
            libc::killpg(self.pgid, sig);
        }
    }

    /// The leader's exit status, if it has exited (reaps it).
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
        }
        self.status
    }

    /// Waits up to `timeout` for the leader and every other process of its group to exit
    /// (a server's wrapper script may exit before the server itself has stopped).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.poll()
                && !self.group_alive()
            {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` of the whole group; waits for the leader.
    pub async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(30)).await;
    }

    /// Sends `sig` and waits up to `timeout` for a clean exit; a process still running then is
    /// killed and that is an error.
    pub async fn stop(&mut self, sig: i32, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(sig);
        match self.wait_exit(timeout).await {
            Some(s) => Ok(s),
            None => {
                self.kill().await;
                bail!("{} did not stop within {timeout:?}; killed", self.name)
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        if self.status.is_none() {
            let _ = self.child.wait();
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a short command to completion, with a time limit; its output if it succeeded.
pub(crate) async fn run_command(mut cmd: Command, timeout: Duration) -> anyhow::Result<String> {
    let what = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::null());
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{what} took longer than {timeout:?}"))?
    .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Settings of a private RabbitMQ node.
#[derive(Debug, Clone, Default)]
pub struct RabbitOptions {
    /// RabbitMQ's consumer timeout (global in 3.10); the broker's own default if `None`. The
    /// channel tick that checks it is set to one second so that a short timeout bites fast.
    pub consumer_timeout_ms: Option<u64>,
}

static NODES: AtomicU32 = AtomicU32::new(0);

/// A RabbitMQ node of our own: own node name, ports, data and log directories, no plugins.
pub struct RabbitNode {
    dir: PathBuf,
    node: String,
    pub port: u16,
    dist_port: u16,
    proc: Option<Proc>,
}

/// Where RabbitMQ's scripts are. Debian's `/usr/sbin/rabbitmq-server` is a wrapper that
/// switches to the `rabbitmq` user, which could not use our directories; the scripts it wraps
/// run as whoever starts them. `VOLLEY_RABBITMQ_SCRIPTS` names another directory.
fn rabbit_script(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("VOLLEY_RABBITMQ_SCRIPTS") {
        return Path::new(&d).join(name);
    }
    let debian = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if debian.exists() {
        debian
    } else {
        PathBuf::from(name)
    }
}

impl RabbitNode {
    /// Starts a node keeping its files under `dir` and waits until it accepts connections.
    pub async fn start(dir: &Path, opts: RabbitOptions) -> anyhow::Result<RabbitNode> {
        let ports = free_ports(2)?;
        let n = NODES.fetch_add(1, Ordering::Relaxed);
        let node = format!("volley-chaos-{}-{n}@localhost", std::process::id());
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{}\n", ports[0]);
        if let Some(ms) = opts.consumer_timeout_ms {
            conf.push_str(&format!("consumer_timeout = {ms}\n"));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(
            dir.join("advanced.config"),
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n",
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        // The machine's rabbitmq-env.conf names the shared node; ours must not read it.
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let mut r = RabbitNode {
            dir: dir.to_owned(),
            node,
            port: ports[0],
            dist_port: ports[1],
            proc: None,
        };
        r.launch().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn command(&self, script: &str) -> Command {
        let d = &self.dir;
        let mut c = Command::new(rabbit_script(script));
        c.env("HOME", d.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"));
        c
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let p = Proc::spawn(
            "rabbitmq",
            self.command("rabbitmq-server"),
            &self.dir.join("server.log"),
        )?;
        self.proc = Some(p);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(p) = self.proc.as_mut()
                && let Some(s) = p.poll()
            {
                bail!(
                    "RabbitMQ node {} exited at start ({s}); see {}",
                    self.node,
                    self.dir.join("server.log").display()
                );
            }
            if let Ok(c) = volley_amqp::connect(&self.url(), "volley-chaos-probe").await {
                let _ = c.close(200, "probe".into()).await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "RabbitMQ node {} did not accept connections in 120 s",
                    self.node
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs `rabbitmqctl -n <node> args…`.
    pub(crate) async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut c = self.command("rabbitmqctl");
        c.arg("-n").arg(&self.node).args(args);
        run_command(c, Duration::from_secs(60)).await
    }

    /// A clean stop (SIGTERM), keeping the data for the next start.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop(libc::SIGTERM, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// `kill -9` of the node.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill().await;
        }
    }

    /// Starts the node again on the same ports and data.
    pub(crate) async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.proc.is_some() {
            self.stop().await?;
        }
        self.launch().await
    }
}

/// How PostgreSQL goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PgStop {
    /// `pg_ctl stop -m fast`: clients are disconnected, a clean shutdown.
    Fast,
    /// `kill -9` of the server: crash recovery on the next start.
    Crash,
}

/// A PostgreSQL cluster of our own: `initdb` into a directory, the server on a spare port,
/// trust authentication for user `postgres`, loopback only.
pub(crate) struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// When we are root: the `postgres` user's uid and gid, since PostgreSQL refuses root.
    server_user: Option<(u32, u32)>,
    proc: Option<Proc>,
}

async fn user_ids(name: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag: &'static str| {
        let mut c = Command::new("id");
        c.arg(flag).arg(name);
        c
    };
    let uid = run_command(id("-u"), Duration::from_secs(10)).await?;
    let gid = run_command(id("-g"), Duration::from_secs(10)).await?;
    Ok((uid.trim().parse()?, gid.trim().parse()?))
}

/// PostgreSQL's server programs (`pg_config --bindir`), or the `PATH`.
async fn pg_bindir() -> PathBuf {
    let mut c = Command::new("pg_config");
    c.arg("--bindir");
    match run_command(c, Duration::from_secs(10)).await {
        Ok(out) if !out.trim().is_empty() => PathBuf::from(out.trim()),
        _ => PathBuf::new(),
    }
}

impl PgCluster {
    pub async fn start(dir: &Path) -> anyhow::Result<PgCluster> {
        let bin = pg_bindir().await;
        let port = free_ports(1)?[0];
        let server_user = if is_root() {
            Some(
                user_ids("postgres")
                    .await
                    .context("PostgreSQL refuses to run as root and there is no postgres user")?,
            )
        } else {
            None
        };
        let pg = PgCluster {
            dir: dir.to_owned(),
            bin,
            port,
            server_user,
            proc: None,
        };
        std::fs::create_dir_all(dir.join("sock"))?;
        std::fs::create_dir_all(dir.join("data"))?;
        if let Some((uid, gid)) = server_user {
            // The server user must reach its directories (temporary directories are private
            // to their creator) and own them.
            use std::os::unix::fs::PermissionsExt;
            let tmp = std::env::temp_dir();
            let mut p = Some(dir);
            while let Some(d) = p {
                if d.starts_with(&tmp) && d != tmp {
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
                }
                p = d.parent();
            }
            for d in [dir.join("sock"), dir.join("data")] {
                std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
            }
            std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o700))?;
        }
        let mut init = pg.as_server_user("initdb");
        init.arg("-D").arg(dir.join("data")).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_command(init, Duration::from_secs(120))
            .await
            .context("initdb")?;
        let mut pg = pg;
        pg.launch().await?;
        Ok(pg)
    }

    /// A command run as the server user. Directly, not through `runuser`, which would turn a
    /// fast-shutdown SIGINT into SIGTERM and then SIGKILL.
    fn as_server_user(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.server_user {
            c.uid(uid).gid(gid);
        }
        c
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut c = self.as_server_user("postgres");
        // fsync off: the cluster only has to survive its processes being killed, not the
        // machine losing power, and the shared 2-core machine is slow enough already.
        c.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.join("sock"))
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]);
        self.proc = Some(Proc::spawn("postgres", c, &self.dir.join("server.log"))?);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(p) = self.proc.as_mut()
                && let Some(s) = p.poll()
            {
                bail!(
                    "PostgreSQL exited at start ({s}); see {}",
                    self.dir.join("server.log").display()
                );
            }
            let mut probe = Command::new(self.bin.join("pg_isready"));
            probe
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p"])
                .arg(self.port.to_string());
            if run_command(probe, Duration::from_secs(10)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("PostgreSQL did not start in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs SQL as `postgres` on `database`.
    pub(crate) async fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let mut c = Command::new(self.bin.join("psql"));
        c.args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .arg("-d")
        .arg(database)
        .arg("-c")
        .arg(sql);
        run_command(c, Duration::from_secs(60)).await
    }

    pub async fn stop(&mut self, how: PgStop) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            match how {
                // SIGINT to the postmaster is PostgreSQL's fast shutdown.
                PgStop::Fast => {
                    p.stop(libc::SIGINT, Duration::from_secs(60)).await?;
                }
                PgStop::Crash => p.kill().await,
            }
        }
        Ok(())
    }

    pub(crate) async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.proc.is_some() {
            self.stop(PgStop::Fast).await?;
        }
        self.launch().await
    }
}
