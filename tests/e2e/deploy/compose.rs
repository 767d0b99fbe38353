//! docker-compose.yml.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

pub(crate) fn compose() -> Value {
    docs(&root().join("docker-compose.yml"))
        .into_iter()
        .next()
        .unwrap()
}

pub(crate) fn compose_env(svc: &Value) -> BTreeMap<String, EnvSrc> {
    let mut out = BTreeMap::new();
    match svc.get("environment") {
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                if let Some(k) = scalar(k) {
                    out.insert(k, EnvSrc::Lit(scalar(v).unwrap_or_default()));
                }
            }
        }
        Some(Value::Sequence(s)) => {
            for e in s.iter().filter_map(scalar) {
                let (k, v) = e.split_once('=').unwrap_or((&e, ""));
                out.insert(k.to_owned(), EnvSrc::Lit(v.to_owned()));
            }
        }
        _ => {}
    }
    out
}

/// (source, target) of a compose service's volumes.
pub(crate) fn compose_mounts(svc: &Value) -> Vec<(String, String)> {
    seq(svc.get("volumes"))
        .iter()
        .filter_map(|v| match v {
            Value::String(s) => {
                let mut parts = s.split(':');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            }
            Value::Mapping(_) => Some((text(v, &["source"])?, text(v, &["target"])?)),
            _ => None,
        })
        .collect()
}

/// The http URL of a compose health check, if any.
pub(crate) fn healthcheck_url(svc: &Value) -> Option<String> {
    let test = svc.get("healthcheck")?.get("test")?;
    let parts: Vec<String> = match test {
        Value::Sequence(s) => s.iter().filter_map(scalar).collect(),
        v => vec![scalar(v)?],
    };
    parts
        .iter()
        .flat_map(|p| p.split_whitespace())
        .find(|w| w.starts_with("http://"))
        .map(str::to_owned)
}

/// Seconds of a compose duration (`90s`, `5m`, `1h30m`, `1m30s`).
pub(crate) fn duration_secs(s: &str) -> Option<u64> {
    let (mut total, mut num) = (0u64, String::new());
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            let n: u64 = num.parse().ok()?;
            num.clear();
            total += n * match c {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => return None,
            };
        }
    }
    if num.is_empty() { Some(total) } else { None }
}
