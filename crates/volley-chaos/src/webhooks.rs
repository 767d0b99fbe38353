//! Webhooks under faults: every batch is submitted with a webhook to the project's test
//! receiver (`tests/python/webhook_receiver.py`, which verifies signatures with the Standard
//! Webhooks reference library), the receiver itself answers 500 at first and is down for a
//! while mid-run, and at the end every event the accepted batches caused must have arrived,
//! verified: one `batch.completed`/`batch.cancelled` per batch and one `job.failed` per
//! failed job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use volley_db::Db;

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
    secret: String,
}

impl Receiver {
    pub fn start(
        log: &Path,
        secret: &str,
        fail_first: usize,
        port: u16,
    ) -> anyhow::Result<Receiver> {
        let root = repo_root()?;
        let python = root.join(".venv/bin/python");
        if !python.exists() {
            bail!("no .venv with the tests' Python tools: run `bash scripts/setup.sh`");
        }
        let mut child = Command::new(python)
            .arg(root.join("tests/python/webhook_receiver.py"))
            .arg("--log")
            .arg(log)
            .arg("--secret")
            .arg(secret)
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
            secret: secret.to_owned(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
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
        *self = Receiver::start(&self.log.clone(), &self.secret.clone(), 0, self.port)?;
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
/// (from PostgreSQL, the source of truth for how jobs ended).
pub async fn check(
    db: &Db,
    rx: &Receiver,
    accepted: &BTreeMap<i64, usize>,
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
        let mut c = count(&records, accepted, &failed_jobs);
        c.expected = expected;
        if c.lost == 0 || Instant::now() >= deadline {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn count(
    records: &[Value],
    accepted: &BTreeMap<i64, usize>,
    failed_jobs: &HashMap<i64, HashSet<String>>,
) -> Count {
    let mut c = Count::default();
    // (type, object id) → webhook-ids that carried it, accepted (2xx) only.
    let mut seen: HashMap<(String, String), HashSet<String>> = HashMap::new();
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
    for id in accepted.keys() {
        if seen.contains_key(&("batch".to_owned(), id.to_string())) {
            c.delivered += 1;
        } else {
            c.lost += 1;
        }
        for job in failed_jobs.get(id).into_iter().flatten() {
            if seen.contains_key(&("job.failed".to_owned(), job.clone())) {
                c.delivered += 1;
            } else {
                c.lost += 1;
            }
        }
    }
    c
}
