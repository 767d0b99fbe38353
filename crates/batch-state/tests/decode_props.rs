//! Property tests: decoding a worker's event off the broker never panics, whatever the bytes,
//! and what it accepts names a real job and attempt (the rest is dead-lettered).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use batch_state::events::decode_with_context;
use proptest::prelude::*;
use volley_proto::{Failed, JobEvent, Message, Retry, Succeeded, Usage, job_event};

fn json_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"{}".to_vec()),
        Just(b"{\"text\": \"a\\u0000b\"}".to_vec()),
        Just(b"[[[[[[[[[[[[[[[[[[[[".to_vec()),
        "\\PC{0,24}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..32),
    ]
}

fn outcome() -> impl Strategy<Value = Option<job_event::Outcome>> {
    prop_oneof![
        Just(None),
        (
            json_bytes(),
            prop::option::of(any::<(i64, i64, i64)>()),
            prop::collection::vec("\\PC{0,40}", 0..4),
        )
            .prop_map(|(r, u, media_keys)| Some(job_event::Outcome::Succeeded(
                Succeeded {
                    result_json: r,
                    usage: u.map(|(p, c, t)| Usage {
                        prompt_tokens: p,
                        completion_tokens: c,
                        total_tokens: t,
                    }),
                    media_keys,
                }
            ))),
        ("\\PC{0,12}", "\\PC{0,40}").prop_map(|(error_type, message)| Some(
            job_event::Outcome::Failed(Failed {
                error_type,
                message
            })
        )),
        ("\\PC{0,40}", any::<i64>()).prop_map(|(error, delay_ms)| Some(job_event::Outcome::Retry(
            Retry { error, delay_ms }
        ))),
    ]
}

fn event() -> impl Strategy<Value = JobEvent> {
    (
        any::<i64>(),
        any::<i32>(),
        outcome(),
        any::<i64>(),
        any::<i64>(),
        "\\PC{0,8}",
        any::<i64>(),
    )
        .prop_map(
            |(job_id, attempt, outcome, at_ms, batch_id, inference_type, duration_ms)| JobEvent {
                job_id,
                attempt,
                outcome,
                at_ms,
                batch_id,
                inference_type,
                duration_ms,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn any_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_with_context(&bytes);
    }

    #[test]
    fn any_event_decodes_or_is_refused(e in event(), cut in any::<prop::sample::Index>(), flip in any::<(prop::sample::Index, u8)>()) {
        let bytes = e.encode_to_vec();
        match decode_with_context(&bytes) {
            Ok((d, context)) => {
                prop_assert!(d.job_id > 0 && d.attempt > 0);
                prop_assert_eq!(d.job_id, e.job_id);
                prop_assert_eq!(context.batch_id, e.batch_id);
            }
            Err(why) => prop_assert!(!why.is_empty()),
        }
        // Truncated and corrupted copies: refused or decoded, never a panic.
        if !bytes.is_empty() {
            let _ = decode_with_context(&bytes[..cut.index(bytes.len())]);
            let mut bad = bytes.clone();
            let i = flip.0.index(bad.len());
            bad[i] ^= flip.1 | 1;
            let _ = decode_with_context(&bad);
        }
    }
}
