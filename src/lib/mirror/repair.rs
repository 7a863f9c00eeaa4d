//! `pm-mirror repair`: puts back every file of latest, dist and backup/1..3 whose content no
//! longer matches its signed manifest, into every revision that shares it, and changes nothing
//! else (no new revision, no view switch, serials, manifests and signatures untouched).
//!
//! Where the right content comes from, first found wins:
//! 1. another live revision holding a verified copy with the same sha256 (damage in a copy that
//!    was not hard-linked), linked in;
//! 2. an archive (`repo/archives/rN.tar.gz`) holding the same path with that sha256;
//! 3. upstream or the parent mirror, fetched again as sync fetches it (the same client, proxy
//!    and retries), or an `agent` product's package directory.
//!
//! Local sources come first: they cost no request to a vendor that rate-limits (ClamAV's CDN
//! answers 429 and a cool-down), and they work on a closed site. Every candidate is checked
//! against the manifest's size and sha256 before it is used, and a ClamAV file also by ClamAV's
//! own signatures, as sync checks it. [`crate::integrity::restore`] then replaces every damaged
//! path with one read-only inode by rename.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use serde::Serialize;

use super::sync::{self, Origin};
use super::upstream::{Fetched, Upstream};
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::config::Config;
use crate::integrity::{self, DamagedFile, Survey, UntrustedRevision};
use crate::repo::{Generations, Repo, RepoLock};

/// `--json` document of `pm-mirror repair`.
#[derive(Debug, Serialize)]
pub struct RepairReport {
    /// Whether a file was restored (with `--dry-run`: would be).
    pub changed: bool,
    /// `--dry-run`: nothing was fetched or written.
    pub dry_run: bool,
    /// Files listed in the manifests checked (every generation).
    pub files_checked: usize,
    /// Bytes hashed (a file shared by several revisions once).
    pub bytes_hashed: u64,
    /// Per damaged file: where its content came from and which generations it fixed.
    pub files: Vec<RepairedFile>,
    /// Revisions whose manifest does not verify: their files were not checked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub untrusted: Vec<UntrustedRevision>,
    /// Wall time.
    pub duration_seconds: f64,
    /// Files of the right content whose mode let them be written, made 0444 again (in a dry
    /// run: would be), with the mode they had.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modes_restored: Vec<String>,
}

/// What happened to one damaged file.
#[derive(Debug, Clone, Serialize)]
pub struct RepairedFile {
    /// Its path in the revisions, e.g. `clamav/test-2.cdiff`.
    pub path: String,
    /// The size and sha256 its manifests say.
    pub size: u64,
    pub sha256: String,
    /// `repaired`, `would_repair` or `unrepairable`.
    pub result: RepairResult,
    /// The generations it reaches (`latest`, `dist`, `backup/1`).
    pub generations: Vec<String>,
    /// The revisions it reaches.
    pub revisions: Vec<String>,
    /// Where the content came (or would come) from: `backup/2 (r3)`, `archive r1`, a URL.
    pub source: Option<String>,
    /// What was tried and why it did not do, when unrepairable (or a source failed first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<String>,
}

/// The outcome for one damaged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairResult {
    /// Restored into every revision that holds it.
    Repaired,
    /// `--dry-run`: a source was found (an upstream URL is not fetched in a dry run).
    WouldRepair,
    /// No source has the content.
    Unrepairable,
}

/// A candidate source of a damaged file's content.
enum Source {
    /// A verified copy in a live revision.
    Copy { label: String, path: PathBuf },
    /// A member of an archive.
    Archive { revision: String },
    /// Upstream, the parent or the package directory.
    Origin(Origin),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Copy { label, .. } => label.clone(),
            Source::Archive { revision } => format!("archive {revision}"),
            Source::Origin(Origin::Url(url)) => url.to_string(),
            Source::Origin(Origin::File(path)) => path.display().to_string(),
        }
    }
}

