//! Token estimates of a request, for providers with a token rate.

use serde_json::Value;

/// A rough token count for `tokens_per_minute`, known before the call: about four characters
/// per token of the prompt or messages (plus a few tokens of framing per message), plus the
/// completion's ceiling, `max_tokens` (or `max_completion_tokens`), or
/// [`DEFAULT_COMPLETION_ESTIMATE`] when the request sets none. The reservation is corrected
/// with the usage the provider reports.
pub(crate) fn estimate_tokens(body: &Value) -> u64 {
    fn chars(v: &Value) -> usize {
        match v {
            Value::String(s) => s.chars().count(),
            Value::Array(a) => a.iter().map(chars).sum(),
            Value::Object(o) => o.get("text").or_else(|| o.get("content")).map_or(0, chars),
            _ => 0,
        }
    }
    let mut prompt_chars = 0usize;
    let mut framing = 0u64;
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            prompt_chars += m.get("content").map_or(0, chars);
            framing = framing.saturating_add(4);
        }
    }
    if let Some(p) = body.get("prompt") {
        prompt_chars += chars(p);
    }
    let completion = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_COMPLETION_ESTIMATE);
    // Saturating: `max_tokens` is the tenant's number, up to u64::MAX.
    (prompt_chars as u64)
        .div_ceil(4)
        .saturating_add(framing)
        .saturating_add(completion)
}

/// Completion tokens assumed for a request that sets no `max_tokens`.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimates() {
        use serde_json::json;
        // 40 characters = 10 tokens, 4 tokens of framing, max_tokens 16.
        let chat =
            json!({"messages": [{"role": "user", "content": "x".repeat(40)}], "max_tokens": 16});
        assert_eq!(estimate_tokens(&chat), 10 + 4 + 16);
        let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "abcd"}]}],
            "max_completion_tokens": 1});
        assert_eq!(estimate_tokens(&parts), 1 + 4 + 1);
        let completion = json!({"prompt": "abcde"});
        assert_eq!(
            estimate_tokens(&completion),
            2 + DEFAULT_COMPLETION_ESTIMATE
        );
        assert_eq!(
            estimate_tokens(&json!({"prompt": 5, "max_tokens": "many"})),
            DEFAULT_COMPLETION_ESTIMATE
        );
        // A tenant's huge max_tokens saturates instead of overflowing (a debug-build panic).
        let huge = json!({"prompt": "abcd", "max_tokens": u64::MAX});
        assert_eq!(estimate_tokens(&huge), u64::MAX);
    }
}
