//! Who may use the internal API. `/internal/claims` and `/internal/leases` hand out and hold
//! jobs: anyone who could call them could claim and sit on other tenants' work. Workers prove
//! themselves with the shared token (`state.internal_token`) as `Authorization: Bearer`.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use sha2::{Digest, Sha256};
use volley_proto::state_api::ErrorBody;

use crate::Shared;

/// The expected token, kept as its SHA-256 digest: comparing digests takes the same time
/// whatever the length or content of what is presented.
pub(crate) struct InternalToken(Option<[u8; 32]>);

impl InternalToken {
    /// An empty token (allowed in dev mode only, see `Settings::check_internal_token`) leaves
    /// the internal API open.
    pub fn new(token: &str) -> InternalToken {
        InternalToken((!token.is_empty()).then(|| digest(token)))
    }

    pub(crate) fn is_open(&self) -> bool {
        self.0.is_none()
    }

    /// Whether an `Authorization` header value carries the token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(expected) = &self.0 else {
            return true;
        };
        let Some(presented) = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        constant_time_eq(&digest(presented.trim()), expected)
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equal without an early exit: the time taken says nothing about where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware of the `/internal` scope: 401 before the body is read unless the token is
/// presented.
pub(crate) async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let admitted = req.app_data::<web::Data<Shared>>().is_some_and(|s| {
        s.internal.admits(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        )
    });
    if !admitted {
        tracing::warn!(path = %req.path(), peer = ?req.peer_addr(), "internal API call without a valid token refused");
        let resp = HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
            .json(ErrorBody::new("a valid internal token is required"));
        return Ok(req.into_response(resp).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_is_admitted() {
        let t = InternalToken::new("0123456789abcdef0123456789abcdef");
        assert!(t.admits(Some(b"Bearer 0123456789abcdef0123456789abcdef")));
        assert!(!t.admits(None));
        assert!(!t.admits(Some(b"0123456789abcdef0123456789abcdef")));
        assert!(!t.admits(Some(b"Bearer 0123456789abcdef0123456789abcdeX")));
        assert!(!t.admits(Some(b"Bearer ")));
        assert!(!t.admits(Some(b"Basic 0123456789abcdef0123456789abcdef")));
        assert!(!t.admits(Some(b"Bearer \xff")));
        let open = InternalToken::new("");
        assert!(open.is_open() && open.admits(None));
    }
}
