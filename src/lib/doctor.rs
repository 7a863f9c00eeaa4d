//! `pm-doctor`: checks a manager home (config, secrets, inventory, repository and, when asked,
//! the running `pm-mirror serve` and `pm-exporter`) and says what to fix. It only reads: it
//! never creates a key, migrates the inventory or waits for a writer.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::config::{Config, ConfigError, PollConfig};
use crate::integrity;
use crate::inventory::{Inventory, InventoryError};
use crate::repo::{Generations, Repo};

/// How long each reachability check may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `pm-doctor` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-doctor",
    version,
    about = "Check a manager home and say what to fix"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// Also fetch `URL/manifest.json` from this `pm-mirror serve` and compare it with dist's
    #[arg(long, value_name = "URL")]
    pub serve: Option<reqwest::Url>,
    /// Also expect `200` from `URL/healthz` of this `pm-exporter`
    #[arg(long, value_name = "URL")]
    pub exporter: Option<reqwest::Url>,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckResult {
    /// Nothing to do.
    Ok,
    /// Works, but something is missing or will need a look.
    Warn,
    /// Broken or unsafe: the exit status is 1.
    Fail,
}

/// One check: what it looked at, the outcome, and unless ok what is wrong and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, e.g. `config` or `secret pki/ca.key`.
    pub name: String,
    /// ok, warn or fail.
    pub result: CheckResult,
    /// What is wrong; for an ok check a short note of what was found.
    pub message: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, note: Option<String>) -> Check {
        Check {
            name: name.into(),
            result: CheckResult::Ok,
            message: note,
            hint: None,
        }
    }

    fn warn(name: impl Into<String>, message: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::problem(CheckResult::Warn, name.into(), message.into(), hint.into())
    }

    fn fail(name: impl Into<String>, message: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::problem(CheckResult::Fail, name.into(), message.into(), hint.into())
    }

    fn problem(result: CheckResult, name: String, message: String, hint: String) -> Check {
        Check {
            name,
            result,
            message: Some(message),
            hint: Some(hint),
        }
    }
}

/// The `--json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always false: the doctor changes nothing.
    pub changed: bool,
    /// No check failed (warnings allowed).
    pub ok: bool,
    /// Every check, in the order they ran.
    pub checks: Vec<Check>,
}

