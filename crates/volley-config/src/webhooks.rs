//! `[webhooks]`: how batch-state delivers webhook events and where they may go.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Whether this batch-state replica delivers events (replicas share the work).
    pub deliver: bool,
    /// Delays between attempts, in milliseconds; after the last one fails the event fails and
    /// its endpoint is paused. Each delay is jittered by up to ±10%.
    pub schedule_ms: Vec<u64>,
    /// One attempt's whole HTTP exchange.
    pub timeout_ms: u64,
    /// How much of a response body is read and kept for the delivery log.
    pub response_cap_bytes: usize,
    /// Deliveries in flight per replica.
    pub concurrency: usize,
    /// How often due events are looked for when none were found.
    pub poll_interval_ms: u64,
    /// How long a claimed event is left to its replica before another may try it.
    pub lease_ms: u64,
    /// After a key's webhook secret is rotated, how long deliveries are signed with the old
    /// secret too.
    pub secret_grace_secs: u64,
    /// Hosts (`host`, `host:port` or `*.domain`) that may be sent plain `http` and on any
    /// port (a pattern's port, when given). Everything else must be `https` on
    /// `allowed_ports`.
    pub http_hosts: Vec<String>,
    /// Ports `https` endpoints may use.
    pub allowed_ports: Vec<u16>,
    /// Deliver to loopback, private and CGNAT addresses (a receiver on the operator's own
    /// network). Link-local, metadata, multicast and reserved addresses are refused always.
    pub allow_private_network: bool,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            deliver: true,
            // 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: about a day and a few hours.
            schedule_ms: vec![
                5_000, 300_000, 1_800_000, 7_200_000, 18_000_000, 36_000_000, 36_000_000,
            ],
            timeout_ms: 10_000,
            response_cap_bytes: 1_024,
            concurrency: 32,
            poll_interval_ms: 500,
            lease_ms: 60_000,
            secret_grace_secs: 86_400,
            http_hosts: Vec::new(),
            allowed_ports: vec![443],
            allow_private_network: false,
        }
    }
}
