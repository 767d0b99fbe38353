//! Talks to batch-state: workers hold no database credentials, they claim and renew here.

use std::time::Duration;

use tracing::{Instrument, Span};
use volley_domain::Claim;
use volley_proto::state_api::{
    ClaimAnswer, ClaimsAnswer, ClaimsRequest, LeasesAnswer, LeasesRequest,
};

#[derive(Clone)]
pub struct StateClient {
    base: String,
    /// The shared secret batch-state's internal API asks for (empty: none, dev mode).
    token: String,
    http: reqwest::Client,
}

impl StateClient {
    pub fn new(base: &str, token: &str) -> anyhow::Result<StateClient> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(StateClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    fn authorized(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if self.token.is_empty() {
            rb
        } else {
            rb.bearer_auth(&self.token)
        }
    }

    /// Claims many jobs in one request; one answer per id asked, in the order asked. `span`
    /// is the request's client span (batch-state's server span continues it).
    pub async fn claim(&self, job_ids: &[i64], span: Span) -> anyhow::Result<Vec<Claim>> {
        if !span.is_disabled() {
            span.record(
                "server.address",
                volley_telemetry::trace::host_of(&self.base),
            );
        }
        let rb = volley_telemetry::trace::context_headers(&span)
            .into_iter()
            .fold(
                self.authorized(self.http.post(format!("{}/internal/claims", self.base))),
                |rb, (k, v)| rb.header(k, v),
            );
        let resp = rb
            .json(&ClaimsRequest {
                job_ids: job_ids.to_vec(),
            })
            .send()
            .instrument(span.clone())
            .await?;
        span.record("http.response.status_code", resp.status().as_u16());
        let r = resp.error_for_status()?.json::<ClaimsAnswer>().await?;
        answers(job_ids, r.claims)
    }

    /// Renews claims; returns the ids still held.
    pub(crate) async fn renew(&self, held: &[(i64, i32)]) -> anyhow::Result<Vec<i64>> {
        let r = self
            .authorized(self.http.post(format!("{}/internal/leases", self.base)))
            .json(&LeasesRequest {
                held: held.to_vec(),
            })
            .send()
            .await?
            .error_for_status()?
            .json::<LeasesAnswer>()
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

/// Matches batch-state's answers to the ids asked. Batch-state answers in the order asked; an
/// answer missing or out of place is an error rather than a guess, since it hands out work.
fn answers(asked: &[i64], got: Vec<ClaimAnswer>) -> anyhow::Result<Vec<Claim>> {
    if got.len() != asked.len() {
        anyhow::bail!(
            "batch-state answered {} claims for {} jobs",
            got.len(),
            asked.len()
        );
    }
    asked
        .iter()
        .zip(got)
        .map(|(id, a)| {
            if a.job_id != *id {
                anyhow::bail!("batch-state answered for job {} in place of {id}", a.job_id);
            }
            a.claim().map_err(anyhow::Error::msg)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use volley_proto::state_api::ClaimResult;

    fn a(job_id: i64, result: &str, attempt: i32) -> ClaimAnswer {
        let result = match result {
            "claimed" => ClaimResult::Claimed,
            "not_found" => ClaimResult::NotFound,
            _ => ClaimResult::Refused,
        };
        ClaimAnswer {
            job_id,
            result,
            attempt,
            round_attempt: 0,
        }
    }

    #[test]
    fn answers_follow_the_ids_asked() {
        let got = answers(
            &[3, 4, 5],
            vec![a(3, "claimed", 2), a(4, "refused", 0), a(5, "not_found", 0)],
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                Claim::Claimed {
                    attempt: 2,
                    round_attempt: 2
                },
                Claim::Refused,
                Claim::NotFound
            ]
        );
    }

    #[test]
    fn a_wrong_or_short_answer_is_an_error() {
        assert!(answers(&[3, 4], vec![a(3, "claimed", 1)]).is_err());
        assert!(answers(&[3, 4], vec![a(4, "claimed", 1), a(3, "claimed", 1)]).is_err());
        assert!(answers(&[3], vec![a(3, "claimed", 0)]).is_err());
    }
}
