//! Reading a submit file (JSONL, or a JSON array) and validating every item locally with the
//! gateway's own validator, before anything is sent.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use volley_domain::{BatchRejection, Endpoint, Limits, ModelCatalog, ModelCheck, validate_batch};

use crate::Fail;

/// One request of the file.
#[derive(Debug, Clone)]
pub struct Item {
    pub custom_id: Option<String>,
    /// `{"endpoint", "body"}` as sent to the gateway (without `custom_id`, which the contract
    /// does not have: the CLI keeps it locally).
    pub request: Value,
}

pub struct Input {
    pub items: Vec<Item>,
    /// SHA-256 of the file's bytes: names the idempotency keys and ties a state file to it.
    pub sha256: String,
}

/// The models the gateway serves, from `GET /v1/models`.
pub struct Catalog(HashMap<String, Vec<Endpoint>>);

impl Catalog {
    pub fn from_models(models: &Value) -> Catalog {
        let mut map = HashMap::new();
        for m in models["data"].as_array().into_iter().flatten() {
            let Some(id) = m["id"].as_str() else { continue };
            let eps = m["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str()?.parse::<Endpoint>().ok())
                .collect();
            map.insert(id.to_owned(), eps);
        }
        Catalog(map)
    }
}

impl ModelCatalog for Catalog {
    fn check(&self, model: &str, endpoint: Endpoint) -> ModelCheck {
        match self.0.get(model) {
            None => ModelCheck::UnknownModel,
            Some(eps) if eps.contains(&endpoint) => ModelCheck::Served,
            Some(eps) => ModelCheck::WrongEndpoint(eps.clone()),
        }
    }
}

fn valid_custom_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// Parses and validates every item; on any problem, returns every problem (line and field).
pub fn load(bytes: &[u8], catalog: &dyn ModelCatalog, limits: &Limits) -> Result<Input, Fail> {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Fail::usage(format!("the file is not UTF-8: {e}")))?;
    let mut problems: Vec<String> = Vec::new();
    let mut raw: Vec<(usize, Value)> = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with("{\"requests\"") {
        // One JSON document: an array of items, or a batch-shaped object.
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| Fail::usage(format!("the file is not valid JSON: {e}")))?;
        let arr = match doc {
            Value::Array(a) => a,
            Value::Object(mut o) => match o.remove("requests") {
                Some(Value::Array(a)) => a,
                _ => return Err(Fail::usage("`requests` must be an array".into())),
            },
            _ => {
                return Err(Fail::usage(
                    "a JSON file must hold an array of requests".into(),
                ));
            }
        };
        raw.extend(arr.into_iter().enumerate().map(|(i, v)| (i + 1, v)));
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(v) => raw.push((i + 1, v)),
                Err(e) => problems.push(format!("line {}: not valid JSON: {e}", i + 1)),
            }
        }
    }
    let mut items = Vec::with_capacity(raw.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut dup_reported: HashSet<usize> = HashSet::new();
    for (line, v) in raw {
        let custom_id = match v.get("custom_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if valid_custom_id(s) => Some(s.clone()),
            Some(_) => {
                problems.push(format!(
                    "line {line}: custom_id: must be 1-64 characters of A-Z a-z 0-9 _ . : -"
                ));
                None
            }
        };
        if let Some(c) = &custom_id {
            if let Some(first) = seen.get(c) {
                if dup_reported.insert(line) {
                    problems.push(format!(
                        "line {line}: custom_id: \"{c}\" is already used on line {first}"
                    ));
                }
            } else {
                seen.insert(c.clone(), line);
            }
        }
        let request = match &v {
            Value::Object(o) => json!({"endpoint": o.get("endpoint"), "body": o.get("body")}),
            _ => v.clone(),
        };
        // The gateway's validator on a batch of this one item: the same rules, the same words.
        if let Err(r) = validate_batch(&json!({"requests": [&request]}), catalog, limits) {
            match r {
                BatchRejection::Invalid(errors) => {
                    for e in errors {
                        let field = e
                            .field
                            .strip_prefix("requests[0]")
                            .map(|f| f.trim_start_matches('.'))
                            .unwrap_or(&e.field);
                        let field = if field.is_empty() { "item" } else { field };
                        problems.push(format!("line {line}: {field}: {}", e.message));
                    }
                }
                other => problems.push(format!("line {line}: {}", other.message())),
            }
        }
        items.push(Item { custom_id, request });
    }
    if items.is_empty() && problems.is_empty() {
        problems.push("the file holds no requests".into());
    }
    if !problems.is_empty() {
        let n = problems.len();
        let mut m = format!(
            "{n} problem{} found; nothing was submitted:",
            if n == 1 { "" } else { "s" }
        );
        for p in problems {
            m.push_str("\n  ");
            m.push_str(&p);
        }
        return Err(Fail::usage(m));
    }
    Ok(Input { items, sha256 })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_models(&json!({"data": [
            {"id": "qwen3-8b", "endpoints": ["/v1/chat/completions", "/v1/completions"]},
        ]}))
    }

    #[test]
    fn every_bad_line_is_reported_with_its_field() {
        let f = b"{\"custom_id\":\"a\",\"endpoint\":\"/v1/completions\",\"body\":{\"model\":\"qwen3-8b\",\"prompt\":\"hi\"}}\n\
                  not json\n\
                  {\"custom_id\":\"a\",\"endpoint\":\"/v1/completions\",\"body\":{\"model\":\"nope\",\"prompt\":\"hi\"}}\n";
        let Err(e) = load(f, &catalog(), &Limits::default()) else {
            panic!("bad lines pass")
        };
        assert!(
            e.message.contains("line 2: not valid JSON"),
            "{}",
            e.message
        );
        assert!(e.message.contains("line 3: custom_id"), "{}", e.message);
        assert!(e.message.contains("line 3: body.model"), "{}", e.message);
        assert_eq!(e.code, 2);
    }

    #[test]
    fn good_lines_keep_order_and_custom_ids() {
        let f = b"{\"custom_id\":\"x\",\"endpoint\":\"/v1/completions\",\"body\":{\"model\":\"qwen3-8b\",\"prompt\":\"1\"}}\n\n\
                  [1]\n";
        assert!(load(f, &catalog(), &Limits::default()).is_err());
        let f = b"{\"custom_id\":\"x\",\"endpoint\":\"/v1/completions\",\"body\":{\"model\":\"qwen3-8b\",\"prompt\":\"1\"}}\n\n\
                  {\"endpoint\":\"/v1/completions\",\"body\":{\"model\":\"qwen3-8b\",\"prompt\":\"2\"}}\n";
        let input = load(f, &catalog(), &Limits::default()).unwrap();
        assert_eq!(input.items.len(), 2);
        assert_eq!(input.items[0].custom_id.as_deref(), Some("x"));
        assert_eq!(input.items[1].custom_id, None);
        assert!(input.items[0].request.get("custom_id").is_none());
    }
}
