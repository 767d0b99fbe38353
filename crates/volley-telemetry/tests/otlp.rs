//! The real exporter: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans go over OTLP/HTTP
//! (protobuf) to a collector, and `Telemetry::shutdown` flushes them. A minimal OTLP receiver
//! on loopback stands in for the collector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// Accepts OTLP/HTTP requests and sends each decoded body on `tx`.
fn receiver(listener: TcpListener, tx: mpsc::Sender<(String, ExportTraceServiceRequest)>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .unwrap();
        let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
        let _ = tx.send((
            path,
            ExportTraceServiceRequest::decode(body.as_slice()).unwrap(),
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_are_flushed_on_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || receiver(listener, tx));
    // SAFETY: this test binary holds this one test; nothing else reads the environment
    // concurrently.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        std::env::set_var("OTEL_SERVICE_NAME", "otlp-test");
    }
    let telemetry = volley_telemetry::init("gateway");
    assert!(telemetry.tracing_enabled());
    {
        let span = volley_telemetry::trace::producer_span("volley.jobs", "image", Some("42"));
        let headers = volley_telemetry::trace::context_headers(&span);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[0].0, "traceparent");
        assert!(headers[0].1.starts_with("00-") && headers[0].1.ends_with("-01"));
    }
    // Nothing is sent before the batch processor's delay: the shutdown flushes it.
    telemetry.shutdown().await;
    let (path, req) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(path, "/v1/traces");
    let rs = &req.resource_spans[0];
    let service = rs
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref()?.value.clone());
    assert_eq!(service, Some(Value::StringValue("otlp-test".into())));
    let span = &rs.scope_spans[0].spans[0];
    assert_eq!(span.name, "publish volley.jobs");
    let attr = |k: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == k)
            .and_then(|kv| kv.value.as_ref()?.value.clone())
    };
    assert_eq!(
        attr("messaging.system"),
        Some(Value::StringValue("rabbitmq".into()))
    );
    assert_eq!(
        attr("messaging.message.id"),
        Some(Value::StringValue("42".into()))
    );
}
