use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument;
use volley_db::{BatchView, Idempotent, JobSummary, NewJob};
use volley_domain::BatchUsage;
use volley_domain::{BatchRejection, validate_batch};
use volley_proto::{CancelJobs, Control, JobMessage, control};

use crate::Shared;
use crate::error::{ApiError, ErrorBody};
use crate::views::{self, MediaLinks};

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/v1/batches", web::post().to(create_batch))
        .route("/v1/batches", web::get().to(crate::browse::list_batches))
        .route("/v1/batches/{id}", web::get().to(get_batch))
        .route("/v1/batches/{id}/cancel", web::post().to(cancel_batch))
        .route(
            "/v1/batches/{id}/events",
            web::get().to(crate::events::batch_events),
        )
        .route(
            "/v1/batches/{id}/jobs",
            web::get().to(crate::browse::list_jobs),
        )
        .route(
            "/v1/batches/{id}/results",
            web::get().to(crate::results::batch_results),
        )
        .route("/v1/jobs/{id}", web::get().to(get_job))
        .route("/v1/jobs/{id}/cancel", web::post().to(cancel_job))
        .route("/v1/models", web::get().to(list_models))
        .route("/v1/media/{key:.*}", web::get().to(get_media))
        .route(
            "/v1/batches/{id}/webhook-deliveries",
            web::get().to(crate::webhooks::list_deliveries),
        )
        .route(
            "/v1/webhook-deliveries/{id}/retry",
            web::post().to(crate::webhooks::retry_delivery),
        );
}

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = views::Health)),
)]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(views::Health { status: "ok" })
}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready: PostgreSQL and RabbitMQ reachable, not draining", body = views::Readiness),
        (status = 503, description = "Not ready (or shutting down)", body = views::Readiness),
    ),
)]
pub(crate) async fn readyz(state: web::Data<Shared>) -> HttpResponse {
    let db = state.db.ping().await;
    let broker = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        state.broker.ensure_connected(),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    let body = views::Readiness {
        database: db,
        draining,
        rabbitmq: broker,
    };
    if db && broker && !draining {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The key in `Authorization: Bearer <key>`.
pub(crate) fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(
            "missing API key: send Authorization: Bearer <key>",
        ))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .ok_or(ApiError::Unauthorized(
            "malformed Authorization header: expected Bearer <key>",
        ))
}

pub(crate) const UNKNOWN_KEY: ApiError = ApiError::Unauthorized("unknown or revoked API key");

/// The key's owner, from `Authorization: Bearer <key>`.
pub(crate) async fn owner(req: &HttpRequest, state: &Shared) -> Result<String, ApiError> {
    let key = bearer(req)?;
    state.db.authenticate(key).await?.ok_or(UNKNOWN_KEY)
}

pub(crate) fn parse_id(raw: &str, what: &'static str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or(ApiError::NotFound(what))
}

/// Bodies larger than this are parsed and validated on the blocking pool: a few 16 MiB bodies
/// parsed on the event loop would hold up every other request of that worker thread.
const PARSE_INLINE_BYTES: usize = 64 * 1024;

/// Reads the whole body: 413 as soon as the declared or the received size passes `limit`, 408
/// when it has not all arrived within `timeout` (a client sending it slowly holds a
/// connection and a buffer for as long as it likes otherwise).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<web::BytesMut, ApiError> {
    let too_large =
        || ApiError::BodyTooLarge(format!("the request body is larger than {limit} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::invalid(format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} ms",
            timeout.as_millis()
        ))
    })?
}

/// Parses and validates a submitted batch (a pure function, so it can run on any thread).
fn parse_batch(
    body: &[u8],
    settings: &volley_config::Settings,
    limits: &volley_domain::Limits,
) -> Result<volley_domain::ValidBatch, ApiError> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    validate_batch(&request, settings, limits).map_err(|r| match r {
        BatchRejection::TooLarge { .. } => ApiError::TooLarge(r.message()),
        BatchRejection::Invalid(errors) => ApiError::InvalidRequest {
            message: BatchRejection::Invalid(errors.clone()).message(),
            errors,
        },
    })
}

