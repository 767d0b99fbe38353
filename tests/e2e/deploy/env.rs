//! Environment names.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

/// `VOLLEY_...` tokens of a text (`<NAME>` placeholders kept); prefix mentions such as
/// `VOLLEY_*` are skipped.
pub(crate) fn volley_tokens(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("VOLLEY_") {
        let start = i + pos;
        let preceded = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start + "VOLLEY_".len();
        while end < b.len()
            && (b[end].is_ascii_uppercase()
                || b[end].is_ascii_digit()
                || b[end] == b'_'
                || b[end] == b'<'
                || b[end] == b'>')
        {
            end += 1;
        }
        let tok = &text[start..end];
        if !preceded && !tok.ends_with('_') {
            out.insert(tok.to_owned());
        }
        i = end;
    }
    out
}

/// Does `token` match an ENV_KEYS entry, where `<NAME>` is a wildcard?
pub(crate) fn key_matches(pattern: &str, token: &str) -> bool {
    let (Some(lt), Some(gt)) = (pattern.find('<'), pattern.find('>')) else {
        return pattern == token;
    };
    let (prefix, suffix) = (&pattern[..lt], &pattern[gt + 1..]);
    if token.len() <= prefix.len() + suffix.len()
        || !token.starts_with(prefix)
        || !token.ends_with(suffix)
    {
        return false;
    }
    let middle = &token[prefix.len()..token.len() - suffix.len()];
    (middle.starts_with('<') && middle.ends_with('>'))
        || middle
            .bytes()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

/// The simulator's own variables: SIM_KEYS plus every `VOLLEY_SIM_*` its source names.
pub(crate) fn sim_keys() -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = SIM_KEYS.iter().map(|s| s.to_string()).collect();
    let mut files = Vec::new();
    files_under(&root().join("crates").join(SIM).join("src"), &mut files);
    for f in files {
        keys.extend(
            volley_tokens(&read(&f))
                .into_iter()
                .filter(|t| t.starts_with("VOLLEY_SIM_")),
        );
    }
    keys
}

pub(crate) fn known_env(token: &str, sim: &BTreeSet<String>) -> bool {
    sim.contains(token) || ENV_KEYS.iter().any(|(k, _)| key_matches(k, token))
}
