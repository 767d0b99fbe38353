//! Whole-batch validation: every item is checked, every problem is reported with its index and
//! field path, and a batch with any problem is rejected whole.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::types::Endpoint;

/// Caps that keep one request from costing more than it should.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_items: usize,
    pub max_label_chars: usize,
    pub max_model_chars: usize,
    /// Prompt, speech input and each message's content.
    pub max_text_chars: usize,
    pub max_messages: usize,
    /// Serialized size of one item's body.
    pub max_body_bytes: usize,
    /// Pairs of a batch's `metadata`, and the length of each key and value.
    pub max_metadata_pairs: usize,
    pub max_metadata_key_chars: usize,
    pub max_metadata_value_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_items: 256,
            max_label_chars: 256,
            max_model_chars: 256,
            max_text_chars: 100_000,
            max_messages: 512,
            max_body_bytes: 256 * 1024,
            max_metadata_pairs: 16,
            max_metadata_key_chars: 64,
            max_metadata_value_chars: 512,
        }
    }
}

/// Answers whether a configured provider serves a model on an endpoint.
pub trait ModelCatalog {
    fn check(&self, model: &str, endpoint: Endpoint) -> ModelCheck;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelCheck {
    Served,
    UnknownModel,
    /// The model exists but not for this endpoint; these are the endpoints it does serve.
    WrongEndpoint(Vec<Endpoint>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The item's index, or `None` for a problem with the request as a whole.
    pub index: Option<usize>,
    /// Where, as a path from the request body: `requests[2].body.messages[0].role`.
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchRejection {
    /// More items than allowed; nothing else is checked.
    TooLarge {
        count: usize,
        max: usize,
    },
    Invalid(Vec<FieldError>),
}

impl BatchRejection {
    /// One human-readable line naming every problem.
    pub fn message(&self) -> String {
        match self {
            BatchRejection::TooLarge { count, max } => {
                format!("a batch holds at most {max} requests; this one has {count}")
            }
            BatchRejection::Invalid(errors) => {
                let parts: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect();
                let noun = if errors.len() == 1 {
                    "problem"
                } else {
                    "problems"
                };
                format!("{} {noun}: {}", errors.len(), parts.join("; "))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidItem {
    /// The client's own name for the item, unique within the batch.
    pub custom_id: Option<String>,
    pub endpoint: Endpoint,
    pub model: String,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidBatch {
    pub label: Option<String>,
    /// The client's string pairs, kept and returned as given (empty when absent).
    pub metadata: Map<String, Value>,
    pub items: Vec<ValidItem>,
    /// Where to send the batch's webhook events, if the client asked for them.
    pub webhook: Option<ValidWebhook>,
    /// `priority`: `low`, `normal` (when absent) or `high`.
    pub priority: crate::Priority,
}

/// Webhook event types a batch can subscribe to.
const WEBHOOK_EVENT_TYPES: [&str; 4] = [
    "batch.completed",
    "batch.cancelled",
    "job.completed",
    "job.failed",
];

/// The types a webhook gets when `events` is left out.
const DEFAULT_WEBHOOK_EVENTS: [&str; 2] = ["batch.completed", "batch.cancelled"];

/// The longest webhook URL accepted.
const MAX_WEBHOOK_URL_CHARS: usize = 2048;

/// A batch's `webhook`, checked for shape here; whether the URL may be reached is the
/// operator's policy, which the gateway applies (`volley_egress::WebhookPolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidWebhook {
    pub url: String,
    /// Distinct, in the order of `WEBHOOK_EVENT_TYPES`.
    pub events: Vec<String>,
}

/// Checks the optional `webhook` field: `{"url": "https://...", "events": [...]}`.
fn check_webhook(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<ValidWebhook> {
    let mut err = |field: &str, message: String| {
        errors.push(FieldError {
            index: None,
            field: field.to_owned(),
            message,
        })
    };
    let obj = match value {
        None | Some(Value::Null) => return None,
        Some(Value::Object(o)) => o,
        Some(_) => {
            err(
                "webhook",
                "must be an object with `url` and optional `events`".into(),
            );
            return None;
        }
    };
    let mut ok = true;
    for k in obj.keys() {
        if k != "url" && k != "events" {
            err(
                "webhook",
                format!(
                    "unknown field {:?}; allowed: url, events",
                    k.chars().take(64).collect::<String>()
                ),
            );
            ok = false;
        }
    }
    let url = match obj.get("url") {
        None | Some(Value::Null) => {
            err("webhook.url", "required".into());
            None
        }
        Some(Value::String(u)) if u.chars().count() > MAX_WEBHOOK_URL_CHARS => {
            err(
                "webhook.url",
                format!("at most {MAX_WEBHOOK_URL_CHARS} characters"),
            );
            None
        }
        Some(Value::String(u))
            if !(u.starts_with("https://") || u.starts_with("http://"))
                || u.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            err(
                "webhook.url",
                "must be an absolute https URL without spaces or control characters".into(),
            );
            None
        }
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => {
            err("webhook.url", "must be a string".into());
            None
        }
    };
    let events = match obj.get("events") {
        None | Some(Value::Null) => Some(
            DEFAULT_WEBHOOK_EVENTS
                .iter()
                .map(|e| (*e).to_owned())
                .collect(),
        ),
        Some(Value::Array(items)) if items.is_empty() => {
            err("webhook.events", "must name at least one event type".into());
            None
        }
        Some(Value::Array(items)) if items.len() > WEBHOOK_EVENT_TYPES.len() * 4 => {
            err("webhook.events", "too many entries".into());
            None
        }
        Some(Value::Array(items)) => {
            let mut wanted = [false; WEBHOOK_EVENT_TYPES.len()];
            let mut good = true;
            for (i, item) in items.iter().enumerate() {
                match item
                    .as_str()
                    .and_then(|t| WEBHOOK_EVENT_TYPES.iter().position(|k| *k == t))
                {
                    Some(p) => wanted[p] = true,
                    None => {
                        err(
                            &format!("webhook.events[{i}]"),
                            format!("must be one of {}", WEBHOOK_EVENT_TYPES.join(", ")),
                        );
                        good = false;
                    }
                }
            }
            good.then(|| {
                WEBHOOK_EVENT_TYPES
                    .iter()
                    .zip(wanted)
                    .filter(|(_, w)| *w)
                    .map(|(t, _)| (*t).to_owned())
                    .collect()
            })
        }
        Some(_) => {
            err("webhook.events", "must be an array of event types".into());
            None
        }
    };
    match (ok, url, events) {
        (true, Some(url), Some(events)) => Some(ValidWebhook { url, events }),
        _ => None,
    }
}

/// Whether `s` is a valid `custom_id`: 1-64 characters of `A-Z a-z 0-9 _ . : -`. The same
/// rule checks submitted items and the `custom_id` a listing is filtered by.
pub fn is_custom_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

pub const CUSTOM_ID_RULE: &str = "must be 1-64 characters of A-Z a-z 0-9 _ . : -";

/// Validates a whole batch request body.
pub fn validate_batch(
    request: &Value,
    catalog: &dyn ModelCatalog,
    limits: &Limits,
) -> Result<ValidBatch, BatchRejection> {
    let whole = |field: &str, message: &str| {
        BatchRejection::Invalid(vec![FieldError {
            index: None,
            field: field.to_owned(),
            message: message.to_owned(),
        }])
    };
    let Some(obj) = request.as_object() else {
        return Err(whole("body", "the request body must be a JSON object"));
    };
    let requests = match obj.get("requests") {
        None | Some(Value::Null) => return Err(whole("requests", "required")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(whole("requests", "must be an array")),
    };
    if requests.is_empty() {
        return Err(whole("requests", "must hold at least one request"));
    }
    if requests.len() > limits.max_items {
        return Err(BatchRejection::TooLarge {
            count: requests.len(),
            max: limits.max_items,
        });
    }

    let mut errors = Vec::new();
    let label = match obj.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.contains('\0') => {
            errors.push(FieldError {
                index: None,
                field: "label".into(),
                message: NUL_MESSAGE.into(),
            });
            None
        }
        Some(Value::String(s)) if s.chars().count() > limits.max_label_chars => {
            errors.push(FieldError {
                index: None,
                field: "label".into(),
                message: format!("at most {} characters", limits.max_label_chars),
            });
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError {
                index: None,
                field: "label".into(),
                message: "must be a string".into(),
            });
            None
        }
    };

    let metadata = metadata(obj.get("metadata"), limits, &mut errors);
    let webhook = check_webhook(obj.get("webhook"), &mut errors);
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => crate::Priority::default(),
        Some(Value::String(s)) => s.parse().unwrap_or_else(|_| {
            errors.push(FieldError {
                index: None,
                field: "priority".into(),
                message: "must be one of low, normal, high".into(),
            });
            crate::Priority::default()
        }),
        Some(_) => {
            errors.push(FieldError {
                index: None,
                field: "priority".into(),
                message: "must be a string: low, normal or high".into(),
            });
            crate::Priority::default()
        }
    };

    let mut items = Vec::with_capacity(requests.len());
    // Where each custom_id was first seen, to name both items of a duplicate.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, item) in requests.iter().enumerate() {
        let mut c = Checker {
            index: i,
            errors: &mut errors,
            limits,
        };
        let custom_id = c.custom_id(item);
        if let Some(id) = custom_id {
            if let Some(first) = seen.get(id) {
                c.err(
                    "custom_id",
                    format!("{id:?} is already used by requests[{first}]"),
                );
            } else {
                seen.insert(id, i);
            }
        }
        if let Some(mut v) = c.item(item, catalog) {
            v.custom_id = custom_id.map(str::to_owned);
            items.push(v);
        }
    }
    if errors.is_empty() {
        Ok(ValidBatch {
            label,
            metadata,
            items,
            webhook,
            priority,
        })
    } else {
        Err(BatchRejection::Invalid(errors))
    }
}

const NUL_MESSAGE: &str = "must not contain the NUL character (U+0000)";

/// A batch's `metadata`: an object of at most `max_metadata_pairs` string values, keys of
/// 1-`max_metadata_key_chars` characters, values of at most `max_metadata_value_chars`, no
/// U+0000 anywhere (stored as `jsonb`). Problems are pushed to `errors`.
fn metadata(
    v: Option<&Value>,
    limits: &Limits,
    errors: &mut Vec<FieldError>,
) -> Map<String, Value> {
    let mut err = |field: String, message: String| {
        errors.push(FieldError {
            index: None,
            field,
            message,
        })
    };
    let map = match v {
        None | Some(Value::Null) => return Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            err(
                "metadata".into(),
                "must be an object of string values".into(),
            );
            return Map::new();
        }
    };
    if map.len() > limits.max_metadata_pairs {
        err(
            "metadata".into(),
            format!(
                "at most {} pairs; this one has {}",
                limits.max_metadata_pairs,
                map.len()
            ),
        );
        return Map::new();
    }
    let mut bad = 0usize;
    for (k, v) in map {
        let n = k.chars().count();
        // A key that is itself the problem is not echoed in the field path.
        if k.contains('\0') {
            err("metadata".into(), format!("a key {NUL_MESSAGE}"));
            bad += 1;
            continue;
        }
        if n == 0 || n > limits.max_metadata_key_chars {
            err(
                "metadata".into(),
                format!(
                    "keys must be 1-{} characters; {:?} has {n}",
                    limits.max_metadata_key_chars,
                    truncate(k, 32)
                ),
            );
            bad += 1;
            continue;
        }
        let field = format!("metadata.{k}");
        match v {
            Value::String(s) if s.contains('\0') => err(field, NUL_MESSAGE.into()),
            Value::String(s) if s.chars().count() > limits.max_metadata_value_chars => err(
                field,
                format!("at most {} characters", limits.max_metadata_value_chars),
            ),
            Value::String(_) => continue,
            _ => err(field, "must be a string".into()),
        }
        bad += 1;
    }
    if bad > 0 {
        return Map::new();
    }
    map.clone()
}

/// The path of the first string or key holding U+0000 under `body`, which is stored as
/// `jsonb`: PostgreSQL cannot store that character, and a batch holding one must be a clear
/// 400, not a failed insert. Iterative, so any depth is fine.
fn nul_path(body: &Map<String, Value>, root: &str) -> Option<String> {
    let mut stack: Vec<(String, &Value)> = Vec::new();
    for (k, v) in body {
        if k.contains('\0') {
            return Some(root.to_owned());
        }
        stack.push((format!("{root}.{k}"), v));
    }
    while let Some((path, v)) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return Some(path),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    stack.push((format!("{path}[{i}]"), item));
                }
            }
            Value::Object(m) => {
                for (k, item) in m {
                    if k.contains('\0') {
                        return Some(path);
                    }
                    stack.push((format!("{path}.{k}"), item));
                }
            }
            _ => {}
        }
    }
    None
}

