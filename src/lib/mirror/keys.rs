//! `pm-mirror key rotate`: replaces the manifest signing key and re-signs what the repository
//! serves with the new one (docs/keys.md).
//!
//! With the old key at hand, the old key signs a rotation statement naming the new key
//! ([`crate::pki::rotation`]); agents, importing mirrors and child mirrors follow it. With
//! `--old-key-lost` there is no statement (nothing can sign one): the repository is made whole
//! with the new key and every follower must be told to trust it.
//!
//! Crash-safe by order: the new key is written aside first (`pki/manifest-signing.next.key`,
//! while it exists nothing else signs), then the chain, then each revision's `manifest.sig`
//! (one rename each), then a new dist statement in one view switch, and last the key itself
//! by rename. Running the command again after a crash finishes the same rotation.

use std::path::Path;

use anyhow::Context;
use chrono::Utc;
use serde::Serialize;

use super::{repo_error, sign_dist_statement_with};
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::config::Config;
use crate::durable;
use crate::inventory::Inventory;
use crate::manifest::{MANIFEST_FILE, SIGNATURE_FILE};
use crate::pki::rotation::{KeyChain, PENDING_KEY_FILE, RETIRED_DIR, SERVED_FILE, SignedRotation};
use crate::pki::{self, SIGNING_KEY_FILE, SIGNING_PUBLIC_KEY_FILE, SigningKey};
use crate::repo::Repo;

/// What `key rotate` did; its `--json` document.
#[derive(Debug, Serialize)]
pub struct RotateReport {
    /// Whether anything changed (false with `--dry-run`).
    pub changed: bool,
    /// `--dry-run`: nothing changed.
    pub dry_run: bool,
    /// The key replaced (`None` when it was lost and its public half too).
    pub old_key: Option<String>,
    /// The key that signs from now on.
    pub new_key: String,
    /// Whether a rotation statement signed by the old key lets followers move on by themselves.
    pub statement: bool,
    /// The statement's sequence number.
    pub sequence: Option<u64>,
    /// Revisions whose manifest was signed again (latest, dist, backups).
    pub re_signed: Vec<String>,
    /// The dist statement's serial after the rotation.
    pub dist_serial: Option<u64>,
}

/// `pm-mirror key rotate [--old-key-lost] [--reason TEXT]`.
pub fn run_key_rotate(
    home: &Path,
    global: &GlobalArgs,
    old_key_lost: bool,
    reason: &str,
) -> anyhow::Result<ExitStatus> {
    let report = rotate(home, global, old_key_lost, reason)?;
    if global.json {
        cli::print_json(&report)?;
    } else if !global.quiet {
        print(&report)?;
    }
    Ok(ExitStatus::Success)
}

