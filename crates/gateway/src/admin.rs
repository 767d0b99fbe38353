//! `GET /v1/admin/status` (an addition to the contract): what `batchctl status` shows, for keys
//! marked admin (`batchctl keys create --admin`); any other key gets 403. Per inference type:
//! messages ready in RabbitMQ, consumers, jobs queued and running, the oldest wait and the
//! dead-letter queue's size. Each source is read on its own: one being down leaves the other's
//! numbers, with the failure named under `errors`.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;
use volley_amqp::Names;
use volley_amqp::depths::read_once;
use volley_domain::InferenceType;

use crate::Shared;
use crate::error::{ApiError, ErrorBody};
use crate::openapi::schema;
use crate::routes::{UNKNOWN_KEY, bearer};

/// What the operator page shows. Fields in alphabetical order: the bytes clients always got
/// (see `views`).
#[derive(Debug, Serialize, ToSchema)]
struct AdminStatus {
    pub errors: SourceErrors,
    #[schema(schema_with = schema::object_admin_status)]
    pub object: &'static str,
    /// One row per inference type, then the events queue (`name` = `events`).
    pub queues: Vec<QueueRow>,
}

/// Which source could not be read (`null` when it was).
#[derive(Debug, Serialize, ToSchema)]
struct SourceErrors {
    pub database: Option<String>,
    pub rabbitmq: Option<String>,
}

/// One queue: RabbitMQ's numbers (`null` when RabbitMQ could not be read) and PostgreSQL's
/// (`null` for the events queue, or when PostgreSQL could not be read).
#[derive(Debug, Serialize, ToSchema)]
struct QueueRow {
    pub consumers: Option<u32>,
    pub dead_letters: Option<u32>,
    /// Present on the rows of job queues when PostgreSQL was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::inference_type)]
    pub inference_type: Option<&'static str>,
    pub name: &'static str,
    pub oldest_wait_secs: Option<f64>,
    pub processing: Option<i64>,
    pub queue: String,
    pub queued: Option<i64>,
    pub ready: Option<u32>,
}

/// A broker that accepts a connection but never answers must not hold the request.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/admin/status", web::get().to(status));
}

/// What `batchctl status` shows, per inference type (admin keys only).
#[utoipa::path(
    get, path = "/v1/admin/status", tag = "operations",
    responses(
        (status = 200, description = "Queues and jobs per inference type", body = AdminStatus),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn status(
    req: HttpRequest,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let key = bearer(&req)?;
    if !state.db.key_is_admin(key).await?.ok_or(UNKNOWN_KEY)? {
        return Err(ApiError::Forbidden(
            "this key is not an admin key (batchctl keys create --admin)".into(),
        ));
    }
    let names = Names::new(&state.settings.queue_prefix);
    let queues = async {
        tokio::time::timeout(
            BROKER_TIMEOUT,
            read_once(&state.settings.amqp_url, &names, "volley-gateway-admin"),
        )
        .await
        .map_err(|_| "RabbitMQ did not answer in time".to_owned())?
        .map_err(|e| {
            // The cause is logged, not sent: it can name hosts of the deployment.
            tracing::warn!(error = %e, "admin status: RabbitMQ unreachable");
            "RabbitMQ unreachable".to_owned()
        })
    };
    let (queues, jobs) = tokio::join!(queues, state.db.status_by_type());
    let jobs = jobs.map_err(|e| {
        tracing::warn!(error = %e, "admin status: PostgreSQL unreachable");
        "PostgreSQL unreachable".to_owned()
    });
    // (messages ready, consumers) of a queue.
    let depth = |queue: &str| -> (Option<u32>, Option<u32>) {
        match &queues {
            Ok(all) => all
                .iter()
                .find(|d| d.queue == queue)
                .map_or((None, None), |d| (Some(d.messages), Some(d.consumers))),
            Err(_) => (None, None),
        }
    };
    let rows = InferenceType::ALL
        .into_iter()
        .map(|t| (t.key(), names.job_queue(t), Some(t.as_str())))
        .chain([("events", names.events_queue(), None)]);
    let mut out = Vec::new();
    for (name, queue, db_type) in rows {
        let (ready, consumers) = depth(&queue);
        let (dead_letters, _) = depth(&Names::dlq(&queue));
        let mut row = QueueRow {
            consumers,
            dead_letters,
            inference_type: None,
            name,
            oldest_wait_secs: None,
            processing: None,
            queue,
            queued: None,
            ready,
        };
        if let (Some(t), Ok(jobs)) = (db_type, &jobs) {
            let j = jobs.iter().find(|j| j.inference_type == t);
            row.inference_type = Some(t);
            row.queued = Some(j.map_or(0, |j| j.queued));
            row.processing = Some(j.map_or(0, |j| j.processing));
            row.oldest_wait_secs = j.and_then(|j| j.oldest_wait_secs);
        }
        out.push(row);
    }
    Ok(HttpResponse::Ok().json(AdminStatus {
        errors: SourceErrors {
            database: jobs.err(),
            rabbitmq: queues.err(),
        },
        object: "admin_status",
        queues: out,
    }))
}