struct Checker<'a> {
    index: usize,
    errors: &'a mut Vec<FieldError>,
    limits: &'a Limits,
}

impl Checker<'_> {
    fn err(&mut self, field: &str, message: impl Into<String>) {
        let field = if field.is_empty() {
            format!("requests[{}]", self.index)
        } else {
            format!("requests[{}].{field}", self.index)
        };
        self.errors.push(FieldError {
            index: Some(self.index),
            field,
            message: message.into(),
        });
    }

    /// The item's `custom_id`, if it has a valid one (an invalid one is an error).
    fn custom_id<'v>(&mut self, item: &'v Value) -> Option<&'v str> {
        match item.as_object()?.get("custom_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if is_custom_id(s) => Some(s.as_str()),
            Some(_) => {
                self.err("custom_id", CUSTOM_ID_RULE);
                None
            }
        }
    }

    fn item(&mut self, item: &Value, catalog: &dyn ModelCatalog) -> Option<ValidItem> {
        let Some(obj) = item.as_object() else {
            self.err("", "must be an object with `endpoint` and `body`");
            return None;
        };
        let endpoint = match obj.get("endpoint") {
            None | Some(Value::Null) => {
                self.err("endpoint", "required");
                None
            }
            Some(Value::String(path)) => match path.parse::<Endpoint>() {
                Ok(e) => Some(e),
                Err(_) if Endpoint::is_file_upload(path) => {
                    self.err(
                        "endpoint",
                        format!("{path} takes a file upload and cannot be submitted in a batch"),
                    );
                    None
                }
                Err(_) => {
                    let supported: Vec<&str> = Endpoint::ALL.iter().map(|e| e.path()).collect();
                    self.err(
                        "endpoint",
                        format!(
                            "unsupported endpoint {:?}; supported: {}",
                            truncate(path, 100),
                            supported.join(", ")
                        ),
                    );
                    None
                }
            },
            Some(_) => {
                self.err("endpoint", "must be a string");
                None
            }
        };
        let body = match obj.get("body") {
            None | Some(Value::Null) => {
                self.err("body", "required");
                return None;
            }
            Some(Value::Object(b)) => b,
            Some(_) => {
                self.err("body", "must be an object");
                return None;
            }
        };
        if let Some(at) = nul_path(body, "body") {
            self.err(&at, NUL_MESSAGE);
            return None;
        }
        let endpoint = endpoint?;
        let before = self.errors.len();
        let model = self.body(endpoint, body, catalog);
        let size = serde_json::to_vec(body)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > self.limits.max_body_bytes {
            self.err(
                "body",
                format!("at most {} bytes of JSON", self.limits.max_body_bytes),
            );
        }
        if self.errors.len() > before {
            return None;
        }
        let mut body = body.clone();
        // JSON has one number type: `2.0` is the integer 2 (as JSON Schema says too), and the
        // provider gets it as one.
        for key in INTEGER_FIELDS {
            if let Some(v) = body.get_mut(key)
                && v.is_f64()
                && let Some(n) = integral(v)
            {
                *v = Value::from(n);
            }
        }
        Some(ValidItem {
            custom_id: None,
            endpoint,
            model: model?,
            body: Value::Object(body),
        })
    }

    fn body(
        &mut self,
        endpoint: Endpoint,
        body: &Map<String, Value>,
        catalog: &dyn ModelCatalog,
    ) -> Option<String> {
        let model = self.string(body, "model", self.limits.max_model_chars, true);
        if let Some(m) = &model {
            match catalog.check(m, endpoint) {
                ModelCheck::Served => {}
                ModelCheck::UnknownModel => self.err(
                    "body.model",
                    format!(
                        "model {:?} is not served by any configured provider",
                        truncate(m, 100)
                    ),
                ),
                ModelCheck::WrongEndpoint(ok) => {
                    let ok: Vec<&str> = ok.iter().map(|e| e.path()).collect();
                    self.err(
                        "body.model",
                        format!(
                            "model {m:?} does not serve {endpoint}; it serves {}",
                            ok.join(", ")
                        ),
                    )
                }
            }
        }
        match body.get("stream") {
            Some(Value::Bool(true)) => {
                self.err("body.stream", "streaming is not available for batch jobs")
            }
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            // Passed on, anything else would fail the job at the provider instead of here.
            Some(_) => self.err("body.stream", "must be a boolean"),
        }
        let max_text = self.limits.max_text_chars;
        match endpoint {
            Endpoint::ChatCompletions => self.messages(body),
            Endpoint::Completions | Endpoint::VideosGenerations | Endpoint::MusicGenerations => {
                self.string(body, "prompt", max_text, true);
            }
            Endpoint::ImagesGenerations => {
                self.string(body, "prompt", max_text, true);
                self.integer(body, "n", 1, 10);
                if let Some(f) = self.string(body, "response_format", 16, false)
                    && f != "url"
                    && f != "b64_json"
                {
                    self.err("body.response_format", "must be \"url\" or \"b64_json\"");
                }
            }
            Endpoint::AudioSpeech => {
                self.string(body, "input", max_text.min(4096), true);
                self.string(body, "voice", 64, false);
                if let Some(v) = body.get("speed")
                    && !v.as_f64().is_some_and(|s| (0.25..=4.0).contains(&s))
                {
                    self.err("body.speed", "must be a number from 0.25 to 4.0");
                }
            }
        }
        model
    }

    fn messages(&mut self, body: &Map<String, Value>) {
        let msgs = match body.get("messages") {
            None | Some(Value::Null) => return self.err("body.messages", "required"),
            Some(Value::Array(m)) if m.is_empty() => {
                return self.err("body.messages", "must hold at least one message");
            }
            Some(Value::Array(m)) if m.len() > self.limits.max_messages => {
                return self.err(
                    "body.messages",
                    format!("at most {} messages", self.limits.max_messages),
                );
            }
            Some(Value::Array(m)) => m,
            Some(_) => return self.err("body.messages", "must be an array"),
        };
        const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
        for (j, m) in msgs.iter().enumerate() {
            let at = format!("body.messages[{j}]");
            let Some(m) = m.as_object() else {
                self.err(&at, "must be an object with `role` and `content`");
                continue;
            };
            match m.get("role") {
                Some(Value::String(r)) if ROLES.contains(&r.as_str()) => {}
                Some(Value::String(_)) => {
                    self.err(&format!("{at}.role"), format!("must be one of {ROLES:?}"))
                }
                None | Some(Value::Null) => self.err(&format!("{at}.role"), "required"),
                Some(_) => self.err(&format!("{at}.role"), "must be a string"),
            }
            match m.get("content") {
                Some(Value::String(s)) if s.chars().count() > self.limits.max_text_chars => self
                    .err(
                        &format!("{at}.content"),
                        format!("at most {} characters", self.limits.max_text_chars),
                    ),
                // Content parts (text, image_url, ...) are passed to the provider as given.
                Some(Value::String(_)) | Some(Value::Array(_)) => {}
                None | Some(Value::Null) => self.err(&format!("{at}.content"), "required"),
                Some(_) => self.err(
                    &format!("{at}.content"),
                    "must be a string or an array of content parts",
                ),
            }
        }
    }

    fn string(
        &mut self,
        body: &Map<String, Value>,
        key: &str,
        max_chars: usize,
        required: bool,
    ) -> Option<String> {
        let field = format!("body.{key}");
        match body.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.err(&field, "required");
                }
                None
            }
            Some(Value::String(s)) if required && s.trim().is_empty() => {
                self.err(&field, "must not be empty");
                None
            }
            Some(Value::String(s)) if s.chars().count() > max_chars => {
                self.err(&field, format!("at most {max_chars} characters"));
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(&field, "must be a string");
                None
            }
        }
    }

    fn integer(&mut self, body: &Map<String, Value>, key: &str, min: i64, max: i64) {
        if let Some(v) = body.get(key)
            && !v.is_null()
            && !integral(v).is_some_and(|n| (min..=max).contains(&n))
        {
            self.err(
                &format!("body.{key}"),
                format!("must be an integer from {min} to {max}"),
            );
        }
    }
}

