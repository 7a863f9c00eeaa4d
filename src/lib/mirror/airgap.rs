//! Closed networks: `pm-mirror export` writes latest into a signed bundle on the connected side;
//! `pm-mirror import` verifies one completely before anything changes and stages it as latest,
//! exactly as a sync that produced the same revision would. `key` and `trust` manage who may
//! sign what this mirror accepts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Utc;
use serde::Serialize;

use crate::bundle::{self, BundleBase, ReadLimits};
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{Inventory, SyncRecord};
use crate::manifest::{FileEntry, Manifest};
use crate::pki::rotation::KeyChain;
use crate::pki::{self, RetiredTrust, SigningKey};
use crate::repo::{Generations, Repo, StagedRevision};

use super::{inventory_error, repo_error};

/// `--json` document of `pm-mirror export`.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    /// A new file was written.
    pub changed: bool,
    /// The bundle file.
    pub out: PathBuf,
    /// Revision exported.
    pub revision: String,
    /// Base revision of an incremental bundle.
    pub since: Option<String>,
    /// Files carried.
    pub files: usize,
    /// Bytes of the bundle.
    pub size: u64,
    /// sha256 of the bundle, to compare on both sides.
    pub sha256: String,
    /// Fingerprint of the signing key the importer must trust.
    pub exporter: String,
}

/// `pm-mirror export --out FILE [--since REV]`.
pub fn run_export(
    home: &Path,
    global: &GlobalArgs,
    out: &Path,
    since: Option<&str>,
) -> anyhow::Result<ExitStatus> {
    let started_at = Utc::now();
    check_out_path(out)?;
    let repo = Repo::new(home);
    // Held while reading the revision so that a concurrent sync's gc cannot remove it.
    let _lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let generations = repo.generations().map_err(repo_error)?;
    let Some(latest) = generations.latest.clone() else {
        return Err(
            UserError::failure("latest is empty: there is nothing to export")
                .with_hint("run `pm-mirror sync` first")
                .into(),
        );
    };
    // A dry run creates no key; a home without one has nothing it signed to check.
    let key = if global.dry_run {
        SigningKey::load(home).context("cannot load the manifest signing key")?
    } else {
        Some(SigningKey::load_or_create(home).context("cannot load the manifest signing key")?)
    };
    if let Some(key) = &key {
        check_exportable(key, &repo, &latest)?;
    }
    let manifest = repo.manifest(&latest).map_err(repo_error)?;
    let base = match since {
        None => None,
        Some(revision) => Some((
            revision.to_string(),
            base_files(home, &repo, global, revision)?,
        )),
    };
    let included: Vec<String> = manifest
        .files
        .iter()
        .filter(|file| {
            base.as_ref().is_none_or(|(_, files)| {
                !files
                    .iter()
                    .any(|b| b.path == file.path && b.sha256 == file.sha256)
            })
        })
        .map(|file| file.path.clone())
        .collect();
    let bundle_base = base.as_ref().map(|(revision, files)| BundleBase {
        revision: revision.clone(),
        content_sha256: crate::manifest::content_sha256(files),
    });
    if global.dry_run {
        let bytes: u64 = manifest
            .files
            .iter()
            .filter(|f| included.contains(&f.path))
            .map(|f| f.size)
            .sum();
        if global.json {
            cli::print_json(&serde_json::json!({
                "changed": true, "dry_run": true, "out": out, "revision": latest,
                "since": since, "files": included.len(), "size": bytes,
            }))?;
        } else {
            cli::print_text(format!(
                "would export {latest}{} to `{}`: {} files, {}",
                since.map(|s| format!(" since {s}")).unwrap_or_default(),
                out.display(),
                included.len(),
                cli::human_bytes(bytes)
            ))?;
        }
        return Ok(ExitStatus::Success);
    }
    let key = key.expect("a run that is not a dry run loaded or created the key");
    let total: u64 = manifest
        .files
        .iter()
        .filter(|f| included.contains(&f.path))
        .map(|f| f.size)
        .sum();
    let bar = global.show_progress().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "export {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let progress = |written: u64| {
        if let Some(bar) = &bar {
            bar.set_position(written);
        }
    };
    // The chain travels with every bundle of a key that was ever rotated, so closed sites that
    // trust an older key follow it; a never-rotated key's bundles stay as before.
    let chain = KeyChain::load(home).context("cannot read the key chain")?;
    let chain = (!chain.rotations.is_empty()).then(|| chain.to_bytes());
    let (header, written) = bundle::write_bundle(
        out,
        &repo.revision_dir(&latest),
        bundle_base,
        included,
        &key,
        chain.as_deref(),
        &progress,
    )
    .map_err(|err| UserError::failure(err.to_string()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = ExportReport {
        changed: true,
        out: out.to_owned(),
        revision: latest.clone(),
        since: since.map(String::from),
        files: header.included.len(),
        size: written.size,
        sha256: written.sha256.clone(),
        exporter: header.exporter.clone(),
    };
    // The bundle is complete and valid; a busy inventory costs only the audit row, so it is a
    // warning, not a failed export.
    let summary = format!(
        "exported {latest}{} to {} (sha256 {})",
        since.map(|s| format!(" since {s}")).unwrap_or_default(),
        out.display(),
        written.sha256
    );
    let recorded = Inventory::open(home, global.lock_timeout)
        .and_then(|inventory| inventory.insert_job("export", started_at, "ok", &summary));
    if let Err(err) = recorded {
        tracing::warn!(error = %err, "the export is not recorded in the inventory");
    }
    if global.json {
        cli::print_json(&report)?;
    } else if !global.quiet {
        cli::print_text(format!(
            "exported {latest}{} to {}: {} files, {}\nsha256 {}  {}\nthe importing mirror must trust key {}",
            since.map(|s| format!(" since {s}")).unwrap_or_default(),
            out.display(),
            report.files,
            cli::human_bytes(report.size),
            report.sha256,
            out.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            report.exporter,
        ))?;
    }
    Ok(ExitStatus::Success)
}

/// Refuses a bundle no importer could use: the bundle is signed with `key` and carries
/// `revision`'s `manifest.sig`, which importers check against the same key. After the key was
/// replaced by hand the two differ, and the operator would learn it only on the closed side.
fn check_exportable(key: &SigningKey, repo: &Repo, revision: &str) -> anyhow::Result<()> {
    if pki::revision_signed_by(repo, revision, &key.verifying_key()?) {
        return Ok(());
    }
    Err(UserError::failure(format!(
        "latest ({revision}) is not signed by the key that would sign the bundle ({}): every \
         importer would refuse it",
        key.fingerprint()?
    ))
    .with_hint(
        "the signing key was replaced without `pm-mirror key rotate`: put the old key back in \
         `pki/` and run `pm-mirror key rotate`, or if it is lost, remove the replacement \
         (`pki/manifest-signing.*`) and run `pm-mirror key rotate --old-key-lost`; then export \
         again (docs/keys.md)",
    )
    .into())
}

/// The files of `revision`, from the repository when it is still there, else from the inventory.
fn base_files(
    home: &Path,
    repo: &Repo,
    global: &GlobalArgs,
    revision: &str,
) -> anyhow::Result<Vec<FileEntry>> {
    if let Ok(manifest) = repo.manifest(revision) {
        return Ok(manifest.files);
    }
    let files =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory
                .revision_files(revision)
                .map_err(inventory_error)?,
            None => Vec::new(),
        };
    if files.is_empty() {
        return Err(UserError::usage(format!("unknown revision `{revision}`"))
            .with_hint(
                "--since takes a revision of this mirror (`r42`) that the closed side imported",
            )
            .into());
    }
    Ok(files)
}

