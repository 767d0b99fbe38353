//! Binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

pub(crate) fn binaries_on_disk() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(root().join("crates")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if DEV_TOOLS.contains(&name.as_str()) {
            continue;
        }
        if e.path().join("src").join("main.rs").is_file() {
            out.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

pub(crate) fn binaries() -> BTreeSet<String> {
    let mut b = binaries_on_disk();
    b.extend(PLANNED.iter().map(|s| s.to_string()));
    b
}

/// Long-running binaries (everything but the CLI).
pub(crate) fn services() -> Vec<String> {
    binaries().into_iter().filter(|b| b != CLI).collect()
}

pub(crate) fn worker_key(bin: &str) -> Option<&str> {
    bin.strip_prefix("worker-")
}

pub(crate) fn workers() -> Vec<String> {
    binaries()
        .into_iter()
        .filter(|b| worker_key(b).is_some())
        .collect()
}

/// The `*_ADDR` variable a binary listens on.
pub(crate) fn addr_var(bin: &str) -> Option<&'static str> {
    match bin {
        "gateway" => Some("VOLLEY_GATEWAY_ADDR"),
        "batch-state" => Some("VOLLEY_STATE_ADDR"),
        SIM => Some("VOLLEY_SIM_ADDR"),
        b if worker_key(b).is_some() => Some("VOLLEY_WORKER_ADDR"),
        _ => None,
    }
}

/// Variables a binary must be given (besides RUST_LOG).
pub(crate) fn required_env(bin: &str) -> Vec<&'static str> {
    match bin {
        "gateway" => vec![
            "VOLLEY_CONFIG",
            "VOLLEY_DATABASE_URL",
            "VOLLEY_AMQP_URL",
            "VOLLEY_GATEWAY_ADDR",
            "VOLLEY_PUBLIC_URL",
            "VOLLEY_MEDIA_DIR",
            "VOLLEY_MEDIA_SIGNING_KEY",
        ],
        "batch-state" => vec![
            "VOLLEY_CONFIG",
            "VOLLEY_DATABASE_URL",
            "VOLLEY_AMQP_URL",
            "VOLLEY_STATE_ADDR",
            "VOLLEY_PUBLIC_URL",
            "VOLLEY_MEDIA_SIGNING_KEY",
            "VOLLEY_INTERNAL_TOKEN",
        ],
        CLI => vec!["VOLLEY_DATABASE_URL"],
        SIM => vec!["VOLLEY_SIM_ADDR"],
        b if worker_key(b).is_some() => vec![
            "VOLLEY_CONFIG",
            "VOLLEY_AMQP_URL",
            "VOLLEY_STATE_URL",
            "VOLLEY_WORKER_ADDR",
            "VOLLEY_WORKER_CONCURRENCY",
            "VOLLEY_PUBLIC_URL",
            "VOLLEY_MEDIA_DIR",
            "VOLLEY_MEDIA_SIGNING_KEY",
            "VOLLEY_INTERNAL_TOKEN",
        ],
        _ => vec![],
    }
}

/// Variables a binary must NOT be given: workers hold no database credentials.
pub(crate) fn forbidden_env(bin: &str) -> Vec<&'static str> {
    if worker_key(bin).is_some() || bin == SIM {
        vec!["VOLLEY_DATABASE_URL", "VOLLEY_DATABASE_POOL_SIZE"]
    } else {
        vec![]
    }
}

/// Binaries that share the media store (gateway serves files, workers write them).
pub(crate) fn uses_media(bin: &str) -> bool {
    bin == "gateway" || worker_key(bin).is_some()
}

pub(crate) fn readiness_path(bin: &str) -> &'static str {
    // The simulator serves /healthz only.
    if bin == SIM { "/healthz" } else { "/readyz" }
}
