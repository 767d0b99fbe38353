//! `chaos`: runs the fault-injection suite and prints one summary line, e.g.
//! `chaos: accepted=10240 terminal=10240 lost=0 duplicates=3 faults=24 ...`.
//! Exits 1 if any accepted job was lost or anything was inconsistent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use volley_chaos::suite::{self, Plan, RunOptions};

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Kill and restart every part of Volley under load, then check nothing was lost"
)]
struct Cli {
    /// The short version `make test` runs: a few hundred jobs, every kind of fault once.
    #[arg(long)]
    short: bool,
    /// Batches to get accepted.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    batches: Option<u32>,
    /// Most jobs in one batch (1 to 256).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    max_jobs: Option<u32>,
    /// Rounds of faults (the second and later add kill -9 of RabbitMQ and PostgreSQL).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10))]
    rounds: Option<u32>,
    /// Seed of the load and the fault order (default: from the clock); printed, to replay a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the working directory (logs and data) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Where the service binaries are (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let mut plan = if cli.short {
        Plan::short(seed)
    } else {
        Plan::full(seed)
    };
    if let Some(b) = cli.batches {
        plan.batches = b as usize;
    }
    if let Some(m) = cli.max_jobs {
        plan.jobs = (plan.jobs.0.min(m as usize), m as usize);
    }
    if let Some(r) = cli.rounds {
        plan.rounds = r as usize;
    }
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => match std::env::current_exe() {
            Ok(p) => p.parent().map(PathBuf::from).unwrap_or_default(),
            Err(e) => {
                eprintln!("chaos: cannot find the service binaries: {e}");
                return ExitCode::from(2);
            }
        },
    };
    eprintln!(
        "chaos: seed {seed}, {} batches of {}-{} jobs, {} round(s) of faults",
        plan.batches, plan.jobs.0, plan.jobs.1, plan.rounds
    );
    let opts = RunOptions {
        bin_dir,
        keep: cli.keep,
    };
    // Ctrl-C or SIGTERM drops the run, and with it every process and directory it started.
    let outcome = tokio::select! {
        r = suite::run(plan, opts) => r,
        _ = volley_telemetry::shutdown_signal() => {
            eprintln!("chaos: interrupted; cleaned up");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(summary) => {
            for p in summary.problems.iter().take(30) {
                eprintln!("chaos: PROBLEM: {p}");
            }
            if summary.problems.len() > 30 {
                eprintln!(
                    "chaos: ... and {} more problems",
                    summary.problems.len() - 30
                );
            }
            println!("{}", summary.line());
            if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: the run could not complete: {e:#}");
            ExitCode::FAILURE
        }
    }
}
