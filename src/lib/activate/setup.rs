//! The manager's side of host setup: scan profiles (`pm-activate profile ...`), license files
//! (`pm-activate license ...`), and the setup steps `pm-activate host` runs after activation:
//! profile, group, license, in the seed's order, each reported on its own so a failed one can be
//! retried alone by running the same `pm-activate host` again.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;
use serde::Serialize;

use super::host::Step;
use super::inventory_error;
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::durable;
use crate::inventory::{Inventory, LicenseRecord};
use crate::profile::{self, DEFAULT_PROFILE, Profile, ProfileBody, ScanOptions};
use crate::proto;

/// Directory of registered license files, relative to `PM_HOME`.
pub const LICENSES_DIR: &str = "licenses";
/// A license file larger than this is refused (agents refuse it too).
const MAX_LICENSE: u64 = 1024 * 1024;

/// `pm-activate profile` subcommands.
#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Create or replace a profile, from form keys (`--set key=value`, repeatable) or from a
    /// configuration file for `command` engines (`--file F`)
    New {
        /// Profile name
        name: String,
        /// A form key (repeatable): exclude, exclude_dir, max_filesize_mb, max_scansize_mb,
        /// max_recursion, scan_archive, detect_pua, follow_symlinks
        #[arg(
            long = "set",
            value_name = "KEY=VALUE",
            conflicts_with = "file",
            required_unless_present = "file"
        )]
        set: Vec<String>,
        /// Raw configuration text for a `command` engine (file mode)
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Replace a profile active hosts use with one of the other mode (form or file); the
        /// hosts that use it get it at once either way
        #[arg(long)]
        force: bool,
    },
    /// Show a profile
    Show {
        /// Profile name
        name: String,
    },
    /// List profiles
    List,
    /// Delete a profile no active host uses (`default` cannot be deleted)
    Delete {
        /// Profile name
        name: String,
    },
}

/// `pm-activate license` subcommands.
#[derive(Debug, Subcommand)]
pub enum LicenseCommand {
    /// Register a license file; hosts get the newest one registered
    Add {
        /// The license file (kept 0600 under PM_HOME/licenses)
        file: PathBuf,
        /// Its expiry date, YYYY-MM-DD (end of that day, UTC) or RFC 3339
        #[arg(long, value_parser = parse_expiry)]
        expires: DateTime<Utc>,
    },
    /// Registered licenses, newest (the one hosts get) first
    List,
}

/// `--expires`: YYYY-MM-DD (the end of that day, UTC) or an RFC 3339 time.
pub fn parse_expiry(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map(|day| {
            day.and_hms_opt(23, 59, 59)
                .expect("a valid time of day")
                .and_utc()
        })
        .map_err(|_| format!("`{text}` is not a date (YYYY-MM-DD) or an RFC 3339 time"))
}

fn profile_error(err: profile::ProfileError) -> UserError {
    UserError::usage(err.to_string())
}

/// Runs `pm-activate profile ...`.
pub fn profile_command(
    home: &Path,
    global: &GlobalArgs,
    command: ProfileCommand,
) -> anyhow::Result<ExitStatus> {
    match command {
        ProfileCommand::New {
            name,
            set,
            file,
            force,
        } => profile_new(home, global, name, &set, file, force),
        ProfileCommand::Show { name } => {
            let profile = read_profiles(home, global)?
                .into_iter()
                .find(|p| p.name == name)
                .ok_or_else(|| missing_profile(&name))?;
            if global.json {
                cli::print_json(&serde_json::json!({ "changed": false, "profile": profile }))?;
            } else {
                cli::print_text(format!(
                    "{} ({} mode)\n{}",
                    profile.name,
                    profile.mode(),
                    profile.rendered().trim_end()
                ))?;
            }
            Ok(ExitStatus::Success)
        }
        ProfileCommand::List => {
            let profiles = read_profiles(home, global)?;
            if global.json {
                cli::print_json(&serde_json::json!({ "changed": false, "profiles": profiles }))?;
            } else {
                let mut table = cli::table(&["profile", "mode", "settings"]);
                for profile in &profiles {
                    table.add_row(vec![
                        profile.name.clone(),
                        profile.mode().to_string(),
                        profile.summary(),
                    ]);
                }
                cli::print_text(table)?;
            }
            Ok(ExitStatus::Success)
        }
        ProfileCommand::Delete { name } => profile_delete(home, global, &name),
    }
}