/// `--json` document of `pm-mirror import`.
#[derive(Debug, Serialize)]
pub struct ImportReport {
    /// Whether latest changed.
    pub changed: bool,
    /// Latest after the import.
    pub revision: Option<String>,
    /// Latest before.
    pub previous_revision: Option<String>,
    /// The exporter's name for the revision.
    pub exported_revision: String,
    /// Fingerprint of the trusted key that signed the bundle.
    pub signer: String,
    /// sha256 of the bundle file.
    pub sha256: String,
    /// Bytes of the bundle file.
    pub size: u64,
    /// Files carried by the bundle.
    pub files_imported: usize,
    /// Trusted keys whose owner rotated away from them, followed through the chain the bundle
    /// carries to its signer: the signer is trusted now, they are retired (`trust/retired/`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub followed: Vec<FollowedReport>,
    /// Why nothing changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Files damaged on disk that this bundle (holding latest's content) restored, in every
    /// revision sharing them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
}

/// A key rotation an import followed.
#[derive(Debug, Serialize)]
pub struct FollowedReport {
    /// The key trusted before (retired now).
    pub from: String,
    /// The key trusted now.
    pub to: String,
    /// Sequence numbers of the exporter's rotations followed.
    pub rotations: Vec<u64>,
}

/// A refused bundle: why, and what to do when there is more to say than "nothing changed".
struct Refusal {
    message: String,
    hint: Option<String>,
}

impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal {
            message,
            hint: None,
        }
    }
}

