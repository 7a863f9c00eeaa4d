//! `pm-mirror`: mirror vendor updates into `latest`, publish them to `dist` with rollback
//! generations, and serve the private mirror agents and freshclam download from.

mod airgap;
mod keys;
mod parent_key;
mod removed;
mod repair;
mod serve;
mod sync;
mod upstream;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::config::{self, Config};
use crate::dist_statement::{DistStatement, SignedStatement};
use crate::inventory::{DistChange, Inventory, PublishAttempt, SyncRecord};
use crate::manifest::{Manifest, ProductComponents};
use crate::pki::SigningKey;
use crate::repo::{Generations, Repo};

pub use serve::{ServeState, router, shutdown_signal};
pub use sync::{ProductReport, ProductResult};
pub use upstream::parse_retry_after;

/// `pm-mirror` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-mirror",
    version,
    about = "Mirror signature databases, publish generations, serve a private mirror"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// `pm-mirror` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch every product's new components and stage a verified revision into latest
    Sync {
        /// Only these products (others keep what latest has)
        #[arg(long = "product", value_name = "NAME")]
        products: Vec<String>,
    },
    /// Upstream, latest, dist and backup versions per product and component
    Status,
    /// Publish latest to dist, rotating dist -> backup/1 -> 2 -> 3 -> archive
    Publish {
        /// Publish latest even though a rollback took it out of dist before
        #[arg(long)]
        again: bool,
        /// Publish latest even though it leaves out a product dist holds (removed or renamed
        /// in pm.toml): its files leave dist
        #[arg(long)]
        allow_removal: bool,
    },
    /// Move dist back to backup/N (dist only; to roll back the fleet use pm-rollback)
    Rollback {
        /// Which backup becomes dist: 1, 2 or 3 (1 is the dist before the last publish)
        #[arg(long, value_parser = crate::repo::parse_generation, value_name = "N")]
        generation: usize,
    },
    /// Serve dist and backups over HTTP (freshclam DatabaseMirror/PrivateMirror, agents)
    Serve {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
    },
    /// Remove revisions, views and archives nothing references any more
    Gc,
    /// Restore every file of latest, dist and the backups that no longer matches its manifest
    Repair,
    /// Write latest (or what changed since REV) into one signed bundle for a closed network
    Export {
        /// Bundle file to write
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Carry only what changed since this revision of this mirror (the closed side has it)
        #[arg(long, value_name = "REV")]
        since: Option<String>,
    },
    /// Verify a bundle completely, then stage it as latest (nothing changes if anything is wrong)
    Import {
        /// Bundle file written by `pm-mirror export`
        file: PathBuf,
        /// Accept a bundle whose versions are older than latest's
        #[arg(long)]
        allow_downgrade: bool,
        /// Refuse bundles larger than this (e.g. 500M, 8G)
        #[arg(long, default_value = "8G", value_parser = airgap::parse_size, value_name = "SIZE")]
        max_size: u64,
    },
    /// This mirror's signing key
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Keys whose bundles (and parent manifests) this mirror accepts
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
}

/// `pm-mirror key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write the public half of the signing key, for `trust add` on an importing mirror
    ExportPublic {
        /// File to write (PEM)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Create the signing key if this home has none yet (never when its repository holds
        /// signed revisions: see `key rotate --old-key-lost`)
        #[arg(long)]
        create: bool,
    },
    /// Replace the signing key: the old key signs a rotation statement that agents and mirrors
    /// follow, and latest, dist, the backups and the dist statement are signed anew
    Rotate {
        /// The old key is lost (not stolen): sign everything anew without a statement; agents
        /// must then be told to trust the new key (docs/keys.md)
        #[arg(long)]
        old_key_lost: bool,
        /// Why, recorded in the rotation statement and the job
        #[arg(long, default_value = "scheduled rotation", value_name = "TEXT")]
        reason: String,
    },
}

/// `pm-mirror trust` subcommands.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust the public key in FILE (written by `key export-public`)
    Add {
        /// PEM public key file
        file: PathBuf,
        /// Trust it even though its owner rotated away from it (it was retired here)
        #[arg(long)]
        again: bool,
    },
    /// List trusted keys
    List,
    /// Stop trusting a key
    Remove {
        /// Its fingerprint (`sha256:...`, or a unique prefix of the hex)
        fingerprint: String,
    },
}

impl Command {
    /// The subcommand's name when it writes the home (repository, inventory, keys, trust
    /// store), even in a dry run: those run only as the home's owner
    /// ([`crate::ownership::check_home`]). `status`, `serve` and `trust list` only read.
    fn writes_home(&self) -> Option<&'static str> {
        match self {
            Command::Status | Command::Serve { .. } => None,
            Command::Trust {
                command: TrustCommand::List,
            } => None,
            Command::Sync { .. } => Some("sync"),
            Command::Publish { .. } => Some("publish"),
            Command::Rollback { .. } => Some("rollback"),
            Command::Gc => Some("gc"),
            Command::Repair => Some("repair"),
            Command::Export { .. } => Some("export"),
            Command::Import { .. } => Some("import"),
            Command::Key {
                command: KeyCommand::ExportPublic { .. },
            } => Some("key export-public"),
            Command::Key {
                command: KeyCommand::Rotate { .. },
            } => Some("key rotate"),
            Command::Trust { .. } => Some("trust"),
        }
    }
}

/// Runs `pm-mirror` and returns its exit status.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let home = args.global.home();
    if let Some(command) = args.command.writes_home() {
        crate::ownership::check_home(&home, &format!("pm-mirror {command}"))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match args.command {
        Command::Sync { products } => runtime.block_on(run_sync(&home, &args.global, &products)),
        Command::Status => run_status(&home, &args.global),
        Command::Publish {
            again,
            allow_removal,
        } => {
            let started_at = Utc::now();
            let published = run_publish(&home, &args.global, again, allow_removal);
            if let Err(err) = &published {
                record_failed_publish(&home, &args.global, started_at, err);
            }
            published
        }
        Command::Rollback { generation } => run_rollback(&home, &args.global, generation),
        Command::Serve { listen } => runtime.block_on(run_serve(&home, listen)),
        Command::Gc => run_gc(&home, &args.global),
        Command::Repair => runtime.block_on(repair::run_repair(&home, &args.global)),
        Command::Export { out, since } => {
            airgap::run_export(&home, &args.global, &out, since.as_deref())
        }
        Command::Import {
            file,
            allow_downgrade,
            max_size,
        } => {
            // Import reads no pm.toml; without one, say what the home is taken for.
            note_closed_home(&home, &args.global);
            airgap::run_import(&home, &args.global, &file, allow_downgrade, max_size)
        }
        Command::Key {
            command: KeyCommand::ExportPublic { out, create },
        } => airgap::run_key_export_public(&home, &args.global, &out, create),
        Command::Key {
            command:
                KeyCommand::Rotate {
                    old_key_lost,
                    reason,
                },
        } => keys::run_key_rotate(&home, &args.global, old_key_lost, &reason),
        Command::Trust { command } => match command {
            TrustCommand::Add { file, again } => {
                airgap::run_trust_add(&home, &args.global, &file, again)
            }
            TrustCommand::List => airgap::run_trust_list(&home, &args.global),
            TrustCommand::Remove { fingerprint } => {
                airgap::run_trust_remove(&home, &args.global, &fingerprint)
            }
        },
    }
}

fn load_config(home: &Path) -> anyhow::Result<Config> {
    let path = home.join("pm.toml");
    Config::load(&path).map_err(|err| {
        let hint = match &err {
            config::ConfigError::Missing { .. } => format!(
                "create it with the products to mirror, for example:\n{}\nor, on a closed home \
                 fed only by bundles (`pm-mirror import`), an empty one (docs/mirror.md shows a \
                 minimal closed-home pm.toml)",
                config::EXAMPLE.trim_end()
            ),
            config::ConfigError::Unreadable { .. } => format!(
                "`{}` must be a regular file this user can read (`ls -l {}`)",
                path.display(),
                path.display()
            ),
            _ => "fix the value and run again; pm.toml keys are in the README".into(),
        };
        anyhow::Error::new(UserError::usage(err.to_string()).with_hint(hint))
    })
}

/// `pm.toml` for the commands a closed home runs (`status`, `publish`): with no file, the
/// defaults of a closed home (no products, default retention and serve settings), said on
/// stderr. `sync` keeps requiring the file ([`load_config`]): a connected mirror that lost it
/// must fail loudly, not stop updating with exit 0.
fn load_config_or_closed_home(home: &Path, global: &GlobalArgs) -> anyhow::Result<Config> {
    if note_closed_home(home, global) {
        return Ok(Config::parse("", &home.join("pm.toml"))
            .expect("an empty pm.toml is a valid closed-home config"));
    }
    load_config(home)
}

/// Says on stderr (unless `-q`) that the home has no `pm.toml` and is taken for a closed home;
/// true when it has none.
fn note_closed_home(home: &Path, global: &GlobalArgs) -> bool {
    if home.join("pm.toml").exists() {
        return false;
    }
    if !global.quiet {
        eprintln!(
            "note: no `pm.toml` in `{}`: assuming a closed home (no products, its content comes \
             from `pm-mirror import`; default retention and serve settings); create it to \
             change them, see docs/mirror.md",
            home.display()
        );
    }
    true
}