/// The `Idempotency-Key` header, if sent: 1-255 visible ASCII characters.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(v) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(|k| Some(k.to_owned()))
        .ok_or_else(|| ApiError::invalid("Idempotency-Key must be 1-255 visible ASCII characters"))
}

/// Submit a batch: validated whole (every bad item is named), committed, then run.
#[utoipa::path(
    post, path = "/v1/batches", tag = "batches",
    request_body(content = crate::openapi::BatchRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
        pattern = "^[!-~]+$",
        description = "Makes retries safe: the same key (per API key, 24 h) and body replay the \
            original 202; another body is 422; a request still in flight with it is 409.")),
    responses(
        (status = 202, description = "Accepted: the batch and every job are committed", body = views::Batch,
            headers(("Idempotent-Replayed" = String, description = "`true` on a replayed answer"))),
        (status = 400, description = "`invalid_request` (malformed body or items, every bad item \
            listed; malformed Idempotency-Key) or `too_large` (more than 256 requests)", body = ErrorBody),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is in flight", body = ErrorBody),
        (status = 413, description = "The body is larger than the gateway accepts", body = ErrorBody),
        (status = 422, description = "The Idempotency-Key was used with another body", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "`async_disabled`, or the database is unreachable", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn create_batch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let who = state
        .db
        .authenticate_submitter(bearer(&req)?)
        .await?
        .ok_or(UNKNOWN_KEY)?;
    let idempotency_key = idempotency_key(&req)?;
    if !state.settings.gateway.async_enabled {
        return Err(ApiError::AsyncDisabled);
    }
    let gw = &state.settings.gateway;
    let body = read_body(
        &req,
        payload,
        gw.max_body_bytes,
        std::time::Duration::from_millis(gw.body_timeout_ms),
    )
    .await?
    .freeze();
    let batch = if body.len() <= PARSE_INLINE_BYTES {
        parse_batch(&body, &state.settings, &state.limits)?
    } else {
        // `Bytes` clones share the buffer: the idempotency check below hashes the same body.
        let (settings, limits, shared) =
            (state.settings.clone(), state.limits.clone(), body.clone());
        web::block(move || parse_batch(&shared, &settings, &limits))
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("parsing off the event loop: {e}")))??
    };
    let webhook = crate::webhooks::accept(&state, batch.webhook.as_ref(), who.key_id)?;
    let held = state
        .gate
        .held(batch.items.iter().map(|i| i.endpoint.inference_type()));
    let jobs: Vec<NewJob> = batch
        .items
        .into_iter()
        .map(|i| NewJob {
            inference_type: i.endpoint.inference_type().as_str().to_owned(),
            endpoint: i.endpoint.path().to_owned(),
            model: i.model,
            body: i.body,
            custom_id: i.custom_id,
        })
        .collect();
    let metadata = Value::Object(batch.metadata);
    let grace = state.settings.state.dispatch_grace_ms;
    let (view, dispatch) = match idempotency_key {
        None => state
            .db
            .submit_batch(
                &who,
                batch.label,
                metadata,
                webhook,
                batch.priority,
                jobs,
                grace,
                held.clone(),
            )
            .await?
            .map_err(over_quota)?,
        Some(k) => match state
            .db
            .create_batch_idempotent(
                &who,
                k,
                &body,
                batch.label,
                metadata,
                batch.priority,
                jobs,
                grace,
                webhook,
                held.clone(),
            )
            .await?
        {
            Idempotent::Created(view, dispatch) => (view, dispatch),
            Idempotent::Replayed(view) => {
                return Ok(HttpResponse::Accepted()
                    .insert_header(("Idempotent-Replayed", "true"))
                    .json(views::batch(&view)));
            }
            Idempotent::Mismatch => return Err(ApiError::IdempotencyMismatch),
            Idempotent::InFlight => return Err(ApiError::IdempotencyInFlight),
            Idempotent::OverQuota(over) => return Err(over_quota(over)),
        },
    };
    tracing::info!(batch.id = view.id, jobs = dispatch.len(), "batch accepted");
    count_accepted(&state, &dispatch);

    // Committed: from here on the batch is durable, so the client gets its 202 without waiting
    // for the broker's confirms. Publishing is best effort; whatever is not confirmed is
    // published by batch-state's sweeper once the grace period passes. Held jobs are
    // published by batch-state's fair dispatcher.
    let messages: Vec<JobMessage> = dispatch
        .iter()
        .filter(|d| !held.contains(&d.inference_type))
        .map(JobMessage::from)
        .collect();
    let publish =
        publish_batch(state.clone(), view.id, messages).instrument(tracing::Span::current());
    match state.publishing.clone().try_acquire_owned() {
        Ok(permit) => {
            actix_web::rt::spawn(async move {
                publish.await;
                drop(permit);
            });
        }
        Err(_) => publish.await,
    }
    Ok(HttpResponse::Accepted().json(views::batch(&view)))
}

