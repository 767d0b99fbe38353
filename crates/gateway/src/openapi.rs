//! `GET /openapi.json`: the OpenAPI 3.1 document of the gateway, generated from the code.
//!
//! utoipa derives it from the typed bodies (`views`, `error`, `admin`, and the request shapes
//! below) and from each handler's `#[utoipa::path]`; [`document`] then completes it from what
//! the code decides elsewhere: which error `type`s each status carries (`ApiError`), the
//! per-key limiter's 429 on every route, and the models this deployment serves (from the
//! settings, so that a body the document calls valid is one the gateway accepts). It is built
//! once, when the gateway starts, and served as bytes without authentication.
//!
//! Handlers declare their error statuses with `body = ErrorBody`; [`document`] narrows each to
//! a schema whose `type` lists the error types that status really carries.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};
use utoipa::{OpenApi, ToSchema};
use volley_config::Settings;
use volley_domain::{BatchStatus, Endpoint, JobStatus};

use crate::error::{ApiError, ErrorBody};
use crate::{admin, browse, console, events, results, routes, webhooks};

/// The document, serialised once at start-up, and the methods of each of its paths.
pub(crate) struct Document {
    json: web::Bytes,
    /// `Allow` header values by path template (`/v1/batches/{id}`).
    allow: BTreeMap<String, String>,
}

impl Document {
    /// The methods a registered route pattern (`/v1/media/{key:.*}`) answers, for a 405's
    /// `Allow` header.
    pub fn allowed(&self, pattern: &str) -> Option<&str> {
        self.allow.get(&template(pattern)).map(String::as_str)
    }
}

/// An actix route pattern as an OpenAPI path template: `{key:.*}` becomes `{key}`.
pub fn template(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let (mut in_name, mut in_regex) = (false, false);
    for c in pattern.chars() {
        match c {
            '{' => in_name = true,
            ':' if in_name => in_regex = true,
            '}' => (in_name, in_regex) = (false, false),
            _ => {}
        }
        if !in_regex {
            out.push(c);
        }
    }
    out
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Volley",
        description = "Batch inference: submit up to 256 inference requests in one call, \
            follow their progress, fetch each job's result. Errors are \
            `{\"error\": {\"type\": ..., \"message\": ...}}`."
    ),
    paths(
        routes::healthz,
        routes::readyz,
        routes::create_batch,
        browse::list_batches,
        routes::get_batch,
        routes::cancel_batch,
        browse::list_jobs,
        results::batch_results,
        events::batch_events,
        routes::get_job,
        routes::cancel_job,
        webhooks::list_deliveries,
        webhooks::retry_delivery,
        routes::list_models,
        routes::get_media,
        admin::status,
        openapi_json,
        metrics,
        console::to_console,
        console_redirect,
        console::index,
        console::asset,
    ),
    components(schemas(ErrorBody, BatchRequest, results::ResultLine)),
    tags(
        (name = "batches", description = "Submit, follow and cancel batches."),
        (name = "jobs", description = "Each item of a batch is a job."),
        (name = "media", description = "Media results, behind signed links."),
        (name = "webhooks", description = "Signed deliveries of a batch's events, and redelivery."),
        (name = "operations", description = "Health, readiness, metrics, operator status."),
        (name = "console", description = "The web console's static files."),
    )
)]
struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = Object)),
)]
pub(crate) async fn openapi_json(doc: web::Data<Document>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(doc.json.clone())
}

/// `/metrics` is registered by `volley_telemetry::http::metrics_resource`; documented here.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics (on an internal port instead \
        when `VOLLEY_GATEWAY_METRICS_ADDR` is set)", body = String,
        content_type = "text/plain; version=0.0.4; charset=utf-8")),
)]
#[allow(dead_code)]
fn metrics() {}

/// `/console` redirects like `/` (the same handler, `console::to_console`).
#[utoipa::path(
    get, path = "/console", tag = "console",
    responses((status = 302, description = "Redirect to `/console/`",
        headers(("Location" = String, description = "`/console/`")))),
)]
#[allow(dead_code)]
fn console_redirect() {}