fn inventory_error(err: crate::inventory::InventoryError) -> anyhow::Error {
    let locked = matches!(err, crate::inventory::InventoryError::Locked { .. });
    let user = UserError::failure(err.to_string());
    anyhow::Error::new(if locked {
        user.with_hint("wait for it to finish, close the other session, or raise --lock-timeout")
    } else {
        user
    })
}

fn repo_error(err: crate::repo::RepoError) -> anyhow::Error {
    let hint = match &err {
        crate::repo::RepoError::Locked { .. } => {
            Some("wait for the other pm-mirror to finish, or raise --lock-timeout")
        }
        crate::repo::RepoError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::StorageFull =>
        {
            Some(cli::DISK_FULL_HINT)
        }
        _ => None,
    };
    // The message names the cause too (`No space left on device`), not only the step.
    let mut message = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(inner) = cause {
        message = format!("{message}: {inner}");
        cause = inner.source();
    }
    let user = UserError::failure(message);
    anyhow::Error::new(match hint {
        Some(hint) => user.with_hint(hint),
        None => user,
    })
}

/// `--json` document of `pm-mirror sync`.
#[derive(Debug, Serialize)]
pub struct SyncReport {
    /// Whether latest changed.
    pub changed: bool,
    /// `--dry-run`: nothing was downloaded or changed.
    pub dry_run: bool,
    /// Latest after the sync.
    pub revision: Option<String>,
    /// Latest before the sync.
    pub previous_revision: Option<String>,
    /// Body bytes downloaded over all products.
    pub bytes_downloaded: u64,
    /// Wall time of the sync.
    pub duration_seconds: f64,
    /// Products with no verified content yet, which keep latest from being updated.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub incomplete: Vec<String>,
    /// Per product.
    pub products: Vec<ProductReport>,
    /// Files of latest that no longer matched their manifest, repaired before the sync (with
    /// `--dry-run`: that would be), in every generation sharing them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<repair::RepairedFile>,
    /// Products the previous latest held that pm.toml no longer lists, with their files: this
    /// sync left them out of latest (in a dry run: would); publish asks `--allow-removal`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<removed::RemovedProduct>,
}

async fn run_sync(home: &Path, global: &GlobalArgs, only: &[String]) -> anyhow::Result<ExitStatus> {
    let started = Instant::now();
    let started_at = Utc::now();
    let config = load_config(home)?;
    if config.products.is_empty() {
        // A closed site has no upstream: its latest comes from `pm-mirror import`. Its sync
        // timer still runs (and publish after it re-signs dist), so that is not an error.
        let latest = Repo::new(home).generations().map_err(repo_error)?.latest;
        let Some(latest) = latest else {
            return Err(UserError::usage(format!(
                "`{}` lists no products and latest is empty",
                home.join("pm.toml").display()
            ))
            .with_hint(format!(
                "add a [[products]] table, for example:\n{}\nor, on a closed site, import a \
                 bundle with `pm-mirror import FILE`",
                config::EXAMPLE.trim_end()
            ))
            .into());
        };
        let report = SyncReport {
            changed: false,
            dry_run: global.dry_run,
            revision: Some(latest.clone()),
            previous_revision: Some(latest.clone()),
            bytes_downloaded: 0,
            duration_seconds: started.elapsed().as_secs_f64(),
            incomplete: Vec::new(),
            products: Vec::new(),
            repaired: Vec::new(),
            removed: Vec::new(),
        };
        if global.json {
            cli::print_json(&report)?;
        } else if !global.quiet {
            cli::print_text(format!(
                "nothing to sync: `{}` lists no products (a closed site: latest {latest} comes \
                 from `pm-mirror import`)",
                home.join("pm.toml").display()
            ))?;
        }
        return Ok(ExitStatus::Success);
    }
    for name in only {
        if !config.products.iter().any(|p| &p.name == name) {
            return Err(UserError::usage(format!("no product `{name}` in pm.toml")).into());
        }
    }
    // Read what earlier runs learned (validators, cool-downs); the file is closed again before
    // any network work.
    let states =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory.product_states().map_err(inventory_error)?,
            None => Vec::new(),
        };
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    if !global.dry_run {
        // Staging left by a killed run is garbage now that we hold the lock.
        repo.collect_garbage(&lock).map_err(repo_error)?;
    }
    let generations = repo.generations().map_err(repo_error)?;
    let previous = match &generations.latest {
        Some(latest) => Some(repo.manifest(latest).map_err(repo_error)?),
        None => None,
    };
    let upstream = upstream::Upstream::new(&config, global.show_progress())?;
    if !global.dry_run && generations.latest.is_some() {
        // A key that cannot sign fails the run before anything is downloaded.
        SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
    }
    // A repair of latest asks no upstream that is in its cool-down (a 429 or 403 earlier).
    let mut reachable = config.clone();
    reachable.products.retain(|product| {
        !states.iter().any(|state| {
            state.product == product.name
                && state.cooldown_until.is_some_and(|until| until > Utc::now())
        })
    });
    let repaired = repair::repair_latest(
        home,
        &repo,
        &lock,
        &generations,
        (&reachable, &upstream),
        global.dry_run,
    )
    .await?;
    let repair_bytes = upstream.bytes_received();
    let mut staged = if global.dry_run {
        None
    } else {
        Some(repo.stage(&lock).map_err(repo_error)?)
    };
    let inputs = sync::SyncInputs {
        config: &config,
        only,
        upstream: &upstream,
        previous: previous.as_ref(),
        repo: &repo,
        states: &states,
        dry_run: global.dry_run,
    };
    let reports = sync::sync_products(&inputs, staged.as_mut()).await;
    // A damaged file of latest no source had must not be carried into the next revision: the
    // run fails, recorded like any failed sync (with what upstream answered: a 429's cool-down
    // counts), and says so after its report.
    let carried = staged
        .as_ref()
        .and_then(|staged| repair::carried_damage(&repaired, staged.files()));

    let failed = carried.is_some() || reports.iter().any(|r| r.result == ProductResult::Failed);
    let cooling = reports.iter().any(|r| r.result == ProductResult::Cooldown);
    // Open the inventory before anything becomes visible: if another process holds it past the
    // lock timeout, the sync fails having changed nothing.
    let inventory = match &staged {
        None => None,
        Some(_) => match Inventory::open(home, global.lock_timeout) {
            Ok(inventory) => Some(inventory),
            Err(err) => {
                if let Some(staged) = staged {
                    staged.discard();
                }
                return Err(inventory_error(err));
            }
        },
    };
    // latest holds every configured product; one that has never verified (e.g. in cool-down on
    // its first sync) keeps the next revision from being made.
    let incomplete: Vec<String> = reports
        .iter()
        .filter(|r| !r.has_content())
        .map(|r| r.name.clone())
        .collect();
    let mut new_manifest: Option<Manifest> = None;
    if let Some(staged) = staged {
        let unchanged = previous.as_ref().is_some_and(|p| {
            p.content_sha256 == staged.content_sha256()
                && p.products
                    == reports
                        .iter()
                        .flat_map(|r| r.entries.iter().cloned())
                        .collect::<Vec<_>>()
        });
        if failed || unchanged || !incomplete.is_empty() {
            staged.discard();
        } else {
            let key =
                SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
            let products = reports
                .iter()
                .flat_map(|r| r.entries.iter().cloned())
                .collect();
            // A site fed only by a parent mirror says so in its manifests.
            let source = if reports.iter().all(|r| r.kind == "pm") {
                "parent"
            } else {
                "upstream"
            };
            let manifest = staged
                .commit(&repo, &lock, &key, source, products)
                .map_err(repo_error)?;
            let after = Generations {
                latest: Some(manifest.revision.clone()),
                ..generations.clone()
            };
            repo.switch(&lock, &after, None).map_err(repo_error)?;
            tracing::info!(revision = %manifest.revision, "staged a new revision into latest");
            new_manifest = Some(manifest);
        }
    }
    drop(lock);

    // Products pm.toml no longer lists leave latest with the next revision.
    let configured: Vec<&str> = config.products.iter().map(|p| p.name.as_str()).collect();
    let leaving = previous
        .as_ref()
        .map(|p| removed::unconfigured_products(p, &configured))
        .unwrap_or_default();
    // A dry run says whether a sync would make a new revision (Ansible's check mode).
    let would_update = global.dry_run
        && !failed
        && incomplete.is_empty()
        && (!leaving.is_empty()
            || reports
                .iter()
                .any(|r| r.result == ProductResult::WouldUpdate));
    let report = SyncReport {
        changed: new_manifest.is_some() || would_update,
        dry_run: global.dry_run,
        revision: new_manifest
            .as_ref()
            .map(|m| m.revision.clone())
            .or(generations.latest.clone()),
        previous_revision: generations.latest.clone(),
        // What the repair of a damaged latest fetched counts too.
        bytes_downloaded: repair_bytes + reports.iter().map(|r| r.bytes_downloaded).sum::<u64>(),
        duration_seconds: started.elapsed().as_secs_f64(),
        incomplete,
        products: reports,
        repaired,
        removed: if new_manifest.is_some() || would_update {
            leaving
        } else {
            Vec::new()
        },
    };
    let status = if failed {
        ExitStatus::Failure
    } else if cooling {
        ExitStatus::Partial
    } else {
        ExitStatus::Success
    };
    if let Some(inventory) = inventory {
        let job_status = match status {
            ExitStatus::Failure => "failed",
            ExitStatus::Partial => "partial",
            _ if report.changed => "ok",
            _ => "unchanged",
        };
        inventory
            .transaction(|inv| {
                let summary = match &new_manifest {
                    Some(m) => format!("latest is now {}", m.revision),
                    None if carried.is_some() => {
                        "sync failed: latest is damaged and no source has the file; latest \
                         unchanged"
                            .to_string()
                    }
                    None if failed => "sync failed; latest unchanged".to_string(),
                    None => "no change".to_string(),
                };
                let summary = summary + &repair::repaired_summary(&report.repaired);
                let job_id = inv.insert_job("sync", started_at, job_status, &summary)?;
                record_live_revisions(inv, &repo)?;
                let rows: Vec<SyncRecord> = report
                    .products
                    .iter()
                    .map(|p| SyncRecord {
                        product: p.name.clone(),
                        source: if p.kind == "pm" { "parent" } else { "upstream" }.into(),
                        started_at: p.started_at,
                        finished_at: p.finished_at,
                        result: serde_json::to_value(p.result)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                        bytes_downloaded: p.bytes_downloaded,
                        versions: p.versions(),
                        revision: new_manifest.as_ref().map(|m| m.revision.clone()),
                        error: p.error.clone(),
                        bundle_sha256: None,
                        warnings: (!p.warnings.is_empty()).then(|| p.warnings.join("\n")),
                    })
                    .collect();
                inv.record_syncs(job_id, &rows)?;
                // Validators describe what latest holds. When the staged content was thrown
                // away, keep the old ones, or the next sync's 304 would hide the new upstream.
                let discarded = failed || !report.incomplete.is_empty();
                for product in &report.products {
                    let mut state = product.state.clone();
                    if discarded {
                        state.validators = states
                            .iter()
                            .find(|s| s.product == product.name)
                            .and_then(|s| s.validators.clone());
                    }
                    inv.save_product_state(&state)?;
                }
                Ok(())
            })
            .map_err(inventory_error)?;
    }
    if let Some(err) = carried {
        return Err(err);
    }
    print_sync(global, &report)?;
    removed::warn(
        &report.removed,
        global.dry_run,
        "sync",
        "latest what pm.toml no longer lists",
        "; `pm-mirror publish` takes it out of dist only with --allow-removal (put it back in \
         pm.toml to keep it)",
    );
    if failed {
        print_sync_errors(home, &report);
    }
    Ok(status)
}