/// Runs `pm-doctor`: 0 when no check fails, 1 when one does.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let home = args.global.home();
    let report = examine(&home, args.serve.as_ref(), args.exporter.as_ref())?;
    if args.global.json {
        cli::print_json(&report)?;
    } else {
        let mut table = cli::table(&["check", "result", "message", "hint"]);
        for check in &report.checks {
            table.add_row(vec![
                check.name.clone(),
                serde_json::to_value(check.result)?
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                check.message.clone().unwrap_or_default(),
                check.hint.clone().unwrap_or_default(),
            ]);
        }
        cli::print_text(table)?;
    }
    Ok(if report.ok {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// Runs every check against `home`; the reachability checks only for the URLs given.
pub fn examine(
    home: &Path,
    serve: Option<&reqwest::Url>,
    exporter: Option<&reqwest::Url>,
) -> anyhow::Result<Report> {
    let mut checks = Vec::new();
    let config = check_config(home, &mut checks);
    check_secrets(home, config.as_ref(), &mut checks);
    checks.push(check_signing_key(home));
    checks.push(check_ownership(home));
    checks.push(check_inventory(home, config.as_ref()));
    checks.extend(check_certificates(home));
    checks.extend(check_addresses(home));
    checks.extend(check_setup(home));
    checks.extend(check_manifest_keys(home));
    let dist_manifest = check_repository(home, &mut checks);
    if serve.is_some() || exporter.is_some() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The manager's own services: asked directly, never through a proxy from the
        // environment.
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(HTTP_TIMEOUT)
            .build()?;
        if let Some(url) = serve {
            checks.push(runtime.block_on(check_serve(&client, url, dist_manifest.as_deref())));
        }
        if let Some(url) = exporter {
            checks.push(runtime.block_on(check_exporter(&client, url)));
        }
    }
    let ok = checks.iter().all(|check| check.result != CheckResult::Fail);
    Ok(Report {
        changed: false,
        ok,
        checks,
    })
}

/// `pm.toml` through the loader every tool uses; its error text is the message.
fn check_config(home: &Path, checks: &mut Vec<Check>) -> Option<Config> {
    let path = home.join("pm.toml");
    match Config::load(&path) {
        Ok(config) => {
            checks.push(Check::ok(
                "config",
                Some(format!("{} products", config.products.len())),
            ));
            Some(config)
        }
        // pm-mirror takes a home without pm.toml for a closed home (status, publish, import
        // work; sync refuses): worth a look, not a failure.
        Err(ConfigError::Missing { .. }) => {
            checks.push(Check::warn(
                "config",
                format!(
                    "no `{}`: pm-mirror assumes a closed home (no products, content from \
                     `pm-mirror import`); `pm-mirror sync` refuses to run",
                    path.display()
                ),
                "create it: with the products to mirror on a connected mirror (see `pm.toml` \
                 in the README), empty on a closed home (docs/mirror.md)",
            ));
            Config::parse("", &path).ok()
        }
        Err(err) => {
            let hint = "fix the value; pm.toml keys are in the README";
            checks.push(Check::fail("config", err.to_string(), hint));
            None
        }
    }
}

/// The private keys, license files and the proxy password file: present, owned by this user,
/// not readable by group or others. Only metadata is read, never the contents.
fn check_secrets(home: &Path, config: Option<&Config>, checks: &mut Vec<Check>) {
    // The signing key's file mode is checked here; whether it is there and signs the
    // repository, by check_signing_key.
    if home.join(crate::pki::SIGNING_KEY_FILE).exists() {
        checks.push(check_secret_file(
            format!("secret {}", crate::pki::SIGNING_KEY_FILE),
            &home.join(crate::pki::SIGNING_KEY_FILE),
        ));
    }
    let created_by = [
        (
            crate::pki::ca::CA_KEY_FILE,
            "it is created by the first `pm-activate host` or `pm-poll`",
        ),
        (
            crate::pki::ca::CLIENT_KEY_FILE,
            "it is created by the first `pm-activate host` or `pm-poll`",
        ),
    ];
    for (relative, create_hint) in created_by {
        let path = home.join(relative);
        let name = format!("secret {relative}");
        match std::fs::metadata(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => checks.push(Check::warn(
                name,
                format!("`{}` does not exist yet", path.display()),
                create_hint,
            )),
            _ => checks.push(check_secret_file(name, &path)),
        }
    }
    let public = home.join(crate::pki::SIGNING_PUBLIC_KEY_FILE);
    if home.join(crate::pki::SIGNING_KEY_FILE).exists() && !public.exists() {
        checks.push(Check::fail(
            format!("key {}", crate::pki::SIGNING_PUBLIC_KEY_FILE),
            format!("`{}` is missing", public.display()),
            format!(
                "openssl pkey -in {} -pubout -out {}",
                home.join(crate::pki::SIGNING_KEY_FILE).display(),
                public.display()
            ),
        ));
    }
    let licenses = home.join(crate::activate::setup::LICENSES_DIR);
    if let Ok(entries) = std::fs::read_dir(&licenses) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        paths.sort();
        for path in paths {
            let relative = path
                .strip_prefix(home)
                .unwrap_or(&path)
                .display()
                .to_string();
            checks.push(check_secret_file(format!("secret {relative}"), &path));
        }
    }
    if let Some(password) = config
        .and_then(|config| config.proxy.as_ref())
        .and_then(|proxy| proxy.password_file.as_ref())
    {
        checks.push(check_secret_file(
            "secret proxy password_file".to_string(),
            password,
        ));
    }
}

/// The manifest signing key: loads, is the key that signed the repository, no rotation is
/// unfinished (docs/keys.md). Reads the key as the signing tools do; creates nothing.
fn check_signing_key(home: &Path) -> Check {
    use crate::pki::{PkiError, SigningKey};
    let name = "signing key";
    let failed = |err: PkiError| {
        let hint = err
            .hint()
            .unwrap_or("restore `pki/` from a backup of PM_HOME (docs/keys.md)");
        Check::fail(name, err.to_string(), hint)
    };
    let pending = home.join(crate::pki::rotation::PENDING_KEY_FILE);
    if pending.exists() {
        return failed(PkiError::RotationUnfinished { path: pending });
    }
    match SigningKey::load(home) {
        Err(PkiError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Check::warn(
                name,
                "cannot read the signing key as this user",
                "run pm-doctor as the home's owner to check it",
            )
        }
        Err(err) => failed(err),
        Ok(None) if crate::pki::repository_has_revisions(home) => failed(PkiError::Lost {
            path: home.join(crate::pki::SIGNING_KEY_FILE),
        }),
        Ok(None) => Check::warn(
            name,
            "there is no signing key yet",
            "`pm-mirror sync` creates it",
        ),
        Ok(Some(key)) => match key.check_signs_repository(home) {
            Err(err) => failed(err),
            Ok(()) => {
                let rotations = crate::pki::rotation::KeyChain::load(home)
                    .map(|chain| chain.rotations.len())
                    .unwrap_or(0);
                Check::ok(
                    name,
                    Some(format!(
                        "{}; rotated {rotations} time{}",
                        key.fingerprint().unwrap_or_default(),
                        if rotations == 1 { "" } else { "s" }
                    )),
                )
            }
        },
    }
}

