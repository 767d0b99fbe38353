//! `volley watch`: polls the batches until every job is terminal, with one progress bar per
//! modality (plain lines when stderr is not a terminal).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::api::Api;
use crate::journal::{self, Journal};
use crate::{Fail, Out, batch_path};

#[derive(clap::Args)]
pub struct Args {
    /// Batch ids (default: the batches of the last `volley submit` here).
    batches: Vec<String>,
    /// Every batch with this label (among your newest 50).
    #[arg(long, conflicts_with = "batches")]
    label: Option<String>,
    /// Seconds between polls.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

/// What a command acts on: batch ids in order, and the submit's journal when there is one
/// (it maps jobs back to custom ids).
pub struct Targets {
    pub batches: Vec<String>,
    pub journal: Option<Journal>,
}

pub async fn targets(
    api: &Api,
    batches: Vec<String>,
    label: Option<String>,
) -> Result<Targets, Fail> {
    if !batches.is_empty() {
        for b in &batches {
            batch_path(b)?;
        }
        // The last submit's custom ids still apply to those of its batches named here.
        let journal = journal::last()?.map(|(_, s)| s);
        return Ok(Targets { batches, journal });
    }
    if let Some(l) = label {
        let list = api.get("/v1/batches").await?;
        let mut ids: Vec<String> = list["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["label"].as_str() == Some(l.as_str()))
            .filter_map(|b| b["id"].as_str().map(str::to_owned))
            .collect();
        // Oldest first: submission order.
        ids.reverse();
        if ids.is_empty() {
            return Err(Fail::usage(format!("no batch labelled \"{l}\"")));
        }
        let journal = journal::last()?
            .map(|(_, s)| s)
            .filter(|s| s.label.as_deref() == Some(l.as_str()));
        return Ok(Targets {
            batches: ids,
            journal,
        });
    }
    match journal::last()? {
        Some((_, s)) if !s.batch_ids().is_empty() => Ok(Targets {
            batches: s.batch_ids(),
            journal: Some(s),
        }),
        _ => Err(Fail::usage(
            "nothing to act on: give batch ids or --label, or run `volley submit FILE` here first"
                .into(),
        )),
    }
}

/// Reads every batch (a few at a time), in order.
pub async fn read_batches(api: &Api, ids: &[String]) -> Result<Vec<Value>, Fail> {
    let got: Vec<Result<Value, Fail>> = futures::stream::iter(ids)
        .map(|id| async move { api.get(&batch_path(id)?).await })
        .buffered(8)
        .collect()
        .await;
    got.into_iter().collect()
}

#[derive(Default, Clone, Copy, PartialEq)]
struct Counts {
    total: u64,
    queued: u64,
    processing: u64,
    processed: u64,
    failed: u64,
    cancelled: u64,
}

impl Counts {
    fn finished(&self) -> u64 {
        self.processed + self.failed + self.cancelled
    }
    fn add(&mut self, status: &str) {
        self.total += 1;
        match status {
            "QUEUED" => self.queued += 1,
            "PROCESSING" => self.processing += 1,
            "PROCESSED" => self.processed += 1,
            "FAILED" => self.failed += 1,
            _ => self.cancelled += 1,
        }
    }
    fn describe(&self) -> String {
        format!(
            "{} ok, {} failed, {} cancelled, {} running, {} queued",
            self.processed, self.failed, self.cancelled, self.processing, self.queued
        )
    }
}

/// Counts per modality (and in all) over the batches' jobs.
fn tally(batches: &[Value]) -> (BTreeMap<String, Counts>, Counts) {
    let mut by: BTreeMap<String, Counts> = BTreeMap::new();
    let mut all = Counts::default();
    for b in batches {
        for j in b["jobs"].as_array().into_iter().flatten() {
            let status = j["status"].as_str().unwrap_or("");
            by.entry(j["inference_type"].as_str().unwrap_or("?").to_owned())
                .or_default()
                .add(status);
            all.add(status);
        }
    }
    (by, all)
}

pub async fn run(api: &Api, args: Args, out: Out) -> Result<(), Fail> {
    let t = targets(api, args.batches, args.label).await?;
    let every = Duration::from_secs_f64(args.interval.clamp(0.1, 60.0));
    let bars = out.tty && !out.json;
    let multi = MultiProgress::with_draw_target(if bars {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template(
        "{prefix:>6} [{bar:30.cyan/blue}] {pos}/{len} {rate:>8} eta {eta:>4}  {msg}",
    )
    .map_err(|e| Fail::local(e.to_string()))?
    .with_key(
        "rate",
        |st: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1}/s", st.per_sec());
        },
    )
    .progress_chars("=> ");
    let mut shown: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut last_plain: Option<(Instant, Counts)> = None;
    out.note(&format!(
        "watching {} batch{}",
        t.batches.len(),
        if t.batches.len() == 1 { "" } else { "es" }
    ));
    let (batches, by, all) = loop {
        let batches = read_batches(api, &t.batches).await?;
        let (by, all) = tally(&batches);
        for (kind, c) in by.iter().chain(std::iter::once((&"ALL".to_owned(), &all))) {
            let bar = shown.entry(kind.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(c.total));
                b.set_style(style.clone());
                b.set_prefix(kind.clone());
                b
            });
            bar.set_length(c.total);
            bar.set_position(c.finished());
            bar.set_message(c.describe());
        }
        let done = batches.iter().all(|b| b["status"] == "DONE");
        if !bars && !out.json {
            // Plain output: a line when something changed, at most every 2 s (and the last).
            let due = last_plain
                .is_none_or(|(at, prev)| prev != all && at.elapsed() >= Duration::from_secs(2));
            if due || done {
                for (kind, c) in &by {
                    eprintln!("{kind:>6} {}/{}  {}", c.finished(), c.total, c.describe());
                }
                last_plain = Some((Instant::now(), all));
            }
        }
        if done {
            break (batches, by, all);
        }
        tokio::time::sleep(every).await;
    };
    for b in shown.values() {
        b.finish();
    }
    if out.json {
        let per: serde_json::Map<String, Value> = by
            .iter()
            .map(|(k, c)| (k.clone(), counts_json(c)))
            .collect();
        out.print_json(&json!({
            "batches": batches.iter().map(|b| &b["id"]).collect::<Vec<_>>(),
            "all": counts_json(&all),
            "by_type": per,
        }));
    } else {
        outln!("done: {} jobs: {}", all.total, all.describe());
    }
    if all.failed + all.cancelled > 0 {
        return Err(Fail::incomplete(format!(
            "{} failed and {} cancelled of {} jobs",
            all.failed, all.cancelled, all.total
        )));
    }
    Ok(())
}

fn counts_json(c: &Counts) -> Value {
    json!({"total": c.total, "processed": c.processed, "failed": c.failed,
           "cancelled": c.cancelled, "processing": c.processing, "queued": c.queued})
}