fn missing_profile(name: &str) -> UserError {
    UserError::usage(format!("there is no profile `{name}`")).with_hint(format!(
        "create it with `pm-activate profile new {name} --set key=value` (or `--file F`); \
         `pm-activate profile list` shows the existing ones"
    ))
}

fn read_profiles(home: &Path, global: &GlobalArgs) -> anyhow::Result<Vec<Profile>> {
    Ok(
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory.profiles().map_err(inventory_error)?,
            None => vec![Profile::default_profile()],
        },
    )
}

fn profile_new(
    home: &Path,
    global: &GlobalArgs,
    name: String,
    set: &[String],
    file: Option<PathBuf>,
    force: bool,
) -> anyhow::Result<ExitStatus> {
    let body = match file {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|err| {
                UserError::usage(format!(
                    "cannot read profile file `{}`: {err}",
                    path.display()
                ))
                .with_hint("a file-mode profile is UTF-8 text, at most 64 KiB")
            })?;
            ProfileBody::File { text }
        }
        None => {
            let mut options = ScanOptions::default();
            for pair in set {
                let (key, value) = pair.split_once('=').ok_or_else(|| {
                    UserError::usage(format!("--set `{pair}` is not of the form key=value"))
                })?;
                options.set(key.trim(), value.trim()).map_err(|err| {
                    profile_error(err).with_hint(
                        "keys: exclude, exclude_dir, max_filesize_mb, max_scansize_mb, \
                         max_recursion, scan_archive, detect_pua, follow_symlinks",
                    )
                })?;
            }
            ProfileBody::Form { options }
        }
    };
    let profile = Profile { name, body };
    profile.validate().map_err(profile_error)?;
    let (changed, users) = if global.dry_run {
        let users =
            match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
                Some(inventory) => check_replacement(&inventory, &profile, force)?,
                None => Vec::new(),
            };
        let changed = read_profiles(home, global)?.iter().all(|p| *p != profile);
        (changed, users)
    } else {
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        let users = check_replacement(&inventory, &profile, force)?;
        let started = Utc::now();
        let changed = inventory
            .transaction(|inv| {
                let changed = inv.save_profile(&profile)?;
                if changed {
                    inv.insert_job(
                        "profile",
                        started,
                        "ok",
                        &format!("saved profile {} ({} mode)", profile.name, profile.mode()),
                    )?;
                }
                Ok(changed)
            })
            .map_err(inventory_error)?;
        (changed, users)
    };
    // The hosts that use a changed profile get it now: the inventory never says a host runs a
    // profile it does not have. The report is then `pm-push profile`'s, a row per host.
    if changed && !users.is_empty() {
        if !global.json && !global.quiet {
            cli::print_text(format!(
                "saved profile {}: {}; sending it to the {} active host(s) that use it",
                profile.name,
                profile.summary(),
                users.len()
            ))?;
        }
        return crate::push::resend_profile(home, global, &profile.name, &users);
    }
    if global.json {
        cli::print_json(&serde_json::json!({ "changed": changed, "profile": profile }))?;
    } else if !global.quiet {
        cli::print_text(if changed {
            format!("saved profile {}: {}", profile.name, profile.summary())
        } else {
            format!("profile {} is already exactly this", profile.name)
        })?;
    }
    Ok(ExitStatus::Success)
}

/// The active hosts that hold the profile `new` replaces (by name; a host whose profile step
/// failed does not hold it and gets it when `pm-activate host` retries the step). Replacing one
/// they hold with the other mode is refused without `force`: a `clamav` agent refuses a file
/// profile, so the hosts would silently stay on the old one while the inventory names the new.
fn check_replacement(
    inventory: &Inventory,
    new: &Profile,
    force: bool,
) -> anyhow::Result<Vec<String>> {
    let users: Vec<crate::inventory::HostRecord> = inventory
        .hosts()
        .map_err(inventory_error)?
        .into_iter()
        .filter(|h| {
            h.state == "active"
                && h.profile == new.name
                && !h.setup_failed.split(',').any(|step| step == "profile")
        })
        .collect();
    let Some(old) = inventory.profile(&new.name).map_err(inventory_error)? else {
        return Ok(Vec::new());
    };
    if !force && !users.is_empty() && old.mode() != new.mode() {
        const SHOWN: usize = 10;
        let mut named: Vec<String> = users
            .iter()
            .take(SHOWN)
            .map(|h| {
                format!(
                    "{} ({})",
                    h.host,
                    h.engine.as_deref().unwrap_or("engine unknown")
                )
            })
            .collect();
        if users.len() > SHOWN {
            named.push(format!("and {} more", users.len() - SHOWN));
        }
        return Err(UserError::usage(format!(
            "profile `{}` is used by {} active host(s) ({}) as a {} profile; saving a {} profile \
             over it changes its mode",
            new.name,
            users.len(),
            named.join(", "),
            old.mode(),
            new.mode()
        ))
        .with_hint(
            "clamav agents take form profiles only: save it under a new name and move the hosts \
             that should use it (`pm-push profile NAME --host H`), or give --force to replace it \
             and send it to those hosts now",
        )
        .into());
    }
    Ok(users.into_iter().map(|h| h.host).collect())
}