/// One secret file: exists, owned by the effective user, mode 0600 or stricter.
fn check_secret_file(name: String, path: &Path) -> Check {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) => {
            return Check::fail(
                name,
                format!("cannot read `{}`: {err}", path.display()),
                "restore the file or point the config at the right one",
            );
        }
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Check::fail(
            name,
            format!(
                "`{}` is readable by group or others (mode {mode:o})",
                path.display()
            ),
            format!("chmod 600 {}", path.display()),
        );
    }
    let me = crate::ownership::effective_uid();
    if me.is_some_and(|uid| uid != metadata.uid()) {
        return Check::fail(
            name,
            format!(
                "`{}` is owned by uid {}, not by this user (uid {})",
                path.display(),
                metadata.uid(),
                me.unwrap_or_default()
            ),
            format!(
                "chown {} {} (run pm as the user that owns PM_HOME)",
                me.unwrap_or_default(),
                path.display()
            ),
        );
    }
    Check::ok(name, Some(format!("mode {mode:o}")))
}

/// Everything pm writes in the home belongs to the home's owner: an entry another user left
/// (a `sudo pm-mirror sync` by hand) stops the owner's next sync or publish halfway.
fn check_ownership(home: &Path) -> Check {
    const NAME: &str = "ownership";
    let Ok(metadata) = std::fs::metadata(home) else {
        return Check::warn(
            NAME,
            format!("`{}` does not exist", home.display()),
            "check --home (or PM_HOME)",
        );
    };
    let owner = metadata.uid();
    let foreign = crate::ownership::foreign_entries(home, owner);
    if foreign.is_empty() {
        return Check::ok(
            NAME,
            Some(format!(
                "everything pm writes belongs to {}",
                crate::ownership::describe_user(owner)
            )),
        );
    }
    Check::fail(
        NAME,
        format!(
            "{} belong to another user than {}, who owns the home: its next sync or publish \
             fails",
            crate::ownership::name_foreign(&foreign),
            crate::ownership::describe_user(owner)
        ),
        format!(
            "{} (as root); run pm as the home's owner, never as root",
            crate::ownership::chown_hint(home, owner)
        ),
    )
}

/// The inventory as the exporter opens it: read-only, one attempt, never migrated; and whether
/// polls past `[poll] keep_polls` are being pruned.
fn check_inventory(home: &Path, config: Option<&Config>) -> Check {
    const NAME: &str = "inventory";
    match Inventory::open_for_snapshot(home) {
        Ok(Some(inventory)) => {
            let version = inventory.schema_version().unwrap_or_default();
            let poll = config.map(|c| c.poll.clone()).unwrap_or_default();
            match clock_off(&inventory).or_else(|| retention_overdue(&inventory, &poll)) {
                Some((message, hint)) => Check::warn(NAME, message, hint),
                None => Check::ok(
                    NAME,
                    Some(format!(
                        "schema version {version}, {} on disk",
                        cli::human_bytes(Inventory::size_on_disk(home).unwrap_or_default())
                    )),
                ),
            }
        }
        Ok(None) => Check::warn(
            NAME,
            "no inventory yet",
            "run pm-mirror sync or pm-activate",
        ),
        Err(InventoryError::Locked { path, holder, .. }) => Check::warn(
            NAME,
            format!(
                "`{}` is busy: a writer is running ({holder})",
                path.display()
            ),
            "run pm-doctor again when it has finished",
        ),
        Err(err) if err.is_unreplayable_wal() => Check::warn(
            NAME,
            "a writer was interrupted: its write-ahead log is replayed by the next pm command \
             that writes the inventory (read-only opens cannot replay it)",
            "run a writing command, e.g. pm-mirror sync or pm-poll",
        ),
        Err(err @ InventoryError::TooOld { .. }) => Check::warn(
            NAME,
            err.to_string(),
            "run any tool that writes it (e.g. pm-mirror sync) to migrate it",
        ),
        Err(err @ InventoryError::TooNew { .. }) => Check::fail(
            NAME,
            err.to_string(),
            "upgrade pm to the version that wrote it",
        ),
        Err(err) => Check::fail(
            NAME,
            err.to_string(),
            "restore inventory.duckdb from a backup, or move it aside to start a new one",
        ),
    }
}

/// What is wrong, and what to do, when the last poll that heard agents found this manager's
/// clock out of step with theirs (the median of their answers): polls are stamped with it,
/// and while it is ahead pm-poll prunes nothing.
fn clock_off(inventory: &Inventory) -> Option<(String, String)> {
    let (ahead, checked_at) =
        crate::poll::clock_out_of_step(inventory, chrono::Utc::now()).ok()??;
    Some((
        format!(
            "this manager's clock was {} its agents' at the poll of {}: polls are stamped with \
             it{}",
            crate::hosts::clock_offset(checked_at, checked_at - ahead),
            checked_at.to_rfc3339(),
            if ahead > chrono::Duration::zero() {
                ", and pm-poll prunes nothing while it is ahead"
            } else {
                ""
            }
        ),
        "set this manager's clock right (`timedatectl status`, NTP), then run pm-poll".into(),
    ))
}

/// Slack past `keep_polls` before an old poll means no prune ran: pm-poll prunes at most a
/// day apart, and a day without polls delays it.
const PRUNE_SLACK: chrono::Duration = chrono::Duration::days(2);