fn rotate(
    home: &Path,
    global: &GlobalArgs,
    old_key_lost: bool,
    reason: &str,
) -> anyhow::Result<RotateReport> {
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let key_path = home.join(SIGNING_KEY_FILE);
    // A damaged key file is a lost key: `--old-key-lost` sets it aside.
    let old = match SigningKey::load(home) {
        Ok(key) => key,
        Err(err @ (pki::PkiError::BadKey { .. } | pki::PkiError::NotEd25519 { .. }))
            if old_key_lost =>
        {
            tracing::warn!(error = %err, "the signing key file is damaged; setting it aside");
            None
        }
        Err(err) => {
            return Err(anyhow::Error::new(err).context("cannot load the manifest signing key"));
        }
    };
    let generations = repo.generations().map_err(repo_error)?;
    let mut revisions: Vec<String> = Vec::new();
    for revision in generations
        .latest
        .iter()
        .chain(generations.dist.iter())
        .chain(generations.backups.iter())
    {
        if !revisions.contains(revision) {
            revisions.push(revision.clone());
        }
    }
    let mut chain = current_chain(home, &repo)?;
    let pending_path = home.join(PENDING_KEY_FILE);
    // A damaged new key of an unfinished rotation: harmless to replace while no statement names
    // it (the chain's last rotation leads to the home's key); once one does, followers may have
    // moved to it, and only `--old-key-lost` goes on (they then need the trust step).
    let mut damaged_pending = false;
    let pending = match SigningKey::load_file(&pending_path) {
        Ok(key) => key,
        Err(
            err @ (pki::PkiError::BadKey { .. }
            | pki::PkiError::NotEd25519 { .. }
            | pki::PkiError::LoosePermissions { .. }),
        ) => {
            let home_key = old.as_ref().map(|k| k.fingerprint()).transpose()?;
            let named = chain
                .last()
                .filter(|r| Some(&r.next_key) != home_key.as_ref());
            if let (Some(named), false) = (&named, old_key_lost) {
                return Err(UserError::failure(format!(
                    "the new key of the unfinished rotation `{}` is unusable ({err}), and \
                     rotation {} already names it ({})",
                    pending_path.display(),
                    named.sequence,
                    named.next_key
                ))
                .with_hint(
                    "restore the file from a backup of `pki/` and run `pm-mirror key rotate` \
                     again; if there is none, the new key is lost: run `pm-mirror key rotate \
                     --old-key-lost` (agents that followed it need the trust step, docs/keys.md)",
                )
                .into());
            }
            damaged_pending = named.is_some();
            if !global.dry_run {
                let aside = move_aside(&pending_path, "damaged")?;
                tracing::warn!(error = %err, path = %aside.display(), "set aside the unusable new key of an unfinished rotation");
            }
            None
        }
        Err(err) => {
            return Err(anyhow::Error::new(err).context(format!(
                "cannot load the unfinished rotation's key `{PENDING_KEY_FILE}`"
            )));
        }
    };
    // A statement already written for the pending key: the old key is not needed any more.
    let pending_fingerprint: Option<String> =
        pending.as_ref().map(|k| k.fingerprint()).transpose()?;
    let written = chain
        .last()
        .filter(|r| Some(&r.next_key) == pending_fingerprint.as_ref());
    // The key in `pki/` is the old key only if it signed the repository (or the pending
    // rotation's statement starts from it).
    let signs_repository = |key: &SigningKey| -> anyhow::Result<bool> {
        let verifier = key.verifying_key()?;
        let fingerprint = key.fingerprint()?;
        Ok(revisions.is_empty()
            || written
                .as_ref()
                .is_some_and(|r| r.previous_key == fingerprint)
            || revisions
                .iter()
                .any(|r| pki::revision_signed_by(&repo, r, &verifier)))
    };
    let mut set_aside = None;
    let old = match old {
        // The statement that leads followers to the lost new key is signed: the old key is
        // replaced like a lost one (and kept aside).
        Some(key) if old_key_lost && damaged_pending => {
            set_aside = Some(key);
            None
        }
        Some(key) if old_key_lost && signs_repository(&key)? => {
            return Err(UserError::usage(format!(
                "`--old-key-lost` but the signing key `{}` is here and signed this repository",
                key_path.display()
            ))
            .with_hint(
                "run `pm-mirror key rotate` without it: the old key then signs the rotation and \
                 agents and mirrors follow by themselves",
            )
            .into());
        }
        Some(key) if !signs_repository(&key)? => {
            if !old_key_lost {
                return Err(UserError::failure(format!(
                    "the signing key {} in `{}` did not sign this repository: it cannot sign a \
                     rotation its followers would accept",
                    key.fingerprint()?,
                    key_path.display()
                ))
                .with_hint(
                    "put back the key that signed the repository (restore `pki/` from a newer \
                     backup) and rotate then; if that key is lost, run `pm-mirror key rotate \
                     --old-key-lost`, which sets this one aside (docs/keys.md)",
                )
                .into());
            }
            set_aside = Some(key);
            None
        }
        Some(_) | None if old_key_lost => None,
        Some(key) => Some(key),
        None if written.is_some() => None,
        None => {
            return Err(UserError::failure(format!(
                "there is no signing key to rotate: `{}` is missing",
                key_path.display()
            ))
            .with_hint(
                "restore `pki/` from a backup of PM_HOME and rotate then; if the key is truly \
                 lost, run `pm-mirror key rotate --old-key-lost` (agents must then be told to \
                 trust the new key: docs/keys.md)",
            )
            .into());
        }
    };
    let statement = old.is_some() || written.is_some();
    // Every key this home is known to have signed with: a manifest none of them verifies was
    // edited after signing (when one of them verifies the others).
    let mut known_keys = known_keys(home, &chain, old.as_ref())?;
    if let Some(pending) = &pending {
        known_keys.push((pending.fingerprint()?, pending.verifying_key()?));
    }
    let signer = |revision: &str| {
        known_keys
            .iter()
            .find(|(_, key)| pki::revision_signed_by(&repo, revision, key))
            .map(|(fingerprint, _)| fingerprint.clone())
    };
    let signed_by_known = |revision: &str| signer(revision).is_some();
    // The key replaced: the one at hand, else the one that signed the repository.
    let old_fingerprint = match &old {
        Some(key) => Some(key.fingerprint()?),
        None => written
            .as_ref()
            .map(|r| r.previous_key.clone())
            .or_else(|| {
                revisions
                    .iter()
                    .filter_map(|r| signer(r))
                    .find(|fingerprint| Some(fingerprint) != pending_fingerprint.as_ref())
            }),
    };
    let mut problems = Vec::new();
    let any_known = revisions.iter().any(|r| signed_by_known(r));
    for revision in &revisions {
        if old.is_some() {
            // With the old key at hand its signature vouches for the files.
            if !signed_by_known(revision) {
                problems.push(format!(
                    "{revision}: its manifest is not signed by the old key (edited or damaged)"
                ));
            }
            continue;
        }
        if any_known && !signed_by_known(revision) {
            problems.push(format!(
                "{revision}: its manifest does not verify with any key this manager signed with \
                 (edited after signing)"
            ));
            continue;
        }
        if let Err(err) = super::verify_revision_files(&repo.revision_dir(revision), revision) {
            problems.push(format!("{err:#}"));
        }
    }
    if !problems.is_empty() {
        return Err(UserError::failure(format!(
            "refusing to sign anew what no key vouches for; nothing was changed:\n  {}",
            problems.join("\n  ")
        ))
        .with_hint(
            "restore the damaged files with `pm-mirror repair` (docs/repairing.md) and run this \
             again; `pm-doctor` shows every generation's state",
        )
        .into());
    }
    let sequence_if_signed = |chain: &KeyChain| match &written {
        Some(r) => Some(r.sequence),
        None => old.as_ref().map(|_| chain.next_sequence()),
    };
    if global.dry_run {
        return Ok(RotateReport {
            changed: true,
            dry_run: true,
            old_key: old_fingerprint,
            new_key: pending_fingerprint.unwrap_or_else(|| "(a new key)".to_string()),
            statement,
            sequence: sequence_if_signed(&chain),
            re_signed: revisions,
            dist_serial: generations
                .dist
                .as_ref()
                .map(|_| generations.dist_serial + 1),
        });
    }
    // Opened before anything changes: a lock timeout fails with no change.
    let inventory = Inventory::open(home, global.lock_timeout).map_err(super::inventory_error)?;
    let started_at = Utc::now();
    remove_stale_temporaries(home, &repo, &revisions);
    if let Some(key) = &set_aside {
        let aside = move_aside(&key_path, "set-aside")?;
        tracing::warn!(key = %key.fingerprint()?, path = %aside.display(), "set aside a signing key that did not sign this repository");
    } else if old.is_none() && old_key_lost && key_path.exists() {
        // Damaged: kept for whoever wants to look at it, never loaded again.
        move_aside(&key_path, "damaged")?;
    }
    let next = match pending {
        Some(key) => key,
        None => {
            let key = SigningKey::generate()?;
            let pki_dir = home.join("pki");
            durable::create_private_dir(&pki_dir, 0o700)
                .with_context(|| format!("cannot create `{}`", pki_dir.display()))?;
            key.write_private(&pending_path)?;
            key
        }
    };
    let next_fingerprint = next.fingerprint()?;
    let next_public = next.verifying_key()?;
    let mut sequence = written.as_ref().map(|r| r.sequence);
    if let (Some(old), None) = (&old, &written) {
        let number = chain.next_sequence();
        chain
            .rotations
            .push(SignedRotation::sign(old, &next, number, reason)?);
        chain.save(home)?;
        sequence = Some(number);
    }
    if !chain.rotations.is_empty() {
        // `pki/` keeps the chain followers know (also when it was restored from before a
        // rotation).
        chain.save(home)?;
    }
    if statement {
        // Served before any signature changes: a follower that meets a manifest signed by the
        // new key finds the statement that lets it move on. (An empty repository serves
        // nothing yet; its first view carries the chain.)
        if generations.latest.is_some() {
            repo.switch(&lock, &generations, None).map_err(repo_error)?;
        }
    }
    let mut re_signed = Vec::new();
    for revision in &revisions {
        if !pki::revision_signed_by(&repo, revision, &next_public) {
            let dir = repo.revision_dir(revision);
            let manifest = std::fs::read(dir.join(MANIFEST_FILE))
                .with_context(|| format!("cannot read the manifest of {revision}"))?;
            durable::write_atomic(&dir.join(SIGNATURE_FILE), &next.sign(&manifest)?, 0o444)
                .with_context(|| format!("cannot write the new signature of {revision}"))?;
        }
        re_signed.push(revision.clone());
    }
    let mut after = generations.clone();
    let mut dist_serial = None;
    if after.dist.is_some() {
        after.dist_serial += 1;
        let valid_for = Config::load(&home.join("pm.toml"))
            .map(|config| config.serve.dist_valid_for)
            .unwrap_or(crate::dist_statement::DEFAULT_VALID_FOR);
        let (_, signed) = sign_dist_statement_with(&next, &repo, &after, valid_for)?;
        repo.switch(&lock, &after, Some(&signed))
            .map_err(repo_error)?;
        dist_serial = Some(after.dist_serial);
    }
    // Last, by rename: until here the old key (or none) is the home's key and a rerun resumes.
    retire_public_half(
        home,
        old.as_ref(),
        old_fingerprint.as_deref(),
        &next_fingerprint,
    )?;
    next.install(home)?;
    std::fs::remove_file(&pending_path)
        .with_context(|| format!("cannot remove `{}`", pending_path.display()))?;
    durable::sync_parent_dir(&pending_path)
        .with_context(|| format!("cannot fsync `{}`", pending_path.display()))?;
    tracing::info!(old = ?old_fingerprint, new = %next_fingerprint, "rotated the manifest signing key");
    let summary = format!(
        "manifest signing key {} replaced by {next_fingerprint}{}; {} revisions signed anew",
        old_fingerprint.as_deref().unwrap_or("(lost)"),
        if statement {
            ""
        } else {
            " without a rotation statement (old key lost)"
        },
        re_signed.len()
    );
    inventory
        .transaction(|inv| inv.insert_job("key-rotate", started_at, "ok", &summary))
        .map_err(super::inventory_error)?;
    drop(lock);
    Ok(RotateReport {
        changed: true,
        dry_run: false,
        old_key: old_fingerprint,
        new_key: next_fingerprint,
        statement,
        sequence,
        re_signed,
        dist_serial,
    })
}