/// The 429 for a batch over a quota of its key.
fn over_quota(o: volley_db::OverQuota) -> ApiError {
    let (what, unit) = match o.kind {
        volley_db::QuotaKind::ActiveJobs => ("jobs queued or running at once", "active"),
        volley_db::QuotaKind::JobsPerMinute => {
            ("jobs submitted per minute", "submitted in the last minute")
        }
    };
    let message = if o.never_fits() {
        format!(
            "this API key allows {} {what}; a batch of {} jobs can never fit: split it",
            o.limit, o.requested
        )
    } else {
        format!(
            "this API key allows {} {what} ({} {unit}); a batch of {} jobs would pass it: \
             retry later, nothing was created",
            o.limit, o.used, o.requested
        )
    };
    ApiError::OverQuota {
        message,
        retry_after_secs: o.retry_after_secs,
    }
}

/// Publishes a batch's job messages and records which the broker confirmed.
async fn publish_batch(state: web::Data<Shared>, batch_id: i64, messages: Vec<JobMessage>) {
    if messages.is_empty() {
        // All held: nothing to confirm, and the batch is published as far as this gateway goes.
        if let Err(e) = state.db.record_publish(batch_id, Vec::new()).await {
            tracing::warn!(batch.id = batch_id, error = %e, "could not record the publish");
        }
        return;
    }
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        state.broker.publish_jobs_confirmed(&messages),
    )
    .await
    {
        Ok(Ok(confirms)) => {
            // The jobs went in marked as dispatched: only those not confirmed are cleared.
            let unconfirmed = confirms.unconfirmed;
            if !unconfirmed.is_empty() {
                tracing::warn!(
                    batch.id = batch_id,
                    unconfirmed = unconfirmed.len(),
                    "some job messages were not confirmed; the sweeper will publish them"
                );
            }
            if let Err(e) = state.db.record_publish(batch_id, unconfirmed).await {
                tracing::warn!(batch.id = batch_id, error = %e, "could not record the publish; the sweeper will publish");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(batch.id = batch_id, error = %e, "publishing failed; the sweeper will publish")
        }
        Err(_) => tracing::warn!(
            batch.id = batch_id,
            "publishing timed out; the sweeper will publish"
        ),
    }
}

/// The batch `path` names, read for the request's key. The read clients poll: the key is
/// checked in the same round trip as the batch is read; 401 comes before 404, and another
/// owner's batch is the same 404 as a missing one.
pub(crate) async fn batch_for_key(
    req: &HttpRequest,
    path: &str,
    state: &Shared,
) -> Result<(i64, (BatchView, Vec<JobSummary>, BatchUsage)), ApiError> {
    let key = bearer(req)?;
    let Ok(id) = parse_id(path, "batch") else {
        owner(req, state).await?;
        return Err(ApiError::NotFound("batch"));
    };
    let found = state
        .db
        .get_batch_for_key(key, id)
        .await?
        .ok_or(UNKNOWN_KEY)?
        .ok_or(ApiError::NotFound("batch"))?;
    Ok((id, found))
}

