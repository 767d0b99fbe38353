//! A batch's webhook: accepting it with the batch, and the deliveries a client can see and
//! redeliver. batch-state does the delivering.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;
use volley_config::Settings;
use volley_db::NewWebhook;
use volley_db::webhooks::Delivery;
use volley_domain::{FieldError, ValidWebhook};
use volley_egress::WebhookPolicy;

use crate::Shared;
use crate::error::{ApiError, ErrorBody};
use crate::routes::{owner, parse_id};

/// The operator's webhook policy from the settings; a bad host pattern stops start-up.
pub fn policy(settings: &Settings) -> anyhow::Result<WebhookPolicy> {
    let w = &settings.webhooks;
    WebhookPolicy::new(w.allow_private_network, &w.http_hosts, &w.allowed_ports)
        .map_err(|e| anyhow::anyhow!("webhooks.http_hosts: {e}"))
}

/// Applies the operator's policy to a batch's (well-formed) webhook: a URL it refuses is a
/// 400 on `webhook.url`, like any other bad field.
pub fn accept(
    state: &Shared,
    webhook: Option<&ValidWebhook>,
    key_id: i64,
) -> Result<Option<NewWebhook>, ApiError> {
    let Some(w) = webhook else {
        return Ok(None);
    };
    let url = state.webhook_policy.parse_url(&w.url).map_err(|e| {
        let message = format!("the webhook URL is refused: {e}");
        ApiError::InvalidRequest {
            message: format!("1 problem: webhook.url: {message}"),
            errors: vec![FieldError {
                index: None,
                field: "webhook.url".into(),
                message,
            }],
        }
    })?;
    Ok(Some(NewWebhook {
        url: url.to_string(),
        types: w.events.clone(),
        key_id,
    }))
}

/// One event and how its delivery is going.
#[derive(Debug, Serialize, ToSchema)]
struct DeliveryBody {
    pub id: String,
    pub object: &'static str,
    /// The `webhook-id` header: the same on every attempt.
    pub webhook_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub batch_id: String,
    pub job_id: Option<String>,
    pub url: String,
    /// `pending` (will be tried again), `delivered` or `failed` (retries used up).
    pub status: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub last_response: Option<String>,
    pub created: i64,
    pub last_attempt: Option<i64>,
    /// When the next attempt is due (pending only).
    pub next_attempt: Option<i64>,
    pub delivered: Option<i64>,
    /// The endpoint is paused after an event used up its retries; its events wait until a
    /// redelivery to it succeeds.
    pub endpoint_paused: bool,
}

impl From<Delivery> for DeliveryBody {
    fn from(d: Delivery) -> DeliveryBody {
        DeliveryBody {
            id: d.id.to_string(),
            object: "webhook_delivery",
            webhook_id: d.msg_id,
            event_type: d.event_type,
            batch_id: d.batch_id.to_string(),
            job_id: d.job_id.map(|j| j.to_string()),
            url: d.url,
            status: d.status,
            attempts: d.attempts,
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            last_response: d.last_response,
            created: d.created_at.timestamp(),
            last_attempt: d.last_attempt_at.map(|t| t.timestamp()),
            next_attempt: d.next_attempt_at.map(|t| t.timestamp()),
            delivered: d.delivered_at.map(|t| t.timestamp()),
            endpoint_paused: d.endpoint_paused,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct DeliveryList {
    pub object: &'static str,
    pub data: Vec<DeliveryBody>,
}

/// `GET /v1/batches/{id}/webhook-deliveries`: every event of the batch, oldest first.
#[utoipa::path(
    get, path = "/v1/batches/{id}/webhook-deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "The batch id (a positive integer; anything else is 404)")),
    responses(
        (status = 200, description = "The batch's webhook events, oldest first", body = DeliveryList),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such batch for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn list_deliveries(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let id = parse_id(&path, "batch")?;
    let list = state
        .db
        .webhook_deliveries(&owner, id)
        .await?
        .ok_or(ApiError::NotFound("batch"))?;
    Ok(HttpResponse::Ok().json(DeliveryList {
        object: "list",
        data: list.into_iter().map(DeliveryBody::from).collect(),
    }))
}

/// `POST /v1/webhook-deliveries/{id}/retry`: one more attempt at once, same `webhook-id`.
#[utoipa::path(
    post, path = "/v1/webhook-deliveries/{id}/retry", tag = "webhooks",
    params(("id" = String, Path, description = "The delivery's id (a positive integer; anything else is 404)")),
    responses(
        (status = 202, description = "Queued for an attempt now; the same `webhook-id`", body = DeliveryBody),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such delivery for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn retry_delivery(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let id = parse_id(&path, "webhook delivery")?;
    let d = state
        .db
        .retry_webhook_delivery(&owner, id)
        .await?
        .ok_or(ApiError::NotFound("webhook delivery"))?;
    tracing::info!(
        webhook.event = id,
        batch.id = d.batch_id,
        "webhook redelivery asked"
    );
    Ok(HttpResponse::Accepted().json(DeliveryBody::from(d)))
}
