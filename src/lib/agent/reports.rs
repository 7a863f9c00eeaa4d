//! Reports the agent keeps on disk (`scans/`, `updates/`): each one JSON file written aside and
//! renamed (0600), pruned to the newest N, listed newest first.
//!
//! "Newest" is by the report's number in the agent's report stream (`seq`), not by its id: ids
//! start with the time the report began, and a clock that steps back (NTP correcting a clock
//! that ran ahead, a VM restored from a snapshot) would make the newest report sort first, be
//! pruned at once and stay behind the manager's cursor forever. The numbers come from
//! `reports.seq` in the state directory (`STREAM LAST`: a random stream id made once, and the
//! last number given), taken under a lock so that `pm-agent run` and the CLI never give one
//! twice, and written before the report it numbers (a crash leaves a gap, never a repeat).
//! Reports from before the numbers have none and sort before every numbered one, by id.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durable;

use super::io_error;

/// The report stream and its last number, relative to the state directory.
pub const SEQUENCE_FILE: &str = "reports.seq";

/// The kept report files in `reports_dir` with their numbers, oldest first (temporary files
/// start with a dot; a damaged file has no number and sorts first).
fn files(reports_dir: &Path) -> Result<Vec<(Option<u64>, PathBuf)>> {
    let entries = match std::fs::read_dir(reports_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_error("read", reports_dir)(err)),
    };
    #[derive(Deserialize)]
    struct Numbered {
        #[serde(default)]
        seq: Option<u64>,
    }
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("read", reports_dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".json") {
            let seq = std::fs::read(entry.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Numbered>(&bytes).ok())
                .and_then(|numbered| numbered.seq);
            files.push((seq, entry.path()));
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
    for (_, old) in &files[..excess] {
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

/// Numbers a report with the next number of the agent's stream (`make` builds it from the
/// number) and stores it like [`store`], all under the sequence lock: a report stored later
/// always has a higher number, so a manager that has seen number N has seen all below it.
pub(super) fn store_numbered<T: Serialize>(
    state_dir: &Path,
    reports_dir: &Path,
    keep: usize,
    make: impl FnOnce(u64) -> (String, T),
) -> Result<T> {
    let mut sequence = Sequence::lock(state_dir)?;
    let seq = sequence.claim_next()?;
    let (id, report) = make(seq);
    store(reports_dir, &id, &report, keep)?;
    Ok(report)
}

/// The agent's report stream id and the last number it gave, when it has numbered a report.
pub(super) fn stream(state_dir: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(state_dir.join(SEQUENCE_FILE)).ok()?;
    parse_sequence(&text).map(|(stream, last)| (stream.to_string(), last))
}

fn parse_sequence(text: &str) -> Option<(&str, u64)> {
    let mut fields = text.split_whitespace();
    let stream = fields.next()?;
    let last = fields.next()?.parse().ok()?;
    let valid = !stream.is_empty() && stream.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then_some((stream, last))
}

/// `reports.seq`, locked while this lives.
struct Sequence {
    file: File,
    path: PathBuf,
    stream: String,
    last: u64,
}

impl Sequence {
    fn lock(state_dir: &Path) -> Result<Sequence> {
        let path = state_dir.join(SEQUENCE_FILE);
        let mut file = super::open_locked_file(&path)?;
        file.lock().map_err(io_error("lock", &path))?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(io_error("read", &path))?;
        let (stream, last) = match parse_sequence(&text) {
            Some((stream, last)) => (stream.to_string(), last),
            None => {
                // New, or damaged: a new stream (the manager then goes by report ids once), its
                // numbers above any report kept.
                if !text.trim().is_empty() {
                    tracing::warn!(path = %path.display(), "the report sequence is damaged; starting a new stream");
                }
                let last = [super::scan::SCANS_DIR, super::schedule::UPDATES_DIR]
                    .iter()
                    .filter_map(|dir| files(&state_dir.join(dir)).ok())
                    .flatten()
                    .filter_map(|(seq, _)| seq)
                    .max()
                    .unwrap_or(0);
                (crate::proto::nonce()[..16].to_string(), last)
            }
        };
        Ok(Sequence {
            file,
            path,
            stream,
            last,
        })
    }

    /// The next number, written down before anything uses it.
    fn claim_next(&mut self) -> Result<u64> {
        let next = self.last + 1;
        // Fixed width, written in place: one short write, never a truncated file.
        let text = format!("{} {next:020}\n", self.stream);
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(text.as_bytes()))
            .and_then(|()| self.file.set_len(text.len() as u64))
            .and_then(|()| self.file.sync_data())
            .map_err(io_error("write", &self.path))?;
        self.last = next;
        Ok(next)
    }
}

/// The kept reports, newest first; a damaged file is skipped with a warning.
pub(super) fn list<T: DeserializeOwned>(reports_dir: &Path) -> Result<Vec<T>> {
    let mut reports = Vec::new();
    for (_, path) in files(reports_dir)?.iter().rev() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Report {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    }

    #[test]
    fn numbers_order_and_prune_reports_whatever_their_ids_say() {
        let state = tempfile::tempdir().unwrap();
        let reports = state.path().join("scans");
        // A report from before the numbers.
        store(
            &reports,
            "2030",
            &Report {
                id: "2030".into(),
                seq: None,
            },
            3,
        )
        .unwrap();
        // The clock stepped back: each id sorts before the one before it.
        for id in ["2029", "2028", "2027"] {
            let report = store_numbered(state.path(), &reports, 3, |seq| {
                (
                    id.to_string(),
                    Report {
                        id: id.into(),
                        seq: Some(seq),
                    },
                )
            })
            .unwrap();
            assert!(report.seq.is_some());
        }
        let kept: Vec<Report> = list(&reports).unwrap();
        let ids: Vec<&str> = kept.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["2027", "2028", "2029"],
            "newest first; the unnumbered one pruned"
        );
        assert_eq!(
            kept.iter().map(|r| r.seq.unwrap()).collect::<Vec<_>>(),
            [3, 2, 1]
        );
        let (stream, last) = stream(state.path()).unwrap();
        assert_eq!((stream.len(), last), (16, 3));

        // A damaged sequence: a new stream, numbered above what is kept.
        std::fs::write(state.path().join(SEQUENCE_FILE), "garbage\n").unwrap();
        let report = store_numbered(state.path(), &reports, 3, |seq| {
            (
                "2026".to_string(),
                Report {
                    id: "2026".into(),
                    seq: Some(seq),
                },
            )
        })
        .unwrap();
        assert_eq!(report.seq, Some(4));
        assert_ne!(super::stream(state.path()).unwrap().0, stream);
    }
}
