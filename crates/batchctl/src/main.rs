//! `batchctl`: what an operator runs by hand or from a deploy job.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use volley_config::Settings;
use volley_db::Db;

#[derive(Parser)]
#[command(name = "batchctl", version, about = "Operate a Volley installation")]
struct Cli {
    /// PostgreSQL URL (default: the configuration's `database_url`).
    #[arg(long, global = true)]
    database_url: Option<String>,
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
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id or name.
    Revoke { id_or_name: String },
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
            KeysCommand::Create { name, owner } => {
                for (what, v) in [("--name", Some(&name)), ("--owner", owner.as_ref())] {
                    if let Some(v) = v
                        && let Err(e) = valid_name(v)
                    {
                        eprintln!("batchctl: {what} {e}");
                        return Ok(ExitCode::from(2));
                    }
                }
                let k = db.create_key(&name, owner.as_deref()).await?;
                println!(
                    "created key {} (name {}, owner {}); it is shown only now:",
                    k.key.id, k.key.name, k.key.owner
                );
                println!("{}", k.secret);
            }
            KeysCommand::List => {
                println!(
                    "{:<6} {:<24} {:<24} {:<12} {:<20} REVOKED",
                    "ID", "NAME", "OWNER", "PREFIX", "CREATED"
                );
                for k in db.list_keys().await? {
                    println!(
                        "{:<6} {:<24} {:<24} {:<12} {:<20} {}",
                        k.id,
                        k.name,
                        k.owner,
                        k.key_prefix,
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
        },
    }
    Ok(ExitCode::SUCCESS)
}
