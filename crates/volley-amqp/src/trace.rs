//! Trace context across the broker: W3C `traceparent`/`tracestate` travel in the AMQP message
//! headers, from a producer span on publish to a consumer span on delivery.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::Span;

pub use volley_telemetry::trace::producer_span;

/// The headers to publish with: `extra`, plus the span's trace context when tracing is on.
/// `None` when there are none (no header table is sent then).
pub fn headers(extra: Vec<(String, String)>, span: &Span) -> Option<FieldTable> {
    let trace = volley_telemetry::trace::context_headers(span);
    if extra.is_empty() && trace.is_empty() {
        return None;
    }
    let mut t = FieldTable::default();
    // Trace headers last: they win over stale ones copied from an earlier delivery.
    for (k, v) in extra.into_iter().chain(trace) {
        if let Ok(k) = ShortString::try_new(k) {
            t.insert(k, AMQPValue::LongString(LongString::from(v)));
        }
    }
    Some(t)
}

/// A header's value as text, if it is a string.
fn header<'a>(table: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The consumer span for processing `delivery` from `queue` in `service`: a child of the
/// producer span whose context came in the headers, and linked to it (messaging
/// conventions). Disabled, at the cost of a branch, when tracing is off.
pub fn consumer_span(service: &str, queue: &str, delivery: &Delivery) -> Span {
    let props = &delivery.properties;
    let span = volley_telemetry::trace::consumer_span(
        service,
        queue,
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        props.message_id().as_ref().map(ShortString::as_str),
    );
    if !span.is_disabled() {
        let table = props.headers().as_ref();
        volley_telemetry::trace::continue_remote(&span, |k| header(table, k), true);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_header_table_without_headers_or_tracing() {
        assert!(headers(Vec::new(), &Span::none()).is_none());
        let t = headers(vec![("x-origin".into(), "replay".into())], &Span::none()).unwrap();
        assert_eq!(header(Some(&t), "x-origin"), Some("replay"));
        assert_eq!(header(Some(&t), "traceparent"), None);
    }
}
