//! `batchctl`: what an operator runs by hand or from a deploy job.
//!
//! Exit codes: 0 done, 1 failed (or nothing found to act on), 2 bad usage.

mod dlq;
mod status;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use volley_amqp::{Names, connect, declare_topology, queue_depth};
use volley_config::Settings;
use volley_db::{Db, QuotaChange};

#[derive(Parser)]
#[command(name = "batchctl", version, about = "Operate a Volley installation")]
struct Cli {
    /// PostgreSQL URL (default: the configuration's `database_url`).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// RabbitMQ URL (default: the configuration's `amqp_url`).
    #[arg(long, global = true)]
    amqp_url: Option<String>,
    /// Prefix of queue and exchange names (default: the configuration's `queue_prefix`).
    #[arg(long, global = true)]
    queue_prefix: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations.
    Migrate,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Messages waiting and consumers on every work queue and its dead-letter queue.
    Queues,
    /// One screen per inference type: queue depth, consumers, queued and running jobs, the
    /// oldest wait, dead letters.
    Status,
    /// Dead-lettered messages: undecodable, or delivered more than the delivery limit.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Recover a batch's jobs.
    Batches {
        #[command(subcommand)]
        command: BatchesCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show dead letters (queue, job, batch, reason, count); they stay where they are.
    List {
        #[command(flatten)]
        from: DlqSource,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to the queue they came from; each is removed from its
    /// dead-letter queue only once RabbitMQ confirmed the copy. A replayed job that has
    /// finished meanwhile is refused by its claim, and a replayed outcome that is stale
    /// matches nothing: replaying never changes a finished job.
    Replay {
        #[command(flatten)]
        from: DlqSource,
        /// Only messages of this batch (job messages carry it; events are looked up).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        batch: Option<i64>,
        /// Only messages dead-lettered for this reason.
        #[arg(long, value_parser = dlq::REASONS)]
        reason: Option<String>,
        /// Also replay messages that cannot be decoded (they will be dead-lettered again
        /// unless the consumers changed).
        #[arg(long)]
        include_undecodable: bool,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
struct DlqSource {
    /// Only this queue's dead letters: llm, image, video, music, tts, events, or a full
    /// queue name (default: every queue).
    #[arg(long)]
    queue: Option<String>,
    /// At most this many messages per dead-letter queue.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    limit: u32,
}

#[derive(Subcommand)]
enum BatchesCommand {
    /// Publish a batch's unfinished jobs again: QUEUED jobs (say their messages were lost or
    /// purged) and PROCESSING jobs whose lease ran out. Jobs running under a live lease are
    /// left alone: their worker is alive, and handing them out again would run them twice.
    /// batch-state's sweeper publishes them on its next pass.
    Redispatch {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
    },
    /// Re-run a batch's FAILED jobs as new attempts under the same job ids, each with a
    /// fresh retry budget. Other jobs do not change; running it again when nothing failed
    /// changes nothing.
    RetryFailed {
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        id: i64,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; the key itself is printed once, as the last line.
    Create {
        #[arg(long)]
        name: String,
        /// Whose batches the key sees (default: the name). Keys with one owner share batches.
        #[arg(long)]
        owner: Option<String>,
        /// An operator's key: it may also read `GET /v1/admin/status` (the console's operator
        /// page), the whole stack's queues and dead letters.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Change a key's quotas or weight, by id or name. Batches already accepted are not
    /// affected.
    Update {
        id_or_name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id or name.
    Revoke { id_or_name: String },
    /// Give a key a new webhook signing secret (printed once). Deliveries are signed with the
    /// old one too for `webhooks.secret_grace_secs`, so receivers can switch over.
    RotateWebhookSecret { id_or_name: String },
}

/// Per-key quotas (a batch that would pass one is refused whole with 429 `rate_limited` and a
/// `Retry-After`) and the key's share of fair dispatch.
#[derive(Args)]
struct QuotaArgs {
    /// Turns in a row the key's owner takes when a modality's work is released round-robin
    /// over owners: 3 gets three batches (or queue-room slices) out for each one of an owner
    /// with 1. From 1 (the default) to 100; applies to batches submitted afterwards.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=i64::from(volley_db::MAX_WEIGHT)))]
    weight: Option<i32>,
    /// At most this many of the key's jobs QUEUED or PROCESSING at once (`none`: no limit).
    #[arg(long, value_name = "N|none", value_parser = parse_limit)]
    max_active_jobs: Option<QuotaChange>,
    /// At most this many jobs submitted by the key in any 60 seconds (`none`: no limit).
    #[arg(long, value_name = "N|none", value_parser = parse_limit)]
    max_jobs_per_minute: Option<QuotaChange>,
}

impl QuotaArgs {
    fn is_empty(&self) -> bool {
        self.max_active_jobs.is_none()
            && self.max_jobs_per_minute.is_none()
            && self.weight.is_none()
    }
}

/// The largest limit accepted: the column is a 32-bit integer.
const MAX_LIMIT: i64 = i32::MAX as i64;

fn parse_limit(s: &str) -> Result<QuotaChange, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(QuotaChange::Unlimited);
    }
    let n: i64 = s
        .parse()
        .map_err(|_| format!("expected a whole number from 1 to {MAX_LIMIT}, or none"))?;
    if !(1..=MAX_LIMIT).contains(&n) {
        return Err(format!("must be from 1 to {MAX_LIMIT}, or none"));
    }
    i32::try_from(n)
        .map(QuotaChange::Max)
        .map_err(|_| format!("must be from 1 to {MAX_LIMIT}"))
}

fn show_limit(v: Option<i32>) -> String {
    v.map_or_else(|| "-".into(), |n| n.to_string())
}

fn valid_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 {
        return Err("must be 1 to 128 characters".into());
    }
    if s.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("batchctl: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(url) = cli.database_url {
        settings.database_url = url;
    }
    if let Some(url) = cli.amqp_url {
        settings.amqp_url = url;
    }
    if let Some(p) = cli.queue_prefix {
        settings.queue_prefix = p;
    }
    match run(cli.command, settings).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("batchctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    let db = Db::new(&settings.database_url, 2)?;
    match command {
        Command::Migrate => {
            let applied = db.migrate().await?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for v in applied {
                println!("applied migration {v}");
            }
        }
        Command::Keys { command } => match command {
            KeysCommand::Create {
                name,
                owner,
                admin,
                quotas,
            } => {
                for (what, v) in [("--name", Some(&name)), ("--owner", owner.as_ref())] {
                    if let Some(v) = v
                        && let Err(e) = valid_name(v)
                    {
                        eprintln!("batchctl: {what} {e}");
                        return Ok(ExitCode::from(2));
                    }
                }
                let k = db.create_key(&name, owner.as_deref()).await?;
                if admin {
                    db.set_admin(k.key.id, true).await?;
                }
                if !quotas.is_empty() {
                    db.set_quotas(
                        &k.key.id.to_string(),
                        quotas.max_active_jobs.unwrap_or(QuotaChange::Keep),
                        quotas.max_jobs_per_minute.unwrap_or(QuotaChange::Keep),
                        quotas.weight,
                    )
                    .await?;
                }
                println!(
                    "created {}key {} (name {}, owner {}); it is shown only now:",
                    if admin { "admin " } else { "" },
                    k.key.id,
                    k.key.name,
                    k.key.owner
                );
                println!(
                    "webhook signing secret (verify deliveries with it): {}",
                    k.webhook_secret
                );
                println!("{}", k.secret);
            }
            KeysCommand::Update { id_or_name, quotas } => {
                if quotas.is_empty() {
                    eprintln!(
                        "batchctl: nothing to change: give --max-active-jobs, \
                         --max-jobs-per-minute and/or --weight"
                    );
                    return Ok(ExitCode::from(2));
                }
                let changed = db
                    .set_quotas(
                        &id_or_name,
                        quotas.max_active_jobs.unwrap_or(QuotaChange::Keep),
                        quotas.max_jobs_per_minute.unwrap_or(QuotaChange::Keep),
                        quotas.weight,
                    )
                    .await?;
                if changed.is_empty() {
                    eprintln!("batchctl: no key with id or name {id_or_name:?}");
                    return Ok(ExitCode::from(1));
                }
                for (id, q, weight) in changed {
                    println!(
                        "key {id}: max active jobs {}, max jobs per minute {}, weight {weight}",
                        show_limit(q.max_active_jobs),
                        show_limit(q.max_jobs_per_minute)
                    );
                }
            }
            KeysCommand::List => {
                println!(
                    "{:<6} {:<24} {:<24} {:<12} {:<6} {:>10} {:>10} {:>6} {:<20} REVOKED",
                    "ID",
                    "NAME",
                    "OWNER",
                    "PREFIX",
                    "ADMIN",
                    "ACTIVE",
                    "PER MIN",
                    "WEIGHT",
                    "CREATED"
                );
                for k in db.list_keys().await? {
                    println!(
                        "{:<6} {:<24} {:<24} {:<12} {:<6} {:>10} {:>10} {:>6} {:<20} {}",
                        k.id,
                        k.name,
                        k.owner,
                        k.key_prefix,
                        if k.admin { "yes" } else { "-" },
                        show_limit(k.max_active_jobs),
                        show_limit(k.max_jobs_per_minute),
                        k.dispatch_weight,
                        k.created_at.format("%Y-%m-%d %H:%M:%S"),
                        k.revoked_at
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
            KeysCommand::Revoke { id_or_name } => {
                let n = db.revoke_key(&id_or_name).await?;
                if n == 0 {
                    eprintln!("batchctl: no live key with id or name {id_or_name:?}");
                    return Ok(ExitCode::from(1));
                }
                println!("revoked {n} key(s)");
            }
            KeysCommand::RotateWebhookSecret { id_or_name } => {
                let rotated = db.rotate_webhook_secret(&id_or_name).await?;
                if rotated.is_empty() {
                    eprintln!("batchctl: no live key with id or name {id_or_name:?}");
                    return Ok(ExitCode::from(1));
                }
                println!(
                    "new webhook signing secret(s); the old one also signs for {} s:",
                    settings.webhooks.secret_grace_secs
                );
                for (id, secret) in rotated {
                    println!("key {id}: {secret}");
                }
            }
        },
        Command::Queues => return queues(&settings).await,
        Command::Status => return status::run(&settings, &db).await,
        Command::Dlq { command } => return dead_letters(command, &settings, &db).await,
        Command::Batches { command } => match command {
            BatchesCommand::Redispatch { id } => {
                let Some(r) = db.redispatch_batch(id).await? else {
                    eprintln!("batchctl: no batch {id}");
                    return Ok(ExitCode::from(1));
                };
                println!(
                    "batch {id}: {} queued job(s) and {} job(s) whose worker was lost will be \
                     published again by batch-state's sweeper",
                    r.queued, r.abandoned
                );
                if r.running > 0 {
                    println!(
                        "{} job(s) run under a live lease and were left alone (their workers \
                         are alive; a lease that runs out is recovered by the sweeper)",
                        r.running
                    );
                }
                println!("{} job(s) already finished", r.finished);
            }
            BatchesCommand::RetryFailed { id } => {
                let Some(ids) = db.retry_failed(id).await? else {
                    eprintln!("batchctl: no batch {id}");
                    return Ok(ExitCode::from(1));
                };
                if ids.is_empty() {
                    println!("batch {id} has no FAILED jobs; nothing changed");
                } else {
                    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
                    println!(
                        "batch {id}: {} failed job(s) queued again as new attempts: {}",
                        ids.len(),
                        list.join(", ")
                    );
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

async fn queues(settings: &Settings) -> anyhow::Result<ExitCode> {
    let names = Names::new(&settings.queue_prefix);
    let conn = connect(&settings.amqp_url, "batchctl").await?;
    let ch = conn.create_channel().await?;
    declare_topology(&ch, &names).await?;
    println!(
        "{:<40} {:>10} {:>10} {:>14}",
        "QUEUE", "MESSAGES", "CONSUMERS", "DEAD LETTERS"
    );
    for q in names.work_queues() {
        let (messages, consumers) = queue_depth(&ch, &q).await?;
        let (dead, _) = queue_depth(&ch, &Names::dlq(&q)).await?;
        println!("{q:<40} {messages:>10} {consumers:>10} {dead:>14}");
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(
    command: DlqCommand,
    settings: &Settings,
    db: &Db,
) -> anyhow::Result<ExitCode> {
    let names = Names::new(&settings.queue_prefix);
    let from = match &command {
        DlqCommand::List { from, .. } | DlqCommand::Replay { from, .. } => from,
    };
    let queues = match &from.queue {
        Some(q) => match dlq::resolve_queue(&names, q) {
            Ok(q) => vec![q],
            Err(e) => {
                eprintln!("batchctl: --queue: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => names.work_queues(),
    };
    let conn = connect(&settings.amqp_url, "batchctl-dlq").await?;
    let get = conn.create_channel().await?;
    declare_topology(&get, &names).await?;
    let (mut letters, truncated) = dlq::fetch(&get, &names, &queues, from.limit as usize).await?;
    let code = match command {
        DlqCommand::List { json, .. } => {
            // Events carry only their job; the batch comes from PostgreSQL when it answers.
            fill_event_batches(db, &mut letters).await;
            if json {
                for d in &letters {
                    println!("{}", d.to_json());
                }
            } else {
                print_table(&letters);
                println!("{} dead-lettered message(s)", letters.len());
            }
            for d in &letters {
                dlq::give_back(&get, d).await?;
            }
            ExitCode::SUCCESS
        }
        DlqCommand::Replay {
            batch,
            reason,
            include_undecodable,
            dry_run,
            ..
        } => {
            if batch.is_some() {
                // Needed to match events to the batch: without it, filtering would be a guess.
                let ids: Vec<i64> = letters.iter().filter_map(|d| d.content.job_id()).collect();
                let map = db.batches_of_jobs(ids).await?;
                dlq::fill_batches(&mut letters, &map);
            }
            let filter = dlq::Filter {
                batch,
                reason,
                include_undecodable,
            };
            let publish = dlq::confirm_channel(&conn).await?;
            let (mut replayed, mut skipped, mut undecodable, mut failed) = (0, 0, 0, 0);
            for d in &letters {
                match filter.verdict(d) {
                    dlq::Verdict::Replay if dry_run => {
                        println!("would replay {}", describe(d));
                        replayed += 1;
                        dlq::give_back(&get, d).await?;
                    }
                    dlq::Verdict::Replay => match dlq::replay(&get, &publish, d).await {
                        Ok(()) => {
                            println!("replayed {}", describe(d));
                            replayed += 1;
                        }
                        Err(e) => {
                            eprintln!("batchctl: could not replay {}: {e:#}", describe(d));
                            failed += 1;
                            dlq::give_back(&get, d).await?;
                        }
                    },
                    dlq::Verdict::NotSelected => {
                        skipped += 1;
                        dlq::give_back(&get, d).await?;
                    }
                    dlq::Verdict::Undecodable => {
                        undecodable += 1;
                        dlq::give_back(&get, d).await?;
                    }
                }
            }
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{verb} {replayed}; left in place: {skipped} not matching the filters, \
                 {undecodable} undecodable (--include-undecodable to replay them too)"
            );
            if failed > 0 {
                eprintln!(
                    "batchctl: {failed} message(s) could not be replayed and stay dead-lettered"
                );
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    };
    for t in truncated {
        println!("{t} holds more than --limit messages; the rest were not looked at");
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(code)
}

async fn fill_event_batches(db: &Db, letters: &mut [dlq::DeadLetter]) {
    let ids: Vec<i64> = letters
        .iter()
        .filter(|d| matches!(d.content, dlq::Content::Event { .. }))
        .filter_map(|d| d.content.job_id())
        .collect();
    if ids.is_empty() {
        return;
    }
    match db.batches_of_jobs(ids).await {
        Ok(map) => dlq::fill_batches(letters, &map),
        Err(e) => eprintln!("batchctl: batches of dead-lettered events unknown: {e}"),
    }
}

fn describe(d: &dlq::DeadLetter) -> String {
    let job = d
        .content
        .job_id()
        .map(|j| format!("job {j}"))
        .unwrap_or_else(|| "an undecodable message".into());
    format!(
        "{job} to {} ({}, dead-lettered {} time(s))",
        d.queue, d.reason, d.count
    )
}

fn print_table(letters: &[dlq::DeadLetter]) {
    println!(
        "{:<28} {:>10} {:>8} {:<16} {:>5}  CONTENT",
        "QUEUE", "JOB", "BATCH", "REASON", "COUNT"
    );
    let dash = || "-".to_string();
    for d in letters {
        println!(
            "{:<28} {:>10} {:>8} {:<16} {:>5}  {}",
            d.queue,
            d.content
                .job_id()
                .map(|j| j.to_string())
                .unwrap_or_else(dash),
            d.batch_id.map(|b| b.to_string()).unwrap_or_else(dash),
            d.reason,
            d.count,
            d.content
        );
    }
}
