//! `volley results --out DIR`: `results.jsonl` in input order (one line per job, with its
//! custom_id) and every media file, named from the custom_id or the job id. Resumable: a file
//! is downloaded to `NAME.part`, its size checked against what the server announced, then
//! renamed; a rerun skips files whose recorded size matches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::api::Api;
use crate::watch::{read_batches, targets};
use crate::{Fail, Out};

#[derive(clap::Args)]
pub struct Args {
    /// Batch ids (default: the batches of the last `volley submit` here).
    batches: Vec<String>,
    /// Every batch with this label (among your newest 50).
    #[arg(long, conflicts_with = "batches")]
    label: Option<String>,
    /// Where results.jsonl and the media files go.
    #[arg(long)]
    out: PathBuf,
    /// Jobs read and files downloaded at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
}

/// Sizes of the files already downloaded and verified, by name.
const MANIFEST: &str = ".volley-downloads.json";

/// Every media link in a result (signed gateway URLs), in document order.
fn media_urls(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.contains("/v1/media/") => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| media_urls(x, out)),
        Value::Object(o) => o.values().for_each(|x| media_urls(x, out)),
        _ => {}
    }
}

fn extension(url: &str) -> &str {
    let path = url.split('?').next().unwrap_or("");
    let name = path.rsplit('/').next().unwrap_or("");
    match name.rsplit_once('.') {
        Some((_, ext)) if !ext.is_empty() && ext.len() <= 5 => ext,
        _ => "bin",
    }
}