/// `pm-mirror import FILE`.
pub fn run_import(
    home: &Path,
    global: &GlobalArgs,
    file: &Path,
    allow_downgrade: bool,
    max_size: u64,
) -> anyhow::Result<ExitStatus> {
    let started_at = Utc::now();
    let reject = |refusal: Refusal| -> anyhow::Error {
        UserError::failure(format!(
            "bundle `{}` rejected: {}",
            file.display(),
            refusal.message
        ))
        .with_hint(refusal.hint.unwrap_or_else(|| {
            "nothing was changed; check the bundle's sha256 against the exporting side".into()
        }))
        .into()
    };
    let source = crate::durable::open_regular(file).map_err(|err| match err {
        crate::durable::OpenRegularError::NotRegular { .. } => {
            UserError::usage(format!("cannot import `{}`: {err}", file.display())).with_hint(
                "import reads a bundle file whole before it changes anything: copy it to a file \
             first (e.g. `ssh central cat pm-r42.tar > /var/tmp/pm-r42.tar`, or \
             `pm-mirror export --out /var/tmp/pm-r42.tar` on the exporting side), then import \
             that file",
            )
        }
        crate::durable::OpenRegularError::Io(_) => {
            UserError::usage(format!("cannot open bundle `{}`: {err}", file.display()))
        }
    })?;
    let length = source.metadata().map(|m| m.len()).unwrap_or(0);
    if length > max_size {
        return Err(reject(
            format!(
                "{length} bytes is larger than the limit of {max_size} (raise it with --max-size)"
            )
            .into(),
        ));
    }
    let trusted = pki::trusted_keys(home).context("cannot read the trust store")?;
    if trusted.is_empty() {
        return Err(UserError::failure(format!("bundle `{}` rejected: this mirror trusts no exporter key", file.display()))
            .with_hint("on the exporting side run `pm-mirror key export-public --out exporter.pem`, carry it across, then `pm-mirror trust add exporter.pem`")
            .into());
    }
    // Verify everything in a staging directory beside the repository; the repository itself is
    // not touched until the bundle is known good.
    remove_abandoned_imports(home);
    let staging_dir = home.join(format!(".import-{}", std::process::id()));
    let mut staged = StagedRevision::at(staging_dir.clone())
        .with_context(|| format!("cannot create `{}`", staging_dir.display()))?;
    let outcome = verify_into(
        &mut staged,
        home,
        global,
        source,
        &trusted,
        max_size,
        allow_downgrade,
    );
    let verified = match outcome {
        Ok(verified) => verified,
        Err(err) => {
            staged.discard();
            return Err(reject(err));
        }
    };
    let result = commit_import(home, global, file, staged, verified, started_at);
    let _ = std::fs::remove_dir_all(&staging_dir);
    result
}

/// Removes staging directories of imports whose process is gone (killed mid-import).
fn remove_abandoned_imports(home: &Path) {
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".import-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(path = %entry.path().display(), "removing an abandoned import");
            let _ = StagedRevision::at(entry.path()).map(StagedRevision::discard);
        }
    }
}

/// A bundle verified into staging, with what the commit needs.
struct VerifiedImport {
    bundle: bundle::VerifiedBundle,
    previous: Option<Manifest>,
    generations: Generations,
}