/// The body of `POST /v1/batches`. The gateway validates the body as JSON
/// (`volley_domain::validate_batch`, naming every bad item); this type documents it.
#[derive(ToSchema)]
#[schema(example = json!({
    "label": "Q2 product shots",
    "requests": [
        {"endpoint": "/v1/images/generations",
            "body": {"model": "flux-dev", "prompt": "a minimalist desk lamp"}},
        {"endpoint": "/v1/chat/completions", "body": {"model": "qwen3-8b",
            "messages": [{"role": "user", "content": "Write a product description for a lamp."}]}},
    ],
}))]
#[allow(dead_code)]
pub(crate) struct BatchRequest {
    /// A human-readable name for the batch.
    #[schema(max_length = 256, pattern = r"^[^\u0000]*$")]
    label: Option<String>,
    /// Up to 16 string pairs kept with the batch and returned with it.
    metadata: Option<BTreeMap<String, String>>,
    /// 1 to 256 requests; more is 400 `too_large`.
    #[schema(min_items = 1, max_items = 256)]
    requests: Vec<BatchItem>,
    /// The order within the key's own work; `normal` when absent.
    priority: Option<PriorityName>,
    /// Where to send the batch's events (Standard Webhooks, signed with the key's secret).
    webhook: Option<WebhookRequest>,
}

/// A batch's priority.
#[derive(ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum PriorityName {
    Low,
    Normal,
    High,
}

/// A batch's webhook.
#[derive(ToSchema)]
#[allow(dead_code)]
struct WebhookRequest {
    /// An absolute `https` URL (plain `http` only to hosts the operator allows); a URL the
    /// operator's policy refuses is 400 on `webhook.url`.
    #[schema(max_length = 2048)]
    url: String,
    /// The events to send; both batch events when absent.
    #[schema(min_items = 1, max_items = 16)]
    events: Option<Vec<WebhookEventType>>,
}

/// A webhook event type.
#[derive(ToSchema)]
#[allow(dead_code)]
enum WebhookEventType {
    #[serde(rename = "batch.completed")]
    BatchCompleted,
    #[serde(rename = "batch.cancelled")]
    BatchCancelled,
    #[serde(rename = "job.completed")]
    JobCompleted,
    #[serde(rename = "job.failed")]
    JobFailed,
}

/// One request of a batch: an endpoint and the body a direct call to it would take.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum BatchItem {
    ChatCompletions(ChatCompletionsItem),
    Completions(CompletionsItem),
    ImagesGenerations(ImagesItem),
    VideosGenerations(VideosItem),
    MusicGenerations(MusicItem),
    AudioSpeech(SpeechItem),
}

/// Declares an item type per endpoint: `{"endpoint": <its path>, "body": <its body>}`.
macro_rules! items {
    ($($item:ident, $endpoint:ident, $body:ty;)*) => {$(
        #[derive(ToSchema)]
        #[allow(dead_code)]
        pub struct $item {
            endpoint: $endpoint,
            body: $body,
            /// Your own id for the item, unique in the batch; jobs and results carry it.
            #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
            custom_id: Option<String>,
        }
    )*};
}

items! {
    ChatCompletionsItem, ChatCompletionsEndpoint, ChatBody;
    CompletionsItem, CompletionsEndpoint, CompletionsBody;
    ImagesItem, ImagesEndpoint, ImageBody;
    VideosItem, VideosEndpoint, VideoBody;
    MusicItem, MusicEndpoint, MusicBody;
    SpeechItem, SpeechEndpoint, SpeechBody;
}

