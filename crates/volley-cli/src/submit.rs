//! `volley submit FILE`: validate everything locally, then send 256-item chunks with bounded
//! concurrency, each with an `Idempotency-Key` derived from the file's hash and the chunk's
//! index, recording each accepted chunk in the state file. A rerun skips recorded chunks and
//! re-sends the others with the same keys, so a chunk the gateway accepted but the CLI never
//! recorded comes back as a replay rather than as a second batch.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use volley_domain::Limits;

use crate::api::{Api, refused};
use crate::input::{self, Catalog};
use crate::journal::{self, Chunk, Journal};
use crate::{Fail, Out};

/// The contract's largest batch.
const CHUNK: usize = 256;
/// Attempts per chunk for failures worth retrying (unreachable, 5xx, 409 in flight).
const ATTEMPTS: u32 = 6;

#[derive(clap::Args)]
pub struct Args {
    /// A JSONL file (one `{"endpoint", "body", "custom_id"?}` per line) or a JSON array.
    file: PathBuf,
    /// The batches' label (default: the file's name).
    #[arg(long)]
    label: Option<String>,
    /// Metadata sent with every batch, `key=value` (repeatable).
    #[arg(long, value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// Chunks in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    concurrency: u16,
    /// Fault injection for tests: exit abruptly once the gateway has accepted this many
    /// chunks in this run, before recording the last one.
    #[arg(long, hide = true)]
    crash_after_chunks: Option<usize>,
}

