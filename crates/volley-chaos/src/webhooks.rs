//! Webhooks under faults: every batch is submitted with a webhook to the project's test
//! receiver (`tests/python/webhook_receiver.py`, which verifies signatures with the Standard
//! Webhooks reference library), at its tenant's path `/tenant/<name>`, where only that
//! tenant's secret verifies; the receiver itself answers 500 at first and is down for a
//! while mid-run, and at the end every event the accepted batches caused must have arrived,
//! verified, at its own tenant's path: one `batch.completed`/`batch.cancelled` per batch and
//! one `job.failed` per failed job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use volley_db::Db;

use crate::suite::Accepted;

/// The event types the suite's batches subscribe to.
pub(crate) const EVENTS: [&str; 3] = ["batch.completed", "batch.cancelled", "job.failed"];

/// The repository root (where `.venv` and `tests/python` are).
fn repo_root() -> anyhow::Result<PathBuf> {
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    loop {
        if dir.join("tests/python/webhook_receiver.py").exists() {
            return Ok(dir);
        }
        if !dir.pop() {
            bail!("tests/python/webhook_receiver.py not found above the chaos crate");
        }
    }
}

/// The receiver as a child process, killed on drop.
pub struct Receiver {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    /// (tenant name, its webhook secret).
    tenants: Vec<(String, String)>,
}

impl Receiver {
    pub fn start(
        log: &Path,
        tenants: &[(String, String)],
        fail_first: usize,
        port: u16,
    ) -> anyhow::Result<Receiver> {
        let root = repo_root()?;
        let python = root.join(".venv/bin/python");
        if !python.exists() {
            bail!("no .venv with the tests' Python tools: run `bash scripts/setup.sh`");
        }
        let mut cmd = Command::new(python);
        cmd.arg(root.join("tests/python/webhook_receiver.py"))
            .arg("--log")
            .arg(log);
        for (name, secret) in tenants {
            cmd.arg("--tenant").arg(format!("{name}={secret}"));
        }
        let mut child = cmd
            .arg("--fail-first")
            .arg(fail_first.to_string())
            .arg("--port")
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the webhook receiver")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("receiver stdout")?).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("the receiver said {line:?}"))?;
        Ok(Receiver {
            child: Some(child),
            port,
            log: log.to_owned(),
            tenants: tenants.to_vec(),
        })
    }

    /// The endpoint of one tenant's webhooks.
    pub fn url(&self, tenant: &str) -> String {
        format!("http://127.0.0.1:{}/tenant/{tenant}", self.port)
    }

    pub(crate) fn is_down(&self) -> bool {
        self.child.is_none()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Up again on the same port, keeping its record.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        *self = Receiver::start(&self.log.clone(), &self.tenants.clone(), 0, self.port)?;
        Ok(())
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the webhook check found.
#[derive(Debug, Default)]
pub struct Count {
    pub expected: usize,
    pub delivered: usize,
    pub lost: usize,
    pub problems: Vec<String>,
}

/// Waits (up to `wait`) until every event the accepted batches caused has arrived verified,
/// then counts. Expected: one batch event per accepted batch, one `job.failed` per failed job
/// (from PostgreSQL, the source of truth for how jobs ended), each at the path of the tenant
/// that submitted the batch (`tenants` names them by index).
pub async fn check(
    db: &Db,
    rx: &Receiver,
    accepted: &BTreeMap<i64, Accepted>,
    tenants: &[&str],
    wait: Duration,
) -> anyhow::Result<Count> {
    let mut failed_jobs: HashMap<i64, HashSet<String>> = HashMap::new();
    for j in db.audit_jobs().await? {
        if j.status == "FAILED" && accepted.contains_key(&j.batch_id) {
            failed_jobs
                .entry(j.batch_id)
                .or_default()
                .insert(j.id.to_string());
        }
    }
    let expected = accepted.len() + failed_jobs.values().map(HashSet::len).sum::<usize>();
    let deadline = Instant::now() + wait;
    loop {
        let records = rx.records();
        let mut c = count(&records, accepted, tenants, &failed_jobs);
        c.expected = expected;
        if c.lost == 0 || Instant::now() >= deadline {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn count(
    records: &[Value],
    accepted: &BTreeMap<i64, Accepted>,
    tenants: &[&str],
    failed_jobs: &HashMap<i64, HashSet<String>>,
) -> Count {
    let mut c = Count::default();
    // (type, object id) → webhook-ids that carried it, accepted (2xx) only.
    let mut seen: HashMap<(String, String), HashSet<String>> = HashMap::new();
    // (type, object id) → the tenant paths it arrived at.
    let mut paths: HashMap<(String, String), HashSet<String>> = HashMap::new();
    for r in records {
        if r["verified_with"].as_array().is_none_or(Vec::is_empty) {
            c.problems.push(format!(
                "a delivery failed signature verification: {}",
                r["webhook_id"]
            ));
            continue;
        }
        if r["answered"] != 204 {
            continue;
        }
        let t = r["type"].as_str().unwrap_or("").to_owned();
        let data = &r["body"]["data"];
        let id = data["id"].as_str().unwrap_or("").to_owned();
        let wid = r["webhook_id"].as_str().unwrap_or("").to_owned();
        let kind = if t.starts_with("batch.") {
            "batch".to_owned()
        } else {
            t.clone()
        };
        let tenant = r["tenant"].as_str().unwrap_or("").to_owned();
        paths
            .entry((kind.clone(), id.clone()))
            .or_default()
            .insert(tenant);
        seen.entry((kind, id)).or_default().insert(wid);
    }
    for ((kind, id), wids) in &seen {
        // Redeliveries of one event share a webhook-id; two ids for one batch end or one
        // failed job would be an event recorded twice.
        if wids.len() > 1 {
            c.problems
                .push(format!("{kind} {id} was recorded as {} events", wids.len()));
        }
    }
    for (id, a) in accepted {
        let owner = tenants.get(a.tenant).copied().unwrap_or("");
        let events = std::iter::once(("batch".to_owned(), id.to_string())).chain(
            failed_jobs
                .get(id)
                .into_iter()
                .flatten()
                .map(|job| ("job.failed".to_owned(), job.clone())),
        );
        for key in events {
            if seen.contains_key(&key) {
                c.delivered += 1;
            } else {
                c.lost += 1;
            }
            // Verified at another tenant's path means signed with that tenant's secret.
            for at in paths.get(&key).into_iter().flatten() {
                if at != owner {
                    c.problems.push(format!(
                        "{} {} of batch {id} (tenant {owner}) arrived at tenant {at:?}'s endpoint",
                        key.0, key.1
                    ));
                }
            }
        }
    }
    c
}