/// What is wrong, and what to do, when the oldest poll kept is older than `keep_polls` plus
/// [`PRUNE_SLACK`]: the daily prune (or the operator's `pm-poll --prune`) is not running.
fn retention_overdue(inventory: &Inventory, poll: &PollConfig) -> Option<(String, String)> {
    let oldest = inventory.oldest_poll_at().ok()??;
    let keep = chrono::Duration::from_std(poll.keep_polls).ok()?;
    if chrono::Utc::now() - oldest <= keep + PRUNE_SLACK {
        return None;
    }
    let last = match inventory.last_prune_at(chrono::Utc::now()).ok()? {
        Some(at) => format!("the last prune ran at {}", at.to_rfc3339()),
        None => "no prune ever ran".into(),
    };
    let hint = if poll.auto_prune {
        "pm-poll prunes after a poll once a day: check that pm-poll runs (`systemctl list-timers \
         pm-poll.timer`), then run `pm-poll --prune` and read its error"
    } else {
        "`[poll] auto_prune = false`: run `pm-poll --prune` from a daily timer, or set auto_prune \
         = true"
    };
    Some((
        format!(
            "polls from {} are kept, older than `[poll] keep_polls` ({}) by more than 2 days: \
             {last}; the inventory grows without bound",
            oldest.to_rfc3339(),
            humantime_days(poll.keep_polls)
        ),
        hint.into(),
    ))
}