/// `error:`/`hint:` on stderr for each product that failed (the report has the details).
fn print_sync_errors(home: &Path, report: &SyncReport) {
    for product in report.products.iter() {
        let Some(error) = &product.error else {
            continue;
        };
        eprintln!("error: {}: {error}", product.name);
        if error.contains("published or rolled back while this sync ran") {
            eprintln!(
                "hint: latest is unchanged; the parent's dist changed during the sync: run \
                 `pm-mirror sync` again"
            );
        } else if error.contains("No space left on device") {
            eprintln!(
                "hint: free space on the filesystem of `{}` (df -h) and run again; latest and \
                 dist are unchanged",
                home.display()
            );
        } else if error.contains(parent_key::NOT_FOLLOWED) {
            eprintln!("hint: {}", parent_key::lost_key_hint(&product.name));
        } else {
            eprintln!(
                "hint: latest is unchanged; fix the cause and run again (`pm-mirror status` \
                 shows each product's last error)"
            );
        }
    }
}

/// Makes sure every revision the repository holds is in the inventory, so a crash between the
/// repository switch and the inventory write heals on the next run.
fn record_live_revisions(
    inventory: &Inventory,
    repo: &Repo,
) -> Result<(), crate::inventory::InventoryError> {
    let Ok(generations) = repo.generations() else {
        return Ok(());
    };
    let revisions = generations
        .latest
        .iter()
        .chain(generations.dist.iter())
        .chain(generations.backups.iter());
    for revision in revisions {
        if let Ok(manifest) = repo.manifest(revision) {
            inventory.record_revision(&manifest)?;
        }
    }
    Ok(())
}

fn print_sync(global: &GlobalArgs, report: &SyncReport) -> anyhow::Result<()> {
    if global.json {
        return cli::print_json(report);
    }
    if global.quiet {
        return Ok(());
    }
    let mut table = cli::table(&[
        "product",
        "component",
        "upstream",
        "before",
        "after",
        "result",
        "downloaded",
    ]);
    for product in &report.products {
        let result = match (&product.error, product.cooldown_until) {
            (_, Some(until)) => format!("cooldown until {}", until.format("%Y-%m-%d %H:%M:%SZ")),
            (Some(_), None) => "failed".to_string(),
            _ if product.result == ProductResult::RolledBackByParent => {
                "rolled back by the parent".to_string()
            }
            _ => serde_json::to_value(product.result)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        };
        let downloaded = cli::human_bytes(product.bytes_downloaded);
        if product.components.is_empty() {
            table.add_row(vec![
                product.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                result.clone(),
                downloaded.clone(),
            ]);
        }
        for (i, component) in product.components.iter().enumerate() {
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            table.add_row(vec![
                if i == 0 {
                    product.name.clone()
                } else {
                    String::new()
                },
                component.name.clone(),
                component
                    .upstream_version
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
                show(&component.previous_version),
                show(&component.version),
                if i == 0 {
                    result.clone()
                } else {
                    String::new()
                },
                if i == 0 {
                    downloaded.clone()
                } else {
                    String::new()
                },
            ]);
        }
    }
    cli::print_text(table)?;
    for product in &report.products {
        if let Some(error) = &product.error {
            cli::print_text(format!("{}: {error}", product.name))?;
        }
        for warning in &product.warnings {
            cli::print_text(format!("{}: {warning}", product.name))?;
        }
    }
    if !report.repaired.is_empty() {
        cli::print_text(repair::repair_text(&report.repaired))?;
    }
    if !report.incomplete.is_empty() && !report.dry_run {
        cli::print_text(format!(
            "latest not updated: no verified content yet for {}",
            report.incomplete.join(", ")
        ))?;
    }
    let verdict = match (&report.revision, report.changed, report.dry_run) {
        (_, _, true) => "dry run: nothing downloaded or changed".to_string(),
        (Some(revision), true, _) => {
            format!("latest is now {revision} (publish it with `pm-mirror publish`)")
        }
        (Some(revision), false, _) => format!("latest unchanged at {revision}"),
        (None, _, _) => "latest is empty".to_string(),
    };
    cli::print_text(format!(
        "{verdict}; {} downloaded in {:.1}s",
        cli::human_bytes(report.bytes_downloaded),
        report.duration_seconds
    ))
}

/// `--json` document of `pm-mirror publish`.
#[derive(Debug, Serialize)]
pub struct PublishReport {
    /// Whether dist changed.
    pub changed: bool,
    /// `--dry-run`: what would happen.
    pub dry_run: bool,
    /// dist after the publish.
    pub dist: Option<String>,
    /// dist before.
    pub previous_dist: Option<String>,
    /// backup/1..3 after.
    pub backups: Vec<String>,
    /// Archived revisions after, newest first.
    pub archives: Vec<String>,
    /// Revision moved into the archive by this publish.
    pub archived: Option<String>,
    /// Archives deleted beyond the retention.
    pub expired: Vec<String>,
    /// Why nothing changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Until when agents accept dist: the signed dist statement's expiry, re-signed by this
    /// publish when it changed dist or a part of the validity had passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dist_valid_until: Option<DateTime<Utc>>,
    /// Whether this publish re-signed the statement of an unchanged dist.
    pub re_signed: bool,
    /// Products dist held that this publish took out with `--allow-removal`, with their files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<removed::RemovedProduct>,
}

