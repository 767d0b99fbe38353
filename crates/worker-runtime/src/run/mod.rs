//! The worker's loops: consuming jobs, running them, reporting outcomes, renewing leases,
//! listening for cancellations.

mod consume;
mod control;
mod job;
mod leases;
mod report;

pub use consume::{consume_forever, decode};
pub use control::control_forever;
pub use leases::renew_leases;
pub(crate) use report::Report;
pub use report::{hand_back_all, report_forever};
