//! Talks to batch-state: workers hold no database credentials, they claim and renew here.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimResult {
    /// The attempt number (the fencing token outcomes carry) and the attempt counted from the
    /// latest operator retry (what the retry budget goes by).
    Claimed {
        attempt: i32,
        round_attempt: i32,
    },
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
    #[serde(default)]
    round_attempt: i32,
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
        // A client span whose context batch-state's server span continues: the claim is part
        // of the job's trace.
        let span = volley_telemetry::trace::client_span("POST", "/internal/claims");
        if !span.is_disabled() {
            span.record(
                "server.address",
                volley_telemetry::trace::host_of(&self.base),
            );
        }
        let rb = volley_telemetry::trace::context_headers(&span)
            .into_iter()
            .fold(
                self.http.post(format!("{}/internal/claims", self.base)),
                |rb, (k, v)| rb.header(k, v),
            );
        let resp = rb
            .json(&json!({"job_ids": [job_id]}))
            .send()
            .instrument(span.clone())
            .await?;
        span.record("http.response.status_code", resp.status().as_u16());
        let r = resp.error_for_status()?.json::<Claims>().await?;
        let a = r
            .claims
            .into_iter()
            .find(|c| c.job_id == job_id)
            .ok_or_else(|| anyhow::anyhow!("batch-state did not answer for job {job_id}"))?;
        Ok(match a.result.as_str() {
            "claimed" => ClaimResult::Claimed {
                attempt: a.attempt,
                // An older batch-state does not send it: no operator retries there.
                round_attempt: if a.round_attempt > 0 {
                    a.round_attempt
                } else {
                    a.attempt
                },
            },
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
