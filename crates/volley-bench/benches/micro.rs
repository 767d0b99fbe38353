//! Micro-benchmarks of the two per-batch CPU costs on the gateway's hot path: whole-batch
//! validation of a 256-item batch and encoding its job messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use volley_domain::{Dispatch, Limits, validate_batch};
use volley_proto::{JobMessage, Message};

fn batch() -> Value {
    let kinds = [
        json!({"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "user", "content": "Write a product description for a lamp."}]}}),
        json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "Once upon a time"}}),
        json!({"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a minimalist desk lamp"}}),
        json!({"endpoint": "/v1/videos/generations", "body": {"model": "sim-video", "prompt": "waves at dusk"}}),
        json!({"endpoint": "/v1/music/generations", "body": {"model": "sim-music", "prompt": "slow jazz"}}),
        json!({"endpoint": "/v1/audio/speech", "body": {"model": "tts-1", "input": "Hello there", "voice": "alloy"}}),
    ];
    let requests: Vec<Value> = (0..256).map(|i| kinds[i % 6].clone()).collect();
    json!({"label": "bench", "requests": requests})
}

fn benches(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/volley.toml");
    let settings = volley_config::Settings::from_file(&path).unwrap();
    let limits = Limits::default();
    let body = batch();
    let raw = serde_json::to_vec(&body).unwrap();
    c.bench_function("parse + validate a 256-item batch", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(&raw).unwrap();
            validate_batch(&v, &settings, &limits).unwrap()
        })
    });
    let valid = validate_batch(&body, &settings, &limits).unwrap();
    // What the gateway publishes: its jobs as the database returns them, through the one
    // protobuf conversion (`JobMessage::from`).
    let dispatch: Vec<Dispatch> = valid
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| Dispatch {
            id: i as i64,
            batch_id: 1,
            inference_type: it.endpoint.inference_type(),
            endpoint: it.endpoint,
            model: it.model.clone(),
            body: it.body.clone(),
            accepted_at_ms: 0,
        })
        .collect();
    c.bench_function("encode 256 job messages", |b| {
        b.iter(|| {
            dispatch
                .iter()
                .map(|d| JobMessage::from(d).encode_to_vec().len())
                .sum::<usize>()
        })
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
