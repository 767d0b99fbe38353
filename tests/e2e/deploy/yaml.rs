//! YAML helpers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

pub(crate) fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    Some(cur)
}

pub(crate) fn seq(v: Option<&Value>) -> &[Value] {
    v.and_then(|v| v.as_sequence())
        .map(|s| s.as_slice())
        .unwrap_or(&[])
}

pub(crate) fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(crate) fn text(v: &Value, path: &[&str]) -> Option<String> {
    at(v, path).and_then(scalar)
}

pub(crate) fn int(v: &Value, path: &[&str]) -> Option<i64> {
    text(v, path).and_then(|s| s.parse().ok())
}

pub(crate) fn labels(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(|v| v.as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, scalar(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Port of a `host:port` address or a URL.
pub(crate) fn port_of(addr: &str) -> Option<u16> {
    let hostport = addr.split("://").last()?.split('/').next()?;
    let hostport = hostport.rsplit('@').next()?;
    hostport.rsplit(':').next()?.parse().ok()
}

/// Host of a URL (`scheme://[user@]host[:port]/...`).
pub(crate) fn url_host(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let hostport = rest.split('/').next()?.rsplit('@').next()?;
    Some(hostport.split(':').next()?.to_owned())
}

pub(crate) fn is_local_host(h: &str) -> bool {
    matches!(h, "localhost" | "127.0.0.1" | "0.0.0.0" | "[::1]" | "")
}