/// The chain to extend: `pki/key-chain.json`, or the served one when it is longer and starts
/// with it (a `pki/` restored from before a rotation must not fork the chain followers know).
fn current_chain(home: &Path, repo: &Repo) -> anyhow::Result<KeyChain> {
    let own = KeyChain::load(home)?;
    let served = match std::fs::read(repo.root().join("view").join(SERVED_FILE)) {
        Ok(bytes) => KeyChain::parse(&bytes)
            .with_context(|| format!("the served key chain `repo/view/{SERVED_FILE}`"))?,
        Err(_) => return Ok(own),
    };
    if served.rotations.len() > own.rotations.len() {
        if served.rotations.starts_with(&own.rotations) {
            return Ok(served);
        }
        return Err(UserError::failure(format!(
            "`{}` and the chain this mirror serves (`repo/view/{SERVED_FILE}`) disagree",
            home.join(crate::pki::rotation::CHAIN_FILE).display()
        ))
        .with_hint(
            "`pki/` was restored from another manager's backup, or edited: restore this \
             manager's `pki/` (docs/keys.md)",
        )
        .into());
    }
    Ok(own)
}

/// Public keys this home signed with: its current and retired keys, and every key its chain
/// names.
fn known_keys(
    home: &Path,
    chain: &KeyChain,
    old: Option<&SigningKey>,
) -> anyhow::Result<Vec<(String, pki::VerifyingKey)>> {
    let mut pems: Vec<Vec<u8>> = Vec::new();
    if let Some(old) = old {
        pems.push(old.public_key_pem()?);
    }
    pems.extend(std::fs::read(home.join(SIGNING_PUBLIC_KEY_FILE)));
    if let Ok(entries) = std::fs::read_dir(home.join(RETIRED_DIR)) {
        pems.extend(
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok()),
        );
    }
    for rotation in chain.rotations.iter().filter_map(|r| r.rotation().ok()) {
        pems.push(rotation.next_key_pem.into_bytes());
    }
    Ok(pems
        .iter()
        .filter_map(|pem| pki::parse_public_key(pem, Path::new("key")).ok())
        .collect())
}