/// A batch: counts, token usage and a link to each job.
#[utoipa::path(
    get, path = "/v1/batches/{id}", tag = "batches",
    params(("id" = String, Path, description = "The id (a positive integer; anything else is 404)")),
    responses(
        (status = 200, description = "The batch", body = views::BatchDetail),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such batch for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn get_batch(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let (id, (b, jobs, usage)) = batch_for_key(&req, &path, &state).await?;
    let mut v = views::batch_with_jobs(&b, &jobs, &state.settings.gateway.public_url);
    v.usage = Some(views::usage(&usage));
    // An addition: when the batch should finish, from measured throughput (see eta.rs).
    let unfinished = jobs
        .iter()
        .filter(|j| !j.status.is_terminal())
        .map(|j| j.inference_type.as_str());
    let estimate = state.eta.estimate(&state.db, id, unfinished);
    v.estimated_completion_at = Some(estimate.estimated_completion_at);
    v.estimated_seconds_remaining = Some(estimate.estimated_seconds_remaining);
    Ok(HttpResponse::Ok().json(v))
}

/// Cancels every QUEUED or PROCESSING job of the batch; returns the updated batch.
#[utoipa::path(
    post, path = "/v1/batches/{id}/cancel", tag = "batches",
    params(("id" = String, Path, description = "The id (a positive integer; anything else is 404)")),
    responses(
        (status = 200, description = "The batch after the cancel", body = views::BatchDetail),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such batch for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn cancel_batch(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let id = parse_id(&path, "batch")?;
    let (b, jobs, cancelled) = state
        .db
        .cancel_batch(&owner, id)
        .await?
        .ok_or(ApiError::NotFound("batch"))?;
    if !cancelled.is_empty() {
        tracing::info!(batch.id = id, jobs = cancelled.len(), "batch cancelled");
        for j in jobs.iter().filter(|j| cancelled.contains(&j.id)) {
            job_cancelled(&state, id, j.id, &j.inference_type);
        }
        abort_running(&state, id, cancelled).await;
    }
    Ok(HttpResponse::Ok().json(views::batch_with_jobs(
        &b,
        &jobs,
        &state.settings.gateway.public_url,
    )))
}

/// Jobs accepted per inference type: one counter update per type present, not per job.
fn count_accepted(state: &Shared, jobs: &[volley_domain::Dispatch]) {
    for t in volley_domain::InferenceType::ALL {
        let n = jobs.iter().filter(|j| j.inference_type == t).count();
        if n > 0 {
            state
                .metrics
                .jobs
                .accepted
                .with_label_values(&[t.as_str()])
                .inc_by(n as u64);
        }
    }
}

/// One event per cancelled job (a state change), and its count.
fn job_cancelled(state: &Shared, batch_id: i64, job_id: i64, inference_type: &str) {
    tracing::info!(
        job.id = job_id,
        batch.id = batch_id,
        inference_type,
        status = "CANCELLED",
        "job cancelled"
    );
    state
        .metrics
        .jobs
        .cancelled
        .with_label_values(&[inference_type])
        .inc();
}

/// Tells workers to abort in-flight calls. Best effort: a worker that misses it learns of the
/// cancellation when it next renews its claim, and its late result is discarded anyway.
async fn abort_running(state: &Shared, batch_id: i64, job_ids: Vec<i64>) {
    let c = Control {
        action: Some(control::Action::Cancel(CancelJobs { batch_id, job_ids })),
    };
    if let Err(e) = state.broker.publish_control(&c).await {
        tracing::warn!(batch.id = batch_id, error = %e, "could not broadcast the cancellation");
    }
}

pub(crate) fn links(state: &Shared) -> MediaLinks<'_> {
    MediaLinks {
        signer: &state.signer,
        public_url: &state.settings.gateway.public_url,
        ttl_secs: i64::try_from(state.settings.media.url_ttl_secs).unwrap_or(i64::MAX),
        now: chrono::Utc::now().timestamp(),
    }
}

/// A job: status, attempts, timestamps, its request and its result (media as signed URLs).
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The id (a positive integer; anything else is 404)")),
    responses(
        (status = 200, description = "The job", body = views::Job),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such job for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn get_job(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let id = parse_id(&path, "job")?;
    let (job, request) = state
        .db
        .get_job_with_request(&owner, id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    let mut v = views::job(&job, &links(&state));
    // An addition to the contract: the body the job was submitted with.
    v.request = Some(request);
    Ok(HttpResponse::Ok().json(v))
}

/// Cancels one job if it is QUEUED or PROCESSING; returns the job.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "The id (a positive integer; anything else is 404)")),
    responses(
        (status = 200, description = "The job after the cancel", body = views::Job),
        (status = 401, description = "No, malformed, unknown or revoked API key", body = ErrorBody),
        (status = 404, description = "No such job for this key", body = ErrorBody),
        (status = 500, description = "Internal error (the cause is logged, not sent)", body = ErrorBody),
        (status = 503, description = "The database is unreachable; retry", body = ErrorBody),
    ),
    security(("api_key" = [])),
)]
pub(crate) async fn cancel_job(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let owner = owner(&req, &state).await?;
    let id = parse_id(&path, "job")?;
    let (job, cancelled) = state
        .db
        .cancel_job(&owner, id)
        .await?
        .ok_or(ApiError::NotFound("job"))?;
    if cancelled {
        job_cancelled(&state, job.batch_id, id, &job.inference_type);
        abort_running(&state, 0, vec![id]).await;
    }
    Ok(HttpResponse::Ok().json(views::job(&job, &links(&state))))
}

/// The models the configured providers serve, and the endpoints each accepts.
#[utoipa::path(
    get, path = "/v1/models", tag = "batches",
    responses((status = 200, description = "Every model", body = views::ModelList)),
)]
pub(crate) async fn list_models(state: web::Data<Shared>) -> HttpResponse {
    let data = state
        .settings
        .models
        .iter()
        .map(|m| views::Model {
            created: 0,
            endpoints: m.endpoints.clone(),
            id: m.name.clone(),
            object: "model",
            owned_by: "volley",
        })
        .collect();
    HttpResponse::Ok().json(views::ModelList {
        data,
        object: "list",
    })
}

