//! The repository's content checked against its signed manifests, and damaged content put back.
//!
//! Identical files are hard-linked across revisions ([`crate::repo::StagedRevision::carry_over`]),
//! so one changed byte in latest's `test-2.cdiff` is a changed byte in dist and in every backup
//! that shares it. [`survey`] checks every generation (latest, dist, backup/1..3): each
//! revision's manifest signature, then every file's type, size and sha256. A file linked into
//! several revisions is hashed once (its device and inode are the key), so checking every
//! generation costs about as much as hashing the distinct content once. Shared by pm-doctor,
//! `pm-mirror repair` and `pm-mirror sync`.
//!
//! [`restore`] replaces every damaged path of one content with one new, verified inode: written
//! aside, fsynced, made read-only, then renamed over the first path and hard-linked over the
//! others (link aside + rename). Renaming rather than writing in place means a reader (`pm-mirror
//! serve` answering an agent) sees the whole old file or the whole new one, never a mix, and the
//! manager needs no write permission on a read-only revision file; the paths that shared the
//! damaged inode share the repaired one, so the repository keeps its size.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::manifest::{self, FileEntry, Manifest};
use crate::pki::VerifyingKey;
use crate::repo::{Generations, Repo};

/// Mode of every file of a committed revision: an accidental write by a user fails (root's
/// does not: [`survey`] is the defence against that).
pub const REVISION_FILE_MODE: u32 = 0o444;

/// One generation of the current view: its name (`latest`, `dist`, `backup/2`) and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// `latest`, `dist` or `backup/N`.
    pub name: String,
    /// The revision it holds, e.g. `r7`.
    pub revision: String,
}

/// Latest, dist and backup/1..3 of `generations`, in that order.
pub fn live_generations(generations: &Generations) -> Vec<Generation> {
    let named = |name: String, revision: &String| Generation {
        name,
        revision: revision.clone(),
    };
    let mut list = Vec::new();
    if let Some(latest) = &generations.latest {
        list.push(named("latest".into(), latest));
    }
    if let Some(dist) = &generations.dist {
        list.push(named("dist".into(), dist));
    }
    for (i, backup) in generations.backups.iter().enumerate() {
        list.push(named(format!("backup/{}", i + 1), backup));
    }
    list
}

/// What is on disk where the manifest lists a file whose content does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    /// No file at the path.
    Missing,
    /// Something else than a regular file (a directory, a symlink).
    NotAFile,
    /// A file whose size or sha256 differs.
    Differs { size: u64, sha256: String },
    /// The file cannot be read.
    Unreadable { error: String },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Missing => write!(f, "missing"),
            Found::NotAFile => write!(f, "not a regular file"),
            Found::Differs { size, sha256 } => write!(f, "size {size}, sha256 {sha256}"),
            Found::Unreadable { error } => write!(f, "unreadable ({error})"),
        }
    }
}

/// One revision's copy of a damaged file.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedCopy {
    /// The revision, e.g. `r4`.
    pub revision: String,
    /// The generations holding that revision (`latest`, `dist`), empty for none.
    pub generations: Vec<String>,
    /// What is there instead.
    pub found: Found,
    /// Its path on disk.
    pub path: PathBuf,
}

/// A file (one path and one expected content) that no longer matches its manifest in one or
/// more revisions.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedFile {
    /// Its path in the revisions, e.g. `clamav/test-2.cdiff`.
    pub path: String,
    /// The size the manifests say.
    pub size: u64,
    /// The sha256 the manifests say.
    pub sha256: String,
    /// Its manifest entry (the first revision's).
    #[serde(skip)]
    pub entry: FileEntry,
    /// The product it belongs to in the revision's manifest (its `kind`, e.g. `clamav`).
    #[serde(skip)]
    pub product_kind: Option<String>,
    /// The pm.toml product that brought it.
    #[serde(skip)]
    pub config_product: String,
    /// Every damaged copy, by revision.
    pub copies: Vec<DamagedCopy>,
}

