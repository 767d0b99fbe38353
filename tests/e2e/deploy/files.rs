//! Files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

pub(crate) fn root() -> PathBuf {
    fs::canonicalize(env!("CARGO_MANIFEST_DIR")).unwrap()
}

pub(crate) fn rel(p: &Path) -> String {
    let p = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    p.strip_prefix(root()).unwrap_or(&p).display().to_string()
}

pub(crate) fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", rel(p)))
}

pub(crate) fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

pub(crate) fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

/// Every YAML file of the deployment: deploy/**.yaml and docker-compose.yml.
pub(crate) fn yaml_files() -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&root().join("deploy"), &mut all);
    let mut out: Vec<PathBuf> = all.into_iter().filter(|p| is_yaml(p)).collect();
    out.push(root().join("docker-compose.yml"));
    out
}

/// Every text file this test treats as "deploy files" (for the environment-name checks).
pub(crate) fn deploy_text_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files_under(&root().join("deploy"), &mut out);
    for f in ["docker-compose.yml", "Dockerfile", ".dockerignore"] {
        out.push(root().join(f));
    }
    out
}

/// Splits a YAML stream into documents and parses each (merge keys `<<` applied).
pub(crate) fn parse_docs(path: &Path) -> Result<Vec<Value>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", rel(path)))?;
    let mut chunks = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            chunks.push(String::new());
            if let Some(rest) = line.strip_prefix("--- ") {
                chunks.last_mut().unwrap().push_str(rest);
                chunks.last_mut().unwrap().push('\n');
            }
        } else {
            let last = chunks.last_mut().unwrap();
            last.push_str(line);
            last.push('\n');
        }
    }
    let mut docs = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut v: Value = serde_yaml::from_str(chunk)
            .map_err(|e| format!("{} (document {}): {e}", rel(path), i + 1))?;
        v.apply_merge()
            .map_err(|e| format!("{} (document {}): {e}", rel(path), i + 1))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

pub(crate) fn docs(path: &Path) -> Vec<Value> {
    parse_docs(path).unwrap_or_else(|e| panic!("invalid YAML: {e}"))
}

pub(crate) fn report(what: &str, errors: Vec<String>) {
    assert!(
        errors.is_empty(),
        "{what}: {} problem(s):\n  - {}",
        errors.len(),
        errors.join("\n  - ")
    );
}