/// Keeps the old key's public half under `pki/retired/`: archives signed with it still verify.
fn retire_public_half(
    home: &Path,
    old: Option<&SigningKey>,
    old_fingerprint: Option<&str>,
    next_fingerprint: &str,
) -> anyhow::Result<()> {
    let pem = match old {
        Some(key) => Some(key.public_key_pem()?),
        None => std::fs::read(home.join(SIGNING_PUBLIC_KEY_FILE))
            .ok()
            .filter(|pem| {
                pki::parse_public_key(pem, Path::new("key"))
                    .is_ok_and(|(fingerprint, _)| Some(fingerprint.as_str()) == old_fingerprint)
            }),
    };
    let (Some(pem), Some(fingerprint)) = (pem, old_fingerprint) else {
        return Ok(());
    };
    if fingerprint == next_fingerprint {
        return Ok(());
    }
    let retired = home.join(RETIRED_DIR);
    durable::create_private_dir(&retired, 0o755)
        .with_context(|| format!("cannot create `{}`", retired.display()))?;
    let path = retired.join(format!(
        "{}.pub.pem",
        fingerprint.trim_start_matches("sha256:")
    ));
    durable::write_atomic(&path, &pem, 0o644)
        .with_context(|| format!("cannot write `{}`", path.display()))
}

