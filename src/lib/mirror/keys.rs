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
use crate::pki::rotation::{KeyChain, PENDING_KEY_FILE, RETIRED_DIR, SignedRotation};
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
    /// Revisions left as they were, and why (a signature neither key made).
    pub skipped: Vec<String>,
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
    Ok(if report.skipped.is_empty() {
        ExitStatus::Success
    } else {
        ExitStatus::Partial
    })
}

fn rotate(
    home: &Path,
    global: &GlobalArgs,
    old_key_lost: bool,
    reason: &str,
) -> anyhow::Result<RotateReport> {
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let old = SigningKey::load(home).context("cannot load the manifest signing key")?;
    // With the private key lost, its public half (if it survived) still tells which
    // signatures were ours.
    let (old_fingerprint, old_public) = match &old {
        Some(key) => (Some(key.fingerprint()?), Some(key.verifying_key()?)),
        None => std::fs::read(home.join(SIGNING_PUBLIC_KEY_FILE))
            .ok()
            .and_then(|pem| pki::parse_public_key(&pem, Path::new(SIGNING_PUBLIC_KEY_FILE)).ok())
            .map_or((None, None), |(fingerprint, key)| {
                (Some(fingerprint), Some(key))
            }),
    };
    let pending_path = home.join(PENDING_KEY_FILE);
    let pending = SigningKey::load_file(&pending_path).with_context(|| {
        format!("cannot load the unfinished rotation's key `{PENDING_KEY_FILE}`")
    })?;
    match (&old, old_key_lost) {
        (Some(_), true) => {
            return Err(UserError::usage(format!(
                "`--old-key-lost` but the signing key `{}` is here",
                home.join(SIGNING_KEY_FILE).display()
            ))
            .with_hint(
                "run `pm-mirror key rotate` without it: the old key then signs the rotation and \
                 agents and mirrors follow by themselves",
            )
            .into());
        }
        (None, false) => {
            return Err(UserError::failure(format!(
                "there is no signing key to rotate: `{}` is missing",
                home.join(SIGNING_KEY_FILE).display()
            ))
            .with_hint(
                "restore `pki/` from a backup of PM_HOME and rotate then; if the key is truly \
                 lost, run `pm-mirror key rotate --old-key-lost` (agents must then be told to \
                 trust the new key: docs/keys.md)",
            )
            .into());
        }
        _ => {}
    }
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
    let mut chain = KeyChain::load(home)?;
    if global.dry_run {
        let new_key = match &pending {
            Some(key) => key.fingerprint()?,
            None => "(a new key)".to_string(),
        };
        return Ok(RotateReport {
            changed: true,
            dry_run: true,
            old_key: old_fingerprint,
            new_key,
            statement: old.is_some(),
            sequence: old.as_ref().map(|_| chain.next_sequence()),
            re_signed: revisions,
            skipped: Vec::new(),
            dist_serial: generations
                .dist
                .as_ref()
                .map(|_| generations.dist_serial + 1),
        });
    }
    // Opened before anything changes: a lock timeout fails with no change.
    let inventory = Inventory::open(home, global.lock_timeout).map_err(super::inventory_error)?;
    let started_at = Utc::now();
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
    let mut sequence = None;
    if let Some(old) = &old {
        let already = chain
            .last()
            .filter(|r| r.next_key == next_fingerprint)
            .map(|r| r.sequence);
        sequence = Some(match already {
            Some(sequence) => sequence,
            None => {
                let sequence = chain.next_sequence();
                chain
                    .rotations
                    .push(SignedRotation::sign(old, &next, sequence, reason)?);
                chain.save(home)?;
                // Served before any signature changes: a follower that meets a manifest signed
                // by the new key finds the statement that lets it move on. (An empty repository
                // serves nothing yet; its first view carries the chain.)
                if generations.latest.is_some() {
                    repo.switch(&lock, &generations, None).map_err(repo_error)?;
                }
                sequence
            }
        });
    }
    let mut re_signed = Vec::new();
    let mut skipped = Vec::new();
    for revision in &revisions {
        let dir = repo.revision_dir(revision);
        let manifest = std::fs::read(dir.join(MANIFEST_FILE))
            .with_context(|| format!("cannot read the manifest of {revision}"))?;
        let signature = std::fs::read(dir.join(SIGNATURE_FILE)).unwrap_or_default();
        if next_public.verify(&manifest, &signature) {
            re_signed.push(revision.clone());
            continue;
        }
        let ours = old_public
            .as_ref()
            .is_some_and(|key| key.verify(&manifest, &signature));
        if !ours {
            if old.is_some() {
                skipped.push(format!(
                    "{revision}: its manifest is not signed by the old key (run `pm-doctor`)"
                ));
                continue;
            }
            // The old key is lost: its public half may be too. What is signed now must at
            // least be the files it lists, unchanged.
            super::verify_revision_files(&dir, revision)?;
        }
        durable::write_atomic(&dir.join(SIGNATURE_FILE), &next.sign(&manifest)?, 0o444)
            .with_context(|| format!("cannot write the new signature of {revision}"))?;
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
    if let Ok(pem) = std::fs::read(home.join(SIGNING_PUBLIC_KEY_FILE))
        && let Some(fingerprint) = &old_fingerprint
        && *fingerprint != next_fingerprint
    {
        let retired = home.join(RETIRED_DIR);
        std::fs::create_dir_all(&retired)
            .with_context(|| format!("cannot create `{}`", retired.display()))?;
        let path = retired.join(format!(
            "{}.pub.pem",
            fingerprint.trim_start_matches("sha256:")
        ));
        durable::write_atomic(&path, &pem, 0o644)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    next.install(home)?;
    std::fs::remove_file(&pending_path)
        .with_context(|| format!("cannot remove `{}`", pending_path.display()))?;
    durable::sync_parent_dir(&pending_path)
        .with_context(|| format!("cannot fsync `{}`", pending_path.display()))?;
    tracing::info!(old = ?old_fingerprint, new = %next_fingerprint, "rotated the manifest signing key");
    let summary = format!(
        "manifest signing key {} replaced by {next_fingerprint}{}; {} revisions re-signed",
        old_fingerprint.as_deref().unwrap_or("(lost)"),
        if old.is_some() {
            ""
        } else {
            " without a rotation statement (old key lost)"
        },
        re_signed.len()
    );
    let status = if skipped.is_empty() { "ok" } else { "partial" };
    inventory
        .transaction(|inv| inv.insert_job("key-rotate", started_at, status, &summary))
        .map_err(super::inventory_error)?;
    drop(lock);
    Ok(RotateReport {
        changed: true,
        dry_run: false,
        old_key: old_fingerprint,
        new_key: next_fingerprint,
        statement: old.is_some(),
        sequence,
        re_signed,
        skipped,
        dist_serial,
    })
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
    for skipped in &report.skipped {
        text.push_str(&format!("not re-signed: {skipped}\n"));
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