/// `key=value`, with a key of 1-64 and a value of at most 512 characters.
fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got \"{s}\""))?;
    if k.is_empty() || k.chars().count() > 64 || v.chars().count() > 512 {
        return Err("keys are 1-64 characters and values at most 512".into());
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// At most this many metadata pairs per batch.
const MAX_METADATA: usize = 16;

pub async fn run(api: &Api, args: Args, out: Out) -> Result<(), Fail> {
    if args.metadata.len() > MAX_METADATA {
        return Err(Fail::usage(format!(
            "at most {MAX_METADATA} --metadata pairs"
        )));
    }
    let bytes = tokio::fs::read(&args.file)
        .await
        .map_err(|e| Fail::usage(format!("cannot read {}: {e}", args.file.display())))?;
    let models = api.call(Method::GET, "/v1/models", false).await?;
    let input = input::load(&bytes, &Catalog::from_models(&models), &Limits::default())?;
    let journal_path = Journal::path_for(&args.file);
    let label = args.label.clone().or_else(|| {
        args.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    });
    let mut journal = match Journal::load(&journal_path)? {
        Some(journal) if journal.sha256 == input.sha256 => journal,
        Some(_) => {
            return Err(Fail::usage(format!(
                "{} changed since {} was written; remove that file to submit it as new",
                args.file.display(),
                journal_path.display()
            )));
        }
        None => Journal {
            file: args.file.display().to_string(),
            sha256: input.sha256.clone(),
            label: label.clone(),
            chunks: input
                .items
                .chunks(CHUNK)
                .enumerate()
                .map(|(index, c)| Chunk {
                    index,
                    idempotency_key: format!("volley-cli-{}-{index}", &input.sha256[..32]),
                    custom_ids: c.iter().map(|i| i.custom_id.clone()).collect(),
                    batch_id: None,
                })
                .collect(),
        },
    };
    if args.label.is_some() && args.label != journal.label {
        out.note(&format!(
            "resuming with the label of the first run ({}), so that every chunk is sent as before",
            journal.label.as_deref().unwrap_or("none")
        ));
    }
    journal::remember_last(&journal_path).await?;
    let metadata: Map<String, Value> = args
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let total = journal.chunks.len();
    let done_before = journal
        .chunks
        .iter()
        .filter(|c| c.batch_id.is_some())
        .count();
    if done_before > 0 {
        out.note(&format!(
            "resuming: {done_before} of {total} chunks were already accepted"
        ));
    }
    let pending: Vec<(usize, String, Vec<u8>)> = journal
        .chunks
        .iter()
        .filter(|c| c.batch_id.is_none())
        .map(|c| {
            let requests: Vec<&Value> = input.items[c.index * CHUNK..]
                .iter()
                .take(CHUNK)
                .map(|i| &i.request)
                .collect();
            // The journal's label, so a rerun sends the very same bodies as the first run.
            let mut body = json!({"label": journal.label, "requests": requests});
            if !metadata.is_empty() {
                body["metadata"] = Value::Object(metadata.clone());
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            (c.index, c.idempotency_key.clone(), bytes)
        })
        .collect();
    let mut sent = futures::stream::iter(pending)
        .map(|(index, key, body)| async move { (index, send_chunk(api, &key, &body).await) })
        .buffer_unordered(usize::from(args.concurrency));
    let mut accepted = 0usize;
    let mut first_error: Option<Fail> = None;
    while let Some((index, r)) = sent.next().await {
        match r {
            Ok((batch_id, replayed)) => {
                accepted += 1;
                if args.crash_after_chunks == Some(accepted) {
                    // Dies between the gateway's answer and the journal write, the window the
                    // idempotency key exists for.
                    std::process::exit(70);
                }
                journal.chunks[index].batch_id = Some(batch_id.clone());
                journal.save(&journal_path).await?;
                out.note(&format!(
                    "chunk {}/{total}: batch {batch_id} ({} requests){}",
                    index + 1,
                    journal.chunks[index].custom_ids.len(),
                    if replayed {
                        ", already accepted before"
                    } else {
                        ""
                    }
                ));
            }
            Err(e) => {
                out.note(&format!("chunk {}/{total}: {}", index + 1, e.message));
                first_error.get_or_insert(e);
            }
        }
    }
    let ids = journal.batch_ids();
    if let Some(e) = first_error {
        return Err(Fail {
            code: e.code,
            message: format!(
                "{} of {total} chunks accepted; run the same command again to resume ({})",
                ids.len(),
                e.message
            ),
        });
    }
    let requests = input.items.len();
    if out.json {
        out.print_json(&json!({
            "state_file": journal_path.display().to_string(),
            "requests": requests,
            "batches": ids,
        }));
    } else {
        outln!(
            "submitted {requests} requests in {} batch{}: {} (state: {})",
            ids.len(),
            if ids.len() == 1 { "" } else { "es" },
            ids.join(" "),
            journal_path.display()
        );
    }
    Ok(())
}

/// Sends one chunk until the gateway decides: the batch id, and whether it was a replay.
async fn send_chunk(api: &Api, key: &str, body: &[u8]) -> Result<(String, bool), Fail> {
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        let retry = match api
            .send(Method::POST, "/v1/batches", Some(body), Some(key), true)
            .await
        {
            Ok(r) if r.status == StatusCode::ACCEPTED => {
                let id = r.body["id"]
                    .as_str()
                    .ok_or_else(|| Fail::service(format!("unexpected answer: {}", r.body)))?;
                return Ok((id.to_owned(), r.replayed));
            }
            // In flight elsewhere (an earlier attempt still running), or the service is
            // struggling: with the idempotency key, sending again cannot duplicate.
            Ok(r) if r.status == StatusCode::CONFLICT || r.status.is_server_error() => refused(&r),
            Ok(r) if r.body["error"]["type"] == "idempotency_mismatch" => {
                return Err(Fail::usage(
                    "this file was submitted in the last 24 hours with another label or \
                     metadata; use the same ones, or change the file"
                        .into(),
                ));
            }
            Ok(r) => return Err(refused(&r)),
            Err(e) if e.code == 3 => e,
            Err(e) => return Err(e),
        };
        if attempt >= ATTEMPTS {
            return Err(retry);
        }
        attempt += 1;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(8));
    }
}
