//! Dockerfile.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

#[derive(Debug)]
pub(crate) struct Stage {
    pub(crate) name: String,
    pub(crate) from: String,
    pub(crate) instrs: Vec<(String, String)>,
}

pub(crate) fn dockerfile() -> Vec<Stage> {
    let text = read(&root().join("Dockerfile"));
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                logical.push(cur.trim().to_owned());
            }
            cur.clear();
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (instr, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let instr = instr.to_ascii_uppercase();
        if instr == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, n] if as_.eq_ignore_ascii_case("as") => (*n).to_owned(),
                _ => format!("#{}", stages.len()),
            };
            stages.push(Stage {
                name,
                from: words.first().copied().unwrap_or("").to_owned(),
                instrs: vec![],
            });
        } else if let Some(s) = stages.last_mut() {
            s.instrs.push((instr, args.trim().to_owned()));
        }
    }
    stages
}

/// A stage and the stages it is built FROM, nearest first.
pub(crate) fn chain<'a>(stages: &'a [Stage], name: &str) -> Vec<&'a Stage> {
    let mut out = Vec::new();
    let mut next = stages.iter().find(|s| s.name == name);
    while let Some(s) = next {
        out.push(s);
        next = stages
            .iter()
            .find(|p| p.name == s.from && !out.iter().any(|o| o.name == p.name));
    }
    out
}

pub(crate) const BUILD_TOOLS: &[&str] = &[
    "build-essential",
    "gcc",
    "g++",
    "clang",
    "make",
    "cmake",
    "pkg-config",
    "libpq-dev",
    "libssl-dev",
    "cargo",
    "rustc",
    "protobuf-compiler",
];