fn run_publish(
    home: &Path,
    global: &GlobalArgs,
    again: bool,
    allow_removal: bool,
) -> anyhow::Result<ExitStatus> {
    let started_at = Utc::now();
    let config = load_config_or_closed_home(home, global)?;
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let before = repo.generations().map_err(repo_error)?;
    let Some(latest) = before.latest.clone() else {
        return Err(
            UserError::failure("latest is empty: there is nothing to publish")
                .with_hint("run `pm-mirror sync` first")
                .into(),
        );
    };
    let up_to_date = |reason: String| PublishReport {
        changed: false,
        dry_run: global.dry_run,
        dist: before.dist.clone(),
        previous_dist: before.dist.clone(),
        backups: before.backups.clone(),
        archives: before.archives.clone(),
        archived: None,
        expired: Vec::new(),
        reason: Some(reason),
        dist_valid_until: None,
        re_signed: false,
        removed: Vec::new(),
    };
    let same_content = match &before.dist {
        Some(dist) if dist != &latest => {
            let dist_manifest = repo.manifest(dist).map_err(repo_error)?;
            let latest_manifest = repo.manifest(&latest).map_err(repo_error)?;
            dist_manifest.content_sha256 == latest_manifest.content_sha256
        }
        _ => false,
    };
    let rotation = if same_content {
        None
    } else {
        before.publish(config.retention.archives)
    };
    let valid_for = config.serve.dist_valid_for;
    // Whenever this publish does not publish latest, it still re-signs dist when due: a refusal
    // run by the sync timer every 30 minutes must not freeze the fleet's dist until it expires.
    let keep_dist_signed = |lock: &crate::repo::RepoLock| {
        if global.dry_run {
            return Ok((current_statement(&repo)?.map(|s| s.expires_at), false));
        }
        re_sign_if_due(home, &repo, lock, &before, valid_for)
    };
    let Some(mut rotation) = rotation else {
        // Nothing to publish is no reason to hide a dist the key no longer verifies (a key
        // lost or replaced by hand): the timer's run says so at once, not when dist expires.
        check_dist_signature(home, &repo, &before)?;
        let mut report = up_to_date(format!("dist is up to date with latest ({latest})"));
        (report.dist_valid_until, report.re_signed) = keep_dist_signed(&lock)?;
        if !global.dry_run {
            record_recovered_publish(home, global, &before);
        }
        drop(lock);
        print_publish(global, &report)?;
        return Ok(ExitStatus::Success);
    };
    // A rollback took this revision out of dist on purpose: bringing it back takes a decision.
    if let Some(rolled_back_on) = before.is_rolled_back(&latest).then(|| {
        before
            .rolled_back_on(&latest)
            .map(|at| at.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .unwrap_or_else(|| "an unknown date".into())
    }) {
        if !again {
            if let Err(err) = keep_dist_signed(&lock) {
                tracing::warn!(error = %format!("{err:#}"), "cannot re-sign dist");
            }
            return Err(UserError::usage(format!(
                "latest `{latest}` was rolled back from dist; refusing to publish it again"
            ))
            .with_hint(format!(
                "it was rolled back on {rolled_back_on}; run `pm-mirror publish --again` to \
                 publish it anyway, or wait for a newer revision from `pm-mirror sync`"
            ))
            .into());
        }
        rotation.after.forget_rolled_back(&latest);
    } else if !again {
        // The same, product by product: a change to another product (or a feed's version
        // alone) makes a new revision that must not carry a rolled-back product's content back.
        if let Some(refused) = carries_rolled_back_product(&repo, &before, &latest)? {
            if let Err(err) = keep_dist_signed(&lock) {
                tracing::warn!(error = %format!("{err:#}"), "cannot re-sign dist");
            }
            return Err(refused.into());
        }
    }
    // dist must not lose a product by a typo in pm.toml: leaving one out takes a decision.
    let removed = match &before.dist {
        Some(dist) => removed::removed_products(
            &repo.manifest(dist).map_err(repo_error)?,
            &repo.manifest(&latest).map_err(repo_error)?,
        ),
        None => Vec::new(),
    };
    if !removed.is_empty() && !allow_removal {
        if let Err(err) = keep_dist_signed(&lock) {
            tracing::warn!(error = %format!("{err:#}"), "cannot re-sign dist");
        }
        return Err(UserError::usage(format!(
            "latest `{latest}` leaves out what dist holds; publishing it would take out of dist: {}",
            removed::describe_all(&removed)
        ))
        .with_hint(if config.products.is_empty() {
            // A closed home: the bundle it imported no longer carries the product.
            "the last imported bundle no longer carries it (it was removed on the exporting \
             side): run `pm-mirror publish --allow-removal` to publish without it, or import \
             a bundle that carries it"
        } else {
            "a product removed or renamed in pm.toml leaves dist with its files: put it back in \
             pm.toml under its old name and run `pm-mirror sync`, or run `pm-mirror publish \
             --allow-removal` to publish without it"
        })
        .into());
    }
    // The inventory is opened before the switch so that a lock timeout fails with no change.
    let inventory = if global.dry_run {
        None
    } else {
        Some(Inventory::open(home, global.lock_timeout).map_err(inventory_error)?)
    };
    let mut dist_valid_until = None;
    if !global.dry_run {
        // Sign-check the revision being published: never serve a manifest we did not sign.
        if let Err(refused) = verify_revision(&repo, home, &latest) {
            if let Err(err) = keep_dist_signed(&lock) {
                tracing::warn!(error = %format!("{err:#}"), "cannot re-sign dist");
            }
            return Err(refused);
        }
        let statement =
            sign_dist_statement(home, &repo, &rotation.after, config.serve.dist_valid_for)?;
        repo.switch(&lock, &rotation.after, Some(&statement.1))
            .map_err(repo_error)?;
        dist_valid_until = Some(statement.0.expires_at);
    }
    let report = PublishReport {
        // In a dry run: it would change (what Ansible's check mode reports).
        changed: true,
        dry_run: global.dry_run,
        dist: rotation.after.dist.clone(),
        previous_dist: before.dist.clone(),
        backups: rotation.after.backups.clone(),
        archives: rotation.after.archives.clone(),
        archived: rotation.archived.clone(),
        expired: rotation.expired.clone(),
        reason: None,
        dist_valid_until,
        re_signed: false,
        removed,
    };
    let mut unfinished_rollback = None;
    if let Some(inventory) = inventory {
        unfinished_rollback = unfinished_fleet_rollback(&inventory);
        inventory
            .transaction(|inv| {
                let summary = format!("dist is now {latest}");
                let job_id = inv.insert_job("publish", started_at, "ok", &summary)?;
                inv.record_publish(
                    job_id,
                    started_at,
                    &PublishAttempt {
                        at: Utc::now(),
                        result: "published".into(),
                        revision: Some(latest.clone()),
                        dist: rotation.after.dist.clone(),
                        error: None,
                    },
                )?;
                record_live_revisions(inv, &repo)?;
                inv.record_dist_change(
                    job_id,
                    &DistChange {
                        action: "publish".into(),
                        revision: latest.clone(),
                        previous_revision: before.dist.clone(),
                        backups: rotation.after.backups.clone(),
                        archived: rotation.archived.clone(),
                    },
                )
            })
            .map_err(inventory_error)?;
    }
    drop(lock);
    print_publish(global, &report)?;
    removed::warn(
        &report.removed,
        global.dry_run,
        "publish",
        "dist with --allow-removal",
        "",
    );
    if let Some((job_id, revision, hosts)) = unfinished_rollback {
        // Publish does not wait for it (docs/day-2-operations.md says why); its hosts stay
        // held, and running it again is refused with what to do instead.
        eprintln!(
            "warning: fleet rollback job {job_id} to {revision} has not finished ({hosts} host(s) \
             held there): this publish shifted the backups, so that rollback's next step changed; \
             `pm-push status {job_id}` says what to do"
        );
    }
    Ok(ExitStatus::Success)
}

/// Records a publish that was refused or failed, so that `status` shows it (and `jobs` audits
/// it): the error, what latest was and that dist did not change. Never in a dry run, never
/// into a home without an inventory, and never at the cost of the error itself: a failure to
/// record is a warning.
/// After a refused or failed publish, the next run that finds nothing to do records that it
/// ended well (`up_to_date`), so `status` stops showing the old failure as the last word.
/// Nothing is recorded (nor the inventory opened for writing) while the last attempt succeeded.
fn record_recovered_publish(home: &Path, global: &GlobalArgs, generations: &Generations) {
    let last = Inventory::open_read_only(home, global.lock_timeout)
        .ok()
        .flatten()
        .and_then(|inventory| inventory.last_publish().ok().flatten());
    if !last.is_some_and(|last| last.result == "refused" || last.result == "failed") {
        return;
    }
    let started_at = Utc::now();
    let attempt = PublishAttempt {
        at: started_at,
        result: "up_to_date".into(),
        revision: generations.latest.clone(),
        dist: generations.dist.clone(),
        error: None,
    };
    let recorded = Inventory::open(home, global.lock_timeout).and_then(|inventory| {
        inventory.transaction(|inv| {
            let job_id = inv.insert_job("publish", started_at, "ok", "dist is up to date")?;
            inv.record_publish(job_id, started_at, &attempt)
        })
    });
    if let Err(record) = recorded {
        tracing::warn!(error = %record, "cannot record the publish in the inventory");
    }
}

fn record_failed_publish(
    home: &Path,
    global: &GlobalArgs,
    started_at: DateTime<Utc>,
    err: &anyhow::Error,
) {
    if global.dry_run || !home.join(crate::inventory::INVENTORY_FILE).exists() {
        return;
    }
    let refused = err
        .downcast_ref::<UserError>()
        .is_some_and(|e| e.status == ExitStatus::Usage);
    let result = if refused { "refused" } else { "failed" };
    let generations = Repo::new(home).generations().unwrap_or_default();
    let attempt = PublishAttempt {
        at: Utc::now(),
        result: result.into(),
        revision: generations.latest,
        dist: generations.dist,
        error: Some(format!("{err:#}")),
    };
    // The publish may have failed on a busy inventory: do not wait for it as long again.
    let recorded = Inventory::open(home, global.lock_timeout.min(Duration::from_secs(5))).and_then(
        |inventory| {
            inventory.transaction(|inv| {
                let summary = format!("publish {result}; dist unchanged");
                let job_id = inv.insert_job("publish", started_at, result, &summary)?;
                inv.record_publish(job_id, started_at, &attempt)
            })
        },
    );
    if let Err(record) = recorded {
        tracing::warn!(error = %record, "cannot record the failed publish in the inventory");
    }
}

/// The refusal of a publish whose latest carries a product as a rolled-back revision had it
/// (not as dist has it), else None.
fn carries_rolled_back_product(
    repo: &Repo,
    generations: &Generations,
    latest: &str,
) -> anyhow::Result<Option<UserError>> {
    if generations.rolled_back_products.is_empty() {
        return Ok(None);
    }
    let latest_products = repo
        .manifest(latest)
        .map_err(repo_error)?
        .product_components();
    let dist = match &generations.dist {
        Some(dist) => Some(
            repo.manifest(dist)
                .map_err(repo_error)?
                .product_components(),
        ),
        None => None,
    };
    // Newest first, as `rolled_back` lists them.
    let rolled_back: Vec<(&String, &ProductComponents)> = generations
        .rolled_back
        .iter()
        .filter_map(|r| Some((r, generations.rolled_back_products.get(r)?)))
        .collect();
    let Some((product, revision)) =
        rolled_back_products(&latest_products, dist.as_ref(), &rolled_back)
            .into_iter()
            .next()
    else {
        return Ok(None);
    };
    let on = generations
        .rolled_back_on(&revision)
        .map(|at| at.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "an unknown date".into());
    Ok(Some(
        UserError::usage(format!(
            "latest `{latest}` carries `{product}` as `{revision}` had it, which was rolled back \
             from dist on {on}; refusing to publish it"
        ))
        .with_hint(format!(
            "the other products' changes go out with the first revision in which `{product}` \
             moved on upstream (`pm-mirror sync`); run `pm-mirror publish --again` to publish \
             `{latest}` whole, rolled-back `{product}` included"
        )),
    ))
}

/// The products of `latest` whose components are those of a rolled-back revision (newest
/// first) and not those of dist, each with the newest such revision: publishing latest would
/// bring that product's rolled-back content back.
fn rolled_back_products(
    latest: &ProductComponents,
    dist: Option<&ProductComponents>,
    rolled_back: &[(&String, &ProductComponents)],
) -> Vec<(String, String)> {
    latest
        .iter()
        .filter(|(product, now)| dist.and_then(|dist| dist.get(*product)) != Some(*now))
        .filter_map(|(product, now)| {
            rolled_back
                .iter()
                .find(|(_, old)| old.get(product) == Some(now))
                .map(|(revision, _)| (product.clone(), revision.to_string()))
        })
        .collect()
}

/// The newest fleet rollback whose hosts are still held at its revision (it did not rotate
/// dist): its job, revision and the number of hosts held.
fn unfinished_fleet_rollback(inventory: &Inventory) -> Option<(i64, String, usize)> {
    let holds = inventory.holds().ok()?;
    let record = crate::rollback::unfinished_fleet_rollback(inventory, holds.values())?;
    let hosts = holds
        .values()
        .filter(|h| h.job_id == Some(record.job_id))
        .count();
    Some((record.job_id, record.revision?, hosts))
}

/// What [`rollback_dist`] did, or with `--dry-run` would do; the `--json` document of
/// `pm-mirror rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DistRollback {
    /// Whether dist changed (false with `--dry-run`).
    pub changed: bool,
    /// `--dry-run`: nothing changed.
    pub dry_run: bool,
    /// The backup generation rolled back to.
    pub generation: usize,
    /// dist before.
    pub from: String,
    /// dist after (what backup/N held).
    pub to: String,
    /// backup/1..3 after.
    pub backups: Vec<String>,
    /// Archived revisions after, newest first (a rollback does not change them).
    pub archives: Vec<String>,
    /// What this rollback took out of dist and the backups, newest first; `pm-mirror publish`
    /// refuses these until `--again`.
    pub rolled_back: Vec<String>,
    /// The `jobs` row recorded with the `dist_history` row (none with `--dry-run`).
    pub job_id: Option<i64>,
}

