//! `volley`, the client CLI: submit a file of any size, watch it, download the results.
//!
//! Exit codes: 0 everything succeeded; 1 the work ran but not all of it succeeded (failed or
//! cancelled jobs, unfinished or missing results); 2 a usage or input problem (bad flags, bad
//! lines, nothing to act on), found before anything was changed; 3 the service could not be
//! used (unreachable, key refused, an unexpected answer).

/// `println!` that treats a closed stdout (`volley ls | head`) as the reader being done, not
/// as a panic.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod api;
mod input;
mod journal;
mod results;
mod submit;
mod watch;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::Value;

use crate::api::Api;

#[derive(Parser)]
#[command(
    name = "volley",
    version,
    about = "Volley's client: submit, watch and download batch inference"
)]
struct Cli {
    /// The gateway's base URL [default: the config file's `url`, else http://127.0.0.1:8080].
    #[arg(long, env = "VOLLEY_URL", global = true)]
    url: Option<String>,
    /// The API key (sent as a bearer token) [default: the config file's `api_key`].
    #[arg(long, env = "VOLLEY_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// A TOML file with `url` and `api_key`, used for what flags and variables leave unset
    /// [default: ~/.config/volley/config.toml, if it exists].
    #[arg(long, env = "VOLLEY_CLI_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a JSONL (or JSON array) file of requests and submit it in 256-item batches.
    Submit(submit::Args),
    /// Follow batches until every job has finished; exits 1 if any failed.
    Watch(watch::Args),
    /// Write results.jsonl (input order) and every media file into a directory.
    Results(results::Args),
    /// Your newest batches.
    Ls,
    /// One batch: status, counts and jobs.
    Get { id: String },
    /// Cancel every queued or running job of a batch.
    Cancel { id: String },
    /// The models the gateway serves and their endpoints.
    Models,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

/// Why the CLI stopped, and the exit code that says so.
#[derive(Debug)]
pub struct Fail {
    pub code: u8,
    pub message: String,
}

impl Fail {
    /// Some of the work did not succeed.
    pub fn incomplete(message: String) -> Fail {
        Fail { code: 1, message }
    }
    /// A usage or input problem.
    pub fn usage(message: String) -> Fail {
        Fail { code: 2, message }
    }
    /// The service could not be used.
    pub fn service(message: String) -> Fail {
        Fail { code: 3, message }
    }
    /// A local file could not be read or written.
    pub fn local(message: String) -> Fail {
        Fail { code: 3, message }
    }
}

/// How to print: JSON for scripts, or text; progress bars only on a terminal.
#[derive(Clone, Copy)]
pub struct Out {
    pub json: bool,
    pub tty: bool,
}

impl Out {
    pub fn print_json(&self, v: &Value) {
        outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    /// A progress note on stderr (stdout stays for results), unless printing JSON.
    pub fn note(&self, s: &str) {
        if !self.json {
            eprintln!("{s}");
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out {
        json: cli.json,
        tty: std::io::stderr().is_terminal(),
    };
    match run(cli, out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("volley: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The config file's settings: flags and environment variables come first.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    url: Option<String>,
    api_key: Option<String>,
}

fn file_config(path: Option<std::path::PathBuf>) -> Result<FileConfig, Fail> {
    let explicit = path.is_some();
    let Some(path) = path.or_else(|| {
        std::env::var_os("XDG_CONFIG_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config")))
            .map(|d| d.join("volley").join("config.toml"))
    }) else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| Fail::usage(format!("{}: {e}", path.display())))
        }
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(Fail::usage(format!("cannot read {}: {e}", path.display()))),
    }
}

async fn run(cli: Cli, out: Out) -> Result<(), Fail> {
    let file = file_config(cli.config)?;
    let url = cli
        .url
        .or(file.url)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let key = cli.api_key.or(file.api_key).filter(|k| !k.is_empty());
    let api = Api::new(&url, key)?;
    match cli.command {
        Command::Submit(a) => submit::run(&api, a, out).await,
        Command::Watch(a) => watch::run(&api, a, out).await,
        Command::Results(a) => results::run(&api, a, out).await,
        Command::Ls => ls(&api, out).await,
        Command::Get { id } => get(&api, &id, out).await,
        Command::Cancel { id } => cancel(&api, &id, out).await,
        Command::Models => models(&api, out).await,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "volley", &mut script);
            outln!("{}", String::from_utf8_lossy(&script).trim_end());
            Ok(())
        }
    }
}

fn batch_line(b: &Value) -> String {
    format!(
        "{:>6}  {:<10} {:>5} {:>9} {:>6} {:>9}  {}",
        b["id"].as_str().unwrap_or("?"),
        b["status"].as_str().unwrap_or("?"),
        b["total"],
        b["processed"],
        b["failed"],
        b["cancelled"],
        b["label"].as_str().unwrap_or(""),
    )
}

const BATCH_HEADER: &str = "    ID  STATUS     TOTAL PROCESSED FAILED CANCELLED  LABEL";

async fn ls(api: &Api, out: Out) -> Result<(), Fail> {
    let v = api.get("/v1/batches").await?;
    if out.json {
        out.print_json(&v);
        return Ok(());
    }
    outln!("{BATCH_HEADER}");
    for b in v["data"].as_array().into_iter().flatten() {
        outln!("{}", batch_line(b));
    }
    Ok(())
}

/// A batch id as the API spells it: digits.
fn batch_path(id: &str) -> Result<String, Fail> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Fail::usage(format!("\"{id}\" is not a batch id")));
    }
    Ok(format!("/v1/batches/{id}"))
}

async fn get(api: &Api, id: &str, out: Out) -> Result<(), Fail> {
    let v = api.get(&batch_path(id)?).await?;
    if out.json {
        out.print_json(&v);
        return Ok(());
    }
    outln!("{BATCH_HEADER}\n{}", batch_line(&v));
    outln!("\n{:>8}  {:<10} TYPE", "JOB", "STATUS");
    for j in v["jobs"].as_array().into_iter().flatten() {
        outln!(
            "{:>8}  {:<10} {}",
            j["id"].as_str().unwrap_or("?"),
            j["status"].as_str().unwrap_or("?"),
            j["inference_type"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

async fn cancel(api: &Api, id: &str, out: Out) -> Result<(), Fail> {
    let path = format!("{}/cancel", batch_path(id)?);
    let v = api.call(reqwest::Method::POST, &path, true).await?;
    if out.json {
        out.print_json(&v);
    } else {
        outln!("{BATCH_HEADER}\n{}", batch_line(&v));
    }
    Ok(())
}

async fn models(api: &Api, out: Out) -> Result<(), Fail> {
    let v = api.call(reqwest::Method::GET, "/v1/models", false).await?;
    if out.json {
        out.print_json(&v);
        return Ok(());
    }
    for m in v["data"].as_array().into_iter().flatten() {
        let eps: Vec<&str> = m["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        outln!("{:<16} {}", m["id"].as_str().unwrap_or("?"), eps.join(" "));
    }
    Ok(())
}
