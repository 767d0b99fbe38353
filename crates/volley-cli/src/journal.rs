//! A submit's journal, kept in its state file next to the input (`FILE.volley-state.json`):
//! which chunk became which batch, and each item's custom_id, so that a rerun resumes without
//! duplicates and `watch` and `results` know what to look at. Written atomically after every
//! chunk.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Fail;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    /// The file the journal belongs to, and the SHA-256 of its bytes when submitted.
    pub file: String,
    pub sha256: String,
    pub label: Option<String>,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    pub index: usize,
    /// The `Idempotency-Key` the chunk is sent with: the same on every rerun.
    pub idempotency_key: String,
    /// Each item's custom_id (or none), in submission order; the gateway returns the batch's
    /// jobs in the same order, which maps custom_id to job id.
    pub custom_ids: Vec<Option<String>>,
    /// Set once the gateway accepted the chunk.
    pub batch_id: Option<String>,
}

impl Journal {
    pub fn path_for(file: &Path) -> PathBuf {
        let mut name = file.file_name().unwrap_or_default().to_os_string();
        name.push(".volley-state.json");
        file.with_file_name(name)
    }

    pub fn load(path: &Path) -> Result<Option<Journal>, Fail> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Fail::usage(format!(
                    "{} is not a Volley state file ({e}); remove it to start over",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Fail::local(format!("reading {}: {e}", path.display()))),
        }
    }

    /// Writes to a temporary file and renames it over the old one, so an interruption leaves
    /// either the old journal or the new one.
    pub async fn save(&self, path: &Path) -> Result<(), Fail> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Fail::local(format!("encoding the state: {e}")))?;
        crate::results::write_atomic(path, &bytes).await
    }

    pub fn batch_ids(&self) -> Vec<String> {
        self.chunks
            .iter()
            .filter_map(|c| c.batch_id.clone())
            .collect()
    }
}

/// The last submit in this directory (`.volley/last-submit`), which `watch` and `results`
/// use when given no batches.
fn last_submit_pointer() -> PathBuf {
    Path::new(".volley").join("last-submit")
}

pub async fn remember_last(journal_path: &Path) -> Result<(), Fail> {
    let p = last_submit_pointer();
    let abs = std::path::absolute(journal_path)
        .map_err(|e| Fail::local(format!("{}: {e}", journal_path.display())))?;
    if let Some(dir) = p.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Fail::local(format!("creating {}: {e}", dir.display())))?;
    }
    tokio::fs::write(&p, abs.to_string_lossy().as_bytes())
        .await
        .map_err(|e| Fail::local(format!("writing {}: {e}", p.display())))
}

/// The journal of the last submit in this directory, if any.
pub fn last() -> Result<Option<(PathBuf, Journal)>, Fail> {
    let Ok(p) = std::fs::read_to_string(last_submit_pointer()) else {
        return Ok(None);
    };
    let path = PathBuf::from(p.trim());
    Ok(Journal::load(&path)?.map(|s| (path, s)))
}