// Each endpoint's path as a one-value enum (written out: utoipa reads `rename` only from a
// literal, not from a macro argument). A test checks them against `Endpoint::ALL`.
#[derive(ToSchema)]
#[allow(dead_code)]
enum ChatCompletionsEndpoint {
    #[serde(rename = "/v1/chat/completions")]
    Path,
}
#[derive(ToSchema)]
#[allow(dead_code)]
enum CompletionsEndpoint {
    #[serde(rename = "/v1/completions")]
    Path,
}
#[derive(ToSchema)]
#[allow(dead_code)]
enum ImagesEndpoint {
    #[serde(rename = "/v1/images/generations")]
    Path,
}
#[derive(ToSchema)]
#[allow(dead_code)]
enum VideosEndpoint {
    #[serde(rename = "/v1/videos/generations")]
    Path,
}
#[derive(ToSchema)]
#[allow(dead_code)]
enum MusicEndpoint {
    #[serde(rename = "/v1/music/generations")]
    Path,
}
#[derive(ToSchema)]
#[allow(dead_code)]
enum SpeechEndpoint {
    #[serde(rename = "/v1/audio/speech")]
    Path,
}

// Text the gateway accepts (the `pattern`s below): not blank, and without U+0000 (which
// PostgreSQL cannot store).

/// `/v1/chat/completions`. Other fields of the OpenAI API pass through to the provider.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ChatBody {
    /// A model that serves this endpoint (`GET /v1/models`).
    #[schema(max_length = 256, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
    model: String,
    #[schema(min_items = 1, max_items = 512)]
    messages: Vec<ChatMessage>,
    /// Batch jobs do not stream: `true` is refused.
    #[schema(schema_with = never_true)]
    stream: Option<bool>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct ChatMessage {
    #[schema(schema_with = role)]
    role: String,
    /// Text (at most 100,000 characters) or an array of content parts, passed on as given
    /// (`PassThrough`: any JSON without U+0000).
    #[schema(schema_with = content)]
    content: Value,
}

/// Declares the body of an endpoint that takes a `prompt`.
macro_rules! prompt_bodies {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(ToSchema)]
        #[allow(dead_code)]
        pub struct $name {
            /// A model that serves this endpoint (`GET /v1/models`).
            #[schema(max_length = 256, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
            model: String,
            #[schema(max_length = 100000, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
            prompt: String,
            #[schema(schema_with = never_true)]
            stream: Option<bool>,
        }
    )*};
}

prompt_bodies! {
    /// `/v1/completions`. Other fields of the OpenAI API pass through to the provider.
    CompletionsBody;
    /// `/v1/videos/generations`.
    VideoBody;
    /// `/v1/music/generations`.
    MusicBody;
}

/// `/v1/images/generations`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ImageBody {
    #[schema(max_length = 256, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
    model: String,
    #[schema(max_length = 100000, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
    prompt: String,
    #[schema(minimum = 1, maximum = 10)]
    n: Option<i64>,
    #[schema(schema_with = response_format)]
    response_format: Option<String>,
    #[schema(schema_with = never_true)]
    stream: Option<bool>,
}

/// `/v1/audio/speech`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct SpeechBody {
    #[schema(max_length = 256, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
    model: String,
    #[schema(max_length = 4096, pattern = r"^[^\u0000]*[^\s\u0000][^\u0000]*$")]
    input: String,
    #[schema(max_length = 64, pattern = r"^[^\u0000]*$")]
    voice: Option<String>,
    /// Not `null`: when present, a number.
    #[schema(minimum = 0.25, maximum = 4.0)]
    #[serde(default)]
    speed: f64,
    #[schema(schema_with = never_true)]
    stream: Option<bool>,
}

fn role() -> utoipa::openapi::Object {
    schema::strings(&["system", "developer", "user", "assistant", "tool"])
}

fn content() -> utoipa::openapi::Schema {
    use utoipa::openapi::Ref;
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(100_000))
                .pattern(Some(r"^[^\u0000]*$")),
        )
        .item(ArrayBuilder::new().items(Ref::from_schema_name("PassThrough")))
        .build()
        .into()
}

fn response_format() -> utoipa::openapi::Object {
    schema::strings(&["url", "b64_json"])
}

fn never_true() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::Boolean, Type::Null]))
        .enum_values(Some([Value::Bool(false), Value::Null]))
        .build()
}

/// Small schemas the typed bodies name with `#[schema(schema_with = ...)]`: the domain's sets
/// (`volley_api::schema`, which the batch and job objects use) and the gateway's own.
pub mod schema {
    use utoipa::openapi::Object;
    pub use volley_api::schema::*;

