//! Errors policy: every route returns `ApiError`. Client mistakes map to their contract type
//! and status; anything unexpected is an opaque 500 whose cause is logged, never sent.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;
use volley_domain::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    BodyTooLarge(String),
    #[error("async processing is not enabled on this server")]
    AsyncDisabled,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("the service is temporarily unavailable")]
    Unavailable,
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyMismatch,
    #[error("a request with this Idempotency-Key is still in flight; retry later")]
    IdempotencyInFlight,
    #[error("{0}")]
    RequestTimeout(String),
    /// Too many requests for one API key; the client may retry after `retry_after_secs`.
    #[error("{message}")]
    RateLimited {
        message: &'static str,
        retry_after_secs: u64,
    },
    /// A batch over one of its key's quotas (jobs active, jobs per minute); nothing was
    /// created. The same type and status as `RateLimited`, with a message that names the quota.
    #[error("{message}")]
    OverQuota {
        message: String,
        retry_after_secs: u64,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            errors: Vec::new(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::TooLarge(_) | ApiError::BodyTooLarge(_) => "too_large",
            ApiError::AsyncDisabled => "async_disabled",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Unavailable => "unavailable",
            ApiError::IdempotencyMismatch => "idempotency_mismatch",
            ApiError::IdempotencyInFlight => "idempotency_in_flight",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::OverQuota { .. } => "rate_limited",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl From<volley_db::DbError> for ApiError {
    fn from(e: volley_db::DbError) -> Self {
        match e {
            // Pool exhausted or database down: the client may retry.
            volley_db::DbError::Pool(_) => ApiError::Unavailable,
            other => ApiError::Internal(other.into()),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::TooLarge(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::AsyncDisabled | ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::IdempotencyInFlight => StatusCode::CONFLICT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::OverQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let mut error = json!({"type": self.kind(), "message": self.to_string()});
        if let ApiError::InvalidRequest { errors, .. } = self
            && !errors.is_empty()
        {
            error["errors"] = errors
                .iter()
                .map(|e| json!({"index": e.index, "field": e.field, "message": e.message}))
                .collect();
        }
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let ApiError::RateLimited {
            retry_after_secs, ..
        }
        | ApiError::OverQuota {
            retry_after_secs, ..
        } = self
        {
            resp.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
        }
        if matches!(self, ApiError::RequestTimeout(_)) {
            // The rest of the body may still be on its way: do not read it as a next request.
            resp.insert_header((header::CONNECTION, "close"));
        }
        resp.json(json!({ "error": error }))
    }
}