fn profile_delete(home: &Path, global: &GlobalArgs, name: &str) -> anyhow::Result<ExitStatus> {
    if name == DEFAULT_PROFILE {
        return Err(UserError::usage("the `default` profile cannot be deleted")
            .with_hint("change it instead: `pm-activate profile new default --set key=value`")
            .into());
    }
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    let users: Vec<String> = inventory
        .hosts()
        .map_err(inventory_error)?
        .into_iter()
        .filter(|h| h.state == "active" && h.profile == name)
        .map(|h| h.host)
        .collect();
    if !users.is_empty() {
        return Err(UserError::usage(format!(
            "profile `{name}` is used by {} active host(s): {}",
            users.len(),
            users.join(", ")
        ))
        .with_hint("give those hosts another profile first (`pm-activate host ADDR --profile P`)")
        .into());
    }
    if inventory.profile(name).map_err(inventory_error)?.is_none() {
        return Err(missing_profile(name).into());
    }
    let changed = !global.dry_run
        && inventory
            .transaction(|inv| {
                let deleted = inv.delete_profile(name)?;
                inv.insert_job(
                    "profile",
                    Utc::now(),
                    "ok",
                    &format!("deleted profile {name}"),
                )?;
                Ok(deleted)
            })
            .map_err(inventory_error)?;
    if global.json {
        cli::print_json(&serde_json::json!({ "changed": changed, "deleted": name }))?;
    } else if !global.quiet {
        cli::print_text(format!("deleted profile {name}"))?;
    }
    Ok(ExitStatus::Success)
}

#[derive(Debug, Serialize)]
struct LicenseRow {
    sha256: String,
    file_name: String,
    size_bytes: i64,
    expires_at: DateTime<Utc>,
    added_at: DateTime<Utc>,
    current: bool,
}

/// Runs `pm-activate license ...`.
pub fn license_command(
    home: &Path,
    global: &GlobalArgs,
    command: LicenseCommand,
) -> anyhow::Result<ExitStatus> {
    match command {
        LicenseCommand::Add { file, expires } => license_add(home, global, &file, expires),
        LicenseCommand::List => {
            let licenses = match Inventory::open_read_only(home, global.lock_timeout)
                .map_err(inventory_error)?
            {
                Some(inventory) => inventory.licenses().map_err(inventory_error)?,
                None => Vec::new(),
            };
            let rows: Vec<LicenseRow> = licenses
                .into_iter()
                .enumerate()
                .map(|(n, l)| LicenseRow {
                    sha256: l.sha256,
                    file_name: l.file_name,
                    size_bytes: l.size_bytes,
                    expires_at: l.expires_at,
                    added_at: l.added_at,
                    current: n == 0,
                })
                .collect();
            if global.json {
                cli::print_json(&serde_json::json!({ "changed": false, "licenses": rows }))?;
            } else {
                let mut table = cli::table(&["file", "expires", "added", "sha256", "current"]);
                for row in &rows {
                    table.add_row(vec![
                        row.file_name.clone(),
                        row.expires_at.format("%Y-%m-%d").to_string(),
                        row.added_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                        row.sha256[..16].to_string(),
                        if row.current { "yes" } else { "" }.to_string(),
                    ]);
                }
                cli::print_text(table)?;
            }
            Ok(ExitStatus::Success)
        }
    }
}