fn verify_into(
    staged: &mut StagedRevision,
    home: &Path,
    global: &GlobalArgs,
    source: std::fs::File,
    trusted: &[pki::TrustedKey],
    max_size: u64,
    allow_downgrade: bool,
) -> Result<VerifiedImport, Refusal> {
    let reader = std::io::BufReader::with_capacity(1 << 20, source);
    let verified = bundle::read_bundle(reader, staged.dir(), trusted, ReadLimits { max_size })
        .map_err(|err| refusal(home, err))?;
    let repo = Repo::new(home);
    let generations = repo.generations().map_err(|err| err.to_string())?;
    let previous = match &generations.latest {
        Some(latest) => Some(repo.manifest(latest).map_err(|err| err.to_string())?),
        None => None,
    };
    // An incremental bundle needs the base content here; its other files come from latest.
    if let Some(base) = &verified.header.base {
        let matches = previous
            .as_ref()
            .is_some_and(|p| p.content_sha256 == base.content_sha256);
        if !matches {
            return Err(format!(
                "it holds only what changed since the exporter's {} but latest here is {}; \
                 export a full bundle, or one --since the revision this side last imported",
                base.revision,
                previous
                    .as_ref()
                    .map(|p| p.revision.as_str())
                    .unwrap_or("empty"),
            )
            .into());
        }
    }
    let previous_dir = generations
        .latest
        .as_ref()
        .map(|latest| repo.revision_dir(latest));
    for file in &verified.manifest.files {
        if verified.header.included.contains(&file.path) {
            staged.add(file.clone());
            continue;
        }
        let local = previous.as_ref().and_then(|p| p.file(&file.path));
        match (local, &previous_dir) {
            (Some(local), Some(dir)) if local.sha256 == file.sha256 && local.size == file.size => {
                staged
                    .carry_over(dir, file.clone())
                    .map_err(|err| err.to_string())?;
                // Latest's copy is linked in unread: one damaged on disk would go on unseen.
                let carried = staged.dir().join(&file.path);
                let (size, sha256) = crate::mirror::hash_file(&carried)
                    .map_err(|err| format!("cannot read `{}`: {err}", carried.display()))?;
                if size != file.size || sha256 != file.sha256 {
                    return Err(format!(
                        "`{}` of latest here was damaged on disk (it no longer matches latest's \
                         manifest): run `pm-mirror repair`, or import a full bundle (exported \
                         without `--since`)",
                        file.path
                    )
                    .into());
                }
            }
            _ => {
                return Err(
                    format!("`{}` is neither in the bundle nor in latest", file.path).into(),
                );
            }
        }
    }
    verify_clamav_files(staged.dir(), &verified.manifest)?;
    if !allow_downgrade {
        // A replayed older bundle from the same exporter is a downgrade even when its versions
        // are not numbers; the exporter's serial only grows.
        // A key the chain moved on from is the same exporter: its serials count too.
        let signers: Vec<&String> = std::iter::once(&verified.signer)
            .chain(verified.followed.iter().map(|f| &f.from))
            .collect();
        let accepted = match Inventory::open_read_only(home, global.lock_timeout)
            .map_err(|err| err.to_string())?
        {
            Some(inventory) => signers
                .iter()
                .map(|signer| inventory.accepted_bundle_serial(signer))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| err.to_string())?
                .into_iter()
                .flatten()
                .max(),
            None => None,
        };
        if let Some(accepted) = accepted
            && verified.manifest.serial < accepted
        {
            return Err(format!(
                "it carries the exporter's {} (serial {}), older than serial {accepted} already \
                 imported from this exporter; pass --allow-downgrade to accept an older bundle",
                verified.manifest.revision, verified.manifest.serial
            )
            .into());
        }
        // A newer revision of the same exporter that lacks a product dropped it there (a
        // removal, which `publish` here asks `--allow-removal` for), not an older bundle.
        let newer = accepted.is_some_and(|accepted| verified.manifest.serial > accepted);
        if let Some(previous) = &previous {
            check_no_downgrade(previous, &verified.manifest, newer)?;
        }
    }
    Ok(VerifiedImport {
        bundle: verified,
        previous,
        generations,
    })
}

/// What the reader refused, with a hint where the way out is not "check the bundle": a signer
/// this mirror retired (an old bundle), or one no trusted key's rotations lead to (the
/// exporter's key was lost and replaced: its new public key must be carried across).
fn refusal(home: &Path, err: bundle::BundleError) -> Refusal {
    let bundle::BundleError::Untrusted { fingerprint, .. } = &err else {
        return err.to_string().into();
    };
    let retired = pki::retired_trust(home)
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.fingerprint == *fingerprint);
    if let Some(retired) = retired {
        return Refusal {
            message: format!(
                "it is signed by {fingerprint}, a key this mirror retired on {} when it followed \
                 the exporter's key rotation to {}: the bundle was made before that rotation",
                retired.retired_at.format("%Y-%m-%d %H:%M:%SZ"),
                retired.replaced_by
            ),
            hint: Some(
                "nothing was changed; import a bundle exported since (`pm-mirror trust list` \
                 shows the retired keys)"
                    .into(),
            ),
        };
    }
    Refusal {
        message: err.to_string(),
        hint: Some(format!(
            "nothing was changed; if the exporter's key was lost and replaced (`pm-mirror key \
             rotate --old-key-lost`), no rotation statement can vouch for the new one: on the \
             exporting side run `pm-mirror key export-public --out exporter.pem`, carry it across, \
             check that its fingerprint is {fingerprint} (`pm-mirror trust add` prints it), run \
             `pm-mirror trust add exporter.pem` and import again (docs/keys.md)"
        )),
    }
}

/// The same ClamAV checks a sync makes: every CVD, cdiff and detached signature.
fn verify_clamav_files(dir: &Path, manifest: &Manifest) -> Result<(), String> {
    for file in &manifest.files {
        let path = file.path.as_str();
        let signed = super::sync::signed_file(path).map(|signed| dir.join(signed));
        super::sync::verify_clamav_file(path, &dir.join(path), signed.as_deref())
            .map_err(|err| format!("`{path}`: {err}"))?;
    }
    Ok(())
}