/// Runs `pm-mirror repair`: 0 when nothing was damaged or everything was repaired, 1 when a
/// file could not be repaired (named with the next step).
pub(super) async fn run_repair(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let started = std::time::Instant::now();
    let started_at = Utc::now();
    // A closed site has no products: it repairs from its own revisions and archives only.
    let config = super::load_config(home)?;
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(super::repo_error)?;
    let generations = repo.generations().map_err(super::repo_error)?;
    let verifier = manifest_verifier(home)?;
    let survey = integrity::survey(&repo, &integrity::live_generations(&generations), &verifier);
    let upstream = Upstream::new(&config, global.show_progress())?;
    // Opened before anything changes: an inventory busy past the lock timeout fails the repair
    // with nothing restored, rather than a repair done but not recorded.
    let inventory = match global.dry_run || survey.damaged.is_empty() {
        true => None,
        false => Some(
            crate::inventory::Inventory::open(home, global.lock_timeout)
                .map_err(super::inventory_error)?,
        ),
    };
    let files = repair(
        &repo,
        &lock,
        &generations,
        &survey,
        (&config, &upstream),
        global.dry_run,
    )
    .await;
    // Right content under a mode that lets it be written: read-only again.
    let mut modes_restored = Vec::new();
    for (path, mode) in &survey.writable {
        if !global.dry_run {
            std::fs::set_permissions(
                path,
                std::fs::Permissions::from_mode(integrity::REVISION_FILE_MODE),
            )
            .with_context(|| format!("cannot make `{}` read-only", path.display()))?;
        }
        modes_restored.push(format!("{} (was {mode:o})", path.display()));
    }
    drop(lock);
    let report = RepairReport {
        changed: files.iter().any(|f| f.result != RepairResult::Unrepairable)
            || !modes_restored.is_empty(),
        modes_restored,
        dry_run: global.dry_run,
        files_checked: survey.files_checked,
        bytes_hashed: survey.bytes_hashed,
        files,
        untrusted: survey.untrusted.clone(),
        duration_seconds: started.elapsed().as_secs_f64(),
    };
    let unrepairable: Vec<&RepairedFile> = report
        .files
        .iter()
        .filter(|f| f.result == RepairResult::Unrepairable)
        .collect();
    if let Some(inventory) = inventory {
        record_job(&inventory, started_at, &report, unrepairable.len())?;
    }
    if global.json {
        cli::print_json(&report)?;
    } else if !global.quiet && report.files.is_empty() && !report.modes_restored.is_empty() {
        cli::print_text(format!(
            "{} read-only (0444) again: {}",
            if report.dry_run { "would make" } else { "made" },
            report.modes_restored.join(", ")
        ))?;
    } else if !global.quiet && report.files.is_empty() {
        cli::print_text(format!(
            "nothing to repair: {} files of latest, dist and the backups match their manifests \
             ({} bytes hashed)",
            report.files_checked, report.bytes_hashed
        ))?;
    } else if !global.quiet {
        cli::print_text(repair_text(&report.files))?;
    }
    for file in &unrepairable {
        eprintln!(
            "error: `{}` (sha256 {}) is damaged in {} and no source has it: {}",
            file.path,
            file.sha256,
            file.generations.join(", "),
            file.tried.join("; ")
        );
    }
    if !unrepairable.is_empty() {
        eprintln!("hint: {UNREPAIRABLE_HINT}");
    }
    for untrusted in &report.untrusted {
        eprintln!(
            "error: {} ({}): {}; its files were not checked",
            untrusted.revision,
            untrusted.generations.join(", "),
            untrusted.problem
        );
    }
    if !report.untrusted.is_empty() {
        eprintln!("hint: {UNTRUSTED_HINT}");
    }
    Ok(if unrepairable.is_empty() && report.untrusted.is_empty() {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// The next step for a revision whose manifest does not verify.
const UNTRUSTED_HINT: &str = "a repair restores files, never manifests or signatures: restore \
    the revision's `manifest.json`/`manifest.sig` or `pki/manifest-signing.*` from a backup of \
    PM_HOME; a latest heals with the next sync that makes a new revision";

/// The next step when no source has a file's content.
const UNREPAIRABLE_HINT: &str = "restore the file from a backup of PM_HOME (its sha256 is \
    above) and run `pm-mirror repair` again, or leave the damaged generation behind: \
    `pm-mirror sync` (on a closed site: `pm-mirror import` of a full bundle, exported without \
    `--since`) and `pm-mirror publish` for latest and dist, and a backup leaves at the \
    publishes after (never roll back to it); docs/repairing.md";

/// The manager's manifest key, as the revisions were signed with it.
fn manifest_verifier(home: &Path) -> anyhow::Result<crate::pki::VerifyingKey> {
    let path = home.join(crate::pki::SIGNING_PUBLIC_KEY_FILE);
    let pem = std::fs::read(&path).map_err(|err| {
        UserError::failure(format!("cannot read `{}`: {err}", path.display()))
            .with_hint("restore `pki/` from a backup of this manager")
    })?;
    Ok(crate::pki::parse_public_key(&pem, &path)?.1)
}

/// Repairs every damaged file of `survey`, files a `.sign` signs before the `.sign`.
/// `upstream`: the configuration and client to fetch from (a closed site's has no products).
pub(crate) async fn repair(
    repo: &Repo,
    lock: &RepoLock,
    generations: &Generations,
    survey: &Survey,
    upstream: (&Config, &Upstream),
    dry_run: bool,
) -> Vec<RepairedFile> {
    if !dry_run {
        for path in integrity::remove_leftovers(repo, &integrity::live_generations(generations)) {
            tracing::info!(path = %path.display(), "removed what a killed repair left");
        }
    }
    let mut order: Vec<&DamagedFile> = survey.damaged.iter().collect();
    order.sort_by_key(|d| (d.path.ends_with(".sign"), d.path.clone()));
    let mut results = Vec::new();
    for damaged in order {
        results.push(repair_one(repo, lock, generations, survey, upstream, damaged, dry_run).await);
    }
    results.sort_by(|a, b| a.path.cmp(&b.path));
    results
}

async fn repair_one(
    repo: &Repo,
    _lock: &RepoLock,
    generations: &Generations,
    survey: &Survey,
    upstream: (&Config, &Upstream),
    damaged: &DamagedFile,
    dry_run: bool,
) -> RepairedFile {
    let mut result = RepairedFile {
        path: damaged.path.clone(),
        size: damaged.size,
        sha256: damaged.sha256.clone(),
        result: RepairResult::Unrepairable,
        generations: damaged.generations(),
        revisions: damaged.copies.iter().map(|c| c.revision.clone()).collect(),
        source: None,
        tried: Vec::new(),
    };
    let targets: Vec<PathBuf> = damaged.copies.iter().map(|c| c.path.clone()).collect();
    let mut sources = Vec::new();
    if let Some(path) = survey.good.get(&damaged.sha256) {
        let label = survey
            .revisions
            .iter()
            .find(|(revision, _)| path.starts_with(repo.revision_dir(revision)))
            .map(|(revision, names)| format!("{} ({revision})", names.join(", ")))
            .unwrap_or_else(|| path.display().to_string());
        sources.push(Source::Copy {
            label,
            path: path.clone(),
        });
    }
    for revision in &generations.archives {
        sources.push(Source::Archive {
            revision: revision.clone(),
        });
    }
    sources.extend(
        sync::origins(upstream.0, &damaged.config_product, &damaged.path)
            .into_iter()
            .map(Source::Origin),
    );
    let download = integrity::source_path(&targets[0]);
    for source in sources {
        let label = source.describe();
        if dry_run && matches!(source, Source::Origin(Origin::Url(_))) {
            // Not fetched in a dry run: said as where the repair would fetch it.
            result.result = RepairResult::WouldRepair;
            result.source = Some(label);
            return result;
        }
        let fetched = fetch(repo, upstream.1, &source, damaged, &download, dry_run)
            .await
            .and_then(|()| {
                if dry_run {
                    return Ok(());
                }
                check_content(damaged, &download, &targets[0])
            });
        match fetched {
            Ok(()) if dry_run => {
                result.result = RepairResult::WouldRepair;
                result.source = Some(label);
                return result;
            }
            Ok(()) => match integrity::restore(&download, &targets) {
                Ok(()) => {
                    tracing::info!(path = %damaged.path, source = %label, generations = %damaged.generations_text(), "repaired a damaged file");
                    result.result = RepairResult::Repaired;
                    result.source = Some(label);
                    return result;
                }
                Err(err) => result
                    .tried
                    .push(format!("{label}: cannot restore it: {err}")),
            },
            Err(problem) => result.tried.push(format!("{label}: {problem}")),
        }
        let _ = std::fs::remove_file(&download);
    }
    if result.tried.is_empty() {
        result
            .tried
            .push("no other revision, archive or configured upstream has it".to_string());
    }
    result
}

/// Puts the candidate content at `download` (in a dry run only checks an archive or a copy
/// has it). An archive member is checked against the manifest's sha256 as it streams.
async fn fetch(
    repo: &Repo,
    upstream: &Upstream,
    source: &Source,
    damaged: &DamagedFile,
    download: &Path,
    dry_run: bool,
) -> Result<(), String> {
    let _ = std::fs::remove_file(download);
    if let (false, Some(parent)) = (dry_run, download.parent()) {
        std::fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create `{}`: {err}", parent.display()))?;
    }
    match source {
        Source::Copy { path, .. } => {
            if dry_run {
                return Ok(());
            }
            // The verified copy's own inode: the repaired paths share it.
            std::fs::hard_link(path, download)
                .or_else(|_| std::fs::copy(path, download).map(drop))
                .map_err(|err| format!("cannot copy it: {err}"))
        }
        Source::Archive { revision } => {
            let archive = repo.archive_path(revision);
            let member = Path::new(revision).join(&damaged.path);
            let out = (!dry_run).then_some(download);
            match extract_member(&archive, &member, out) {
                Ok(Some((size, sha256))) if size == damaged.size && sha256 == damaged.sha256 => {
                    Ok(())
                }
                Ok(Some((size, sha256))) => Err(format!(
                    "holds another content (size {size}, sha256 {sha256})"
                )),
                Ok(None) => Err("does not hold it".into()),
                Err(err) => Err(format!("cannot read `{}`: {err}", archive.display())),
            }
        }
        Source::Origin(Origin::File(path)) => {
            if dry_run {
                return match crate::mirror::hash_file(path) {
                    Ok((size, sha256)) if size == damaged.size && sha256 == damaged.sha256 => {
                        Ok(())
                    }
                    Ok(_) => Err("holds another content".into()),
                    Err(err) => Err(err.to_string()),
                };
            }
            std::fs::copy(path, download)
                .map(drop)
                .map_err(|err| format!("cannot copy it: {err}"))
        }
        Source::Origin(Origin::Url(url)) => {
            match upstream.download(url, download, damaged.size).await {
                Ok(Fetched::Body { .. }) => Ok(()),
                Ok(_) => Err("not found (HTTP 404): upstream has moved on".into()),
                Err(err) => Err(err.to_string()),
            }
        }
    }
}

/// The candidate at `file` is the manifest's content: size, sha256, and for a ClamAV file its
/// own signatures (a `.sign` against the file it signs in the revision at `target`).
fn check_content(damaged: &DamagedFile, file: &Path, target: &Path) -> Result<(), String> {
    let (size, sha256) = crate::mirror::hash_file(file).map_err(|err| err.to_string())?;
    if size != damaged.size || sha256 != damaged.sha256 {
        return Err(format!(
            "offers another content (size {size}, sha256 {sha256}; the manifest says size {}, \
             sha256 {})",
            damaged.size, damaged.sha256
        ));
    }
    if damaged.product_kind.as_deref() == Some("clamav") {
        let signed = sync::signed_file(&damaged.path).and_then(|signed| {
            let name = Path::new(&signed).file_name()?.to_owned();
            Some(target.with_file_name(name))
        });
        sync::verify_clamav_file(&damaged.path, file, signed.as_deref())
            .map_err(|problem| format!("does not verify as ClamAV's: {problem}"))?;
    }
    Ok(())
}

/// Streams `archive` (a revision's `.tar.gz`) to the member `member`; when found, hashes it
/// (writing it to `out` when given, fsynced) and returns its size and sha256.
fn extract_member(
    archive: &Path,
    member: &Path,
    out: Option<&Path>,
) -> io::Result<Option<(u64, String)>> {
    let file = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in tar.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular || entry.path()? != member {
            continue;
        }
        let mut writer = match out {
            Some(path) => Some(
                std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(path)?,
            ),
            None => None,
        };
        let mut hasher = openssl::sha::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = entry.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
            if let Some(writer) = writer.as_mut() {
                writer.write_all(&buffer[..n])?;
            }
        }
        if let Some(writer) = writer {
            writer.sync_all()?;
        }
        return Ok(Some((size, crate::manifest::hex(&hasher.finish()))));
    }
    Ok(None)
}

/// A `repair` job in the inventory, so `pm-query` shows who repaired what and when.
fn record_job(
    inventory: &crate::inventory::Inventory,
    started_at: chrono::DateTime<Utc>,
    report: &RepairReport,
    unrepairable: usize,
) -> anyhow::Result<()> {
    let repaired = report.files.len() - unrepairable;
    let status = if unrepairable > 0 { "failed" } else { "ok" };
    let summary = format!(
        "repaired {repaired} file(s){}: {}",
        if unrepairable > 0 {
            format!(", {unrepairable} unrepairable")
        } else {
            String::new()
        },
        report
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    inventory
        .insert_job("repair", started_at, status, &summary)
        .map_err(super::inventory_error)
        .context("cannot record the repair")?;
    Ok(())
}

/// One line per damaged file: what was (or would be) done, where, from where.
pub(crate) fn repair_text(files: &[RepairedFile]) -> String {
    files
        .iter()
        .map(|file| {
            let places = file.generations.join(", ");
            let source = file.source.as_deref().unwrap_or("-");
            match file.result {
                RepairResult::Repaired => {
                    format!("repaired `{}` in {places} from {source}", file.path)
                }
                RepairResult::WouldRepair if source.contains("://") => format!(
                    "would repair `{}` in {places} from {source} (fetched and checked by the \
                     real run only)",
                    file.path
                ),
                RepairResult::WouldRepair => {
                    format!("would repair `{}` in {places} from {source}", file.path)
                }
                RepairResult::Unrepairable => {
                    format!(
                        "cannot repair `{}` in {places}: no source has it",
                        file.path
                    )
                }
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `; repaired PATH, PATH` for the sync job's summary (empty when nothing was repaired).
pub(crate) fn repaired_summary(files: &[RepairedFile]) -> String {
    let repaired: Vec<&str> = files
        .iter()
        .filter(|f| f.result == RepairResult::Repaired)
        .map(|f| f.path.as_str())
        .collect();
    match repaired.is_empty() {
        true => String::new(),
        false => format!("; repaired {}", repaired.join(", ")),
    }
}

/// Before a sync: latest's files checked against its manifest (a sync would otherwise trust
/// them, and carry damaged content into the next revision by hard link). When one is damaged,
/// every generation is surveyed and repaired as `pm-mirror repair` does; a file no source has
/// fails the sync with the repair command as the next step. Costs hashing latest once.
pub(crate) async fn repair_latest(
    home: &Path,
    repo: &Repo,
    lock: &RepoLock,
    generations: &Generations,
    upstream: (&Config, &Upstream),
    dry_run: bool,
) -> anyhow::Result<Vec<RepairedFile>> {
    let Some(latest) = &generations.latest else {
        return Ok(Vec::new());
    };
    // Without the public key (a new home) there is nothing signed to check against.
    let Ok(verifier) = manifest_verifier(home) else {
        return Ok(Vec::new());
    };
    let latest_only = [integrity::Generation {
        name: "latest".into(),
        revision: latest.clone(),
    }];
    if integrity::survey(repo, &latest_only, &verifier)
        .damaged
        .is_empty()
    {
        return Ok(Vec::new());
    }
    let survey = integrity::survey(repo, &integrity::live_generations(generations), &verifier);
    Ok(repair(repo, lock, generations, &survey, upstream, dry_run).await)
}

/// A damaged file of latest that [`repair_latest`] could not repair and that the staged
/// revision would carry over as it is: the sync fails with the repair as the next step. When
/// upstream has moved on (the new revision no longer lists it) the sync goes ahead.
pub(crate) fn carried_damage(
    repaired: &[RepairedFile],
    staged: &[crate::manifest::FileEntry],
) -> Option<anyhow::Error> {
    let file = repaired.iter().find(|f| {
        f.result == RepairResult::Unrepairable
            && f.generations.iter().any(|g| g == "latest")
            && staged
                .iter()
                .any(|s| s.path == f.path && s.sha256 == f.sha256)
    })?;
    Some(
        UserError::failure(format!(
            "latest is damaged: `{}` does not match its manifest and no source has it ({}); \
             latest is unchanged",
            file.path,
            file.tried.join("; ")
        ))
        .with_hint(format!(
            "run `pm-mirror repair` to see every damaged file; {UNREPAIRABLE_HINT}"
        ))
        .into(),
    )
}
