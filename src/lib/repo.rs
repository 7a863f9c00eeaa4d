//! The manager's repository on disk (DESIGN.md section 2): immutable revision directories and
//! one atomically switched *view* that says which revision is latest, dist, backup/1..3 and which
//! are archived.
//!
//! ```text
//! repo/revisions/r7/          immutable: manifest.json, manifest.sig, <product>/<files>
//! repo/archives/r2.tar.gz     compressed old generations
//! repo/views/v12/             state.json + symlinks latest, dist, backup/1..3, archive/
//! repo/view -> views/v12      the one pointer that changes, by rename
//! repo/latest -> view/latest  fixed links, so repo/{latest,dist,backup,archive} always resolve
//! ```
//!
//! A change builds a new view aside, fsyncs it and renames `view` over the old pointer, so a
//! `kill -9` at any instant leaves either the whole old state or the whole new one. Anything no
//! longer referenced by the current view is garbage and removed by [`Repo::collect_garbage`].

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::dist_statement::{
    SIGNATURE_FILE as STATEMENT_SIGNATURE_FILE, STATEMENT_FILE, SignedStatement,
};
use crate::durable;
use crate::manifest::{self, FileEntry, Manifest, ProductEntry};
use crate::pki::SigningKey;

/// Number of backup generations kept after dist.
pub const BACKUP_GENERATIONS: usize = 3;

/// A backup generation named on a command line or in a request: 1..=[`BACKUP_GENERATIONS`].
pub fn check_generation(n: usize) -> Result<usize, String> {
    if (1..=BACKUP_GENERATIONS).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "generation {n} is not a backup: use 1, 2 or 3 (1 is the dist before the last publish)"
        ))
    }
}

/// `--generation N` of `pm-mirror rollback`, `pm-agent update` and pm-rollback.
pub fn parse_generation(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .map_err(|_| format!("`{text}` is not a generation: use 1, 2 or 3"))
        .and_then(check_generation)
}

/// How many rolled-back revisions [`Generations::rolled_back`] remembers.
pub const ROLLED_BACK_KEPT: usize = 10;

/// Repository errors; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A file system operation failed.
    #[error("{action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Another pm-mirror holds the repository lock.
    #[error(
        "repository `{path}` is locked by another pm-mirror (sync, publish or import) for more than {waited:?}"
    )]
    Locked { path: PathBuf, waited: Duration },
    /// A manifest or view state does not parse.
    #[error("`{path}` is corrupt: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    /// Signing failed.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RepoError + 'a {
    move |source| RepoError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Which revision each generation holds; the contents of a view's `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generations {
    /// Newest verified revision (staging).
    pub latest: Option<String>,
    /// The published revision agents install from.
    pub dist: Option<String>,
    /// backup/1, backup/2, backup/3: the previous dist revisions, newest first.
    pub backups: Vec<String>,
    /// Archived revisions, newest first.
    pub archives: Vec<String>,
    /// Revisions taken out of dist or the backups by a rollback, newest first (at most
    /// [`ROLLED_BACK_KEPT`]): `pm-mirror publish` refuses to publish them again without
    /// `--again`, so a rolled-back revision never comes back silently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolled_back: Vec<String>,
    /// When each revision in `rolled_back` was rolled back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rolled_back_at: BTreeMap<String, DateTime<Utc>>,
    /// The components (name, version) of each product of each revision in `rolled_back`, kept
    /// from its manifest when it was rolled back (its directory goes at the next switch):
    /// `pm-mirror publish` refuses a latest that carries a product as one of them had it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rolled_back_products: BTreeMap<String, crate::manifest::ProductComponents>,
    /// The counter of the view's signed dist statement ([`crate::dist_statement`]): grows with
    /// every publish, rollback and re-signing, never goes back.
    #[serde(default)]
    pub dist_serial: u64,
}

/// What a publish would do to the generations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The generations after the publish.
    pub after: Generations,
    /// The revision pushed out of backup/3 into the archive, if any.
    pub archived: Option<String>,
    /// Archives dropped beyond the retention.
    pub expired: Vec<String>,
}

/// What a rollback of dist to a backup generation would do to the generations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The generations after the rollback.
    pub after: Generations,
    /// dist before.
    pub from: String,
    /// dist after: the revision backup/N held.
    pub to: String,
    /// The revisions this rollback took out (dist and backup/1..N-1), newest first.
    pub rolled_back: Vec<String>,
}