/// `30d`, `12h` or seconds, as `pm.toml` would say it.
fn humantime_days(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

/// Agent certificates whose automatic renewal is overdue: less than
/// [`crate::hosts::OVERDUE_DAYS`] left (pm-poll renews them with a third of their life left),
/// or expired. Not listed when the inventory cannot be read (its own check says why).
fn check_certificates(home: &Path) -> Option<Check> {
    const NAME: &str = "certificates";
    let inventory = Inventory::open_for_snapshot(home).ok()??;
    let now = chrono::Utc::now();
    let soon = inventory
        .certificates_expiring(now + chrono::TimeDelta::days(crate::hosts::OVERDUE_DAYS))
        .ok()?;
    if soon.is_empty() {
        let known = inventory.certificate_metrics().ok()?;
        return Some(Check::ok(
            NAME,
            Some(match known.iter().map(|c| c.expires_at).min() {
                Some(first) => format!(
                    "{} host certificates, the first expires {}",
                    known.len(),
                    first.format("%Y-%m-%d")
                ),
                None => "no host certificate recorded yet".to_string(),
            }),
        ));
    }
    let expired = soon.iter().filter(|c| c.expires_at <= now).count();
    let named: Vec<String> = soon
        .iter()
        .take(5)
        .map(|c| {
            format!(
                "{} ({} {})",
                c.host,
                if c.expires_at <= now {
                    "expired"
                } else {
                    "expires"
                },
                c.expires_at.format("%Y-%m-%d")
            )
        })
        .collect();
    let more = soon.len().saturating_sub(named.len());
    Some(Check::warn(
        NAME,
        format!(
            "{} host certificates expire within {} days or have expired ({expired} expired): {}{}; \
             their automatic renewal is overdue",
            soon.len(),
            crate::hosts::OVERDUE_DAYS,
            named.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
        "pm-poll renews a certificate once a third of its life is left: check that the poll \
         timer runs (`systemctl status pm-poll.timer`) and what its log says for these hosts; \
         renew an expired one with `pm-activate host ADDRESS`",
    ))
}

/// One active host per address (`hosts::check_address_free`): an inventory from before the
/// rule may hold two, which the one agent there answers for both (`pm-poll` records them
/// `wrong_host`). Not listed when the inventory cannot be read (its own check says why).
fn check_addresses(home: &Path) -> Option<Check> {
    const NAME: &str = "addresses";
    let inventory = Inventory::open_for_snapshot(home).ok()??;
    let hosts = inventory.hosts().ok()?;
    let shared = crate::hosts::shared_addresses(&hosts);
    if shared.is_empty() {
        let active = hosts.iter().filter(|h| h.state == "active").count();
        return Some(Check::ok(
            NAME,
            Some(format!("{active} active hosts, one per address")),
        ));
    }
    let named: Vec<String> = shared
        .iter()
        .map(|(address, names)| format!("{address}: {}", names.join(", ")))
        .collect();
    Some(Check::warn(
        NAME,
        format!(
            "{} addresses have more than one active host: {}",
            shared.len(),
            named.join("; ")
        ),
        "one active host per address: `pm-activate deactivate HOST` the one that is gone for \
         good, or run `pm-activate host NEWADDR` where its agent listens now",
    ))
}

/// Active hosts that lack setup steps the manager has for them (`setup_failed`: a profile saved
/// while they were down, a license an agent refused): the manager's record names what they
/// should have, not what they have. Not listed when the inventory cannot be read.
fn check_setup(home: &Path) -> Option<Check> {
    const NAME: &str = "setup";
    let inventory = Inventory::open_for_snapshot(home).ok()??;
    let hosts = inventory.hosts().ok()?;
    let pending: Vec<String> = hosts
        .iter()
        .filter(|h| h.state == "active" && !h.setup_failed.is_empty())
        .map(|h| format!("{} ({})", h.host, h.setup_failed.replace(',', ", ")))
        .collect();
    if pending.is_empty() {
        return Some(Check::ok(
            NAME,
            Some("every active host has its profile, group and license".to_string()),
        ));
    }
    const SHOWN: usize = 10;
    let more = pending.len().saturating_sub(SHOWN);
    Some(Check::warn(
        NAME,
        format!(
            "{} active hosts do not have setup steps the manager has for them: {}{}",
            pending.len(),
            pending[..pending.len().min(SHOWN)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
        "`pm-activate host ADDRESS` sends a host its setup again once it answers (`pm-activate \
         list` shows the address and `setup: failed: STEP`); a profile alone: `pm-push profile \
         NAME --host HOST`",
    ))
}

/// The manifest key each active host reported against the manager's current one: a host on an
/// older key the rotation chain leads from follows at its next update (warn); one on a key the
/// chain does not lead from (the key was lost and replaced) never will without the trust step
/// (fail). Not listed when the inventory cannot be read or the manager has no key.
fn check_manifest_keys(home: &Path) -> Option<Check> {
    const NAME: &str = "manifest keys";
    let pem = std::fs::read(home.join(crate::pki::SIGNING_PUBLIC_KEY_FILE)).ok()?;
    let (current, _) = crate::pki::parse_public_key(&pem, Path::new("")).ok()?;
    let inventory = Inventory::open_for_snapshot(home).ok()??;
    let reported = inventory.manifest_keys().ok()?;
    let chain = crate::pki::rotation::KeyChain::load(home).unwrap_or_default();
    let leads_to_current = |fingerprint: &str| {
        let retired = home.join(crate::pki::rotation::RETIRED_DIR).join(format!(
            "{}.pub.pem",
            fingerprint.trim_start_matches("sha256:")
        ));
        std::fs::read(&retired)
            .ok()
            .and_then(|pem| crate::pki::parse_public_key(&pem, &retired).ok())
            .and_then(|(_, key)| crate::pki::rotation::follow(&chain, fingerprint, key).ok())
            .is_some_and(|reached| reached.fingerprint == current)
    };
    let (mut following, mut lost, mut none) = (Vec::new(), Vec::new(), Vec::new());
    for (host, key) in &reported {
        let Some(key) = key else {
            none.push(host.clone());
            continue;
        };
        if *key == current {
            continue;
        }
        if leads_to_current(key) {
            following.push(host.clone());
        } else {
            lost.push(host.clone());
        }
    }
    if following.is_empty() && lost.is_empty() && none.is_empty() {
        return Some(Check::ok(
            NAME,
            Some(format!(
                "{} hosts trust the manager's key {current}",
                reported.len()
            )),
        ));
    }
    let mut problems = Vec::new();
    if !lost.is_empty() {
        problems.push(format!(
            "{} hosts trust a key this manager no longer has: {}",
            lost.len(),
            some_hosts(&lost)
        ));
    }
    if !following.is_empty() {
        problems.push(format!(
            "{} hosts still trust an older manifest key: they follow at their next update: {}",
            following.len(),
            some_hosts(&following)
        ));
    }
    if !none.is_empty() {
        problems.push(format!(
            "{} hosts report no manifest key (an agent from before key rotation, or its key \
             file is missing): {}",
            none.len(),
            some_hosts(&none)
        ));
    }
    let message = problems.join("; ");
    if lost.is_empty() {
        return Some(Check::warn(
            NAME,
            message,
            "`pm-push update` moves hosts on an older key on, also when they are on dist; \
             upgrade agents that report none (`pm-push upgrade-agent`), or give one back its key \
             (`pm-agent trust-key`); `pm-poll` then shows the new key (docs/keys.md)",
        ));
    }
    Some(Check::fail(
        NAME,
        message,
        format!(
            "run the trust step on each: `pm-agent trust-key --fingerprint {current}` (ansible \
             playbook `trust-key.yml`), or re-activate them; upgrade agents from before key \
             rotation (`pm-push upgrade-agent`); see docs/keys.md"
        ),
    ))
}

/// Up to ten host names, and how many more.
fn some_hosts(hosts: &[String]) -> String {
    const SHOWN: usize = 10;
    let more = hosts.len().saturating_sub(SHOWN);
    let mut text = hosts[..hosts.len().min(SHOWN)].join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// The generations: dist verified (signature, sizes, sha256), then every generation's files.
/// Returns the bytes of dist's `manifest.json` when dist verified.
fn check_repository(home: &Path, checks: &mut Vec<Check>) -> Option<Vec<u8>> {
    let repo = Repo::new(home);
    let generations = match repo.generations() {
        Ok(generations) => generations,
        Err(err) => {
            checks.push(Check::fail(
                "repository",
                format!("{err:#}"),
                "run `pm-mirror status`; the repository state is damaged",
            ));
            return None;
        }
    };
    let dist_manifest = check_dist(home, &repo, &generations, checks);
    check_generations(home, &repo, &generations, checks);
    dist_manifest
}

/// Latest and the backups present, and every generation's files (latest, dist, backup/1..3)
/// against their signed manifests ([`integrity::survey`]: a file shared by several revisions
/// hashed once). A damaged file is one `files` check naming every generation it reaches.
fn check_generations(home: &Path, repo: &Repo, generations: &Generations, checks: &mut Vec<Check>) {
    let public_path = home.join(crate::pki::SIGNING_PUBLIC_KEY_FILE);
    let survey = std::fs::read(&public_path)
        .ok()
        .and_then(|pem| crate::pki::parse_public_key(&pem, &public_path).ok())
        .map(|(_, verifier)| {
            integrity::survey(repo, &integrity::live_generations(generations), &verifier)
        });
    const REPAIR: &str = "run `pm-mirror repair` (docs/repairing.md)";
    const UNTRUSTED: &str = "the manifest was edited or `pki/manifest-signing.*` replaced: restore \
        them from a backup of PM_HOME (`pm-mirror repair` restores files, never signatures)";
    // What is wrong with generation `name`, and the hint for it.
    let damage = |name: &str| -> Option<(String, &'static str)> {
        let survey = survey.as_ref()?;
        let untrusted: Vec<String> = survey
            .untrusted
            .iter()
            .filter(|u| u.generations.iter().any(|g| g == name))
            .map(|u| u.problem.clone())
            .collect();
        let hint = if untrusted.is_empty() {
            REPAIR
        } else {
            UNTRUSTED
        };
        let problems: Vec<String> = survey
            .damage_in(name)
            .map(|d| format!("`{}` does not match its manifest", d.path))
            .chain(untrusted)
            .collect();
        (!problems.is_empty()).then(|| (problems.join("; "), hint))
    };
    checks.push(match &generations.latest {
        None => Check::warn("latest", "no latest revision yet", "run `pm-mirror sync`"),
        Some(revision) => match damage("latest") {
            Some((problem, hint)) if repo.revision_dir(revision).is_dir() => {
                Check::fail("latest", format!("{revision}: {problem}"), hint)
            }
            _ => present(repo, "latest", revision),
        },
    });
    let missing: Vec<String> = generations
        .backups
        .iter()
        .enumerate()
        .filter(|(_, revision)| !repo.revision_dir(revision).is_dir())
        .map(|(i, revision)| format!("backup/{} ({revision})", i + 1))
        .collect();
    let damaged: Vec<(String, &str)> = (1..=generations.backups.len())
        .filter_map(|n| {
            let name = format!("backup/{n}");
            let (problem, hint) = damage(&name)?;
            Some((
                format!("{name} ({}): {problem}", generations.backups[n - 1]),
                hint,
            ))
        })
        .collect();
    checks.push(if !missing.is_empty() {
        Check::fail(
            "backups",
            format!("missing from `repo/revisions`: {}", missing.join(", ")),
            "the repository was modified by hand; publish again with `pm-mirror publish`",
        )
    } else if !damaged.is_empty() {
        let hint = match damaged.iter().any(|(_, hint)| *hint == UNTRUSTED) {
            true => UNTRUSTED,
            false => REPAIR,
        };
        let problems: Vec<&str> = damaged
            .iter()
            .map(|(problem, _)| problem.as_str())
            .collect();
        Check::fail("backups", problems.join("; "), hint)
    } else if generations.backups.is_empty() {
        Check::ok("backups", Some("none yet".to_string()))
    } else {
        Check::ok(
            "backups",
            Some(
                generations
                    .backups
                    .iter()
                    .enumerate()
                    .map(|(i, revision)| format!("backup/{}: {revision}", i + 1))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        )
    });
    let Some(survey) = survey else {
        return;
    };
    checks.push(
        if survey.damaged.is_empty() && !survey.writable.is_empty() {
            let (path, mode) = &survey.writable[0];
            Check::warn(
                "files",
                format!(
                    "{} revision files can be written (e.g. `{}`, mode {mode:o}): a write would \
                 change every revision sharing them",
                    survey.writable.len(),
                    path.display()
                ),
                "run `pm-mirror repair`: it makes them read-only (0444) again, and look for who \
             changed their mode",
            )
        } else if survey.damaged.is_empty() {
            Check::ok(
                "files",
                Some(format!(
                    "{} files in {} revisions match their manifests ({} distinct, {} bytes hashed)",
                    survey.files_checked,
                    survey.revisions.len(),
                    survey.inodes_hashed,
                    survey.bytes_hashed
                )),
            )
        } else {
            Check::fail(
                "files",
                survey
                    .damaged
                    .iter()
                    .map(|d| {
                        format!(
                            "`{}` is damaged in {} (found {})",
                            d.path,
                            d.generations_text(),
                            d.copies[0].found
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                REPAIR,
            )
        },
    );
}

/// The signed dist statement agents check: present, signed, naming dist, not near expiry.
fn check_dist_statement(
    repo: &Repo,
    verifier: &crate::pki::VerifyingKey,
    manifest: &crate::manifest::Manifest,
) -> Check {
    const NAME: &str = "dist statement";
    let publish = "run `pm-mirror publish` (it signs a statement for an unchanged dist too)";
    let signed = match repo.dist_statement() {
        Ok(Some(signed)) => signed,
        Ok(None) => {
            return Check::warn(
                NAME,
                "dist has no signed statement (published by an older pm): agents cannot tell \
                 a replayed or frozen dist",
                publish,
            );
        }
        Err(err) => return Check::fail(NAME, err.to_string(), publish),
    };
    let statement =
        serde_json::from_slice::<crate::dist_statement::DistStatement>(&signed.document);
    let statement = match statement {
        Ok(statement) if verifier.verify(&signed.document, &signed.signature) => statement,
        _ => {
            return Check::fail(
                NAME,
                "`repo/view/dist.json` does not verify with the manifest key",
                "the repository was modified by hand: restore it from a backup, or roll dist \
                 back and forward again (`pm-mirror rollback`, `pm-mirror publish --again`)",
            );
        }
    };
    if !statement.names(manifest) {
        return Check::fail(
            NAME,
            format!(
                "the statement names {} but dist is {}: agents refuse dist",
                statement.revision, manifest.revision
            ),
            "the repository was modified by hand: restore it from a backup",
        );
    }
    let now = chrono::Utc::now();
    let until = statement.expires_at.format("%Y-%m-%d %H:%M:%SZ");
    if statement.is_expired(now) {
        return Check::fail(
            NAME,
            format!("expired at {until}: agents refuse dist"),
            publish,
        );
    }
    if statement.signed_at > now + chrono::Duration::minutes(5) {
        return Check::warn(
            NAME,
            format!(
                "signed at {} by a clock ahead of this one: it stays valid until {until}, far \
                 longer than the manager allows",
                statement.signed_at.format("%Y-%m-%d %H:%M:%SZ")
            ),
            "check the manager's clock, then run `pm-mirror publish` (it signs dist anew)",
        );
    }
    if statement.expires_at - now < chrono::Duration::days(2) {
        return Check::warn(
            NAME,
            format!("expires at {until}: agents refuse dist after that"),
            publish,
        );
    }
    Check::ok(
        NAME,
        Some(format!(
            "dist serial {}, valid until {until}",
            statement.dist_serial
        )),
    )
}

fn check_dist(
    home: &Path,
    repo: &Repo,
    generations: &Generations,
    checks: &mut Vec<Check>,
) -> Option<Vec<u8>> {
    const NAME: &str = "dist";
    let Some(revision) = &generations.dist else {
        checks.push(Check::warn(
            NAME,
            "nothing published yet (no `repo/dist`)",
            "run `pm-mirror publish`",
        ));
        return None;
    };
    let public_path = home.join(crate::pki::SIGNING_PUBLIC_KEY_FILE);
    let verifier = match std::fs::read(&public_path)
        .map_err(|err| format!("cannot read `{}`: {err}", public_path.display()))
        .and_then(|pem| {
            crate::pki::parse_public_key(&pem, &public_path).map_err(|err| err.to_string())
        }) {
        Ok((_, verifier)) => verifier,
        Err(message) => {
            checks.push(Check::fail(
                NAME,
                format!("cannot verify dist ({revision}): {message}"),
                "restore `pki/` from a backup of this manager",
            ));
            return None;
        }
    };
    let dir = repo.root().join("dist");
    let label = format!("dist ({revision})");
    match crate::mirror::verify_revision_dir(&dir, &label, &verifier) {
        Ok(manifest) => {
            checks.push(Check::ok(
                NAME,
                Some(format!(
                    "{revision}: signature and {} files verified",
                    manifest.files.len()
                )),
            ));
            checks.push(check_dist_statement(repo, &verifier, &manifest));
            std::fs::read(dir.join(crate::manifest::MANIFEST_FILE)).ok()
        }
        Err(err) => {
            let hint = err
                .chain()
                .find_map(|cause| cause.downcast_ref::<UserError>())
                .and_then(|user| user.hint.clone())
                .unwrap_or_else(|| {
                    "the repository was modified by hand; run `pm-mirror sync` and \
                     `pm-mirror publish`"
                        .to_string()
                });
            checks.push(Check::fail(NAME, format!("{err:#}"), hint));
            None
        }
    }
}

/// A generation whose revision directory must exist.
fn present(repo: &Repo, name: &str, revision: &str) -> Check {
    if repo.revision_dir(revision).is_dir() {
        Check::ok(name, Some(revision.to_string()))
    } else {
        Check::fail(
            name,
            format!("{name} names {revision}, which is missing from `repo/revisions`"),
            "the repository was modified by hand; run `pm-mirror sync`",
        )
    }
}

/// `URL` joined with `path` without doubling or losing a slash.
fn join(url: &reqwest::Url, path: &str) -> String {
    format!("{}/{path}", url.as_str().trim_end_matches('/'))
}

/// `pm-mirror serve` answers dist's `manifest.json`, byte for byte.
async fn check_serve(client: &reqwest::Client, url: &reqwest::Url, dist: Option<&[u8]>) -> Check {
    const NAME: &str = "serve";
    let target = join(url, "manifest.json");
    let body = match get(client, &target).await {
        Ok((200, body)) => body,
        Ok((status, _)) => {
            return Check::fail(
                NAME,
                format!("`{target}` answered {status}"),
                "check that pm-mirror serve serves this home (`--home`) and that dist exists",
            );
        }
        Err(message) => {
            return Check::fail(
                NAME,
                message,
                "start pm-mirror serve, or check the URL and the firewall",
            );
        }
    };
    match dist {
        None => Check::warn(
            NAME,
            format!("`{target}` answers, but this home has no verified dist to compare it with"),
            "fix the dist check first",
        ),
        Some(dist) if dist == body.as_slice() => {
            Check::ok(NAME, Some(format!("`{target}` is dist's manifest")))
        }
        Some(_) => Check::fail(
            NAME,
            format!("`{target}` differs from this home's `repo/dist/manifest.json`"),
            "point pm-mirror serve at this home (`--home`), or restart it",
        ),
    }
}

/// `pm-exporter` answers `200` on `/healthz`.
async fn check_exporter(client: &reqwest::Client, url: &reqwest::Url) -> Check {
    const NAME: &str = "exporter";
    let target = join(url, "healthz");
    match get(client, &target).await {
        Ok((200, _)) => Check::ok(NAME, Some(format!("`{target}` answered 200"))),
        // The exporter answers 403 only to peers outside its --allow list: the inventory is
        // not the matter, the address this host speaks from is.
        Ok((403, _)) => {
            let hint = match source_address(url) {
                Some(ip) => format!(
                    "add this host to pm-exporter's --allow (it connects from {ip}: \
                     `--allow {}`), or run pm-doctor where the exporter allows it",
                    ipnet::IpNet::from(ip)
                ),
                None => "add this host's address to pm-exporter's --allow, or run pm-doctor \
                         where the exporter allows it"
                    .into(),
            };
            Check::fail(
                NAME,
                format!("`{target}` answered 403: this host is not in pm-exporter's --allow list"),
                hint,
            )
        }
        Ok((status, body)) => Check::fail(
            NAME,
            format!(
                "`{target}` answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
            "see pm-exporter's log on stderr; it needs a readable inventory in its --home",
        ),
        Err(message) => Check::fail(
            NAME,
            message,
            "start pm-exporter, or check the URL, --allow and the firewall",
        ),
    }
}

/// The address this host sends from to `url`'s host, as the peer sees it (a connected UDP
/// socket takes the route's source address; nothing is sent).
fn source_address(url: &reqwest::Url) -> Option<std::net::IpAddr> {
    let peer = url.socket_addrs(|| None).ok()?.into_iter().next()?;
    let unspecified: std::net::SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(peer).ok()?;
    Some(socket.local_addr().ok()?.ip().to_canonical())
}

/// One GET, its status and body (bounded by the client's timeout), or why it failed.
async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let failed = |err: reqwest::Error| {
        let cause = std::error::Error::source(&err)
            .map(|source| format!(": {source}"))
            .unwrap_or_default();
        format!("cannot GET `{url}`{cause}")
    };
    let response = client.get(url).send().await.map_err(failed)?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(failed)?;
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mode: u32, expected: CheckResult) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let result = check_secret_file("secret".into(), &path);
        assert_eq!(result.result, expected, "mode {mode:o}: {result:?}");
        if expected == CheckResult::Fail {
            assert_eq!(
                result.hint.as_deref(),
                Some(format!("chmod 600 {}", path.display()).as_str())
            );
        }
    }

    #[test]
    fn keep_polls_is_written_as_pm_toml_would_say_it() {
        assert_eq!(humantime_days(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(humantime_days(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(humantime_days(Duration::from_secs(90)), "90s");
    }

    #[test]
    fn doctor_secrets_fail_when_group_or_others_may_read_them() {
        check(0o600, CheckResult::Ok);
        check(0o400, CheckResult::Ok);
        check(0o640, CheckResult::Fail);
        check(0o604, CheckResult::Fail);
        check(0o644, CheckResult::Fail);
    }

    #[test]
    fn doctor_url_join_keeps_one_slash() {
        let url = reqwest::Url::parse("http://127.0.0.1:9745/").unwrap();
        assert_eq!(join(&url, "healthz"), "http://127.0.0.1:9745/healthz");
        let url = reqwest::Url::parse("http://h/mirror").unwrap();
        assert_eq!(join(&url, "manifest.json"), "http://h/mirror/manifest.json");
    }
}
