//! The crate graph ARCHITECTURE.md describes, checked against `cargo metadata`: the domain
//! crate stays free of frameworks, no worker can reach the database, the database crate
//! builds no wire messages, and services speak to RabbitMQ only through volley-amqp.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Each workspace crate's normal (non-dev, non-build) dependencies by package name.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
        ])
        .arg(host())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| name_of[d["pkg"].as_str().unwrap()].to_owned())
                .collect();
            (name_of[n["id"].as_str().unwrap()].to_owned(), deps)
        })
        .collect()
}

/// The host's target triple. Resolved for it, the graph needs only the packages a build here
/// downloaded: for every platform, `--offline` fails on a machine that never ran `cargo fetch`.
fn host() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap()
        .to_owned()
}

/// Everything `from` links, directly or through other crates.
fn reach(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(c) = todo.pop() {
        for d in g.get(&c).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_domain_crate_has_no_framework() {
    let g = graph();
    let reached = reach(&g, "volley-domain");
    for framework in [
        "tokio",
        "actix-web",
        "lapin",
        "diesel",
        "reqwest",
        "prost",
        "hyper",
    ] {
        assert!(
            !reached.contains(framework),
            "volley-domain reaches {framework}: {reached:?}"
        );
    }
}

#[test]
fn no_worker_reaches_the_database() {
    let g = graph();
    // The walk finds real edges: the gateway does use the database.
    assert!(reach(&g, "gateway").contains("volley-db"));
    let workers: Vec<&String> = g.keys().filter(|n| n.starts_with("worker-")).collect();
    assert!(workers.len() >= 6, "worker crates: {workers:?}");
    for w in workers {
        let reached = reach(&g, w);
        for forbidden in ["volley-db", "diesel", "gateway", "batch-state"] {
            assert!(!reached.contains(forbidden), "{w} reaches {forbidden}");
        }
    }
}

#[test]
fn the_database_crate_builds_no_messages() {
    let g = graph();
    // Wire formats live at the edges (volley-proto, the publishing services); the database
    // layer stores domain types and knows no broker message.
    assert!(reach(&g, "gateway").contains("volley-proto"));
    let reached = reach(&g, "volley-db");
    assert!(reached.contains("volley-domain"), "{reached:?}");
    for forbidden in ["volley-proto", "prost", "volley-amqp", "lapin"] {
        assert!(
            !reached.contains(forbidden),
            "volley-db reaches {forbidden}"
        );
    }
}

#[test]
fn services_reach_the_broker_only_through_volley_amqp() {
    let g = graph();
    // The walk sees lapin where it is: under volley-amqp.
    assert!(g["volley-amqp"].contains("lapin"));
    let services: Vec<&String> = g
        .keys()
        .filter(|n| ["gateway", "batch-state"].contains(&n.as_str()) || n.starts_with("worker-"))
        .collect();
    assert!(services.len() >= 8, "service crates: {services:?}");
    for s in services {
        assert!(
            !g[s].contains("lapin"),
            "{s} depends on lapin directly: consume and publish through volley-amqp"
        );
    }
}

#[test]
fn only_tests_depend_on_the_harness() {
    let g = graph();
    // The walk finds real edges: the harness starts the services.
    assert!(reach(&g, "volley-harness").contains("gateway"));
    for (name, deps) in &g {
        assert!(
            !deps.contains("volley-harness"),
            "{name} depends on the test harness outside [dev-dependencies]"
        );
    }
}