impl Generations {
    /// The rollback of dist to backup/`generation` (1..=[`BACKUP_GENERATIONS`]): dist becomes
    /// that backup's revision, older backups move up in order (backup/N+1 becomes backup/1),
    /// archives stay, and the revisions that were dist and backup/1..N-1 are recorded in
    /// [`Generations::rolled_back`] with the time now. `None` when dist is empty or that backup
    /// does not exist.
    pub fn rollback(&self, generation: usize) -> Option<Rollback> {
        if !(1..=BACKUP_GENERATIONS).contains(&generation) || generation > self.backups.len() {
            return None;
        }
        let from = self.dist.clone()?;
        let mut after = self.clone();
        let mut newer = after.backups.drain(..generation).collect::<Vec<_>>();
        let to = newer.pop().expect("generation <= backups.len()");
        after.dist = Some(to.clone());
        after.dist_serial += 1;
        let mut rolled_back = vec![from.clone()];
        rolled_back.extend(newer);
        let now = Utc::now();
        for revision in rolled_back.iter().rev() {
            after.rolled_back.retain(|r| r != revision);
            after.rolled_back.insert(0, revision.clone());
            after.rolled_back_at.insert(revision.clone(), now);
        }
        after.rolled_back.truncate(ROLLED_BACK_KEPT);
        // A revision that is dist again is no longer rolled back.
        after.rolled_back.retain(|r| r != &to);
        let kept = after.rolled_back.clone();
        after.rolled_back_at.retain(|r, _| kept.contains(r));
        after.rolled_back_products.retain(|r, _| kept.contains(r));
        Some(Rollback {
            after,
            from,
            to,
            rolled_back,
        })
    }

    /// Whether `revision` is in [`Generations::rolled_back`].
    pub fn is_rolled_back(&self, revision: &str) -> bool {
        self.rolled_back.iter().any(|r| r == revision)
    }

    /// When `revision` was rolled back, if it is in [`Generations::rolled_back`].
    pub fn rolled_back_on(&self, revision: &str) -> Option<DateTime<Utc>> {
        self.rolled_back_at
            .get(revision)
            .copied()
            .filter(|_| self.is_rolled_back(revision))
    }

    /// Forgets that `revision` was rolled back (the operator published it again on purpose).
    pub fn forget_rolled_back(&mut self, revision: &str) {
        self.rolled_back.retain(|r| r != revision);
        self.rolled_back_at.remove(revision);
        self.rolled_back_products.remove(revision);
    }

    /// The rotation of a publish: latest -> dist -> backup/1 -> 2 -> 3 -> archive (keep
    /// `keep_archives`). `None` when there is nothing to publish or dist already is latest.
    pub fn publish(&self, keep_archives: usize) -> Option<Rotation> {
        let latest = self.latest.clone()?;
        if self.dist.as_deref() == Some(latest.as_str()) {
            return None;
        }
        let mut after = self.clone();
        after.dist_serial += 1;
        let mut archived = None;
        if let Some(old_dist) = after.dist.replace(latest) {
            after.backups.insert(0, old_dist);
        }
        if after.backups.len() > BACKUP_GENERATIONS {
            let pushed_out = after.backups.split_off(BACKUP_GENERATIONS);
            for revision in pushed_out.into_iter().rev() {
                after.archives.insert(0, revision.clone());
                archived = Some(revision);
            }
        }
        let expired = if after.archives.len() > keep_archives {
            after.archives.split_off(keep_archives)
        } else {
            Vec::new()
        };
        Some(Rotation {
            after,
            archived,
            expired,
        })
    }

    /// Every revision directory the view needs on disk.
    fn live_revisions(&self) -> impl Iterator<Item = &String> {
        self.latest
            .iter()
            .chain(self.dist.iter())
            .chain(self.backups.iter())
    }
}

/// The repository under `PM_HOME/repo`.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
}

/// Held while a process changes the repository; released on drop.
pub struct RepoLock {
    _file: File,
}