/// Rolls the manager's dist back to backup/`generation`, crash-safely like a publish: takes the
/// repository lock, computes [`Generations::rollback`], opens the inventory before anything
/// changes (a lock timeout fails with no change), re-verifies the target revision's signature
/// and files, switches the view in one rename ([`Repo::switch`], which also collects garbage:
/// never latest, never a revision the view still references), then records the job and a
/// `dist_history` row with action `rollback` in one transaction. With `global.dry_run` it only
/// reports. It moves dist only; agents are rolled back by pm-rollback.
pub fn rollback_dist(
    home: &Path,
    global: &GlobalArgs,
    generation: usize,
) -> anyhow::Result<DistRollback> {
    let started_at = Utc::now();
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let before = repo.generations().map_err(repo_error)?;
    let Some(mut rollback) = before.rollback(generation) else {
        let problem = match (&before.dist, before.backups.len()) {
            (None, _) => "dist is empty: nothing was published".to_string(),
            (Some(dist), 0) => format!("dist is {dist} and there are no backups"),
            (Some(dist), n) => format!(
                "dist is {dist} and there {} only {n} backup{} ({})",
                if n == 1 { "is" } else { "are" },
                if n == 1 { "" } else { "s" },
                before.backups.join(", ")
            ),
        };
        return Err(UserError::usage(format!(
            "there is no backup/{generation} to roll back to: {problem}"
        ))
        .with_hint("`pm-mirror status` shows the generations; each publish adds a backup")
        .into());
    };
    // What the rolled-back revisions carried, product by product: publish refuses to bring it
    // back with another product's change.
    for revision in &rollback.rolled_back {
        if let Ok(manifest) = repo.manifest(revision) {
            rollback
                .after
                .rolled_back_products
                .insert(revision.clone(), manifest.product_components());
        }
    }
    let inventory = if global.dry_run {
        None
    } else {
        Some(Inventory::open(home, global.lock_timeout).map_err(inventory_error)?)
    };
    let mut job_id = None;
    if let Some(inventory) = inventory {
        // Never serve a manifest we did not sign, nor files that changed since.
        verify_revision(&repo, home, &rollback.to)?;
        let after = &rollback.after;
        // Read here, not before the lock: a rollback needs no pm.toml otherwise.
        let valid_for = Config::load(&home.join("pm.toml"))
            .map(|config| config.serve.dist_valid_for)
            .unwrap_or(crate::dist_statement::DEFAULT_VALID_FOR);
        let statement = sign_dist_statement(home, &repo, after, valid_for)?;
        repo.switch(&lock, after, Some(&statement.1))
            .map_err(repo_error)?;
        tracing::info!(from = %rollback.from, to = %rollback.to, generation, "rolled dist back");
        job_id = Some(
            inventory
                .transaction(|inv| {
                    let summary = format!(
                        "dist rolled back from {} to {} (backup/{generation})",
                        rollback.from, rollback.to
                    );
                    let job_id = inv.insert_job("rollback", started_at, "ok", &summary)?;
                    record_live_revisions(inv, &repo)?;
                    inv.record_dist_change(
                        job_id,
                        &DistChange {
                            action: "rollback".into(),
                            revision: rollback.to.clone(),
                            previous_revision: Some(rollback.from.clone()),
                            backups: rollback.after.backups.clone(),
                            archived: None,
                        },
                    )?;
                    Ok(job_id)
                })
                .map_err(inventory_error)?,
        );
    }
    drop(lock);
    Ok(DistRollback {
        // In a dry run: it would change (what Ansible's check mode reports).
        changed: true,
        dry_run: global.dry_run,
        generation,
        from: rollback.from,
        to: rollback.to,
        backups: rollback.after.backups,
        archives: rollback.after.archives,
        rolled_back: rollback.rolled_back,
        job_id,
    })
}

fn run_rollback(home: &Path, global: &GlobalArgs, generation: usize) -> anyhow::Result<ExitStatus> {
    let report = rollback_dist(home, global, generation)?;
    if global.json {
        cli::print_json(&report)?;
        return Ok(ExitStatus::Success);
    }
    if global.quiet {
        return Ok(ExitStatus::Success);
    }
    cli::print_text(generations_table(
        &report.to,
        &report.backups,
        &report.archives,
    ))?;
    let verb = if report.dry_run {
        "would roll"
    } else {
        "rolled"
    };
    cli::print_text(format!(
        "{verb} dist back from {} to {} (backup/{}); {} will not be published again without \
         `pm-mirror publish --again`\nthis moves dist only; to roll back the fleet use pm-rollback",
        report.from,
        report.to,
        report.generation,
        report.rolled_back.join(", ")
    ))?;
    Ok(ExitStatus::Success)
}

