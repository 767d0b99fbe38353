//! Text that every store can keep. PostgreSQL refuses U+0000 in `text` and inside `jsonb`
//! strings, and one such value fails a whole multi-row statement; providers (and tenants
//! through them) can put it anywhere. It is replaced at the edges, so it never reaches SQL.

use serde_json::Value;

/// Whether `s` holds anything [`clean_for_pg`] would change.
fn needs_cleaning(s: &str) -> bool {
    s.contains('\0')
}

/// `s` with every U+0000 replaced by U+FFFD.
pub fn clean_for_pg(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// Cleans `s` in place; allocates only when there is something to clean.
pub(crate) fn clean_string(s: &mut String) {
    if needs_cleaning(s) {
        *s = clean_for_pg(s);
    }
}

/// Cleans every string of a JSON value in place: values and object keys, at any depth.
/// Returns whether anything changed.
pub(crate) fn clean_json(v: &mut Value) -> bool {
    // An explicit stack: a deeply nested value cannot overflow the call stack.
    let mut changed = false;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => {
                if needs_cleaning(s) {
                    *s = clean_for_pg(s);
                    changed = true;
                }
            }
            Value::Array(a) => stack.extend(a.iter_mut()),
            Value::Object(o) => {
                if o.keys().any(|k| needs_cleaning(k)) {
                    let old = std::mem::take(o);
                    *o = old
                        .into_iter()
                        .map(|(k, v)| (clean_for_pg(&k), v))
                        .collect();
                    changed = true;
                }
                stack.extend(o.values_mut());
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_becomes_the_replacement_character_everywhere() {
        assert_eq!(clean_for_pg("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        let mut s = String::from("ok");
        clean_string(&mut s);
        assert_eq!(s, "ok");
        let mut v = json!({"a\u{0}": ["x\u{0}", {"deep": "\u{0}"}], "n": 1, "ok": "fine"});
        assert!(clean_json(&mut v));
        assert_eq!(
            v,
            json!({"a\u{FFFD}": ["x\u{FFFD}", {"deep": "\u{FFFD}"}], "n": 1, "ok": "fine"})
        );
        assert!(!serde_json::to_string(&v).unwrap().contains("\\u0000"));
        assert!(!clean_json(&mut v));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let mut v = json!("\u{0}");
        for _ in 0..100_000 {
            v = Value::Array(vec![v]);
        }
        assert!(clean_json(&mut v));
        // Dropping a value this deep recurses in serde_json; unwind it by hand.
        let mut cur = v;
        while let Value::Array(mut a) = cur {
            cur = a.pop().unwrap_or(Value::Null);
        }
        assert_eq!(cur, json!("\u{FFFD}"));
    }
}