impl Repo {
    /// The repository at `home/repo` (not created until the first change).
    pub fn new(home: &Path) -> Repo {
        Repo {
            root: home.join("repo"),
        }
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the writer lock, waiting up to `timeout` for another pm-mirror to finish.
    pub fn lock(&self, timeout: Duration) -> Result<RepoLock, RepoError> {
        self.ensure_layout()?;
        let path = self.root.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock file", &path))?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(RepoLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(RepoError::Locked {
                        path,
                        waited: timeout,
                    });
                }
                Err(fs::TryLockError::Error(source)) => {
                    return Err(RepoError::Io {
                        action: "lock",
                        path,
                        source,
                    });
                }
            }
        }
    }

    fn ensure_layout(&self) -> Result<(), RepoError> {
        for dir in ["revisions", "archives", "views"] {
            let path = self.root.join(dir);
            fs::create_dir_all(&path).map_err(io_err("create directory", &path))?;
        }
        // Fixed links into the current view; they dangle until the view has that generation.
        for name in ["latest", "dist", "backup", "archive"] {
            let link = self.root.join(name);
            if fs::symlink_metadata(&link).is_err() {
                durable::replace_symlink(&Path::new("view").join(name), &link)
                    .map_err(io_err("create link", &link))?;
            }
        }
        Ok(())
    }

    /// The current generations (empty before the first sync).
    pub fn generations(&self) -> Result<Generations, RepoError> {
        let path = self.root.join("view/state.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| RepoError::Corrupt {
                path,
                problem: err.to_string(),
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Generations::default()),
            Err(source) => Err(RepoError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Directory of a revision.
    pub fn revision_dir(&self, revision: &str) -> PathBuf {
        self.root.join("revisions").join(revision)
    }

    /// Path of an archived revision.
    pub fn archive_path(&self, revision: &str) -> PathBuf {
        self.root
            .join("archives")
            .join(format!("{revision}.tar.gz"))
    }

    /// The manifest of a revision.
    pub fn manifest(&self, revision: &str) -> Result<Manifest, RepoError> {
        let path = self.revision_dir(revision).join(manifest::MANIFEST_FILE);
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|err| RepoError::Corrupt {
            path,
            problem: err.to_string(),
        })
    }

    /// Starts a new revision in a staging directory; nothing is visible until it is committed and
    /// a view points at it.
    pub fn stage(&self, _lock: &RepoLock) -> Result<StagedRevision, RepoError> {
        self.ensure_layout()?;
        let dir = self
            .root
            .join("revisions")
            .join(format!(".staging-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err("remove stale staging", &dir))?;
        }
        fs::create_dir_all(&dir).map_err(io_err("create staging", &dir))?;
        Ok(StagedRevision {
            dir,
            files: Vec::new(),
        })
    }

    fn next_serial(&self) -> Result<u32, RepoError> {
        let path = self.root.join("serial");
        let last = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u32>().map_err(|_| RepoError::Corrupt {
                path: path.clone(),
                problem: format!("`{}` is not a serial number", text.trim()),
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(RepoError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        let next = last + 1;
        durable::write_atomic(&path, format!("{next}\n").as_bytes(), 0o644)
            .map_err(io_err("write", &path))?;
        Ok(next)
    }

    /// Makes `generations` the current state in one atomic step, creating the archive of a
    /// revision that is newly archived first. Garbage is collected afterwards (a failure there
    /// is logged, not returned: the switch happened). The new view
    /// holds `statement` as its signed dist statement, or with `None` (dist unchanged) the
    /// current view's.
    pub fn switch(
        &self,
        _lock: &RepoLock,
        generations: &Generations,
        statement: Option<&SignedStatement>,
    ) -> Result<(), RepoError> {
        for revision in &generations.archives {
            let archive = self.archive_path(revision);
            if !archive.exists() {
                self.write_archive(revision, &archive)?;
            }
        }
        let views = self.root.join("views");
        let number = fs::read_dir(&views)
            .map_err(io_err("list", &views))?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                entry
                    .file_name()
                    .to_str()?
                    .strip_prefix('v')?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0)
            + 1;
        let staging = views.join(format!(".staging-v{number}"));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))?;
        }
        fs::create_dir_all(staging.join("backup")).map_err(io_err("create", &staging))?;
        fs::create_dir_all(staging.join("archive")).map_err(io_err("create", &staging))?;
        let link = |target: PathBuf, name: &Path| -> Result<(), RepoError> {
            let path = staging.join(name);
            std::os::unix::fs::symlink(&target, &path).map_err(io_err("create link", &path))
        };
        let to_revision = |depth: usize, revision: &str| {
            let mut path = PathBuf::new();
            for _ in 0..depth {
                path.push("..");
            }
            path.join("revisions").join(revision)
        };
        if let Some(latest) = &generations.latest {
            link(to_revision(2, latest), Path::new("latest"))?;
        }
        if let Some(dist) = &generations.dist {
            link(to_revision(2, dist), Path::new("dist"))?;
        }
        for (i, backup) in generations.backups.iter().enumerate() {
            link(
                to_revision(3, backup),
                &Path::new("backup").join((i + 1).to_string()),
            )?;
        }
        for archive in &generations.archives {
            let name = format!("{archive}.tar.gz");
            link(
                Path::new("../../../archives").join(&name),
                &Path::new("archive").join(&name),
            )?;
        }
        let carried;
        let statement = match statement {
            Some(statement) => Some(statement),
            None => {
                carried = self.dist_statement()?;
                carried.as_ref()
            }
        };
        if let Some(statement) = statement {
            for (name, bytes) in [
                (STATEMENT_FILE, &statement.document),
                (STATEMENT_SIGNATURE_FILE, &statement.signature),
            ] {
                durable::write_atomic(&staging.join(name), bytes, 0o644)
                    .map_err(io_err("write", &staging))?;
            }
        }
        // The key chain is served beside the statement, so whoever trusts an older key of this
        // manager can follow it to the one that signs now (crate::pki::rotation).
        if let Some(home) = self.root.parent() {
            let chain = home.join(crate::pki::rotation::CHAIN_FILE);
            match fs::read(&chain) {
                Ok(bytes) => durable::write_atomic(
                    &staging.join(crate::pki::rotation::SERVED_FILE),
                    &bytes,
                    0o644,
                )
                .map_err(io_err("write", &staging))?,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RepoError::Io {
                        action: "read",
                        path: chain,
                        source,
                    });
                }
            }
        }
        let state = serde_json::to_vec_pretty(generations).expect("generations serialize");
        durable::write_atomic(&staging.join("state.json"), &state, 0o644)
            .map_err(io_err("write", &staging))?;
        for dir in [
            staging.join("backup"),
            staging.join("archive"),
            staging.clone(),
        ] {
            durable::sync_dir(&dir).map_err(io_err("fsync", &dir))?;
        }
        let view = views.join(format!("v{number}"));
        fs::rename(&staging, &view).map_err(io_err("rename", &view))?;
        durable::sync_dir(&views).map_err(io_err("fsync", &views))?;
        let pointer = self.root.join("view");
        durable::replace_symlink(&Path::new("views").join(format!("v{number}")), &pointer)
            .map_err(io_err("switch", &pointer))?;
        // The switch is done: a caller must now record it, so garbage that cannot be removed
        // (an entry another user owns, an immutable file) is a warning, never an error that
        // would leave the new view without its record. The next run or `pm-mirror gc` retries.
        if let Err(err) = self.collect_garbage(_lock) {
            let cause = std::error::Error::source(&err)
                .map(|source| format!(": {source}"))
                .unwrap_or_default();
            tracing::warn!(error = %format!("{err}{cause}"), "cannot remove what the new view no longer references; `pm-mirror gc` will try again");
        }
        Ok(())
    }

    /// The current view's signed dist statement, if it has one (a repository published before
    /// statements existed has none until its next publish).
    pub fn dist_statement(&self) -> Result<Option<SignedStatement>, RepoError> {
        let view = self.root.join("view");
        let read = |name: &str| {
            let path = view.join(name);
            match fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(RepoError::Io {
                    action: "read",
                    path,
                    source,
                }),
            }
        };
        Ok(
            match (read(STATEMENT_FILE)?, read(STATEMENT_SIGNATURE_FILE)?) {
                (Some(document), Some(signature)) => Some(SignedStatement {
                    document,
                    signature,
                }),
                _ => None,
            },
        )
    }

    fn write_archive(&self, revision: &str, archive: &Path) -> Result<(), RepoError> {
        let source = self.revision_dir(revision);
        let tmp = archive.with_extension("gz.tmp");
        let write = || -> io::Result<()> {
            let file = File::create(&tmp)?;
            let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
            let mut tar = tar::Builder::new(gz);
            tar.follow_symlinks(false);
            tar.append_dir_all(revision, &source)?;
            let file = tar.into_inner()?.finish()?;
            file.sync_all()?;
            fs::rename(&tmp, archive)?;
            durable::sync_parent_dir(archive)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&tmp);
            RepoError::Io {
                action: "archive",
                path: archive.to_owned(),
                source,
            }
        })
    }

    /// What the current view no longer references (old views, revisions, archives and staging
    /// left by a killed process): what [`Repo::collect_garbage`] removes, for `gc --dry-run`.
    pub fn garbage(&self, _lock: &RepoLock) -> Result<Vec<PathBuf>, RepoError> {
        let generations = self.generations()?;
        let current_view = fs::read_link(self.root.join("view")).ok();
        let live: std::collections::HashSet<&String> = generations.live_revisions().collect();
        let live_archives: std::collections::HashSet<String> = generations
            .archives
            .iter()
            .map(|r| format!("{r}.tar.gz"))
            .collect();
        let mut garbage = Vec::new();
        let mut sweep = |dir: &str, keep: &dyn Fn(&str) -> bool| {
            let dir = self.root.join(dir);
            let Ok(entries) = fs::read_dir(&dir) else {
                return;
            };
            for entry in entries.filter_map(|e| e.ok()) {
                if !keep(&entry.file_name().to_string_lossy()) {
                    garbage.push(entry.path());
                }
            }
        };
        sweep("revisions", &|name| live.iter().any(|r| r.as_str() == name));
        sweep("archives", &|name| live_archives.contains(name));
        sweep("views", &|name| {
            current_view
                .as_ref()
                .is_some_and(|v| v.file_name().is_some_and(|f| f == name))
        });
        garbage.sort();
        Ok(garbage)
    }

    /// Removes what the current view no longer references ([`Repo::garbage`]). Returns the
    /// paths removed; when one cannot be removed, the others still are and the first failure
    /// is the error.
    pub fn collect_garbage(&self, lock: &RepoLock) -> Result<Vec<PathBuf>, RepoError> {
        let mut removed = Vec::new();
        let mut first_error = None;
        for path in self.garbage(lock)? {
            let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            let result = if is_dir {
                make_writable(&path);
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => removed.push(path),
                Err(err) => {
                    first_error.get_or_insert_with(|| io_err("remove", &path)(err));
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(removed),
        }
    }
}

/// Revision files are read-only; directories must be writable again before removal.
fn make_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                make_writable(&entry.path());
            }
        }
    }
}

