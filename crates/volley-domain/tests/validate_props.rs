//! Property tests: whole-batch validation never panics, whatever JSON it is given, and what it
//! accepts holds nothing PostgreSQL cannot store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use volley_domain::{BatchRejection, Endpoint, Limits, ModelCatalog, ModelCheck, validate_batch};

struct Catalog;
impl ModelCatalog for Catalog {
    fn check(&self, model: &str, endpoint: Endpoint) -> ModelCheck {
        match (model, endpoint) {
            ("m", _) => ModelCheck::Served,
            ("chat", Endpoint::ChatCompletions) => ModelCheck::Served,
            ("chat", _) => ModelCheck::WrongEndpoint(vec![Endpoint::ChatCompletions]),
            _ => ModelCheck::UnknownModel,
        }
    }
}

/// Strings that hit the edges: empty, NUL, other controls, non-ASCII, the real endpoint paths.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("\0".to_owned()),
        Just("m".to_owned()),
        Just("chat".to_owned()),
        Just("/v1/chat/completions".to_owned()),
        Just("/v1/completions".to_owned()),
        Just("/v1/images/generations".to_owned()),
        Just("/v1/audio/speech".to_owned()),
        Just("/v1/files".to_owned()),
        "\\PC{0,12}",
        "[\\x00-\\x1f a-z\u{feff}\u{1f600}]{0,8}",
    ]
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Something shaped like a batch item, with any field possibly wrong.
fn item() -> impl Strategy<Value = Value> {
    let body = prop::collection::vec(
        (
            prop_oneof![
                Just("model".to_owned()),
                Just("prompt".to_owned()),
                Just("input".to_owned()),
                Just("messages".to_owned()),
                text()
            ],
            prop_oneof![
                any_json(),
                text().prop_map(Value::String),
                prop::collection::vec((text(), text()), 0..3).prop_map(|m| {
                    Value::Array(
                        m.into_iter()
                            .map(|(role, content)| json!({"role": role, "content": content}))
                            .collect(),
                    )
                }),
            ],
        ),
        0..5,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()));
    prop_oneof![
        4 => (text(), body).prop_map(|(endpoint, body)| json!({"endpoint": endpoint, "body": body})),
        1 => any_json(),
    ]
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_any_json(v in any_json()) {
        let _ = validate_batch(&v, &Catalog, &Limits::default());
    }

    #[test]
    fn batches_are_accepted_clean_or_rejected_with_paths(
        label in prop::option::of(any_json()),
        items in prop::collection::vec(item(), 0..8),
    ) {
        let mut req = json!({"requests": items});
        if let Some(l) = label {
            req["label"] = l;
        }
        let limits = Limits { max_items: 6, ..Limits::default() };
        match validate_batch(&req, &Catalog, &limits) {
            Ok(b) => {
                prop_assert!(!b.items.is_empty() && b.items.len() <= 6);
                prop_assert!(!b.label.as_deref().unwrap_or("").contains('\0'));
                for i in &b.items {
                    prop_assert!(!has_nul(&i.body), "accepted a NUL: {}", i.body);
                }
            }
            Err(BatchRejection::TooLarge { count, max }) => prop_assert!(count > max),
            Err(BatchRejection::Invalid(errors)) => {
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    prop_assert!(!e.field.is_empty());
                    if let Some(i) = e.index {
                        let prefix = format!("requests[{i}]");
                        prop_assert!(e.field.starts_with(&prefix), "{}", e.field);
                    }
                }
            }
        }
    }
}