/// Body fields checked as integers (`Checker::integer`).
const INTEGER_FIELDS: [&str; 1] = ["n"];

/// An integer, or a number without a fractional part that fits one.
fn integral(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Catalog;
    impl ModelCatalog for Catalog {
        fn check(&self, model: &str, endpoint: Endpoint) -> ModelCheck {
            let serves: &[Endpoint] = match model {
                "qwen3-8b" => &[Endpoint::ChatCompletions, Endpoint::Completions],
                "flux-dev" => &[Endpoint::ImagesGenerations],
                "clip-video" => &[Endpoint::VideosGenerations],
                "tune" => &[Endpoint::MusicGenerations],
                "say" => &[Endpoint::AudioSpeech],
                _ => return ModelCheck::UnknownModel,
            };
            if serves.contains(&endpoint) {
                ModelCheck::Served
            } else {
                ModelCheck::WrongEndpoint(serves.to_vec())
            }
        }
    }

    fn check(v: Value) -> Result<ValidBatch, BatchRejection> {
        validate_batch(&v, &Catalog, &Limits::default())
    }

    fn fields(r: Result<ValidBatch, BatchRejection>) -> Vec<String> {
        match r {
            Err(BatchRejection::Invalid(e)) => e.into_iter().map(|e| e.field).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    fn all_kinds() -> Value {
        json!({"label": "mix", "requests": [
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}]}},
            {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "once"}},
            {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "a lamp", "n": 2, "response_format": "b64_json"}},
            {"endpoint": "/v1/videos/generations", "body": {"model": "clip-video", "prompt": "waves"}},
            {"endpoint": "/v1/music/generations", "body": {"model": "tune", "prompt": "jazz"}},
            {"endpoint": "/v1/audio/speech", "body": {"model": "say", "input": "hello", "voice": "alloy", "speed": 1.5}},
        ]})
    }

    fn with_webhook(w: Value) -> Value {
        let mut v = all_kinds();
        v["webhook"] = w;
        v
    }

    #[test]
    fn webhook_is_checked_with_the_batch() {
        let ok = check(with_webhook(json!({"url": "https://h.example/x"}))).unwrap();
        let w = ok.webhook.unwrap();
        assert_eq!(w.url, "https://h.example/x");
        assert_eq!(w.events, ["batch.completed", "batch.cancelled"]);
        let ok = check(with_webhook(json!({"url": "https://h.example/x",
            "events": ["job.failed", "batch.completed", "job.failed"]})))
        .unwrap();
        assert_eq!(
            ok.webhook.unwrap().events,
            ["batch.completed", "job.failed"]
        );
        assert_eq!(check(all_kinds()).unwrap().webhook, None);
        for (w, want) in [
            (json!("https://h.example/x"), vec!["webhook"]),
            (json!({}), vec!["webhook.url"]),
            (json!({"url": 7}), vec!["webhook.url"]),
            (json!({"url": "h.example/x"}), vec!["webhook.url"]),
            (json!({"url": "javascript:alert(1)"}), vec!["webhook.url"]),
            (json!({"url": "https://h.example/a b"}), vec!["webhook.url"]),
            (
                json!({"url": "https://h.example/\u{0000}"}),
                vec!["webhook.url"],
            ),
            (
                json!({"url": format!("https://h.example/{}", "a".repeat(3000))}),
                vec!["webhook.url"],
            ),
            (
                json!({"url": "https://h.example/", "events": []}),
                vec!["webhook.events"],
            ),
            (
                json!({"url": "https://h.example/", "events": "job.failed"}),
                vec!["webhook.events"],
            ),
            (
                json!({"url": "https://h.example/", "events": ["job.done", 3]}),
                vec!["webhook.events[0]", "webhook.events[1]"],
            ),
            (
                json!({"url": "https://h.example/", "events": vec!["job.failed"; 100]}),
                vec!["webhook.events"],
            ),
            (
                json!({"url": "https://h.example/", "secret": "x"}),
                vec!["webhook"],
            ),
        ] {
            assert_eq!(fields(check(with_webhook(w.clone()))), want, "{w}");
        }
        // A bad webhook is reported with every bad item, not instead of them.
        let mut v = with_webhook(json!({"url": 1}));
        v["requests"][0]["endpoint"] = json!("/v1/nope");
        assert_eq!(fields(check(v)), ["webhook.url", "requests[0].endpoint"]);
    }

    #[test]
    fn nul_anywhere_is_a_field_error() {
        let f = fields(check(json!({"label": "a\u{0}b", "requests": [
            {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x\u{0}"}},
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi", "extra": {"k\u{0}": 1}}]}},
            {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "fine"}},
        ]})));
        assert_eq!(
            f,
            [
                "label",
                "requests[0].body.prompt",
                "requests[1].body.messages[0].extra"
            ]
        );
    }

    #[test]
    fn accepts_every_endpoint() {
        let b = check(all_kinds()).unwrap();
        assert_eq!(b.label.as_deref(), Some("mix"));
        assert_eq!(b.items.len(), 6);
        assert_eq!(b.items[2].endpoint, Endpoint::ImagesGenerations);
        assert_eq!(b.items[2].model, "flux-dev");
    }

    #[test]
    fn rejects_the_request_shape() {
        assert_eq!(fields(check(json!([1]))), ["body"]);
        assert_eq!(fields(check(json!({}))), ["requests"]);
        assert_eq!(fields(check(json!({"requests": []}))), ["requests"]);
        assert_eq!(fields(check(json!({"requests": "x"}))), ["requests"]);
    }

    #[test]
    fn too_many_items_is_too_large() {
        let item =
            json!({"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x"}});
        let ok = json!({"requests": vec![item.clone(); 256]});
        assert_eq!(check(ok).unwrap().items.len(), 256);
        let big = json!({"requests": vec![item; 257]});
        assert_eq!(
            check(big),
            Err(BatchRejection::TooLarge {
                count: 257,
                max: 256
            })
        );
    }

    #[test]
    fn names_every_bad_item_by_index_and_path() {
        let r = check(json!({"requests": [
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [{"role": "robot", "content": 5}]}},
            {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "fine"}},
            "not an object",
            {"endpoint": "/v1/images/edits", "body": {}},
            {"endpoint": "/v1/embeddings", "body": {}},
            {"endpoint": "/v1/images/generations", "body": "x"},
            {"endpoint": "/v1/images/generations"},
            {"endpoint": "/v1/audio/speech", "body": {"model": "say"}},
            {"endpoint": "/v1/completions", "body": {"model": "nope", "prompt": "x"}},
            {"endpoint": "/v1/completions", "body": {"model": "flux-dev", "prompt": "x"}},
            {"endpoint": 7, "body": {}},
            {"endpoint": "/v1/images/generations", "body": {"model": "flux-dev", "prompt": "", "n": 99}},
            {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b", "messages": [], "stream": true}},
        ]}));
        assert_eq!(
            fields(r),
            [
                "requests[0].body.messages[0].role",
                "requests[0].body.messages[0].content",
                "requests[2]",
                "requests[3].endpoint",
                "requests[4].endpoint",
                "requests[5].body",
                "requests[6].body",
                "requests[7].body.input",
                "requests[8].body.model",
                "requests[9].body.model",
                "requests[10].endpoint",
                "requests[11].body.prompt",
                "requests[11].body.n",
                "requests[12].body.stream",
                "requests[12].body.messages",
            ]
        );
    }

    #[test]
    fn messages_say_why() {
        let r = check(json!({"requests": [
            {"endpoint": "/v1/images/edits", "body": {}},
            {"endpoint": "/v1/completions", "body": {"model": "flux-dev", "prompt": "x"}},
        ]}))
        .unwrap_err();
        let m = r.message();
        assert!(m.starts_with("2 problems:"), "{m}");
        assert!(m.contains("file upload"), "{m}");
        assert!(m.contains("does not serve /v1/completions"), "{m}");
    }

    #[test]
    fn caps_sizes() {
        let long = "x".repeat(100_001);
        let r = check(json!({"label": "l".repeat(300), "requests": [
            {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": long}},
            {"endpoint": "/v1/completions", "body": {"model": "m".repeat(300), "prompt": "x"}},
            {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x", "pad": "p".repeat(300_000)}},
        ]}));
        assert_eq!(
            fields(r),
            [
                "label",
                "requests[0].body.prompt",
                "requests[1].body.model",
                "requests[2].body"
            ]
        );
    }

    #[test]
    fn types_of_optional_fields() {
        let item = |body: Value| json!({"requests": [{"endpoint": "/v1/images/generations", "body": body}]});
        let r = check(item(
            json!({"model": "flux-dev", "prompt": "x", "stream": {}}),
        ));
        assert_eq!(fields(r), ["requests[0].body.stream"]);
        let r = check(item(json!({"model": "flux-dev", "prompt": "x", "n": 2.5})));
        assert_eq!(fields(r), ["requests[0].body.n"]);
        // 2.0 is the integer 2, and is passed on as 2.
        let ok = check(item(
            json!({"model": "flux-dev", "prompt": "x", "n": 2.0, "stream": false}),
        ))
        .unwrap();
        assert_eq!(ok.items[0].body["n"], json!(2));
        assert!(ok.items[0].body["n"].is_i64());
    }

    #[test]
    fn hostile_values_are_errors_not_panics() {
        for v in [
            json!(null),
            json!("requests"),
            json!({"requests": [null, [], {}, {"endpoint": null, "body": null}]}),
            json!({"requests": [{"endpoint": "/v1/audio/speech", "body": {"model": "say", "input": "x", "speed": "fast"}}]}),
            json!({"requests": [{"endpoint": "\u{0000}../../etc", "body": {"model": "\u{202e}", "prompt": "x"}}]}),
        ] {
            assert!(check(v).is_err());
        }
    }

    fn one(custom_id: Value) -> Value {
        json!({"custom_id": custom_id, "endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x"}})
    }

    #[test]
    fn custom_ids_are_kept_checked_and_unique() {
        let b = check(json!({"requests": [one(json!("a-1:x.y_z")), one(json!(null)), {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x"}}]}))
            .unwrap();
        let ids: Vec<Option<&str>> = b.items.iter().map(|i| i.custom_id.as_deref()).collect();
        assert_eq!(ids, [Some("a-1:x.y_z"), None, None]);

        let r = check(json!({"requests": [
            one(json!("dup")), one(json!("ok")), one(json!("dup")),
            one(json!("")), one(json!("x".repeat(65))), one(json!("sp ace")), one(json!("nul\u{0}")),
            one(json!(7)), one(json!({"a": 1})), one(json!("é")), one(json!("dup")),
        ]}))
        .unwrap_err();
        let BatchRejection::Invalid(errors) = &r else {
            panic!("{r:?}")
        };
        let f: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            f,
            [
                "requests[2].custom_id",
                "requests[3].custom_id",
                "requests[4].custom_id",
                "requests[5].custom_id",
                "requests[6].custom_id",
                "requests[7].custom_id",
                "requests[8].custom_id",
                "requests[9].custom_id",
                "requests[10].custom_id",
            ]
        );
        assert_eq!(errors[0].index, Some(2));
        let m = r.message();
        assert!(
            m.contains("requests[2].custom_id: \"dup\" is already used by requests[0]"),
            "{m}"
        );
        assert!(
            m.contains("requests[10].custom_id: \"dup\" is already used by requests[0]"),
            "{m}"
        );
        // 64 characters is the most.
        assert!(check(json!({"requests": [one(json!("x".repeat(64)))]})).is_ok());
        assert!(is_custom_id("A-z_0.9:"));
        assert!(!is_custom_id("a/b"));
    }

    #[test]
    fn metadata_is_string_pairs_within_limits() {
        let b =
            check(json!({"metadata": {"team": "ads", "k": ""}, "requests": [one(json!(null))]}))
                .unwrap();
        assert_eq!(b.metadata.len(), 2);
        assert_eq!(b.metadata["team"], "ads");
        assert!(
            check(json!({"requests": [one(json!(null))]}))
                .unwrap()
                .metadata
                .is_empty()
        );
        assert!(
            check(json!({"metadata": null, "requests": [one(json!(null))]}))
                .unwrap()
                .metadata
                .is_empty()
        );

        let pairs = |n: usize| -> Value {
            Value::Object((0..n).map(|i| (format!("k{i}"), json!("v"))).collect())
        };
        assert!(check(json!({"metadata": pairs(16), "requests": [one(json!(null))]})).is_ok());
        let bad = |m: Value| {
            fields(check(
                json!({"metadata": m, "requests": [one(json!(null))]}),
            ))
        };
        assert_eq!(bad(pairs(17)), ["metadata"]);
        assert_eq!(bad(json!([["a", "b"]])), ["metadata"]);
        assert_eq!(bad(json!("a=b")), ["metadata"]);
        assert_eq!(bad(json!({"a": {"nested": "x"}})), ["metadata.a"]);
        assert_eq!(
            bad(json!({"a": 1, "b": true, "c": null, "d": ["x"]})),
            ["metadata.a", "metadata.b", "metadata.c", "metadata.d"]
        );
        assert_eq!(bad(json!({"a": "x\u{0}"})), ["metadata.a"]);
        assert_eq!(bad(json!({"k\u{0}": "x"})), ["metadata"]);
        assert_eq!(bad(json!({"": "x"})), ["metadata"]);
        assert_eq!(bad(json!({"k".repeat(65): "x"})), ["metadata"]);
        assert_eq!(bad(json!({"a": "v".repeat(513)})), ["metadata.a"]);
        assert!(check(json!({"metadata": {"k".repeat(64): "v".repeat(512)}, "requests": [one(json!(null))]})).is_ok());
        // Characters, not bytes.
        assert!(check(json!({"metadata": {"é".repeat(64): "é".repeat(512)}, "requests": [one(json!(null))]})).is_ok());
        // Metadata problems are reported with the items' problems, all at once.
        let f = fields(check(
            json!({"metadata": 5, "requests": [one(json!("a b"))]}),
        ));
        assert_eq!(f, ["metadata", "requests[0].custom_id"]);
        // A huge key is not echoed back whole.
        let r =
            check(json!({"metadata": {"k".repeat(10_000): "x"}, "requests": [one(json!(null))]}))
                .unwrap_err();
        assert!(r.message().len() < 300, "{}", r.message());
    }

    #[test]
    fn priority_is_optional_and_closed() {
        let one = |p: Value| {
            json!({"priority": p, "requests": [
                {"endpoint": "/v1/completions", "body": {"model": "qwen3-8b", "prompt": "x"}}
            ]})
        };
        assert_eq!(
            check(all_kinds()).unwrap().priority,
            crate::Priority::Normal
        );
        assert_eq!(
            check(one(Value::Null)).unwrap().priority,
            crate::Priority::Normal
        );
        for p in crate::Priority::ALL {
            assert_eq!(check(one(json!(p.as_str()))).unwrap().priority, p);
        }
        for bad in [
            json!("HIGH"),
            json!("urgent"),
            json!(""),
            json!("high\u{0}"),
            json!("x".repeat(100_000)),
            json!(1),
            json!(true),
            json!(["high"]),
            json!({"level": "high"}),
        ] {
            assert_eq!(fields(check(one(bad.clone()))), ["priority"], "{bad}");
        }
        // Reported with the items' errors, not instead of them.
        let f = fields(check(
            json!({"priority": 3, "requests": [{"endpoint": "/v1/nope", "body": {}}]}),
        ));
        assert!(f.contains(&"priority".to_owned()) && f.len() >= 2, "{f:?}");
    }
}
