//! `GET /v1/admin/status` (an addition to the contract): what `batchctl status` shows, for keys
//! marked admin (`batchctl keys create --admin`); any other key gets 403. Per inference type:
//! messages ready in RabbitMQ, consumers, jobs queued and running, the oldest wait and the
//! dead-letter queue's size. Each source is read on its own: one being down leaves the other's
//! numbers, with the failure named under `errors`.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use volley_amqp::Names;
use volley_amqp::depths::read_once;
use volley_domain::InferenceType;

use crate::AppState;
use crate::error::ApiError;
use crate::routes::{UNKNOWN_KEY, bearer};

/// A broker that accepts a connection but never answers must not hold the request.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/admin/status", web::get().to(status));
}

async fn status(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
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
    let depth = |queue: &str| -> Value {
        match &queues {
            Ok(all) => all
                .iter()
                .find(|d| d.queue == queue)
                .map_or(json!([null, null]), |d| json!([d.messages, d.consumers])),
            Err(_) => json!([null, null]),
        }
    };
    let rows = InferenceType::ALL
        .into_iter()
        .map(|t| (t.key(), names.job_queue(t), Some(t.as_str())))
        .chain([("events", names.events_queue(), None)]);
    let mut out = Vec::new();
    for (name, queue, db_type) in rows {
        let d = depth(&queue);
        let dlq = depth(&Names::dlq(&queue));
        let mut row = json!({
            "name": name,
            "queue": queue,
            "ready": d[0],
            "consumers": d[1],
            "dead_letters": dlq[0],
            "queued": null,
            "processing": null,
            "oldest_wait_secs": null,
        });
        if let (Some(t), Ok(jobs)) = (db_type, &jobs) {
            let j = jobs.iter().find(|j| j.inference_type == t);
            row["inference_type"] = json!(t);
            row["queued"] = json!(j.map_or(0, |j| j.queued));
            row["processing"] = json!(j.map_or(0, |j| j.processing));
            row["oldest_wait_secs"] = json!(j.and_then(|j| j.oldest_wait_secs));
        }
        out.push(row);
    }
    Ok(HttpResponse::Ok().json(json!({
        "object": "admin_status",
        "queues": out,
        "errors": {
            "rabbitmq": queues.as_ref().err(),
            "database": jobs.as_ref().err(),
        },
    })))
}
