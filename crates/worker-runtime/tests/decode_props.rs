//! Property tests: a worker decoding a job message off its queue never panics, whatever the
//! bytes, and accepts only a job of its own type with an object body.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use volley_domain::{Endpoint, InferenceType};
use volley_proto::{JobMessage, Message};
use worker_runtime::decode;

fn kind() -> impl Strategy<Value = InferenceType> {
    prop::sample::select(InferenceType::ALL.to_vec())
}

fn text(known: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(known), "\\PC{0,16}"]
}

fn message() -> impl Strategy<Value = JobMessage> {
    let endpoints: Vec<String> = Endpoint::ALL.iter().map(|e| e.path().to_owned()).collect();
    let types: Vec<String> = InferenceType::ALL
        .iter()
        .map(|t| t.as_str().to_owned())
        .collect();
    let body = prop_oneof![
        Just(b"{\"model\": \"m\", \"prompt\": \"p\"}".to_vec()),
        Just(b"[]".to_vec()),
        Just(b"{\"p\": \"\\u0000\"}".to_vec()),
        prop::collection::vec(any::<u8>(), 0..32),
    ];
    (
        any::<i64>(),
        any::<i64>(),
        text(types),
        text(endpoints),
        "\\PC{0,8}",
        body,
        any::<i64>(),
    )
        .prop_map(
            |(job_id, batch_id, inference_type, endpoint, model, body_json, accepted_at_ms)| {
                JobMessage {
                    job_id,
                    batch_id,
                    inference_type,
                    endpoint,
                    model,
                    body_json,
                    accepted_at_ms,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn any_bytes_decode_or_are_refused(k in kind(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(k, &bytes);
    }

    #[test]
    fn any_message_decodes_or_is_refused(k in kind(), m in message(), cut in any::<prop::sample::Index>()) {
        let bytes = m.encode_to_vec();
        if let Ok((job, accepted)) = decode(k, &bytes) {
            prop_assert!(job.id > 0);
            prop_assert_eq!(job.endpoint.inference_type(), k);
            prop_assert!(job.body.is_object());
            prop_assert_eq!(accepted, m.accepted_at_ms);
        }
        if !bytes.is_empty() {
            let _ = decode(k, &bytes[..cut.index(bytes.len())]);
        }
    }
}
