//! Every JSON body of batch-state's HTTP API (`/internal/claims`, `/internal/leases`, their
//! errors, `/healthz`, `/readyz`), one shape shared by the server (batch-state) and its
//! clients (worker-runtime, the tests).
//!
//! Fields of bodies that used to be `serde_json::json!` maps are declared in alphabetical
//! order: those maps wrote their keys sorted, and callers keep getting the same bytes.

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

/// Any error of the internal API: `401` without the token, `400` for a request out of
/// bounds, `503` while the database is down or the service stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
        }
    }
}

/// `GET /healthz`: the process is alive (always `ok`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

impl Health {
    pub fn ok() -> Health {
        Health {
            status: "ok".to_owned(),
        }
    }
}

/// `GET /readyz`: whether batch-state can do its work (`200`; `503` with the same body when
/// not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// PostgreSQL answers.
    pub database: bool,
    /// True while shutting down.
    pub draining: bool,
    /// The outcome events are being consumed.
    pub rabbitmq: bool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.database && self.rabbitmq && !self.draining
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// `body` is written as `wire` to the byte, and `wire` reads back as `body`.
    fn round_trips<T>(body: &T, wire: &str)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(body).unwrap(), wire);
        assert_eq!(&serde_json::from_str::<T>(wire).unwrap(), body);
    }

    #[test]
    fn claims_request_round_trips() {
        round_trips(
            &ClaimsRequest {
                job_ids: vec![3, 4],
            },
            r#"{"job_ids":[3,4]}"#,
        );
    }

    #[test]
    fn claims_answer_round_trips() {
        round_trips(
            &ClaimsAnswer {
                claims: vec![
                    ClaimAnswer::new(
                        3,
                        Claim::Claimed {
                            attempt: 2,
                            round_attempt: 1,
                        },
                    ),
                    ClaimAnswer::new(4, Claim::Refused),
                    ClaimAnswer::new(5, Claim::NotFound),
                ],
            },
            r#"{"claims":[{"job_id":3,"result":"claimed","attempt":2,"round_attempt":1},{"job_id":4,"result":"refused","attempt":0,"round_attempt":0},{"job_id":5,"result":"not_found","attempt":0,"round_attempt":0}]}"#,
        );
    }

    #[test]
    fn leases_round_trip() {
        round_trips(
            &LeasesRequest {
                held: vec![(3, 1), (4, 2)],
            },
            r#"{"held":[[3,1],[4,2]]}"#,
        );
        round_trips(&LeasesAnswer { alive: vec![4] }, r#"{"alive":[4]}"#);
    }

    #[test]
    fn error_health_and_readiness_round_trip() {
        round_trips(
            &ErrorBody::new("shutting down"),
            r#"{"error":"shutting down"}"#,
        );
        round_trips(&Health::ok(), r#"{"status":"ok"}"#);
        let r = Readiness {
            database: true,
            draining: false,
            rabbitmq: true,
        };
        round_trips(&r, r#"{"database":true,"draining":false,"rabbitmq":true}"#);
        assert!(r.is_ready());
        // The bytes the `json!` maps wrote.
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            serde_json::to_string(&json!({"database": true, "rabbitmq": true, "draining": false}))
                .unwrap()
        );
    }

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
