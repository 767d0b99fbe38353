//! Talks to batch-state: workers hold no database credentials, they claim and renew here.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimResult {
    Claimed(i32),
    Refused,
    NotFound,
}

#[derive(Clone)]
pub struct StateClient {
    base: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ClaimAnswer {
    job_id: i64,
    result: String,
    attempt: i32,
}

#[derive(Deserialize)]
struct Claims {
    claims: Vec<ClaimAnswer>,
}

#[derive(Deserialize)]
struct Alive {
    alive: Vec<i64>,
}

impl StateClient {
    pub fn new(base: &str) -> anyhow::Result<StateClient> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(StateClient {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    pub async fn claim(&self, job_id: i64) -> anyhow::Result<ClaimResult> {
        let r = self
            .http
            .post(format!("{}/internal/claims", self.base))
            .json(&json!({"job_ids": [job_id]}))
            .send()
            .await?
            .error_for_status()?
            .json::<Claims>()
            .await?;
        let a = r
            .claims
            .into_iter()
            .find(|c| c.job_id == job_id)
            .ok_or_else(|| anyhow::anyhow!("batch-state did not answer for job {job_id}"))?;
        Ok(match a.result.as_str() {
            "claimed" => ClaimResult::Claimed(a.attempt),
            "not_found" => ClaimResult::NotFound,
            _ => ClaimResult::Refused,
        })
    }

    /// Renews claims; returns the ids still held.
    pub async fn renew(&self, held: &[(i64, i32)]) -> anyhow::Result<Vec<i64>> {
        let r = self
            .http
            .post(format!("{}/internal/leases", self.base))
            .json(&json!({"held": held}))
            .send()
            .await?
            .error_for_status()?
            .json::<Alive>()
            .await?;
        Ok(r.alive)
    }

    pub async fn ready(&self) -> bool {
        match self.http.get(format!("{}/healthz", self.base)).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }
}