impl DamagedFile {
    /// The generations the damage reaches, in view order (`latest`, `dist`, `backup/1`).
    pub fn generations(&self) -> Vec<String> {
        self.copies
            .iter()
            .flat_map(|c| c.generations.iter().cloned())
            .collect()
    }

    /// `latest (r4), dist (r4), backup/1 (r3)`.
    pub fn generations_text(&self) -> String {
        self.copies
            .iter()
            .flat_map(|c| {
                c.generations
                    .iter()
                    .map(move |g| format!("{g} ({})", c.revision))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A revision whose manifest cannot be trusted: its files were not checked.
#[derive(Debug, Clone, Serialize)]
pub struct UntrustedRevision {
    /// The revision.
    pub revision: String,
    /// Its generations.
    pub generations: Vec<String>,
    /// What is wrong with its manifest.
    pub problem: String,
}

/// The outcome of [`survey`].
#[derive(Debug, Default)]
pub struct Survey {
    /// Revisions checked, in view order, with their generations.
    pub revisions: Vec<(String, Vec<String>)>,
    /// Revisions whose manifest is missing, unsigned or unreadable.
    pub untrusted: Vec<UntrustedRevision>,
    /// Damaged files, by path.
    pub damaged: Vec<DamagedFile>,
    /// A verified copy of each content seen (sha256 -> path), a source for repairs.
    pub good: HashMap<String, PathBuf>,
    /// Files whose content is right but whose mode lets someone write them (anything but
    /// [`REVISION_FILE_MODE`]'s no-write bits): the next write would damage every revision
    /// sharing them. With their mode.
    pub writable: Vec<(PathBuf, u32)>,
    /// Files listed in the checked manifests.
    pub files_checked: usize,
    /// Distinct inodes hashed.
    pub inodes_hashed: usize,
    /// Bytes hashed.
    pub bytes_hashed: u64,
}

impl Survey {
    /// Nothing damaged and every manifest trusted.
    pub fn is_whole(&self) -> bool {
        self.damaged.is_empty() && self.untrusted.is_empty()
    }

    /// The damaged files that reach generation `name`.
    pub fn damage_in<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a DamagedFile> + 'a {
        self.damaged
            .iter()
            .filter(move |d| d.generations().iter().any(|g| g == name))
    }
}

/// Checks `generations` (see [`live_generations`]) against their manifests: the signature with
/// `verifier`, then every file. A revision held by several generations is checked once; a file
/// shared by several revisions is hashed once.
pub fn survey(repo: &Repo, generations: &[Generation], verifier: &VerifyingKey) -> Survey {
    let mut by_revision: Vec<(String, Vec<String>)> = Vec::new();
    for generation in generations {
        match by_revision
            .iter_mut()
            .find(|(revision, _)| *revision == generation.revision)
        {
            Some((_, names)) => names.push(generation.name.clone()),
            None => by_revision.push((generation.revision.clone(), vec![generation.name.clone()])),
        }
    }
    let mut survey = Survey {
        revisions: by_revision.clone(),
        ..Survey::default()
    };
    let mut hashed: HashMap<(u64, u64), Result<(u64, String), String>> = HashMap::new();
    // (path, sha256) -> index into survey.damaged
    let mut damaged_index: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (revision, names) in by_revision {
        let dir = repo.revision_dir(&revision);
        let manifest = match trusted_manifest(&dir, verifier) {
            Ok(manifest) => manifest,
            Err(problem) => {
                survey.untrusted.push(UntrustedRevision {
                    revision,
                    generations: names,
                    problem,
                });
                continue;
            }
        };
        for file in &manifest.files {
            survey.files_checked += 1;
            let path = dir.join(&file.path);
            let found = match fs::symlink_metadata(&path) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => Some(Found::Missing),
                Err(err) => Some(Found::Unreadable {
                    error: err.to_string(),
                }),
                Ok(meta) if !meta.file_type().is_file() => Some(Found::NotAFile),
                Ok(meta) => {
                    let result = hashed.entry((meta.dev(), meta.ino())).or_insert_with(|| {
                        survey.inodes_hashed += 1;
                        survey.bytes_hashed += meta.len();
                        crate::mirror::hash_file(&path).map_err(|err| err.to_string())
                    });
                    match result {
                        Ok((size, sha256)) if *size == file.size && *sha256 == file.sha256 => {
                            survey
                                .good
                                .entry(file.sha256.clone())
                                .or_insert_with(|| path.clone());
                            let mode = meta.mode() & 0o7777;
                            if mode & 0o222 != 0 {
                                survey.writable.push((path.clone(), mode));
                            }
                            None
                        }
                        Ok((size, sha256)) => Some(Found::Differs {
                            size: *size,
                            sha256: sha256.clone(),
                        }),
                        Err(error) => Some(Found::Unreadable {
                            error: error.clone(),
                        }),
                    }
                }
            };
            let Some(found) = found else {
                continue;
            };
            let copy = DamagedCopy {
                revision: revision.clone(),
                generations: names.clone(),
                found,
                path,
            };
            let key = (file.path.clone(), file.sha256.clone());
            match damaged_index.get(&key) {
                Some(&i) => survey.damaged[i].copies.push(copy),
                None => {
                    let product = manifest.product(&file.product);
                    damaged_index.insert(key, survey.damaged.len());
                    survey.damaged.push(DamagedFile {
                        path: file.path.clone(),
                        size: file.size,
                        sha256: file.sha256.clone(),
                        entry: file.clone(),
                        product_kind: product.map(|p| p.kind.clone()),
                        config_product: product
                            .map(|p| p.config_product().to_string())
                            .unwrap_or_else(|| file.product.clone()),
                        copies: vec![copy],
                    });
                }
            }
        }
    }
    survey.damaged.sort_by(|a, b| a.path.cmp(&b.path));
    survey
}

/// The manifest of the revision in `dir` when its signature verifies with `verifier`.
fn trusted_manifest(dir: &Path, verifier: &VerifyingKey) -> Result<Manifest, String> {
    let read =
        |name: &str| fs::read(dir.join(name)).map_err(|err| format!("cannot read `{name}`: {err}"));
    let bytes = read(manifest::MANIFEST_FILE)?;
    let signature = read(manifest::SIGNATURE_FILE)?;
    if !verifier.verify(&bytes, &signature) {
        return Err("its manifest is not signed by this manager's key".into());
    }
    serde_json::from_slice(&bytes).map_err(|err| format!("its manifest is not valid JSON: {err}"))
}

/// Puts the verified content at `source` (a file the caller wrote, e.g. a download; it is
/// consumed) into every path of `targets`, as one read-only inode: `source` is fsynced, made
/// [`REVISION_FILE_MODE`] and renamed over the first target; each other target gets a hard
/// link to it, made aside and renamed over it; every directory touched is fsynced. `source`
/// must be on the repository's file system, in the first target's directory.
pub fn restore(source: &Path, targets: &[PathBuf]) -> io::Result<()> {
    let Some((first, rest)) = targets.split_first() else {
        return Ok(());
    };
    let file = fs::File::open(source)?;
    file.sync_all()?;
    fs::set_permissions(source, fs::Permissions::from_mode(REVISION_FILE_MODE))?;
    replace(first, |aside| fs::rename(source, aside))?;
    for target in rest {
        replace(target, |aside| fs::hard_link(first, aside))?;
    }
    Ok(())
}

/// Makes `target` what `make` puts at a temporary path beside it, by rename. Whatever was at
/// `target` (a damaged file, a directory someone made there) is replaced; a directory is
/// removed first, since rename cannot replace it with a file.
fn replace(target: &Path, make: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let aside = aside_path(target);
    let _ = fs::remove_file(&aside);
    make(&aside)?;
    if fs::symlink_metadata(target).is_ok_and(|m| m.is_dir())
        && let Err(err) = fs::remove_dir_all(target)
    {
        let _ = fs::remove_file(&aside);
        return Err(err);
    }
    if let Err(err) = fs::rename(&aside, target) {
        let _ = fs::remove_file(&aside);
        return Err(err);
    }
    crate::durable::sync_dir(parent)
}

/// Suffix of [`aside_path`].
const ASIDE_SUFFIX: &str = ".pm-repair";
/// Suffix of [`source_path`].
const SOURCE_SUFFIX: &str = ".pm-source";

/// A temporary path beside `target`, for a repaired file before its rename.
pub fn aside_path(target: &Path) -> PathBuf {
    hidden_beside(target, ASIDE_SUFFIX)
}

/// A temporary path beside `target` where a repair puts the candidate content it checks.
pub fn source_path(target: &Path) -> PathBuf {
    hidden_beside(target, SOURCE_SUFFIX)
}

fn hidden_beside(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{suffix}"))
}

/// Removes what a killed repair left in the revisions of `generations` ([`aside_path`],
/// [`source_path`]); the caller holds the repository lock. Returns the paths removed.
pub fn remove_leftovers(repo: &Repo, generations: &[Generation]) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut stack: Vec<PathBuf> = generations
        .iter()
        .map(|g| repo.revision_dir(&g.revision))
        .collect();
    stack.dedup();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => stack.push(path),
                Ok(_)
                    if name.starts_with('.')
                        && (name.ends_with(ASIDE_SUFFIX) || name.ends_with(SOURCE_SUFFIX))
                        && fs::remove_file(&path).is_ok() =>
                {
                    removed.push(path)
                }
                _ => {}
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_links_every_target_to_one_read_only_inode_and_leaves_nothing_aside() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("r1/clamav/test-2.cdiff");
        let b = dir.path().join("r2/clamav/test-2.cdiff");
        fs::create_dir_all(a.parent().unwrap()).unwrap();
        fs::create_dir_all(b.parent().unwrap()).unwrap();
        fs::write(&a, b"damaged").unwrap();
        fs::hard_link(&a, &b).unwrap();
        let source = source_path(&a);
        fs::write(&source, b"good").unwrap();
        restore(&source, &[a.clone(), b.clone()]).unwrap();
        for path in [&a, &b] {
            assert_eq!(fs::read(path).unwrap(), b"good");
            assert_eq!(fs::metadata(path).unwrap().mode() & 0o777, 0o444);
        }
        assert_eq!(
            fs::metadata(&a).unwrap().ino(),
            fs::metadata(&b).unwrap().ino()
        );
        assert_eq!(fs::metadata(&a).unwrap().nlink(), 2);
        let left: Vec<_> = fs::read_dir(a.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the repaired file is left");
        // What a killed repair would leave is removed by the next one.
        fs::write(aside_path(&b), b"x").unwrap();
        fs::write(source_path(&b), b"x").unwrap();
        let repo = Repo::new(dir.path());
        fs::create_dir_all(dir.path().join("repo/revisions")).unwrap();
        fs::rename(dir.path().join("r2"), repo.revision_dir("r2")).unwrap();
        let generations = [Generation {
            name: "dist".into(),
            revision: "r2".into(),
        }];
        assert_eq!(remove_leftovers(&repo, &generations).len(), 2);
        let left: Vec<_> = fs::read_dir(repo.revision_dir("r2/clamav"))
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1, "only the repaired file is left");
    }

    #[test]
    fn live_generations_name_latest_dist_and_numbered_backups() {
        let generations = Generations {
            latest: Some("r4".into()),
            dist: Some("r4".into()),
            backups: vec!["r3".into(), "r2".into()],
            ..Generations::default()
        };
        let names: Vec<(String, String)> = live_generations(&generations)
            .into_iter()
            .map(|g| (g.name, g.revision))
            .collect();
        let expected = [
            ("latest", "r4"),
            ("dist", "r4"),
            ("backup/1", "r3"),
            ("backup/2", "r2"),
        ];
        assert_eq!(
            names,
            expected
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        );
    }
}