    use crate::error::ApiError;

    pub fn object_list() -> Object {
        strings(&["list"])
    }
    pub(crate) fn object_model() -> Object {
        strings(&["model"])
    }
    pub(crate) fn object_admin_status() -> Object {
        strings(&["admin_status"])
    }
    pub fn ok() -> Object {
        strings(&["ok"])
    }

    pub fn error_type() -> Object {
        let mut all: Vec<&str> = ApiError::every_kind().iter().map(ApiError::kind).collect();
        all.dedup();
        strings(&all)
    }
}

/// The error types each status carries, from `ApiError` itself (and the default service's
/// `not_found`, which is `ApiError::NotFound`'s type).
fn error_kinds_by_status() -> BTreeMap<u16, Vec<&'static str>> {
    use actix_web::ResponseError;
    let mut by: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for e in ApiError::every_kind() {
        let kinds = by.entry(e.status_code().as_u16()).or_default();
        if !kinds.contains(&e.kind()) {
            kinds.push(e.kind());
        }
    }
    by
}

/// Unicode White_Space, what `str::trim` removes.
const WS: &str =
    r"[\t\n\u000b\u000c\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// A pattern matching `name` in any case: `Ab` is `[Aa][Bb]`.
fn any_case(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphabetic() {
                format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The document for this deployment (see the module's comment).
pub fn document(settings: &Settings) -> anyhow::Result<Value> {
    let mut doc = serde_json::to_value(ApiDoc::openapi())?;
    let kinds = error_kinds_by_status();
    let error_ref = json!({"$ref": "#/components/schemas/ErrorBody"});

    // Per-status error schemas: ErrorBody with `type` narrowed to what that status carries.
    let components = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow::anyhow!("the document has no components"))?;
    for (status, types) in &kinds {
        let mut detail = json!({
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": types},
            },
        });
        if types.contains(&"invalid_request") {
            detail["properties"]["errors"] = json!({
                "type": "array",
                "items": {"$ref": "#/components/schemas/FieldErrorBody"},
            });
        }
        components.insert(
            format!("Error{status}"),
            json!({
                "type": "object",
                "required": ["error"],
                "properties": {"error": detail},
                "description": format!("Error types: {}.", types.join(", ")),
            }),
        );
    }
    narrow_models(components, settings);
    // The metadata rules (volley_domain's `metadata`), which the field's type cannot carry.
    if let Some(m) = components
        .get_mut("BatchRequest")
        .and_then(|r| r.pointer_mut("/properties/metadata"))
    {
        let limits = volley_domain::Limits::default();
        *m = json!({
            "type": ["object", "null"],
            "maxProperties": limits.max_metadata_pairs,
            "propertyNames": {"minLength": 1, "maxLength": limits.max_metadata_key_chars,
                "pattern": r"^[^\u0000]*$"},
            "additionalProperties": {"type": "string",
                "maxLength": limits.max_metadata_value_chars, "pattern": r"^[^\u0000]*$"},
            "description": m["description"].clone(),
        });
    }
    // Fields of the provider's API that Volley does not check pass through as given, but
    // nothing anywhere in a body may hold U+0000 (PostgreSQL cannot store it): 400.
    components.insert(
        "PassThrough".into(),
        json!({
            "description": "Any JSON value without U+0000 in a string or a key.",
            "anyOf": [
                {"type": ["number", "boolean", "null"]},
                {"type": "string", "pattern": r"^[^\u0000]*$"},
                {"type": "array", "items": {"$ref": "#/components/schemas/PassThrough"}},
                {
                    "type": "object",
                    "additionalProperties": {"$ref": "#/components/schemas/PassThrough"},
                    "propertyNames": {"pattern": r"^[^\u0000]*$"},
                },
            ],
        }),
    );
    // Chat messages are passed on whole, other fields included: the same rule.
    for name in BODIES.iter().chain(&["ChatMessage"]) {
        if let Some(body) = components.get_mut(*name) {
            body["additionalProperties"] = json!({"$ref": "#/components/schemas/PassThrough"});
            body["propertyNames"] = json!({"pattern": r"^[^\u0000]*$"});
        }
    }

    // Status filters take the names in any case (a tuple parameter cannot name a schema).
    let batch: Vec<&str> = [
        BatchStatus::Pending,
        BatchStatus::Processing,
        BatchStatus::Done,
    ]
    .map(BatchStatus::as_str)
    .to_vec();
    let job: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
    let finished: Vec<&str> = JobStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| s.as_str())
        .collect();
    let one_of = |names: &[&str]| {
        names
            .iter()
            .map(|n| any_case(n))
            .collect::<Vec<_>>()
            .join("|")
    };
    let filters = [
        ("/v1/batches", format!("^({})?$", one_of(&batch))),
        ("/v1/batches/{id}/jobs", format!("^({})?$", one_of(&job))),
        (
            "/v1/batches/{id}/results",
            // Parts split at commas: empty, or one name with white space around it (Rust's
            // `trim`, so Unicode White_Space, spelled out: ECMAScript's `\s` also takes U+FEFF).
            format!(
                "^({WS}*({0}){WS}*)?(,({WS}*({0}){WS}*)?)*$",
                one_of(&finished)
            ),
        ),
    ];
    for (path, pattern) in filters {
        if let Some(params) = doc
            .pointer_mut(&format!(
                "/paths/{}/get/parameters",
                path.replace('/', "~1")
            ))
            .and_then(Value::as_array_mut)
        {
            for p in params.iter_mut().filter(|p| p["name"] == "status") {
                p["schema"] = json!({"type": "string", "pattern": pattern});
            }
        }
    }

    // Each Server-Sent Event of a batch's stream (events.rs's `frame`): its `data` is one line
    // of JSON, the batch's counts (`progress`, `done`) or a finished job (`job`).
    if let Some(schema) = doc.pointer_mut(
        "/paths/~1v1~1batches~1{id}~1events/get/responses/200/content/text~1event-stream/schema",
    ) {
        *schema = json!({
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"type": "string", "enum": ["progress", "job", "done"]},
                "id": {"type": "string"},
                "data": {"type": "string", "contentMediaType": "application/json"},
            },
        });
    }

    doc["components"]["securitySchemes"] = json!({
        "api_key": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`batchctl keys create`), as `Authorization: Bearer <key>`.",
        }
    });

    let paths = doc
        .get_mut("paths")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow::anyhow!("the document has no paths"))?;
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            // A parameter is absent or has a value: `Option<T>` parameters are not required,
            // but never `null` (a header or query "null" would be the text `null`).
            if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                for p in params {
                    if let Some(types) = p.pointer_mut("/schema/type")
                        && let Some(list) = types.as_array()
                    {
                        let list: Vec<Value> =
                            list.iter().filter(|t| *t != "null").cloned().collect();
                        *types = match list.as_slice() {
                            [one] => one.clone(),
                            _ => Value::Array(list),
                        };
                    }
                }
            }
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            // The per-key limiter answers before any route, whenever `Authorization` is sent.
            responses.entry("429").or_insert_with(|| {
                json!({
                    "description": "Too many requests for this API key (`rate_limited`).",
                    "content": {"application/json": {"schema": error_ref.clone()}},
                })
            });
            for (status, response) in responses.iter_mut() {
                let Ok(code) = status.parse::<u16>() else {
                    continue;
                };
                let Some(schema) = response.pointer_mut("/content/application~1json/schema") else {
                    continue;
                };
                if *schema == error_ref && kinds.contains_key(&code) {
                    *schema = json!({"$ref": format!("#/components/schemas/Error{code}")});
                }
                let headers = match code {
                    401 => Some(("WWW-Authenticate", "`Bearer`")),
                    429 => Some(("Retry-After", "Seconds to wait before retrying.")),
                    _ => None,
                };
                if let Some((name, description)) = headers {
                    response["headers"][name] = json!({"description": description, "schema": {"type": "string"}, "required": true});
                }
            }
        }
    }
    Ok(doc)
}