/// Signs the dist statement of `generations` (its dist and `dist_serial`) with the manifest key.
fn sign_dist_statement(
    home: &Path,
    repo: &Repo,
    generations: &Generations,
    valid_for: std::time::Duration,
) -> anyhow::Result<(DistStatement, SignedStatement)> {
    let key = SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
    sign_dist_statement_with(&key, repo, generations, valid_for)
}

/// Fails unless dist's manifest verifies with the home's signing key (the signature only; the
/// files are checked when a revision is published or rolled back to).
fn check_dist_signature(home: &Path, repo: &Repo, generations: &Generations) -> anyhow::Result<()> {
    let Some(dist) = &generations.dist else {
        return Ok(());
    };
    let key = SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
    if crate::pki::revision_signed_by(repo, dist, &key.verifying_key()?) {
        return Ok(());
    }
    Err(UserError::failure(format!(
        "dist ({dist}) is not signed by this manager's key {}",
        key.fingerprint()?
    ))
    .with_hint(
        "the signing key was replaced by hand, or dist's signature damaged: sign the repository \
         anew with `pm-mirror key rotate` (see docs/keys.md), or restore `pki/` from a backup",
    )
    .into())
}

/// [`sign_dist_statement`] with a given key (a rotation signs with the key it installs last).
fn sign_dist_statement_with(
    key: &SigningKey,
    repo: &Repo,
    generations: &Generations,
    valid_for: std::time::Duration,
) -> anyhow::Result<(DistStatement, SignedStatement)> {
    let dist = generations
        .dist
        .as_deref()
        .expect("a dist statement is signed for a dist");
    let manifest = repo.manifest(dist).map_err(repo_error)?;
    let statement = DistStatement::new(&manifest, generations.dist_serial, valid_for);
    let signed = SignedStatement::sign(&statement, key)?;
    Ok((statement, signed))
}

/// Signs the statement of an unchanged dist again when a part of its validity has passed (or it
/// has none): agents tell a live mirror from a frozen one by it. Returns the statement's expiry
/// and whether it was signed now.
fn re_sign_if_due(
    home: &Path,
    repo: &Repo,
    lock: &crate::repo::RepoLock,
    before: &Generations,
    valid_for: std::time::Duration,
) -> anyhow::Result<(Option<DateTime<Utc>>, bool)> {
    let current = current_statement(repo)?;
    let due = current
        .as_ref()
        .is_none_or(|s| s.is_due_for_refresh(Utc::now(), valid_for));
    if before.dist.is_none() || !due {
        return Ok((current.map(|s| s.expires_at), false));
    }
    let mut after = before.clone();
    after.dist_serial += 1;
    let (statement, signed) = sign_dist_statement(home, repo, &after, valid_for)?;
    repo.switch(lock, &after, Some(&signed))
        .map_err(repo_error)?;
    tracing::info!(dist = ?after.dist, dist_serial = after.dist_serial, "re-signed dist");
    Ok((Some(statement.expires_at), true))
}

/// The current view's dist statement, parsed (`None` before the first publish that wrote one).
fn current_statement(repo: &Repo) -> anyhow::Result<Option<DistStatement>> {
    let Some(signed) = repo.dist_statement().map_err(repo_error)? else {
        return Ok(None);
    };
    // Ours, so a statement that does not parse is one to replace, not an error.
    Ok(serde_json::from_slice(&signed.document).ok())
}

/// Checks the manifest signature and every file's size and sha256 of a revision.
fn verify_revision(repo: &Repo, home: &Path, revision: &str) -> anyhow::Result<()> {
    let key = SigningKey::load_or_create(home).context("cannot load the manifest signing key")?;
    let verifier = crate::pki::VerifyingKey::from_pem(&key.public_key_pem()?)?;
    verify_revision_dir(&repo.revision_dir(revision), revision, &verifier)?;
    Ok(())
}

/// Checks a revision directory (or a generation's stable path such as `repo/dist`) against its
/// `manifest.json`: the signature with `verifier`, then every listed file's size and sha256,
/// streamed. `label` names the revision in messages; the errors carry a `hint:`.
pub fn verify_revision_dir(
    dir: &Path,
    label: &str,
    verifier: &crate::pki::VerifyingKey,
) -> anyhow::Result<Manifest> {
    let manifest_bytes = std::fs::read(dir.join(crate::manifest::MANIFEST_FILE))
        .with_context(|| format!("cannot read the manifest of {label}"))?;
    let signature = std::fs::read(dir.join(crate::manifest::SIGNATURE_FILE))
        .with_context(|| format!("cannot read the manifest signature of {label}"))?;
    if !verifier.verify(&manifest_bytes, &signature) {
        return Err(UserError::failure(format!(
            "the manifest of {label} is not signed by this manager's key"
        ))
        .with_hint(
            "if the signing key changed, `pm-doctor`'s `signing key` check says how and what to \
             do (put back the key that signed it, or `pm-mirror key rotate --old-key-lost`: \
             docs/keys.md); a manifest changed by hand: restore it from a backup \
             (docs/repairing.md)",
        )
        .into());
    }
    verify_revision_files(dir, label)
}

/// The part of [`verify_revision_dir`] that needs no key: every file `manifest.json` lists, with
/// its size and sha256, and no engine name clash.
pub fn verify_revision_files(dir: &Path, label: &str) -> anyhow::Result<Manifest> {
    let manifest_bytes = std::fs::read(dir.join(crate::manifest::MANIFEST_FILE))
        .with_context(|| format!("cannot read the manifest of {label}"))?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("the manifest of {label} is not valid JSON"))?;
    for file in &manifest.files {
        let path = dir.join(&file.path);
        let (size, sha256) =
            hash_file(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
        if size != file.size || sha256 != file.sha256 {
            return Err(UserError::failure(format!(
                "`{}` in {label} does not match its manifest (size {size}, sha256 {sha256})",
                file.path
            ))
            .with_hint(
                "the file was damaged on disk: run `pm-mirror repair`, which restores it into \
                 every revision that shares it (docs/repairing.md)",
            )
            .into());
        }
    }
    // Made by an older pm, or by hand: agents would refuse it, so it is not served.
    if let Some(clash) = manifest.engine_name_clash() {
        return Err(UserError::failure(format!("{label}: {clash}"))
            .with_hint(
                "rename one of them in its feed or drop one of the products from pm.toml, then \
                 run `pm-mirror sync` and `pm-mirror publish`",
            )
            .into());
    }
    Ok(manifest)
}

/// Size and hex sha256 of a file, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((size, crate::manifest::hex(&hasher.finish())))
}

/// The generations after a publish or rollback, one row each.
fn generations_table(dist: &str, backups: &[String], archives: &[String]) -> comfy_table::Table {
    let mut table = cli::table(&["generation", "revision"]);
    table.add_row(vec!["dist".to_string(), dist.to_string()]);
    for (i, backup) in backups.iter().enumerate() {
        table.add_row(vec![format!("backup/{}", i + 1), backup.clone()]);
    }
    for archive in archives {
        table.add_row(vec!["archive".to_string(), archive.clone()]);
    }
    table
}

fn print_publish(global: &GlobalArgs, report: &PublishReport) -> anyhow::Result<()> {
    if global.json {
        return cli::print_json(report);
    }
    if global.quiet {
        return Ok(());
    }
    if let Some(reason) = &report.reason {
        return cli::print_text(format!("up to date: {reason}"));
    }
    cli::print_text(generations_table(
        report.dist.as_deref().unwrap_or_default(),
        &report.backups,
        &report.archives,
    ))?;
    let verb = if report.dry_run {
        "would publish"
    } else {
        "published"
    };
    cli::print_text(format!(
        "{verb} {} (dist was {})",
        report.dist.clone().unwrap_or_default(),
        report
            .previous_dist
            .clone()
            .unwrap_or_else(|| "empty".into())
    ))
}

/// `--json` document of `pm-mirror status`.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// Always false: status changes nothing.
    pub changed: bool,
    /// Revision names per generation.
    pub generations: Generations,
    /// The newest air-gap bundle import, if this mirror is fed by bundles.
    pub last_import: Option<crate::inventory::BundleImport>,
    /// The newest publish that tried to change dist: published, refused or failed.
    pub last_publish: Option<PublishAttempt>,
    /// Until when dist's signed statement is valid: after it agents refuse dist.
    pub dist_valid_until: Option<DateTime<Utc>>,
    /// Build time of the newest component in latest.
    pub newest_build_time: Option<DateTime<Utc>>,
    /// Its age: how stale the newest data of this site is.
    pub newest_data_age_seconds: Option<i64>,
    /// Per product.
    pub products: Vec<ProductStatus>,
}