/// Refuses a bundle that would move a numeric component version backwards.
fn check_no_downgrade(
    previous: &Manifest,
    incoming: &Manifest,
    removal_possible: bool,
) -> Result<(), String> {
    if let Some(missing) = previous
        .products
        .iter()
        .find(|p| !removal_possible && incoming.product(&p.name).is_none())
    {
        return Err(format!(
            "it lacks product `{}` that latest has (an older bundle?); pass --allow-downgrade to \
             accept it",
            missing.name
        ));
    }
    for product in &incoming.products {
        let Some(before) = previous.product(&product.name) else {
            continue;
        };
        for component in &product.components {
            let Some(old) = before.components.iter().find(|c| c.name == component.name) else {
                continue;
            };
            if let (Ok(new), Ok(old_number)) =
                (component.version.parse::<u64>(), old.version.parse::<u64>())
                && new < old_number
            {
                return Err(format!(
                    "it carries {}/{} version {new}, older than latest's {old_number}; \
                     pass --allow-downgrade to accept an older bundle",
                    product.name, component.name
                ));
            }
        }
    }
    Ok(())
}

fn commit_import(
    home: &Path,
    global: &GlobalArgs,
    file: &Path,
    staged: StagedRevision,
    verified: VerifiedImport,
    started_at: chrono::DateTime<Utc>,
) -> anyhow::Result<ExitStatus> {
    let VerifiedImport {
        bundle,
        previous,
        generations,
    } = verified;
    let mut report = ImportReport {
        changed: false,
        revision: generations.latest.clone(),
        previous_revision: generations.latest.clone(),
        exported_revision: bundle.header.revision.clone(),
        signer: bundle.signer.clone(),
        sha256: bundle.sha256.clone(),
        size: bundle.size,
        files_imported: bundle.header.included.len(),
        followed: bundle
            .followed
            .iter()
            .map(|f| FollowedReport {
                from: f.from.clone(),
                to: f.to.clone(),
                rotations: f.rotations.clone(),
            })
            .collect(),
        reason: None,
        repaired: Vec::new(),
    };
    let same_content = previous.as_ref().is_some_and(|p| {
        p.content_sha256 == bundle.manifest.content_sha256 && p.products == bundle.manifest.products
    });
    // The bundle holds latest's content: it is the source for what is damaged on disk (a
    // closed site's way back, docs/repairing.md).
    if same_content && !global.dry_run {
        let repo = Repo::new(home);
        let _lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
        report.repaired = repair_from_bundle(home, &repo, staged.dir(), &bundle.manifest)?;
        report.changed = !report.repaired.is_empty();
    }
    if global.dry_run || same_content {
        staged.discard();
        report.reason = Some(if same_content {
            format!(
                "latest already holds this content ({})",
                generations.latest.clone().unwrap_or_default()
            )
        } else {
            "dry run: verified, nothing changed".into()
        });
        // A dry run says whether the import would change latest (Ansible's check mode).
        report.changed = report.changed || (global.dry_run && !same_content);
        if same_content && !global.dry_run {
            let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
            follow_trust(home, &bundle)?;
            record_import(
                &inventory,
                home,
                &bundle,
                &report,
                started_at,
                previous.as_ref(),
            )?;
        }
        print_import(global, &report, file)?;
        return Ok(ExitStatus::Success);
    }
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let now = repo.generations().map_err(repo_error)?;
    if now.latest != generations.latest {
        staged.discard();
        return Err(UserError::failure(
            "latest changed while the bundle was being verified (a sync or another import ran)",
        )
        .with_hint("run the import again")
        .into());
    }
    // Open the inventory before anything becomes visible: a lock timeout then changes nothing.
    let inventory = match Inventory::open(home, global.lock_timeout) {
        Ok(inventory) => inventory,
        Err(err) => {
            staged.discard();
            return Err(inventory_error(err));
        }
    };
    // The trust store moves on before the switch: the chain verified whatever happens to the
    // content, and after the switch nothing may fail before the inventory write.
    if let Err(err) = follow_trust(home, &bundle) {
        staged.discard();
        return Err(err);
    }
    let key = SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
    let manifest = staged
        .commit(
            &repo,
            &lock,
            &key,
            "bundle",
            bundle.manifest.products.clone(),
        )
        .map_err(repo_error)?;
    let after = Generations {
        latest: Some(manifest.revision.clone()),
        ..now
    };
    repo.switch(&lock, &after, None).map_err(repo_error)?;
    drop(lock);
    report.changed = true;
    report.revision = Some(manifest.revision.clone());
    record_import(
        &inventory,
        home,
        &bundle,
        &report,
        started_at,
        previous.as_ref(),
    )?;
    print_import(global, &report, file)?;
    Ok(ExitStatus::Success)
}

