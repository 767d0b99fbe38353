//! Volley's wire formats between its own services: the RabbitMQ messages (prost, generated
//! from `proto/volley.proto`) and the JSON bodies of batch-state's internal API
//! ([`state_api`]). They convert to the domain's types here (`convert.rs`), and only here.

#[allow(clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/volley.v1.rs"));
}

mod convert;
pub mod state_api;

pub use generated::*;
pub use prost::Message;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_message_round_trips() {
        let m = JobMessage {
            job_id: 43,
            batch_id: 7,
            inference_type: "IMAGE".into(),
            endpoint: "/v1/images/generations".into(),
            model: "flux-dev".into(),
            body_json: br#"{"model":"flux-dev","prompt":"a lamp"}"#.to_vec(),
            accepted_at_ms: 1,
        };
        let bytes = m.encode_to_vec();
        assert_eq!(JobMessage::decode(bytes.as_slice()).unwrap(), m);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(JobEvent::decode(&[0xff, 0xff, 0xff, 0xff][..]).is_err());
        assert!(JobMessage::decode(&b"{\"json\": true}"[..]).is_err());
    }
}
