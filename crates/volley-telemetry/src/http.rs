//! HTTP plumbing for every service's actix-web server: the [`Observe`] middleware (a server
//! span continuing the caller's trace, plus request metrics) and the `/metrics` resource.
//!
//! *Why our own middleware:* tracing-actix-web has no release for opentelemetry 0.33, and
//! without it an incoming `traceparent` would be ignored.

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::{HttpResponse, web};
use tracing::{Instrument, Span};

use crate::metrics::Metrics;
use crate::trace;

/// Paths probed every few seconds: counted, but never traced (they would drown real traces).
const UNTRACED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Server spans and request metrics for every request of an app:
/// `App::new().wrap(Observe::new("gateway", metrics.clone()))`.
#[derive(Clone)]
pub struct Observe {
    service: &'static str,
    metrics: Arc<Metrics>,
}

impl Observe {
    pub fn new(service: &'static str, metrics: Arc<Metrics>) -> Observe {
        Observe { service, metrics }
    }
}

impl<S, B> Transform<S, ServiceRequest> for Observe
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = ObserveService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ObserveService {
            inner: Rc::new(service),
            observe: self.clone(),
        }))
    }
}

pub struct ObserveService<S> {
    inner: Rc<S>,
    observe: Observe,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

impl<S, B> Service<ServiceRequest> for ObserveService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    actix_web::dev::forward_ready!(inner);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let started = Instant::now();
        // Bounded like the metric label: a client picks the method, and span names are
        // grouped on by trace back-ends too.
        let method = crate::metrics::method_label(req.method().as_str());
        let span = if UNTRACED.contains(&req.path()) {
            Span::none()
        } else {
            server_span(self.observe.service, method, req.path())
        };
        if !span.is_disabled() {
            let headers = req.headers();
            trace::continue_remote(
                &span,
                |k| headers.get(k).and_then(|v| v.to_str().ok()),
                false,
            );
        }
        let fut = self.inner.call(req);
        let metrics = self.observe.metrics.clone();
        Box::pin(async move {
            let res = fut.instrument(span.clone()).await;
            let (route, status) = match &res {
                Ok(r) => (r.request().match_pattern(), r.status()),
                Err(e) => (None, e.as_response_error().status_code()),
            };
            // Unmatched paths share one label, so a scan cannot grow the series without bound.
            let route = route.unwrap_or_else(|| "unmatched".to_owned());
            metrics
                .http
                .observe(&route, method, status.as_u16(), started.elapsed());
            if !span.is_disabled() {
                trace::rename(&span, format!("{method} {route}"));
                span.record("http.route", route.as_str());
                span.record("http.response.status_code", status.as_u16());
                if status.is_server_error() {
                    trace::record_error(&span);
                }
            }
            res
        })
    }
}

fn server_span(service: &'static str, method: &str, path: &str) -> Span {
    tracing::info_span!(
        "http.server",
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        volley.service = service,
        http.request.method = %method,
        http.route = tracing::field::Empty,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    )
}

/// `GET /metrics`: the Prometheus text exposition of `metrics`. Mount with
/// `.service(volley_telemetry::http::metrics_resource(metrics.clone()))`.
pub fn metrics_resource(metrics: Arc<Metrics>) -> actix_web::Resource {
    web::resource("/metrics")
        .app_data(web::Data::from(metrics))
        .route(web::get().to(serve_metrics))
}

async fn serve_metrics(metrics: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{App, test};

    #[actix_web::test]
    async fn counts_requests_by_route_pattern() {
        let m = Metrics::new().unwrap();
        let app = test::init_service(
            App::new()
                .wrap(Observe::new("test", m.clone()))
                .service(metrics_resource(m.clone()))
                .route(
                    "/v1/jobs/{id}",
                    web::get().to(|| async { HttpResponse::NotFound().finish() }),
                ),
        )
        .await;
        for id in ["1", "2"] {
            let req = test::TestRequest::get()
                .uri(&format!("/v1/jobs/{id}"))
                .to_request();
            assert_eq!(test::call_service(&app, req).await.status(), 404);
        }
        let req = test::TestRequest::get().uri("/nope").to_request();
        test::call_service(&app, req).await;
        let req = test::TestRequest::get().uri("/metrics").to_request();
        let body = test::call_and_read_body(&app, req).await;
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains(
                r#"volley_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"volley_http_requests_total{method="GET",route="unmatched",status="404"} 1"#
        ));
        assert!(text.contains("volley_http_request_duration_seconds_bucket"));
    }

    #[actix_web::test]
    async fn invented_methods_share_one_label() {
        let m = Metrics::new().unwrap();
        let app = test::init_service(
            App::new()
                .wrap(Observe::new("test", m.clone()))
                .service(metrics_resource(m.clone())),
        )
        .await;
        for i in 0..50 {
            let method = actix_web::http::Method::from_bytes(format!("X{i}").as_bytes()).unwrap();
            let req = test::TestRequest::default()
                .method(method)
                .uri("/anything")
                .to_request();
            test::call_service(&app, req).await;
        }
        let text = m.render();
        assert!(
            text.contains(
                r#"volley_http_requests_total{method="OTHER",route="unmatched",status="404"} 50"#
            ),
            "{text}"
        );
        assert!(!text.contains("X1"), "{text}");
    }
}
