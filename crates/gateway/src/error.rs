//! Errors policy: every route returns `ApiError`. Client mistakes map to their contract type
//! and status; anything unexpected is an opaque 500 whose cause is logged, never sent.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;
use volley_domain::FieldError;

use crate::openapi::schema;

/// Every error body: `{"error": {"type": ..., "message": ...}}`, and for `invalid_request` the
/// bad fields under `errors`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
}

/// Fields in alphabetical order: the bytes clients always got (see `views`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Every bad item or field (`invalid_request` only; absent when the request as a whole is
    /// the problem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldErrorBody>>,
    pub message: String,
    #[serde(rename = "type")]
    #[schema(schema_with = schema::error_type)]
    pub kind: &'static str,
}

/// One bad field: `index` is the item's position in `requests`, or `null` for the request as a
/// whole; `field` is a path from the body, such as `requests[2].body.messages[0].role`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FieldErrorBody {
    pub field: String,
    pub index: Option<usize>,
    pub message: String,
}

impl ErrorBody {
    pub fn new(kind: &'static str, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                errors: None,
                message: message.into(),
                kind,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
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
    /// The path exists, but not with this method; `allow` lists those it has.
    #[error("{method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: String },
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

    /// One error of each kind, for the API document's list of error types per status.
    pub(crate) fn every_kind() -> Vec<ApiError> {
        vec![
            ApiError::invalid(""),
            ApiError::TooLarge(String::new()),
            ApiError::BodyTooLarge(String::new()),
            ApiError::AsyncDisabled,
            ApiError::Unauthorized(""),
            ApiError::NotFound(""),
            ApiError::Forbidden(String::new()),
            ApiError::Unavailable,
            ApiError::IdempotencyMismatch,
            ApiError::IdempotencyInFlight,
            ApiError::RequestTimeout(String::new()),
            ApiError::RateLimited {
                message: "",
                retry_after_secs: 1,
            },
            ApiError::MethodNotAllowed {
                method: String::new(),
                allow: String::new(),
            },
            ApiError::Internal(anyhow::anyhow!("")),
        ]
    }

    pub(crate) fn kind(&self) -> &'static str {
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
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
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
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let mut body = ErrorBody::new(self.kind(), self.to_string());
        if let ApiError::InvalidRequest { errors, .. } = self
            && !errors.is_empty()
        {
            body.error.errors = Some(
                errors
                    .iter()
                    .map(|e| FieldErrorBody {
                        field: e.field.clone(),
                        index: e.index,
                        message: e.message.clone(),
                    })
                    .collect(),
            );
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
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            resp.insert_header((header::ALLOW, allow.as_str()));
        }
        if matches!(self, ApiError::RequestTimeout(_)) {
            // The rest of the body may still be on its way: do not read it as a next request.
            resp.insert_header((header::CONNECTION, "close"));
        }
        resp.json(body)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    async fn bytes(e: ApiError) -> String {
        let body = e.error_response().into_body();
        let b = actix_web::body::to_bytes(body).await.unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    /// The bytes clients got when the body was a `serde_json::json!` map.
    #[actix_web::test]
    async fn error_bytes() {
        assert_eq!(
            bytes(ApiError::NotFound("batch")).await,
            r#"{"error":{"message":"batch not found","type":"not_found"}}"#
        );
        let e = ApiError::InvalidRequest {
            message: "m".into(),
            errors: vec![FieldError {
                index: None,
                field: "label".into(),
                message: "must be a string".into(),
            }],
        };
        assert_eq!(
            bytes(e).await,
            r#"{"error":{"errors":[{"field":"label","index":null,"message":"must be a string"}],"message":"m","type":"invalid_request"}}"#
        );
        assert_eq!(
            bytes(ApiError::invalid("x")).await,
            r#"{"error":{"message":"x","type":"invalid_request"}}"#
        );
    }
}