#[derive(Deserialize)]
struct MediaQuery {
    job: Option<i64>,
    expires: Option<i64>,
    sig: Option<String>,
}

/// Serves stored media to whoever holds a valid signed link (no API key: the signature is
/// the capability, so links work in browsers and `<img>` tags). A link names its job and
/// opens only that job's media; every refusal is in the contract's error shape.
#[utoipa::path(
    get, path = "/v1/media/{key}", tag = "media",
    params(
        ("key" = String, Path, description = "The stored object's key (may contain `/`)"),
        crate::openapi::MediaParams,
    ),
    responses(
        (status = 200, description = "The media file", content(
            ("image/png"), ("audio/wav"), ("video/mp4"), ("application/octet-stream"))),
        (status = 400, description = "The query string does not parse", body = ErrorBody),
        (status = 403, description = "No signature, a wrong one, or an expired link", body = ErrorBody),
        (status = 404, description = "No such media", body = ErrorBody),
        (status = 500, description = "The object store failed", body = ErrorBody),
    ),
)]
pub(crate) async fn get_media(
    req: HttpRequest,
    state: web::Data<Shared>,
) -> Result<HttpResponse, ApiError> {
    let key = req.match_info().query("key").to_owned();
    // Parsed here, not by the `Query` extractor, whose errors are plain text.
    let query = web::Query::<MediaQuery>::from_query(req.query_string()).map_err(|e| {
        ApiError::invalid(format!("the media link's query string is not valid: {e}"))
    })?;
    let (Some(job), Some(expires), Some(sig)) = (query.job, query.expires, query.sig.as_deref())
    else {
        return Err(ApiError::Forbidden("a signed link is required".into()));
    };
    let ttl = i64::try_from(state.settings.media.url_ttl_secs).unwrap_or(i64::MAX);
    state
        .signer
        .verify(job, &key, expires, sig, chrono::Utc::now().timestamp(), ttl)
        .map_err(|e| ApiError::Forbidden(e.to_string()))?;
    let (size, body) = state.media.get(&key).await.map_err(|e| match e {
        volley_media::MediaError::NotFound | volley_media::MediaError::BadKey(_) => {
            ApiError::NotFound("media")
        }
        other => ApiError::Internal(other.into()),
    })?;
    Ok(HttpResponse::Ok()
        .content_type(volley_media::content_type_for(&key))
        .no_chunking(size)
        .insert_header((header::CACHE_CONTROL, "private, max-age=3600"))
        .streaming(body))
}