/// Copies `source` into a new file beside `target` (fsynced), then renames it to `target`.
fn copy_new(source: &Path, target: &Path) -> Result<(), RepoError> {
    let tmp = target.with_extension("pm-copy");
    let copy = || -> io::Result<()> {
        let mut from = File::open(source)?;
        let mut to = File::options().write(true).create_new(true).open(&tmp)?;
        io::copy(&mut from, &mut to)?;
        to.sync_all()?;
        fs::rename(&tmp, target)
    };
    copy().map_err(|err| {
        let _ = fs::remove_file(&tmp);
        RepoError::Io {
            action: "copy",
            path: source.to_owned(),
            source: err,
        }
    })
}

/// A revision being built: files are downloaded or linked into it, then it is committed.
pub struct StagedRevision {
    dir: PathBuf,
    files: Vec<FileEntry>,
}

impl StagedRevision {
    /// A staging directory outside the repository, for imports that must leave the repository
    /// untouched until everything verified. It must be on the repository's file system so that
    /// the commit is a rename; it is created empty.
    pub fn at(dir: PathBuf) -> io::Result<StagedRevision> {
        if dir.exists() {
            make_writable(&dir);
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(StagedRevision {
            dir,
            files: Vec::new(),
        })
    }

    /// The staging directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl StagedRevision {
    /// Where a file with relative `path` goes; parent directories are created.
    pub fn path_for(&self, path: &str) -> Result<PathBuf, RepoError> {
        let full = self.dir.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        Ok(full)
    }

    /// Records a file already written (and fsynced) at [`Self::path_for`].
    pub fn add(&mut self, entry: FileEntry) {
        self.files.retain(|f| f.path != entry.path);
        self.files.push(entry);
    }

    /// Carries a file over from an earlier revision by hard link (copy across file systems).
    pub fn carry_over(&mut self, from_dir: &Path, entry: FileEntry) -> Result<(), RepoError> {
        let source = from_dir.join(&entry.path);
        let target = self.path_for(&entry.path)?;
        match fs::hard_link(&source, &target) {
            Ok(()) => {}
            // Never open an existing target: it may be a link to a live revision's file, and
            // writing through it would change every generation that shares it.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RepoError::Io {
                    action: "stage twice",
                    path: target,
                    source: err,
                });
            }
            // Another file system: copy into a new file, then rename it into place.
            Err(_) => copy_new(&source, &target)?,
        }
        self.add(entry);
        Ok(())
    }

    /// Copies a file from outside the repository (an `agent` product's package directory) into
    /// the revision. Never a hard link: committing makes revision files read-only, which must
    /// not change the operator's file. `entry` must describe the copy.
    pub fn copy_in(&mut self, source: &Path, entry: FileEntry) -> Result<(), RepoError> {
        let target = self.path_for(&entry.path)?;
        copy_new(source, &target)?;
        self.add(entry);
        Ok(())
    }

    /// Forgets a product's files (its directory is rewritten by the next attempt).
    pub fn remove_product(&mut self, product: &str) {
        self.files.retain(|f| f.product != product);
        let dir = self.dir.join(product);
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
    }

    /// Drops the staging directory without committing.
    pub fn discard(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Files recorded so far.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// The content hash the committed revision would have.
    pub fn content_sha256(&self) -> String {
        manifest::content_sha256(&self.files)
    }

    /// Writes and signs the manifest, makes every file read-only, fsyncs and renames the staging
    /// directory to `revisions/r<serial>`. The revision is not referenced by any view yet.
    pub fn commit(
        mut self,
        repo: &Repo,
        _lock: &RepoLock,
        key: &SigningKey,
        source: &str,
        products: Vec<ProductEntry>,
    ) -> Result<Manifest, RepoError> {
        self.files.sort();
        let serial = repo.next_serial()?;
        let revision = format!("r{serial}");
        let manifest = Manifest {
            format: crate::manifest::FORMAT,
            revision: revision.clone(),
            serial,
            created_at: chrono::Utc::now(),
            source: source.to_owned(),
            content_sha256: manifest::content_sha256(&self.files),
            products,
            files: std::mem::take(&mut self.files),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let signature = key.sign(&json)?;
        durable::write_atomic(&self.dir.join(manifest::MANIFEST_FILE), &json, 0o444)
            .map_err(io_err("write manifest", &self.dir))?;
        durable::write_atomic(&self.dir.join(manifest::SIGNATURE_FILE), &signature, 0o444)
            .map_err(io_err("write signature", &self.dir))?;
        seal(&self.dir).map_err(io_err("seal", &self.dir))?;
        let target = repo.revision_dir(&revision);
        fs::rename(&self.dir, &target).map_err(io_err("rename", &target))?;
        durable::sync_parent_dir(&target).map_err(io_err("fsync", &target))?;
        Ok(manifest)
    }
}

/// Makes every file read-only and fsyncs every directory below `dir` (files were fsynced when
/// written).
fn seal(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            seal(&entry.path())?;
        } else {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o444))?;
        }
    }
    durable::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generations(
        latest: &str,
        dist: Option<&str>,
        backups: &[&str],
        archives: &[&str],
    ) -> Generations {
        Generations {
            latest: Some(latest.into()),
            dist: dist.map(Into::into),
            backups: backups.iter().map(|s| s.to_string()).collect(),
            archives: archives.iter().map(|s| s.to_string()).collect(),
            ..Generations::default()
        }
    }

    fn check(before: Generations, keep: usize, expected: Option<Generations>) {
        let after = before.publish(keep).map(|r| r.after);
        if let Some(after) = &after {
            assert_eq!(
                after.dist_serial,
                before.dist_serial + 1,
                "a publish signs anew"
            );
        }
        let without_serial = |g: Generations| Generations {
            dist_serial: 0,
            ..g
        };
        assert_eq!(after.map(without_serial), expected);
    }

    #[test]
    fn publish_rotates_dist_into_backups_then_archives() {
        check(
            generations("r1", None, &[], &[]),
            5,
            Some(generations("r1", Some("r1"), &[], &[])),
        );
        check(
            generations("r2", Some("r1"), &[], &[]),
            5,
            Some(generations("r2", Some("r2"), &["r1"], &[])),
        );
        check(
            generations("r5", Some("r4"), &["r3", "r2", "r1"], &[]),
            5,
            Some(generations("r5", Some("r5"), &["r4", "r3", "r2"], &["r1"])),
        );
        check(
            generations("r9", Some("r8"), &["r7", "r6", "r5"], &["r4", "r3"]),
            2,
            Some(generations(
                "r9",
                Some("r9"),
                &["r8", "r7", "r6"],
                &["r5", "r4"],
            )),
        );
    }

    #[test]
    fn publish_is_a_no_op_when_dist_is_latest() {
        check(generations("r3", Some("r3"), &["r2"], &[]), 5, None);
        check(Generations::default(), 5, None);
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// dist, backups, archives and the rolled-back list (newest first) after a rollback.
    type Expected<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

    /// Rolls `before` back to `generation` and compares the generations with `expected`.
    fn check_rollback(before: Generations, generation: usize, expected: Option<Expected>) {
        let rollback = before.rollback(generation);
        let got = rollback.as_ref().map(|r| {
            (
                r.after.dist.clone().unwrap(),
                r.after.backups.clone(),
                r.after.archives.clone(),
                r.after.rolled_back.clone(),
            )
        });
        let expected = expected.map(|(dist, backups, archives, rolled_back)| {
            (
                dist.to_string(),
                names(backups),
                names(archives),
                names(rolled_back),
            )
        });
        assert_eq!(got, expected, "rollback {generation} of {before:?}");
        if let Some(rollback) = rollback {
            let after = &rollback.after;
            assert_eq!(after.latest, before.latest, "latest never moves");
            assert_eq!(rollback.from, before.dist.clone().unwrap());
            assert_eq!(Some(&rollback.to), after.dist.as_ref());
            for revision in &after.rolled_back {
                assert!(after.rolled_back_on(revision).is_some(), "{revision}");
            }
            assert_eq!(after.rolled_back_at.len(), after.rolled_back.len());
        }
    }

    #[test]
    fn rollback_makes_backup_n_dist_and_remembers_what_it_took_out() {
        let full = generations("r5", Some("r4"), &["r3", "r2", "r1"], &["r0"]);
        check_rollback(
            full.clone(),
            1,
            Some(("r3", &["r2", "r1"], &["r0"], &["r4"])),
        );
        check_rollback(
            full.clone(),
            2,
            Some(("r2", &["r1"], &["r0"], &["r4", "r3"])),
        );
        check_rollback(
            full.clone(),
            3,
            Some(("r1", &[], &["r0"], &["r4", "r3", "r2"])),
        );
        let rollback = full.rollback(2).unwrap();
        assert_eq!(rollback.rolled_back, names(&["r4", "r3"]));
    }

    #[test]
    fn rollback_to_a_missing_generation_is_none() {
        check_rollback(generations("r2", Some("r2"), &["r1"], &[]), 2, None);
        check_rollback(generations("r2", Some("r2"), &["r1"], &[]), 0, None);
        check_rollback(
            generations("r5", Some("r4"), &["r3", "r2", "r1"], &[]),
            4,
            None,
        );
        check_rollback(generations("r1", Some("r1"), &[], &[]), 1, None);
        check_rollback(generations("r1", None, &[], &[]), 1, None);
    }

    #[test]
    fn rolled_back_revisions_stay_newest_first_bounded_and_leave_when_dist_again() {
        let mut before = generations("r3", Some("r3"), &["r2", "r1"], &[]);
        before.rolled_back = names(&["r9", "r8", "r7", "r6", "r5", "r4", "r2", "x3", "x2", "x1"]);
        let rollback = before.rollback(1).unwrap();
        // r3 goes first, r2 is dist again so it is no longer rolled back, the oldest fall off.
        assert_eq!(
            rollback.after.rolled_back,
            names(&["r3", "r9", "r8", "r7", "r6", "r5", "r4", "x3", "x2"])
        );
        let mut after = rollback.after;
        assert!(after.is_rolled_back("r3") && after.rolled_back_on("r3").is_some());
        after.forget_rolled_back("r3");
        assert!(!after.is_rolled_back("r3") && after.rolled_back_on("r3").is_none());
    }

    #[test]
    fn publish_keeps_the_rolled_back_list() {
        let mut before = generations("r4", Some("r2"), &["r1"], &[]);
        before.rolled_back = names(&["r3"]);
        let after = before.publish(5).unwrap().after;
        assert_eq!(after.rolled_back, names(&["r3"]));
    }

    #[test]
    fn a_state_without_rolled_back_parses() {
        let state: Generations =
            serde_json::from_str(r#"{"latest":"r1","dist":"r1","backups":[],"archives":[]}"#)
                .unwrap();
        assert!(state.rolled_back.is_empty() && state.rolled_back_at.is_empty());
    }
}