/// The item body schemas, one per endpoint.
const BODIES: [&str; 6] = [
    "ChatBody",
    "CompletionsBody",
    "ImageBody",
    "VideoBody",
    "MusicBody",
    "SpeechBody",
];

/// Each endpoint's `model`: one of the models this deployment serves on it. A body with any
/// other model is a 400, so the document says so.
fn narrow_models(components: &mut serde_json::Map<String, Value>, settings: &Settings) {
    let served = |e: Endpoint| -> Vec<String> {
        settings
            .models
            .iter()
            .filter(|m| m.endpoints.iter().any(|p| p == e.path()))
            .map(|m| m.name.clone())
            .collect()
    };
    let bodies = [
        ("ChatBody", Endpoint::ChatCompletions),
        ("CompletionsBody", Endpoint::Completions),
        ("ImageBody", Endpoint::ImagesGenerations),
        ("VideoBody", Endpoint::VideosGenerations),
        ("MusicBody", Endpoint::MusicGenerations),
        ("SpeechBody", Endpoint::AudioSpeech),
    ];
    for (name, endpoint) in bodies {
        if let Some(model) = components
            .get_mut(name)
            .and_then(|s| s.pointer_mut("/properties/model"))
        {
            model["enum"] = json!(served(endpoint));
        }
    }
}