fn license_add(
    home: &Path,
    global: &GlobalArgs,
    file: &Path,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<ExitStatus> {
    let (record, changed) = register_license(home, global, file, expires_at)?;
    if global.json {
        cli::print_json(&serde_json::json!({
            "changed": changed, "sha256": record.sha256, "file_name": record.file_name,
            "expires_at": record.expires_at,
        }))?;
    } else if !global.quiet {
        cli::print_text(if changed {
            format!(
                "registered license {} (expires {}); hosts get it on their next \
                 `pm-activate host` or `pm-push license`",
                record.file_name,
                record.expires_at.format("%Y-%m-%d")
            )
        } else {
            format!("license {} is already registered", record.file_name)
        })?;
    }
    Ok(ExitStatus::Success)
}

/// Registers a license file (kept 0600 under `PM_HOME/licenses`); whether it was new. With
/// `--dry-run` it is only checked.
pub fn register_license(
    home: &Path,
    global: &GlobalArgs,
    file: &Path,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<(LicenseRecord, bool)> {
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    profile::check_name(&file_name).map_err(|_| {
        UserError::usage(format!(
            "license file name `{file_name}` must be 1 to 64 letters, digits, `-`, `_`, `.`"
        ))
        .with_hint("rename the file; agents store it under that name")
    })?;
    let size = std::fs::metadata(file)
        .map_err(|err| {
            UserError::usage(format!(
                "cannot read license file `{}`: {err}",
                file.display()
            ))
        })?
        .len();
    if size == 0 || size > MAX_LICENSE {
        return Err(UserError::usage(format!(
            "license file `{}` has {size} bytes; a license has 1 byte to 1 MiB",
            file.display()
        ))
        .into());
    }
    let content = std::fs::read(file).map_err(|err| {
        UserError::usage(format!(
            "cannot read license file `{}`: {err}",
            file.display()
        ))
    })?;
    let now = Utc::now();
    if expires_at <= now {
        return Err(UserError::usage(format!(
            "--expires {} is in the past: agents refuse an expired license",
            expires_at.to_rfc3339()
        ))
        .into());
    }
    let sha256 = crate::manifest::hex(&openssl::sha::sha256(&content));
    let record = LicenseRecord {
        sha256: sha256.clone(),
        file_name,
        size_bytes: content.len() as i64,
        expires_at,
        added_at: now,
    };
    let mut changed = false;
    if !global.dry_run {
        // The content first (0600, a secret of the vendor's), then the row that refers to it.
        let dir = home.join(LICENSES_DIR);
        durable::create_private_dir(&dir, 0o700).map_err(|err| {
            UserError::failure(format!("cannot create `{}`: {err}", dir.display()))
        })?;
        let path = dir.join(&sha256);
        durable::write_atomic(&path, &content, 0o600).map_err(|err| {
            UserError::failure(format!("cannot write `{}`: {err}", path.display()))
        })?;
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        changed = inventory
            .transaction(|inv| {
                let inserted = inv.insert_license(&record)?;
                if inserted {
                    inv.insert_job(
                        "license",
                        now,
                        "ok",
                        &format!(
                            "registered license {} (expires {})",
                            record.file_name,
                            record.expires_at.to_rfc3339()
                        ),
                    )?;
                }
                Ok(inserted)
            })
            .map_err(inventory_error)?;
    }
    Ok((record, changed))
}

/// What the setup steps give one host, read before the agent is contacted.
#[derive(Debug, Clone)]
pub struct SetupPlan {
    /// The profile to send.
    pub profile: Profile,
    /// The group to send.
    pub group: String,
    /// The newest registered license and its content, if any.
    pub license: Option<(LicenseRecord, Vec<u8>)>,
    /// The hold in force on the host, sent again (a re-activated agent has lost it).
    pub hold: Option<proto::HoldSpec>,
}

impl SetupPlan {
    /// Looks up `profile` (a usage error when it does not exist) and the current license.
    pub fn load(
        home: &Path,
        profiles: &[Profile],
        licenses: &[LicenseRecord],
        group: &str,
        profile: &str,
    ) -> Result<SetupPlan, UserError> {
        let profile = if profile == DEFAULT_PROFILE && profiles.is_empty() {
            Profile::default_profile()
        } else {
            profiles
                .iter()
                .find(|p| p.name == profile)
                .cloned()
                .ok_or_else(|| missing_profile(profile))?
        };
        let license = current_license(home, licenses)?;
        Ok(SetupPlan {
            profile,
            group: group.to_string(),
            license,
            hold: None,
        })
    }
}

/// The newest registered license (the first of `licenses`) and its content.
pub fn current_license(
    home: &Path,
    licenses: &[LicenseRecord],
) -> Result<Option<(LicenseRecord, Vec<u8>)>, UserError> {
    let Some(record) = licenses.first() else {
        return Ok(None);
    };
    let path = home.join(LICENSES_DIR).join(&record.sha256);
    let content = std::fs::read(&path).map_err(|err| {
        UserError::failure(format!(
            "license {} is registered but `{}` cannot be read: {err}",
            record.file_name,
            path.display()
        ))
        .with_hint("register it again with `pm-activate license add FILE --expires DATE`")
    })?;
    Ok(Some((record.clone(), content)))
}

/// Sends a license to an agent (mutual TLS).
pub async fn send_license(
    client: &reqwest::Client,
    address: &str,
    license: &LicenseRecord,
    content: &[u8],
) -> Result<proto::SetupResponse, UserError> {
    let request = proto::LicenseRequest {
        file_name: license.file_name.clone(),
        expires_at: license.expires_at,
        sha256: license.sha256.clone(),
        content_hex: crate::manifest::hex(content),
    };
    super::host::post_json(client, address, proto::LICENSE_PATH, &request).await
}

/// Sends a scan profile to an agent (mutual TLS).
pub async fn send_profile(
    client: &reqwest::Client,
    address: &str,
    profile: &Profile,
) -> Result<proto::SetupResponse, UserError> {
    super::host::post_json(client, address, proto::PROFILE_PATH, profile).await
}

/// What the setup steps did.
#[derive(Debug)]
pub struct SetupOutcome {
    /// One step each: `profile`, `group`, `hold` (when one is in force), `license`.
    pub steps: Vec<Step>,
    /// Whether the agent's setup changed.
    pub changed: bool,
    /// The license the agent now holds (sha256), when that step worked.
    pub license_sha256: Option<String>,
    /// Whether the agent took the hold in force (`None`: no hold to send).
    pub hold_sent: Option<bool>,
}

impl SetupOutcome {
    /// The failed steps as the inventory keeps them (`profile,license`).
    pub fn failed(&self) -> String {
        self.steps
            .iter()
            .filter(|s| !s.ok)
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Sends the profile, the group and the license to an activated agent (mutual TLS), each on its
/// own: a failed step does not stop the next.
pub async fn apply(client: &reqwest::Client, address: &str, plan: &SetupPlan) -> SetupOutcome {
    let mut steps = Vec::new();
    let mut changed = false;
    let mut record = |name: &str, result: Result<proto::SetupResponse, UserError>| match result {
        Ok(answer) => {
            changed |= answer.changed;
            steps.push(Step::ok(name));
        }
        Err(err) => steps.push(Step::failed(name, err.to_string())),
    };
    record(
        "profile",
        send_profile(client, address, &plan.profile).await,
    );
    record(
        "group",
        super::host::post_json(
            client,
            address,
            proto::GROUP_PATH,
            &proto::GroupRequest {
                group: plan.group.clone(),
            },
        )
        .await,
    );
    let mut hold_sent = None;
    if let Some(hold) = &plan.hold {
        let request = proto::HoldRequest {
            hold: Some(hold.clone()),
            only_kind: None,
        };
        let result = super::host::post_json(client, address, proto::HOLD_PATH, &request).await;
        hold_sent = Some(result.is_ok());
        record("hold", result);
    }
    let mut license_sha256 = None;
    match &plan.license {
        Some((license, content)) => {
            let result = send_license(client, address, license, content).await;
            if result.is_ok() {
                license_sha256 = Some(license.sha256.clone());
            }
            record("license", result);
        }
        None => steps.push(Step::skipped(
            "license",
            "no license registered (`pm-activate license add FILE --expires DATE`)",
        )),
    }
    SetupOutcome {
        steps,
        changed,
        license_sha256,
        hold_sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_dates_mean_the_end_of_that_day_in_utc() {
        let day = parse_expiry("2027-03-31").unwrap();
        assert_eq!(day.to_rfc3339(), "2027-03-31T23:59:59+00:00");
        let exact = parse_expiry("2027-03-31T12:00:00+09:00").unwrap();
        assert_eq!(exact.to_rfc3339(), "2027-03-31T03:00:00+00:00");
        assert!(parse_expiry("31/03/2027").is_err());
    }
}