/// Renames a key file out of the way, never deleting it: `<file>.<label>-<UTC time>` beside it
/// (its mode, 0600, goes with it). Returns the new path.
fn move_aside(path: &Path, label: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{label}-{}", Utc::now().format("%Y%m%dT%H%M%SZ")));
    let aside = std::path::PathBuf::from(name);
    std::fs::rename(path, &aside)
        .with_context(|| format!("cannot set `{}` aside", path.display()))?;
    Ok(aside)
}

/// Removes what a killed rotation left half-written: `pki/.<name>.tmp-*` and a revision's
/// `.manifest.sig.tmp-*` (durable::write_atomic's temporaries).
fn remove_stale_temporaries(home: &Path, repo: &Repo, revisions: &[String]) {
    let dirs =
        std::iter::once(home.join("pki")).chain(revisions.iter().map(|r| repo.revision_dir(r)));
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn print(report: &RotateReport) -> anyhow::Result<()> {
    let verb = if report.dry_run {
        "would rotate"
    } else {
        "rotated"
    };
    let mut text = format!(
        "{verb} the manifest signing key: {} -> {}\n",
        report.old_key.as_deref().unwrap_or("(lost)"),
        report.new_key
    );
    text.push_str(&format!(
        "re-signed: {}\n",
        if report.re_signed.is_empty() {
            "nothing (the repository is empty)".to_string()
        } else {
            report.re_signed.join(", ")
        }
    ));
    if let Some(serial) = report.dist_serial {
        text.push_str(&format!(
            "dist statement signed anew (dist serial {serial})\n"
        ));
    }
    if report.statement {
        text.push_str(&format!(
            "agents, importing mirrors and child mirrors that trust the old key follow rotation \
             {} by themselves (served at /keys.json, carried in bundles); write the new public \
             key for new importers with `pm-mirror key export-public --out FILE`",
            report.sequence.unwrap_or_default()
        ));
    } else {
        text.push_str(
            "the old key could not sign a rotation statement: agents must be told to trust the \
             new key (`pm-agent trust-key` on each host, or re-activation), and importing and \
             child mirrors given its public half (`pm-mirror key export-public`); see \
             docs/keys.md",
        );
    }
    cli::print_text(text.trim_end())
}