/// Serialises the document once for serving.
pub fn build(settings: &Settings) -> anyhow::Result<Document> {
    let doc = document(settings)?;
    let mut allow = BTreeMap::new();
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            let methods: Vec<String> = item
                .as_object()
                .map(|ops| {
                    ops.keys()
                        .filter(|m| METHODS.contains(&m.as_str()))
                        .map(|m| m.to_ascii_uppercase())
                        .collect()
                })
                .unwrap_or_default();
            allow.insert(path.clone(), methods.join(", "));
        }
    }
    Ok(Document {
        json: web::Bytes::from(serde_json::to_vec(&doc)?),
        allow,
    })
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Query parameters of `GET /v1/media/{key}`, as documented (parsed by hand in the handler).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct MediaParams {
    /// The job the link was signed for.
    job: Option<i64>,
    /// Unix time the link expires.
    expires: Option<i64>,
    /// The link's signature.
    sig: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    fn settings() -> Settings {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/volley.toml");
        Settings::from_file(&path).unwrap()
    }

    /// The next string literal at the start of `s` (after blanks), and what follows it.
    fn literal(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start().strip_prefix('"')?;
        let end = s.find('"')?;
        Some((&s[..end], &s[end + 1..]))
    }

    /// The method of the next `web::<method>()` within `s`'s first statement.
    fn method(s: &str) -> Option<String> {
        let stmt = &s[..s.find(';').unwrap_or(s.len())];
        let at = stmt.find("web::")?;
        let rest = &stmt[at + 5..];
        let name = &rest[..rest.find('(')?];
        ["get", "post", "put", "patch", "delete", "head"]
            .contains(&name)
            .then(|| name.to_ascii_uppercase())
    }

    /// Every (method, path) the gateway's sources register: `.route("/p", web::get()...)`,
    /// `web::resource("/p")...route(web::get()...)`, `#[get("/p")]`, and `/metrics` from
    /// `volley_telemetry::http::metrics_resource`. Test modules are left out.
    fn registered() -> BTreeSet<(String, String)> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = BTreeSet::new();
        let mut files: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        // Modules in folders (`src/x/mod.rs`, `src/x/y.rs`) too.
        let mut i = 0;
        while i < files.len() {
            if files[i].is_dir() {
                let dir = files.remove(i);
                files.extend(std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()));
            } else {
                i += 1;
            }
        }
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "rs"))
        {
            let text = std::fs::read_to_string(f).unwrap();
            let code = &text[..text.find("#[cfg(test)]").unwrap_or(text.len())];
            for (at, _) in code.match_indices(".route(") {
                let rest = &code[at + 7..];
                if let Some((path, after)) = literal(rest) {
                    let m = method(after).unwrap_or_else(|| panic!("{f:?}: no method for {path}"));
                    found.insert((m, template(path)));
                }
            }
            for (at, _) in code.match_indices("web::resource(") {
                let rest = &code[at + 14..];
                let (path, after) = literal(rest).unwrap();
                let m = method(after).unwrap_or_else(|| panic!("{f:?}: no method for {path}"));
                found.insert((m, template(path)));
            }
            for m in ["get", "post", "put", "patch", "delete"] {
                for (at, _) in code.match_indices(&format!("#[{m}(")) {
                    let (path, _) = literal(&code[at + m.len() + 3..]).unwrap();
                    found.insert((m.to_ascii_uppercase(), template(path)));
                }
            }
            if code.contains("metrics_resource(") {
                found.insert(("GET".into(), "/metrics".into()));
            }
        }
        found
    }

    fn documented(doc: &Value) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for m in item.as_object().unwrap().keys() {
                if METHODS.contains(&m.as_str()) {
                    found.insert((m.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        found
    }

    #[test]
    fn every_registered_route_is_documented_and_nothing_else() {
        let doc = document(&settings()).unwrap();
        let registered = registered();
        let documented = documented(&doc);
        assert!(
            registered.len() >= 17,
            "the route parser lost routes: {registered:?}"
        );
        let missing: Vec<_> = registered.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&registered).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "routes registered but not in the OpenAPI document: {missing:?}; \
             documented but not registered: {extra:?}"
        );
    }

    #[test]
    fn templates() {
        assert_eq!(template("/v1/media/{key:.*}"), "/v1/media/{key}");
        assert_eq!(template("/v1/batches/{id}/jobs"), "/v1/batches/{id}/jobs");
        assert_eq!(template("/a:b"), "/a:b");
    }

    #[test]
    fn document_is_openapi_3_1_with_errors_per_status() {
        let doc = document(&settings()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let header = &doc["paths"]["/v1/batches"]["post"]["parameters"][0];
        assert_eq!(header["name"], "Idempotency-Key");
        assert_eq!(header["schema"]["type"], "string");
        let create = &doc["paths"]["/v1/batches"]["post"];
        for status in [
            "202", "400", "401", "408", "409", "413", "422", "429", "500", "503",
        ] {
            assert!(create["responses"][status].is_object(), "{status}");
        }
        assert_eq!(
            create["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Error400"
        );
        let e400 = &doc["components"]["schemas"]["Error400"]["properties"]["error"];
        assert_eq!(
            e400["properties"]["type"]["enum"],
            json!(["invalid_request", "too_large"])
        );
        assert!(e400["properties"]["errors"].is_object());
        let e503 = &doc["components"]["schemas"]["Error503"]["properties"]["error"];
        assert_eq!(
            e503["properties"]["type"]["enum"],
            json!(["async_disabled", "unavailable"])
        );
        assert_eq!(
            doc["components"]["securitySchemes"]["api_key"]["scheme"],
            "bearer"
        );
        assert_eq!(
            doc["paths"]["/v1/batches/{id}"]["get"]["security"],
            json!([{"api_key": []}])
        );
        // Models come from the configuration, per endpoint.
        let chat = &doc["components"]["schemas"]["ChatBody"]["properties"]["model"]["enum"];
        assert!(chat.as_array().is_some_and(|m| !m.is_empty()), "{chat}");
        // Every request item type is there.
        let items = doc["components"]["schemas"]["BatchItem"]["oneOf"]
            .as_array()
            .unwrap();
        assert_eq!(items.len(), Endpoint::ALL.len());
        let mut paths: Vec<String> = items
            .iter()
            .map(|i| {
                let item = i["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
                let e = doc["components"]["schemas"][item]["properties"]["endpoint"]["$ref"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap();
                doc["components"]["schemas"][e]["enum"][0]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        paths.sort();
        let mut all: Vec<String> = Endpoint::ALL.iter().map(|e| e.path().to_owned()).collect();
        all.sort();
        assert_eq!(paths, all);
    }
}
