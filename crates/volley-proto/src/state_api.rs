//! The JSON bodies of batch-state's internal API (`/internal/claims`, `/internal/leases`), one
//! shape shared by the server (batch-state) and its client (worker-runtime).

use serde::{Deserialize, Serialize};
use volley_domain::Claim;

/// `POST /internal/claims`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimsRequest {
    pub job_ids: Vec<i64>,
}

/// The answer to [`ClaimsRequest`]: one per id asked, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimsAnswer {
    pub claims: Vec<ClaimAnswer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimResult {
    Claimed,
    NotFound,
    /// Running elsewhere, finished or cancelled; also whatever a newer batch-state may answer
    /// that this version does not know: it hands out no work.
    #[serde(other)]
    Refused,
}

impl ClaimResult {
    /// The name on the wire, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimResult::Claimed => "claimed",
            ClaimResult::Refused => "refused",
            ClaimResult::NotFound => "not_found",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    pub job_id: i64,
    pub result: ClaimResult,
    /// The attempt handed out (0 unless claimed).
    pub attempt: i32,
    /// The attempt counted from the latest operator retry: what the worker's retry budget
    /// goes by (absent from older batch-state versions: take `attempt`).
    #[serde(default)]
    pub round_attempt: i32,
}

impl ClaimAnswer {
    pub fn new(job_id: i64, claim: Claim) -> ClaimAnswer {
        let (result, attempt, round_attempt) = match claim {
            Claim::Claimed {
                attempt,
                round_attempt,
            } => (ClaimResult::Claimed, attempt, round_attempt),
            Claim::Refused => (ClaimResult::Refused, 0, 0),
            Claim::NotFound => (ClaimResult::NotFound, 0, 0),
        };
        ClaimAnswer {
            job_id,
            result,
            attempt,
            round_attempt,
        }
    }

    /// The domain's claim; a claim without an attempt is an error, since outcomes could not
    /// be fenced.
    pub fn claim(&self) -> Result<Claim, String> {
        Ok(match self.result {
            ClaimResult::Claimed if self.attempt > 0 => Claim::Claimed {
                attempt: self.attempt,
                // An older batch-state does not send it: no operator retries there.
                round_attempt: if self.round_attempt > 0 {
                    self.round_attempt
                } else {
                    self.attempt
                },
            },
            ClaimResult::Claimed => {
                return Err(format!(
                    "batch-state claimed job {} without an attempt",
                    self.job_id
                ));
            }
            ClaimResult::Refused => Claim::Refused,
            ClaimResult::NotFound => Claim::NotFound,
        })
    }
}

/// `POST /internal/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasesRequest {
    /// `[job_id, attempt]` pairs the worker is running.
    pub held: Vec<(i64, i32)>,
}

/// The answer to [`LeasesRequest`]: the jobs whose claim is still valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasesAnswer {
    pub alive: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_wire_shape_is_the_one_workers_read() {
        let a = ClaimAnswer::new(
            3,
            Claim::Claimed {
                attempt: 2,
                round_attempt: 1,
            },
        );
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            json!({"job_id": 3, "result": "claimed", "attempt": 2, "round_attempt": 1})
        );
        let refused = ClaimAnswer::new(4, Claim::Refused);
        assert_eq!(serde_json::to_value(refused).unwrap()["result"], "refused");
        let missing = ClaimAnswer::new(5, Claim::NotFound);
        assert_eq!(
            serde_json::to_value(missing).unwrap()["result"],
            "not_found"
        );
        for c in [
            Claim::Claimed {
                attempt: 2,
                round_attempt: 1,
            },
            Claim::Refused,
            Claim::NotFound,
        ] {
            assert_eq!(ClaimAnswer::new(9, c).claim(), Ok(c));
        }
    }

    #[test]
    fn older_and_newer_answers_are_read_safely() {
        let old: ClaimAnswer =
            serde_json::from_value(json!({"job_id": 3, "result": "claimed", "attempt": 2}))
                .unwrap();
        assert_eq!(
            old.claim(),
            Ok(Claim::Claimed {
                attempt: 2,
                round_attempt: 2
            })
        );
        let unknown: ClaimAnswer =
            serde_json::from_value(json!({"job_id": 3, "result": "paused", "attempt": 0})).unwrap();
        assert_eq!(unknown.claim(), Ok(Claim::Refused));
        let no_attempt: ClaimAnswer =
            serde_json::from_value(json!({"job_id": 3, "result": "claimed", "attempt": 0}))
                .unwrap();
        assert!(no_attempt.claim().is_err());
    }
}