pub async fn run(api: &Api, args: Args, out: Out) -> Result<(), Fail> {
    let t = targets(api, args.batches, args.label).await?;
    tokio::fs::create_dir_all(&args.out)
        .await
        .map_err(|e| Fail::local(format!("creating {}: {e}", args.out.display())))?;
    // custom_id per job id: the journal's custom ids in submission order, zipped with each
    // batch's jobs (which the gateway lists in the same order).
    let batches = read_batches(api, &t.batches).await?;
    let mut custom: HashMap<String, String> = HashMap::new();
    if let Some(journal) = &t.journal {
        for b in &batches {
            let Some(chunk) = journal
                .chunks
                .iter()
                .find(|c| c.batch_id.as_ref() == b["id"].as_str().map(str::to_owned).as_ref())
            else {
                continue;
            };
            for (j, c) in b["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(&chunk.custom_ids)
            {
                if let (Some(id), Some(c)) = (j["id"].as_str(), c) {
                    custom.insert(id.to_owned(), c.clone());
                }
            }
        }
    }
    let job_ids: Vec<String> = batches
        .iter()
        .flat_map(|b| b["jobs"].as_array().cloned().unwrap_or_default())
        .filter_map(|j| j["id"].as_str().map(str::to_owned))
        .collect();
    out.note(&format!("reading {} jobs", job_ids.len()));
    // Finished jobs come in bulk, one request per batch (`GET /v1/batches/{id}/results`);
    // only jobs not finished yet are read one by one, for their current state.
    let ids: Vec<&str> = batches.iter().filter_map(|b| b["id"].as_str()).collect();
    let bulk: Vec<Result<Vec<Value>, Fail>> = futures::stream::iter(ids)
        .map(|id| async move { api.ndjson(&format!("/v1/batches/{id}/results")).await })
        .buffered(usize::from(args.concurrency))
        .collect()
        .await;
    let mut finished: HashMap<String, Value> = HashMap::new();
    for lines in bulk {
        for mut l in lines? {
            if let Some(id) = l["id"].as_str().map(str::to_owned) {
                if let Some(o) = l.as_object_mut() {
                    o.remove("id");
                    o.insert("job_id".into(), json!(id));
                }
                finished.insert(id, l);
            }
        }
    }
    let jobs: Vec<Result<Value, Fail>> = futures::stream::iter(&job_ids)
        .map(|id| {
            let done = finished.remove(id);
            async move {
                match done {
                    Some(line) => Ok(line),
                    None => {
                        let mut j = api.get(&format!("/v1/jobs/{id}")).await?;
                        j["job_id"] = j["id"].take();
                        Ok(j)
                    }
                }
            }
        })
        .buffered(usize::from(args.concurrency))
        .collect()
        .await;
    let manifest_path = args.out.join(MANIFEST);
    let mut manifest: HashMap<String, u64> = tokio::fs::read(&manifest_path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut lines = String::new();
    let mut downloads: Vec<(String, String)> = Vec::new();
    let (mut processed, mut failed, mut unfinished) = (0usize, 0usize, 0usize);
    for job in jobs {
        let job = job?;
        let id = job["job_id"].as_str().unwrap_or("?").to_owned();
        // The ids this submit recorded, else the one the gateway kept with the job.
        let cid = custom
            .get(&id)
            .cloned()
            .or_else(|| job["custom_id"].as_str().map(str::to_owned));
        match job["status"].as_str() {
            Some("PROCESSED") => processed += 1,
            Some("FAILED" | "CANCELLED") => failed += 1,
            _ => unfinished += 1,
        }
        let mut urls = Vec::new();
        media_urls(&job["result"], &mut urls);
        let stem = cid.clone().unwrap_or_else(|| format!("job-{id}"));
        let files: Vec<String> = urls
            .iter()
            .enumerate()
            .map(|(k, u)| {
                let name = if urls.len() == 1 {
                    format!("{stem}.{}", extension(u))
                } else {
                    format!("{stem}-{}.{}", k + 1, extension(u))
                };
                downloads.push((name.clone(), u.clone()));
                name
            })
            .collect();
        let line = json!({
            "custom_id": cid,
            "job_id": id,
            "batch_id": job["batch_id"],
            "endpoint": job["endpoint"],
            "model": job["model"],
            "status": job["status"],
            "result": job.get("result"),
            "error": job.get("error"),
            "usage": job.get("usage"),
            "files": files,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    write_atomic(&args.out.join("results.jsonl"), lines.as_bytes()).await?;

    let todo: Vec<(String, String)> = downloads
        .into_iter()
        .filter(|(name, _)| {
            let have = std::fs::metadata(args.out.join(name)).map(|m| m.len()).ok();
            !(have.is_some() && have == manifest.get(name).copied())
        })
        .collect();
    let already = manifest.len();
    out.note(&format!("downloading {} files", todo.len()));
    let dir = &args.out;
    let got: Vec<(String, Result<u64, Fail>)> = futures::stream::iter(todo)
        .map(|(name, url)| async move {
            let r = download(api, dir, &name, &url).await;
            (name, r)
        })
        .buffer_unordered(usize::from(args.concurrency))
        .collect()
        .await;
    let mut bad = Vec::new();
    let mut fetched = 0u64;
    for (name, r) in got {
        match r {
            Ok(size) => {
                fetched += 1;
                manifest.insert(name, size);
            }
            Err(e) => bad.push(format!("{name}: {}", e.message)),
        }
    }
    let m = serde_json::to_vec(&manifest).unwrap_or_default();
    write_atomic(&manifest_path, &m).await?;
    let summary = json!({
        "out": args.out.display().to_string(),
        "results": job_ids.len(), "processed": processed, "failed": failed,
        "unfinished": unfinished, "downloaded": fetched, "files": manifest.len(),
        "download_errors": bad,
    });
    if out.json {
        out.print_json(&summary);
    } else {
        outln!(
            "{} results ({processed} processed, {failed} failed or cancelled, {unfinished} unfinished) \
             in {}; {fetched} files downloaded, {already} already there",
            job_ids.len(),
            args.out.join("results.jsonl").display()
        );
    }
    if !bad.is_empty() {
        return Err(Fail::incomplete(format!(
            "{} downloads failed (run again to resume):\n  {}",
            bad.len(),
            bad.join("\n  ")
        )));
    }
    if unfinished > 0 || failed > 0 {
        return Err(Fail::incomplete(format!(
            "{failed} jobs failed or were cancelled and {unfinished} are not finished yet"
        )));
    }
    Ok(())
}

/// Downloads one file to `NAME.part`, checks its size, and renames it into place.
async fn download(api: &Api, dir: &Path, name: &str, url: &str) -> Result<u64, Fail> {
    let part = dir.join(format!("{name}.part"));
    let mut f = tokio::fs::File::create(&part)
        .await
        .map_err(|e| Fail::local(format!("creating {}: {e}", part.display())))?;
    let (written, expected) = api.download(url, &mut f).await?;
    drop(f);
    if expected.is_some_and(|n| n != written) || written == 0 {
        return Err(Fail::service(format!(
            "got {written} bytes, expected {}",
            expected.unwrap_or(0)
        )));
    }
    tokio::fs::rename(&part, dir.join(name))
        .await
        .map_err(|e| Fail::local(format!("renaming {}: {e}", part.display())))?;
    Ok(written)
}

/// Writes to a temporary file beside `path` and renames it over `path`, so an interruption
/// leaves either the old file or the new one.
pub(crate) async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(|e| Fail::local(format!("writing {}: {e}", tmp.display())))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| Fail::local(format!("writing {}: {e}", path.display())))
}