/// One product in `pm-mirror status`.
#[derive(Debug, Serialize)]
pub struct ProductStatus {
    /// Product name.
    pub name: String,
    /// `ok` (its last sync ended well), `failing` (its last sync failed), `deferred` (upstream
    /// asked to wait: no sync contacts it before `cooldown_until`) or `never synced`; for a
    /// product latest, dist or a backup holds that pm.toml does not list, `imported` (it came
    /// in a bundle: a closed home) or `not in pm.toml`.
    pub state: &'static str,
    /// Last successful sync.
    pub last_success_at: Option<DateTime<Utc>>,
    /// Last failed sync and its error.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Error of the last failure.
    pub last_error: Option<String>,
    /// Cool-down end, while it lasts: the next sync that contacts upstream runs after it.
    pub cooldown_until: Option<DateTime<Utc>>,
    /// Why.
    pub cooldown_reason: Option<String>,
    /// Where its content in latest came from: the sync or bundle import that brought it.
    pub origin: Option<crate::inventory::ContentOrigin>,
    /// What the sync that brought its content in latest noted without failing (a damaged
    /// cdiff left out, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Per component.
    pub components: Vec<ComponentStatus>,
    /// For a `pm` product: the key the parent's manifests must be signed with now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_key: Option<parent_key::ParentKeyStatus>,
}

/// One component's version in every generation.
#[derive(Debug, Serialize)]
pub struct ComponentStatus {
    /// Component name.
    pub name: String,
    /// What upstream offered at the last sync that contacted it, or `unknown` when that sync
    /// did not learn it (upstream did not answer, the component failed or was not reached).
    pub upstream: String,
    /// Why the last sync failed on this component (a database missing upstream, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// In latest.
    pub latest: Option<String>,
    /// In dist.
    pub dist: Option<String>,
    /// In backup/1..3.
    pub backups: Vec<Option<String>>,
}

