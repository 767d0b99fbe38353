//! Volley's fault-injection suite (`make chaos`; a short run is part of `make test`).
//!
//! [`infra`] runs processes and private servers (a RabbitMQ node and a PostgreSQL cluster of
//! the suite's own, on spare loopback ports); [`suite`] starts the real service binaries on
//! them, submits mixed batches from several tenants (API keys) while killing and restarting
//! every part of the system, and checks that every accepted job ended in exactly one
//! consistent terminal state; [`webhooks`] counts the webhook events of those batches at the
//! suite's receiver, each tenant's verified with that tenant's secret.

pub mod infra;
pub mod suite;
pub mod webhooks;
