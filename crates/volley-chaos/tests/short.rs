//! The short fault-injection run, so that `cargo test --workspace` (and `make test`) proves the
//! recovery guarantees under crashes on every run. It starts the service binaries next to
//! `chaos` in the target directory: `make test` builds them first (`cargo build --workspace
//! --all-targets`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use volley_chaos::infra::Proc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_fault_injection_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("chaos.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chaos"));
    cmd.arg("--short");
    let mut chaos = Proc::spawn("chaos", cmd, &log).unwrap();
    // Generous: the short run takes about a minute alone and several on a busy machine.
    let status = match chaos.wait_exit(Duration::from_secs(900)).await {
        Some(s) => Some(s),
        None => {
            // SIGTERM lets it tear down its servers and directories.
            let _ = chaos.stop(libc::SIGTERM, Duration::from_secs(120)).await;
            None
        }
    };
    let out = std::fs::read_to_string(&log).unwrap();
    let summary = out
        .lines()
        .rfind(|l| l.starts_with("chaos: accepted="))
        .unwrap_or("chaos: no summary line")
        .to_owned();
    // Straight to the terminal, past the test harness's capture: the line is the result.
    let _ = writeln!(std::io::stderr(), "{summary}");
    assert!(
        matches!(status, Some(s) if s.success()),
        "chaos --short failed ({status:?}):\n{out}"
    );
    assert!(summary.contains(" lost=0 "), "{summary}");
    // Several API keys submitted, each counted on its own.
    assert!(summary.contains(" tenants=3 by_tenant="), "{summary}");
    // Fair dispatch held work while the faults ran (the suite's queues are full at 1).
    let held: i64 = summary
        .split_whitespace()
        .find_map(|f| f.strip_prefix("held_peak="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(held > 0, "nothing was held: {summary}");
}
