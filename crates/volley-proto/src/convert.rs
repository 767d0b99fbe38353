//! Protobuf ⇄ domain, in one place: what the gateway and the sweeper publish, what a worker
//! reports, and what batch-state reads back.

use volley_domain::{Dispatch, Endpoint, Outcome, Usage};

use crate::{Failed, JobMessage, Retry, Succeeded, job_event};

impl From<&Dispatch> for JobMessage {
    fn from(d: &Dispatch) -> JobMessage {
        JobMessage {
            job_id: d.id,
            batch_id: d.batch_id,
            inference_type: d.inference_type.as_str().to_owned(),
            endpoint: d.endpoint.path().to_owned(),
            model: d.model.clone(),
            // Serialising a `Value` cannot fail.
            body_json: serde_json::to_vec(&d.body).unwrap_or_default(),
            accepted_at_ms: d.accepted_at_ms,
        }
    }
}

impl TryFrom<JobMessage> for Dispatch {
    type Error = String;

    /// A job message as a worker may run it: a known endpoint whose inference type the
    /// message names too, a positive id and a JSON object body.
    fn try_from(m: JobMessage) -> Result<Dispatch, String> {
        let endpoint: Endpoint = m.endpoint.parse().map_err(|e| format!("{e}"))?;
        let inference_type = endpoint.inference_type();
        if m.inference_type != inference_type.as_str() {
            return Err(format!(
                "a {} job for {} ({})",
                m.inference_type, inference_type, m.endpoint
            ));
        }
        if m.job_id <= 0 {
            return Err(format!("bad job id {}", m.job_id));
        }
        let body: serde_json::Value =
            serde_json::from_slice(&m.body_json).map_err(|e| format!("body is not JSON: {e}"))?;
        if !body.is_object() {
            return Err("body is not a JSON object".into());
        }
        Ok(Dispatch {
            id: m.job_id,
            batch_id: m.batch_id,
            inference_type,
            endpoint,
            model: m.model,
            body,
            accepted_at_ms: m.accepted_at_ms,
        })
    }
}

impl From<Usage> for crate::Usage {
    fn from(u: Usage) -> crate::Usage {
        crate::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

impl From<crate::Usage> for Usage {
    fn from(u: crate::Usage) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

impl From<Outcome> for job_event::Outcome {
    fn from(o: Outcome) -> job_event::Outcome {
        match o {
            Outcome::Succeeded {
                result,
                usage,
                media_keys,
            } => job_event::Outcome::Succeeded(Succeeded {
                result_json: serde_json::to_vec(&result).unwrap_or_default(),
                usage: usage.map(Into::into),
                media_keys,
            }),
            Outcome::Failed {
                error_type,
                message,
            } => job_event::Outcome::Failed(Failed {
                error_type,
                message,
            }),
            Outcome::Retry { error, delay_ms } => {
                job_event::Outcome::Retry(Retry { error, delay_ms })
            }
        }
    }
}

impl TryFrom<job_event::Outcome> for Outcome {
    type Error = String;

    /// Fails only on a result that is not JSON; the text is taken as it is (callers clean it,
    /// [`Outcome::clean`]).
    fn try_from(o: job_event::Outcome) -> Result<Outcome, String> {
        Ok(match o {
            job_event::Outcome::Succeeded(s) => Outcome::Succeeded {
                result: serde_json::from_slice(&s.result_json)
                    .map_err(|e| format!("result is not JSON: {e}"))?,
                usage: s.usage.map(Into::into),
                media_keys: s.media_keys,
            },
            job_event::Outcome::Failed(f) => Outcome::Failed {
                error_type: f.error_type,
                message: f.message,
            },
            job_event::Outcome::Retry(r) => Outcome::Retry {
                error: r.error,
                delay_ms: r.delay_ms,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use volley_domain::InferenceType;

    #[test]
    fn a_dispatch_round_trips() {
        let d = Dispatch {
            id: 43,
            batch_id: 7,
            inference_type: InferenceType::Image,
            endpoint: Endpoint::ImagesGenerations,
            model: "flux-dev".into(),
            body: json!({"model": "flux-dev", "prompt": "a lamp"}),
            accepted_at_ms: 1,
        };
        let m = JobMessage::from(&d);
        assert_eq!(m.inference_type, "IMAGE");
        assert_eq!(m.endpoint, "/v1/images/generations");
        assert_eq!(Dispatch::try_from(m), Ok(d));
    }

    #[test]
    fn a_message_a_worker_cannot_run_is_refused() {
        let ok = JobMessage {
            job_id: 5,
            batch_id: 1,
            inference_type: "LLM".into(),
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            body_json: br#"{"prompt":"x"}"#.to_vec(),
            accepted_at_ms: 0,
        };
        assert!(Dispatch::try_from(ok.clone()).is_ok());
        for bad in [
            JobMessage {
                inference_type: "IMAGE".into(),
                ..ok.clone()
            },
            JobMessage {
                endpoint: "/v1/x".into(),
                ..ok.clone()
            },
            JobMessage {
                job_id: 0,
                ..ok.clone()
            },
            JobMessage {
                body_json: b"[1]".to_vec(),
                ..ok.clone()
            },
            JobMessage {
                body_json: b"{".to_vec(),
                ..ok.clone()
            },
        ] {
            assert!(Dispatch::try_from(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn outcomes_round_trip() {
        for o in [
            Outcome::Succeeded {
                result: json!({"text": "hi"}),
                usage: Some(Usage {
                    prompt_tokens: 1,
                    completion_tokens: 2,
                    total_tokens: 3,
                }),
                media_keys: vec!["batches/1/2-a1-0-x.png".into()],
            },
            Outcome::Failed {
                error_type: "provider_error".into(),
                message: "no".into(),
            },
            Outcome::Retry {
                error: "busy".into(),
                delay_ms: 5,
            },
        ] {
            let wire = job_event::Outcome::from(o.clone());
            assert_eq!(Outcome::try_from(wire), Ok(o));
        }
        let not_json = job_event::Outcome::Succeeded(Succeeded {
            result_json: b"{".to_vec(),
            ..Default::default()
        });
        assert!(Outcome::try_from(not_json).is_err());
    }
}