/// Moves the trust store on along the rotations the bundle's chain proved: its signer is trusted,
/// the keys it rotated away from are retired. The new key first, so a crash leaves both trusted
/// and the next import of the bundle finishes.
fn follow_trust(home: &Path, bundle: &bundle::VerifiedBundle) -> anyhow::Result<()> {
    for followed in &bundle.followed {
        pki::trust_key(home, followed.to_pem.as_bytes(), Path::new(&followed.to))
            .context("cannot add the exporter's new key to the trust store")?;
        if !followed.from_path.exists() {
            // Another import of a bundle with the same chain retired it meanwhile.
            continue;
        }
        let record = RetiredTrust {
            fingerprint: followed.from.clone(),
            retired_at: Utc::now(),
            replaced_by: followed.to.clone(),
            rotations: followed.rotations.clone(),
            carried_by: format!("bundle {}", bundle.sha256),
        };
        let retired = pki::retire_trusted_key(home, &followed.from_path, &record)
            .context("cannot retire the key the exporter rotated away from")?;
        tracing::info!(from = %followed.from, to = %followed.to, retired = %retired.display(), "followed the exporter's key rotation");
    }
    Ok(())
}

/// Records the import as a sync from `bundle`: a job and one `mirror_syncs` row per product.
fn record_import(
    inventory: &Inventory,
    home: &Path,
    bundle: &bundle::VerifiedBundle,
    report: &ImportReport,
    started_at: chrono::DateTime<Utc>,
    previous: Option<&Manifest>,
) -> anyhow::Result<()> {
    let finished_at = Utc::now();
    inventory
        .transaction(|inv| {
            let summary = match (&report.revision, report.changed) {
                (Some(revision), true) => format!(
                    "imported bundle {} (exporter's {}) as {revision}",
                    report.sha256, report.exported_revision
                ),
                _ => format!("bundle {} changed nothing", report.sha256),
            };
            let status = if report.changed { "ok" } else { "unchanged" };
            let job_id = inv.insert_job("import", started_at, status, &summary)?;
            super::record_live_revisions(inv, &Repo::new(home))?;
            let rows: Vec<SyncRecord> = bundle
                .manifest
                .products
                .iter()
                .map(|product| {
                    let files = |m: &Manifest| -> Vec<(String, String)> {
                        m.product_files(&product.name)
                            .map(|f| (f.path.clone(), f.sha256.clone()))
                            .collect()
                    };
                    let updated = previous.is_none_or(|p| files(p) != files(&bundle.manifest));
                    SyncRecord {
                        product: product.name.clone(),
                        source: "bundle".into(),
                        started_at,
                        finished_at,
                        result: if updated && report.changed {
                            "updated"
                        } else {
                            "unchanged"
                        }
                        .into(),
                        bytes_downloaded: bundle
                            .bytes_per_product
                            .get(&product.name)
                            .copied()
                            .unwrap_or(0),
                        versions: product
                            .components
                            .iter()
                            .map(|c| format!("{}={}", c.name, c.version))
                            .collect::<Vec<_>>()
                            .join(","),
                        revision: report.revision.clone().filter(|_| report.changed),
                        error: None,
                        bundle_sha256: Some(report.sha256.clone()),
                        warnings: None,
                    }
                })
                .collect();
            inv.record_syncs(job_id, &rows)?;
            inv.accept_bundle_serial(
                &bundle.signer,
                bundle.manifest.serial,
                &bundle.manifest.revision,
            )
        })
        .map_err(inventory_error)?;
    Ok(())
}

fn print_import(global: &GlobalArgs, report: &ImportReport, file: &Path) -> anyhow::Result<()> {
    if global.json {
        return cli::print_json(report);
    }
    if global.quiet {
        return Ok(());
    }
    let repaired: String = report
        .repaired
        .iter()
        .map(|file| format!("restored from the bundle: {file}\n"))
        .collect();
    let verdict = match (&report.reason, &report.revision) {
        (Some(reason), _) => format!("no change: {reason}"),
        (None, Some(revision)) => {
            format!("latest is now {revision} (publish it with `pm-mirror publish`)")
        }
        (None, None) => String::new(),
    };
    let followed: String = report
        .followed
        .iter()
        .map(|f| {
            let (follow, trust) = if global.dry_run {
                ("would follow", "would no longer trust")
            } else {
                ("followed", "no longer trusting")
            };
            format!(
                "{follow} the exporter's key rotation {} to {}; {trust} {} (kept in \
                 trust/retired/)\n",
                f.rotations
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                f.to,
                f.from
            )
        })
        .collect();
    cli::print_text(format!(
        "bundle {} verified: signed by {}, exporter's {}, {} files, {}\nsha256 {}\n{followed}{repaired}{verdict}",
        file.display(),
        report.signer,
        report.exported_revision,
        report.files_imported,
        cli::human_bytes(report.size),
        report.sha256,
    ))
}

