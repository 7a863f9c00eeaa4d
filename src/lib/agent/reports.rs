//! Reports the agent keeps on disk (`scans/`, `updates/`): each one JSON file written aside and
//! renamed (0600), pruned to the newest N, listed newest first. Ids sort by time.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::durable;

use super::io_error;

/// The kept report files in `reports_dir`, oldest first (temporary files start with a dot).
fn files(reports_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(reports_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_error("read", reports_dir)(err)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("read", reports_dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".json") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Stores `report` as `<id>.json` and removes the oldest beyond `keep`.
pub(super) fn store<T: Serialize>(
    reports_dir: &Path,
    id: &str,
    report: &T,
    keep: usize,
) -> Result<()> {
    durable::create_private_dir(reports_dir, 0o700)
        .map_err(io_error("create directory", reports_dir))?;
    let path = reports_dir.join(format!("{id}.json"));
    durable::write_atomic(&path, &serde_json::to_vec_pretty(report)?, 0o600)
        .map_err(io_error("write", &path))?;
    let files = files(reports_dir)?;
    let excess = files.len().saturating_sub(keep.max(1));
    for old in &files[..excess] {
        match std::fs::remove_file(old) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("remove", old)(err)),
        }
    }
    if excess > 0 {
        durable::sync_dir(reports_dir).map_err(io_error("sync", reports_dir))?;
    }
    Ok(())
}

/// The kept reports, newest first; a damaged file is skipped with a warning.
pub(super) fn list<T: DeserializeOwned>(reports_dir: &Path) -> Result<Vec<T>> {
    let mut reports = Vec::new();
    for path in files(reports_dir)?.iter().rev() {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            // Pruned by a concurrent writer.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(io_error("read", path)(err)),
        };
        match serde_json::from_slice(&bytes) {
            Ok(report) => reports.push(report),
            Err(err) => tracing::warn!(path = %path.display(), %err, "skipping a damaged report"),
        }
    }
    Ok(reports)
}