fn run_status(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let config = load_config_or_closed_home(home, global)?;
    let repo = Repo::new(home);
    let generations = repo.generations().map_err(repo_error)?;
    let (states, last_import, origins, last_publish) =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => (
                inventory.product_states().map_err(inventory_error)?,
                inventory.last_bundle_import().map_err(inventory_error)?,
                inventory.content_origins().map_err(inventory_error)?,
                inventory.last_publish().map_err(inventory_error)?,
            ),
            None => (Vec::new(), None, Vec::new(), None),
        };
    let manifest_of =
        |revision: &Option<String>| revision.as_ref().and_then(|r| repo.manifest(r).ok());
    let latest = manifest_of(&generations.latest);
    let dist = manifest_of(&generations.dist);
    let backups: Vec<Option<Manifest>> = generations
        .backups
        .iter()
        .map(|r| repo.manifest(r).ok())
        .collect();
    // A component as reports name it (`daily`; `clamav/daily` for what a `pm` product brought)
    // and its version, over the entries a pm.toml product contributed to a manifest.
    let components_of = |manifest: &Manifest, product: &str| {
        manifest
            .products_of(product)
            .flat_map(|e| e.components.iter().map(move |c| (e.component_label(c), c)))
            .map(|(label, c)| (label, c.version.clone()))
            .collect::<Vec<_>>()
    };
    let version_in = |manifest: Option<&Manifest>, product: &str, component: &str| {
        components_of(manifest?, product)
            .into_iter()
            .find(|(label, _)| label == component)
            .map(|(_, version)| version)
    };
    let now = Utc::now();
    // pm.toml's products, then those latest, dist or a backup hold that it does not list: a
    // closed home's, which came in bundles, or one taken out of pm.toml. What is served is shown.
    let mut listed: Vec<(String, Option<&config::Product>)> = config
        .products
        .iter()
        .map(|p| (p.name.clone(), Some(p)))
        .collect();
    for manifest in [latest.as_ref(), dist.as_ref()]
        .into_iter()
        .flatten()
        .chain(backups.iter().flatten())
    {
        for entry in &manifest.products {
            if !listed
                .iter()
                .any(|(name, _)| name == entry.config_product())
            {
                listed.push((entry.config_product().to_string(), None));
            }
        }
    }
    let mut products = Vec::new();
    for (product_name, configured) in &listed {
        let state = states.iter().find(|s| &s.product == product_name);
        let origin = origins.iter().find(|o| &o.product == product_name);
        let upstream_versions: Vec<(String, String)> = state
            .and_then(|s| s.upstream_versions.as_deref())
            .unwrap_or("")
            .split(',')
            .filter_map(|pair| {
                pair.split_once('=')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        // Upstream counts as unreachable when its last answer is older than the last failure.
        let reachable = state.is_some_and(|s| match (s.upstream_checked_at, s.last_failure_at) {
            (Some(ok), Some(failed)) => ok >= failed,
            (Some(_), None) => true,
            _ => false,
        });
        let mut names: Vec<String> = Vec::new();
        for manifest in [latest.as_ref(), dist.as_ref()]
            .into_iter()
            .flatten()
            .chain(backups.iter().flatten())
        {
            for (label, _) in components_of(manifest, product_name) {
                if !names.contains(&label) {
                    names.push(label);
                }
            }
        }
        if let Some(config::ProductSource::Clamav(source)) = configured.map(|p| &p.source) {
            for db in &source.databases {
                if !names.contains(db) {
                    names.push(db.clone());
                }
            }
        }
        // What the last try learnt per component; syncs recorded before it was kept have only
        // upstream_versions, which are stale once a failure is newer.
        let tried = state.and_then(|s| s.upstream_components());
        for name in tried.iter().flat_map(|t| t.keys()) {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let components = names
            .into_iter()
            .map(|name| ComponentStatus {
                upstream: match &tried {
                    Some(tried) => tried.get(&name).and_then(|c| c.version.clone()),
                    None => upstream_versions
                        .iter()
                        .find(|(c, _)| *c == name)
                        .filter(|_| reachable)
                        .map(|(_, v)| v.clone()),
                }
                // Not in pm.toml: this mirror does not ask upstream for it.
                .unwrap_or_else(|| if configured.is_some() { "unknown" } else { "-" }.into()),
                error: tried.as_ref().and_then(|t| t.get(&name)?.error.clone()),
                latest: version_in(latest.as_ref(), product_name, &name),
                dist: version_in(dist.as_ref(), product_name, &name),
                backups: backups
                    .iter()
                    .map(|m| version_in(m.as_ref(), product_name, &name))
                    .collect(),
                name,
            })
            .collect();
        let cooldown_until = state
            .and_then(|s| s.cooldown_until)
            .filter(|until| *until > now);
        products.push(ProductStatus {
            name: product_name.clone(),
            state: match (configured, origin) {
                (Some(_), _) => sync_state(state, cooldown_until),
                (None, Some(origin)) if origin.source == "bundle" => "imported",
                (None, _) => "not in pm.toml",
            },
            last_success_at: state.and_then(|s| s.last_success_at),
            last_failure_at: state.and_then(|s| s.last_failure_at),
            last_error: state.and_then(|s| s.last_error.clone()),
            cooldown_until,
            cooldown_reason: state
                .filter(|s| s.cooldown_until.is_some_and(|until| until > now))
                .and_then(|s| s.cooldown_reason.clone()),
            warnings: origin
                .and_then(|o| o.warnings.as_deref())
                .into_iter()
                .flat_map(|text| text.lines().map(String::from))
                .collect(),
            origin: origin.cloned(),
            components,
            trusted_key: match configured.map(|product| &product.source) {
                Some(config::ProductSource::Pm(source)) => {
                    parent_key::ParentKey::load(home, product_name, &source.trusted_key)
                        .ok()
                        .map(|key| key.status(home, product_name, &source.trusted_key))
                }
                _ => None,
            },
        });
    }
    // How old the newest data is: what a closed site, fed by bundles, needs to see.
    let newest_build_time = latest
        .as_ref()
        .and_then(|m| m.files.iter().filter_map(|f| f.build_time).max());
    let report = StatusReport {
        changed: false,
        last_import,
        last_publish,
        dist_valid_until: current_statement(&repo)
            .ok()
            .flatten()
            .map(|s| s.expires_at),
        newest_build_time,
        newest_data_age_seconds: newest_build_time.map(|t| (now - t).num_seconds()),
        generations,
        products,
    };
    if global.json {
        cli::print_json(&report)?;
        return Ok(ExitStatus::Success);
    }
    let mut header = vec!["product", "component", "upstream", "latest", "dist"];
    let backup_names: Vec<String> = (1..=crate::repo::BACKUP_GENERATIONS)
        .map(|i| format!("backup/{i}"))
        .collect();
    header.extend(backup_names.iter().map(String::as_str));
    header.extend(["last sync ok", "cool-down"]);
    let mut table = cli::table(&header);
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for product in &report.products {
        for (i, component) in product.components.iter().enumerate() {
            let mut row = vec![
                if i == 0 {
                    product.name.clone()
                } else {
                    String::new()
                },
                component.name.clone(),
                component.upstream.clone(),
                show(&component.latest),
                show(&component.dist),
            ];
            for generation in 0..crate::repo::BACKUP_GENERATIONS {
                row.push(show(&component.backups.get(generation).cloned().flatten()));
            }
            row.push(if i == 0 {
                product
                    .last_success_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                    .unwrap_or_else(|| match product.state {
                        "imported" | "not in pm.toml" => "-".into(),
                        _ => "never".into(),
                    })
            } else {
                String::new()
            });
            row.push(if i == 0 {
                product
                    .cooldown_until
                    .map(|t| format!("until {}", t.format("%Y-%m-%d %H:%M:%SZ")))
                    .unwrap_or_else(|| "-".into())
            } else {
                String::new()
            });
            table.add_row(row);
        }
    }
    cli::print_text(table)?;
    let g = &report.generations;
    cli::print_text(format!(
        "latest {} · dist {} · backups {} · archives {}",
        g.latest.as_deref().unwrap_or("-"),
        g.dist.as_deref().unwrap_or("-"),
        if g.backups.is_empty() {
            "-".to_string()
        } else {
            g.backups.join(", ")
        },
        if g.archives.is_empty() {
            "-".to_string()
        } else {
            g.archives.join(", ")
        },
    ))?;
    if let Some(import) = &report.last_import {
        cli::print_text(format!(
            "last bundle import {} (sha256 {}){}",
            import.at.format("%Y-%m-%d %H:%M:%SZ"),
            import.bundle_sha256.as_deref().unwrap_or("-"),
            import
                .revision
                .as_ref()
                .map(|r| format!(" made {r}"))
                .unwrap_or_default(),
        ))?;
    }
    if let Some(until) = report.dist_valid_until {
        let at = until.format("%Y-%m-%d %H:%M:%SZ");
        cli::print_text(if until <= now {
            format!(
                "dist statement EXPIRED at {at}: agents refuse dist; run `pm-mirror publish` \
                 (it signs dist anew) and check the timer that runs it"
            )
        } else {
            format!("dist statement valid until {at}")
        })?;
    }
    if let Some(publish) = &report.last_publish {
        let at = publish.at.format("%Y-%m-%d %H:%M:%SZ");
        let line = match (&publish.error, publish.result.as_str()) {
            (Some(error), result) => format!(
                "last publish {result} at {at}: {error}; dist is still {}",
                publish.dist.as_deref().unwrap_or("empty")
            ),
            (None, "up_to_date") => format!(
                "last publish {at}: dist is up to date ({})",
                publish.dist.as_deref().unwrap_or("empty")
            ),
            (None, result) => format!(
                "last publish {at}: {result} {}",
                publish.revision.as_deref().unwrap_or("-")
            ),
        };
        cli::print_text(line)?;
    }
    if let (Some(built), Some(age)) = (report.newest_build_time, report.newest_data_age_seconds) {
        cli::print_text(format!(
            "newest data built {} ({} old)",
            built.format("%Y-%m-%d %H:%M:%SZ"),
            human_age(age)
        ))?;
    }
    for product in &report.products {
        if let (Some(error), Some(failed_at), "failing" | "deferred") =
            (&product.last_error, product.last_failure_at, product.state)
        {
            let next_try = product
                .cooldown_until
                .map(|t| format!("; next try after {}", t.format("%Y-%m-%d %H:%M:%SZ")))
                .unwrap_or_default();
            cli::print_text(format!(
                "{}: {}: last sync failed at {}: {error}{next_try}",
                product.name,
                product.state,
                failed_at.format("%Y-%m-%d %H:%M:%SZ")
            ))?;
        }
        if let (Some(origin), "imported" | "not in pm.toml") = (&product.origin, product.state) {
            let from = match &origin.bundle_sha256 {
                Some(sha256) => format!("import of bundle {}", &sha256[..sha256.len().min(12)]),
                None => format!("{} sync", origin.source),
            };
            cli::print_text(format!(
                "{}: {}: content from {from} at {}{}",
                product.name,
                product.state,
                origin.at.format("%Y-%m-%d %H:%M:%SZ"),
                origin
                    .revision
                    .as_ref()
                    .map(|r| format!(" (made {r})"))
                    .unwrap_or_default()
            ))?;
        }
        for component in &product.components {
            // A product's only component failing says nothing the product's line did not.
            let said = product.components.len() == 1 && component.error == product.last_error;
            if let (Some(error), false) = (&component.error, said) {
                cli::print_text(format!("{}/{}: {error}", product.name, component.name))?;
            }
        }
        for warning in &product.warnings {
            cli::print_text(format!("{}: warning: {warning}", product.name))?;
        }
    }
    for product in &report.products {
        if let Some(key) = &product.trusted_key {
            cli::print_text(format!("{}: {}", product.name, key.describe()))?;
        }
    }
    Ok(ExitStatus::Success)
}

/// A product's sync state for `status`: deferred while upstream's cool-down lasts, else
/// whichever of its last success and last failure is newer.
fn sync_state(
    state: Option<&crate::inventory::ProductState>,
    cooldown_until: Option<DateTime<Utc>>,
) -> &'static str {
    let Some(state) = state else {
        return "never synced";
    };
    match (cooldown_until, state.last_success_at, state.last_failure_at) {
        (Some(_), _, _) => "deferred",
        (None, Some(ok), Some(failed)) if failed > ok => "failing",
        (None, None, Some(_)) => "failing",
        (None, Some(_), _) => "ok",
        (None, None, None) => "never synced",
    }
}

/// `3d 4h`, `5h 12m`, `42m`: an age for people.
fn human_age(seconds: i64) -> String {
    let (days, hours, minutes) = (seconds / 86400, seconds % 86400 / 3600, seconds % 3600 / 60);
    match (days, hours) {
        (0, 0) => format!("{minutes}m"),
        (0, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}

async fn run_serve(home: &Path, listen: std::net::SocketAddr) -> anyhow::Result<ExitStatus> {
    let repo_root: PathBuf = Repo::new(home).root().to_owned();
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|err| {
        UserError::failure(format!("cannot listen on `{listen}`: {err}"))
            .with_hint("pick a free port with --listen")
    })?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, repo = %repo_root.display(), "serving the mirror");
    eprintln!("serving {} on http://{local}/", repo_root.display());
    serve::run(listener, ServeState::new(repo_root)).await?;
    Ok(ExitStatus::Success)
}

/// `--json` document of `pm-mirror gc`.
#[derive(Debug, Serialize)]
pub struct GcReport {
    /// Whether anything was removed (with `--dry-run`: would be).
    pub changed: bool,
    /// `--dry-run`: nothing was removed.
    pub dry_run: bool,
    /// Paths removed (with `--dry-run`: that a gc would remove).
    pub removed: Vec<PathBuf>,
}

fn run_gc(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let repo = Repo::new(home);
    let lock = repo.lock(global.lock_timeout).map_err(repo_error)?;
    let removed = if global.dry_run {
        repo.garbage(&lock).map_err(repo_error)?
    } else {
        repo.collect_garbage(&lock).map_err(repo_error)?
    };
    let report = GcReport {
        changed: !removed.is_empty(),
        dry_run: global.dry_run,
        removed,
    };
    if global.json {
        cli::print_json(&report)?;
    } else if !global.quiet {
        let verb = if report.dry_run {
            "would remove"
        } else {
            "removed"
        };
        let mut text = format!("{verb} {} unreferenced entries", report.removed.len());
        for path in &report.removed {
            text.push_str(&format!("\n  {}", path.display()));
        }
        cli::print_text(text)?;
    }
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_is_deferred_in_cool_down_else_as_its_newest_sync_ended() {
        let at = |s: i64| DateTime::from_timestamp(1_900_000_000 + s, 0);
        let check = |success: Option<i64>, failure: Option<i64>, cooling: bool, expected: &str| {
            let state = crate::inventory::ProductState {
                last_success_at: success.and_then(at),
                last_failure_at: failure.and_then(at),
                ..Default::default()
            };
            let until = cooling.then(|| at(3600)).flatten();
            assert_eq!(sync_state(Some(&state), until), expected);
        };
        check(Some(10), None, false, "ok");
        check(Some(10), Some(5), false, "ok");
        check(Some(5), Some(10), false, "failing");
        check(None, Some(10), false, "failing");
        check(Some(5), Some(10), true, "deferred");
        check(None, None, false, "never synced");
        assert_eq!(sync_state(None, None), "never synced");
    }

    fn products(list: &[(&str, &str)]) -> ProductComponents {
        list.iter()
            .map(|(name, version)| {
                (
                    name.to_string(),
                    vec![("db".to_string(), version.to_string())],
                )
            })
            .collect()
    }

    #[test]
    fn a_product_as_a_rolled_back_revision_had_it_is_found_and_one_as_dist_has_it_is_not() {
        let dist = products(&[("clamav", "4"), ("vendor", "1")]);
        let r2 = "r2".to_string();
        let old = products(&[("clamav", "5"), ("vendor", "1")]);
        let rolled_back = [(&r2, &old)];
        let latest = products(&[("clamav", "5"), ("vendor", "2")]);
        assert_eq!(
            rolled_back_products(&latest, Some(&dist), &rolled_back),
            [("clamav".to_string(), "r2".to_string())]
        );
        let moved_on = products(&[("clamav", "6"), ("vendor", "2")]);
        assert!(rolled_back_products(&moved_on, Some(&dist), &rolled_back).is_empty());
        let as_dist = products(&[("clamav", "4"), ("vendor", "1")]);
        assert!(rolled_back_products(&as_dist, Some(&dist), &rolled_back).is_empty());
    }
}