/// Restores every file of the live generations that no longer matches its manifest and that
/// the verified bundle in `staged_dir` carries with the same sha256, into every revision sharing
/// it ([`crate::integrity::restore`]). Returns their paths.
fn repair_from_bundle(
    home: &Path,
    repo: &Repo,
    staged_dir: &Path,
    manifest: &Manifest,
) -> anyhow::Result<Vec<String>> {
    let generations = repo.generations().map_err(repo_error)?;
    let verifier = SigningKey::load_or_create(home)
        .context("cannot load the manifest signing key")?
        .verifying_key()?;
    let survey = crate::integrity::survey(
        repo,
        &crate::integrity::live_generations(&generations),
        &verifier,
    );
    let mut repaired = Vec::new();
    for damaged in &survey.damaged {
        let carried = staged_dir.join(&damaged.path);
        let in_bundle = manifest
            .file(&damaged.path)
            .is_some_and(|entry| entry.sha256 == damaged.sha256 && entry.size == damaged.size);
        // An incremental bundle does not carry what did not change.
        if !in_bundle || !carried.is_file() {
            continue;
        }
        let (size, sha256) = crate::mirror::hash_file(&carried)
            .with_context(|| format!("cannot read `{}`", carried.display()))?;
        if size != damaged.size || sha256 != damaged.sha256 {
            continue;
        }
        let targets: Vec<PathBuf> = damaged.copies.iter().map(|c| c.path.clone()).collect();
        let source = crate::integrity::source_path(&targets[0]);
        std::fs::copy(&carried, &source)
            .and_then(|_| crate::integrity::restore(&source, &targets))
            .with_context(|| format!("cannot restore `{}` from the bundle", damaged.path))?;
        tracing::info!(path = %damaged.path, generations = %damaged.generations_text(), "restored from the bundle");
        repaired.push(format!("{} ({})", damaged.path, damaged.generations_text()));
    }
    Ok(repaired)
}

/// `pm-mirror key export-public --out FILE`.
pub fn run_key_export_public(
    home: &Path,
    global: &GlobalArgs,
    out: &Path,
    create: bool,
) -> anyhow::Result<ExitStatus> {
    // A bad `--out` is a usage error whatever the key's state.
    check_out_path(out)?;
    if !SigningKey::exists(home) && !create {
        // A key that signed revisions and went missing is the lost-key error, with its way out.
        if pki::repository_has_revisions(home) {
            return Err(anyhow::Error::new(pki::PkiError::Lost {
                path: home.join(pki::SIGNING_KEY_FILE),
            })
            .context("cannot load the manifest signing key"));
        }
        return Err(UserError::failure(format!(
            "this home has no manifest signing key (`{}`)",
            home.join(pki::SIGNING_KEY_FILE).display()
        ))
        .with_hint(
            "on a new manager, `pm-mirror sync` creates it, or add `--create`; if the key was \
             lost, restore `pki/` from a backup, or run `pm-mirror key rotate --old-key-lost` \
             (docs/keys.md)",
        )
        .into());
    }
    if global.dry_run && !SigningKey::exists(home) {
        // A dry run creates no key: a real run would, and write its public half.
        if global.json {
            cli::print_json(&serde_json::json!({ "changed": true, "dry_run": true, "out": out }))?;
        } else {
            cli::print_text(format!(
                "dry run: would create the signing key and write its public half to {}",
                out.display()
            ))?;
        }
        return Ok(ExitStatus::Success);
    }
    let key = SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
    let pem = key.public_key_pem()?;
    let fingerprint = key.fingerprint()?;
    let changed = crate::durable::read_regular(out).ok().as_deref() != Some(pem.as_slice());
    if changed && !global.dry_run {
        crate::durable::write_atomic(out, &pem, 0o644)
            .with_context(|| format!("cannot write `{}`", out.display()))?;
    }
    if global.json {
        cli::print_json(
            &serde_json::json!({ "changed": changed, "out": out, "fingerprint": fingerprint }),
        )?;
    } else {
        cli::print_text(format!(
            "public key {fingerprint} written to {}",
            out.display()
        ))?;
    }
    Ok(ExitStatus::Success)
}

/// Refuses an `--out` that exists and is not a regular file: the file is written aside and
/// renamed over it, which would replace a FIFO or a device node with a plain file (and reading
/// a FIFO to compare it would block).
fn check_out_path(out: &Path) -> Result<(), UserError> {
    let Ok(metadata) = std::fs::metadata(out) else {
        return Ok(());
    };
    crate::durable::check_regular(&metadata).map_err(|err| {
        UserError::usage(format!("cannot write `{}`: {err}", out.display())).with_hint(
            "--out names a file that is written aside and renamed into place: give a new path or \
             a regular file to replace, e.g. `--out /media/usb/pm-r42.tar`",
        )
    })
}

