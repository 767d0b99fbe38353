//! Volley's end-to-end tests, as one test binary: each file here is a module, so the whole
//! stack is compiled and linked once rather than once per file. Tests share this process
//! (not one each): nothing may set process-wide state of its own. Tracing is installed once
//! for all of them by the harness (`volley_harness::spans`); every stack has its own database,
//! queue prefix, ports and media directory.
//!
//! `cargo test -p volley-e2e --test e2e` runs them all; `... --test e2e -- batches::` one file.

mod architecture;
mod batches;
mod console;
mod deploy;
mod egress;
mod events;
mod fairness;
mod hostile_http;
mod hostile_state;
mod idempotency;
mod media_security;
mod observability;
mod providers;
mod reliability;
mod results;
mod schema;
mod webhooks;