/// `pm-mirror trust add FILE`.
pub fn run_trust_add(
    home: &Path,
    global: &GlobalArgs,
    file: &Path,
    again: bool,
) -> anyhow::Result<ExitStatus> {
    let pem = crate::durable::read_regular(file).map_err(|err| {
        UserError::usage(format!("cannot read `{}`: {err}", file.display())).with_hint(
            "give the PEM file written by `pm-mirror key export-public` on the exporting mirror",
        )
    })?;
    let (fingerprint, _) = pki::parse_public_key(&pem, file).map_err(|err| {
        UserError::usage(err.to_string()).with_hint(
            "give the PEM file written by `pm-mirror key export-public` on the exporting mirror",
        )
    })?;
    // A key its owner rotated away from may be the stolen one: trusting it again undoes the
    // rotation, so it takes a decision.
    let retired = pki::retired_trust(home)?
        .into_iter()
        .find(|record| record.fingerprint == fingerprint);
    if let Some(record) = &retired {
        if !again {
            return Err(UserError::usage(format!(
                "{fingerprint} was retired from this trust store on {}: its owner rotated to {} \
                 (rotation {}, carried by {})",
                record.retired_at.format("%Y-%m-%d %H:%M:%SZ"),
                record.replaced_by,
                record.rotations_text(),
                record.carried_by
            ))
            .with_hint(
                "nothing was changed; a key rotated away from may be the stolen one and bundles \
                 it signs would be accepted again: add `--again` only if you are sure (e.g. the \
                 rotation was a mistake on the exporting side)",
            )
            .into());
        }
        if !global.dry_run {
            pki::forget_retired_key(home, &fingerprint)?;
        }
    }
    let changed = if global.dry_run {
        !pki::trusted_keys(home)?
            .iter()
            .any(|k| k.fingerprint == fingerprint)
    } else {
        pki::trust_key(home, &pem, file)?.1
    };
    if global.json {
        cli::print_json(&serde_json::json!({ "changed": changed, "fingerprint": fingerprint }))?;
    } else if changed {
        cli::print_text(format!("trusting {fingerprint}"))?;
    } else {
        cli::print_text(format!("already trusted: {fingerprint}"))?;
    }
    Ok(ExitStatus::Success)
}

/// `pm-mirror trust list`.
pub fn run_trust_list(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let keys = pki::trusted_keys(home)?;
    let retired = pki::retired_trust(home)?;
    if global.json {
        let keys: Vec<_> = keys
            .iter()
            .map(|k| serde_json::json!({ "fingerprint": k.fingerprint, "path": k.path }))
            .collect();
        cli::print_json(
            &serde_json::json!({ "changed": false, "keys": keys, "retired": retired }),
        )?;
        return Ok(ExitStatus::Success);
    }
    let mut table = cli::table(&["fingerprint", "added", "file"]);
    for key in &keys {
        let added = std::fs::metadata(&key.path)
            .and_then(|m| m.modified())
            .map(|t| {
                chrono::DateTime::<Utc>::from(t)
                    .format("%Y-%m-%d %H:%M:%SZ")
                    .to_string()
            })
            .unwrap_or_default();
        table.add_row(vec![
            key.fingerprint.clone(),
            added,
            key.path.display().to_string(),
        ]);
    }
    cli::print_text(table)?;
    for record in &retired {
        cli::print_text(format!(
            "retired {} on {}: the exporter rotated to {} (rotation {}), no longer trusted",
            record.fingerprint,
            record.retired_at.format("%Y-%m-%d %H:%M:%SZ"),
            record.replaced_by,
            record.rotations_text()
        ))?;
    }
    Ok(ExitStatus::Success)
}

/// `pm-mirror trust remove FINGERPRINT`.
pub fn run_trust_remove(
    home: &Path,
    global: &GlobalArgs,
    fingerprint: &str,
) -> anyhow::Result<ExitStatus> {
    if global.dry_run {
        let trusted = pki::trusted_keys(home)?
            .iter()
            .any(|k| k.fingerprint == fingerprint);
        if global.json {
            cli::print_json(&serde_json::json!({
                "changed": trusted, "dry_run": true, "fingerprint": fingerprint,
            }))?;
        } else {
            cli::print_text(if trusted {
                format!("dry run: would stop trusting {fingerprint}")
            } else {
                format!("dry run: {fingerprint} is not trusted")
            })?;
        }
        return Ok(ExitStatus::Success);
    }
    match pki::distrust_key(home, fingerprint)? {
        Some(removed) => {
            if global.json {
                cli::print_json(&serde_json::json!({ "changed": true, "fingerprint": removed }))?;
            } else {
                cli::print_text(format!("no longer trusting {removed}"))?;
            }
            Ok(ExitStatus::Success)
        }
        None => Err(
            UserError::usage(format!("no single trusted key matches `{fingerprint}`"))
                .with_hint("see `pm-mirror trust list`")
                .into(),
        ),
    }
}

/// Parses sizes like `8G`, `500M`, `64K` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size: use e.g. 500M or 8G"))?;
    let factor: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("unknown unit in `{text}`: use K, M, G or T")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("big").is_err());
        assert!(parse_size("5Q").is_err());
    }
}
