//! `pm-activate`: enrolment of agents. This part manages activation keys (DESIGN.md section 4,
//! seed 004): single-use, or reusable until an expiry of at most 24 hours; only a hash of the
//! secret is stored, the key is shown once and never logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{ActivationKeyRecord, Inventory, InventoryError};

/// Longest validity of an activation key, as the seed's agent keys allow.
pub const MAX_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Prefix and format version of key text.
const KEY_PREFIX: &str = "pmk1";

/// `pm-activate` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-activate",
    version,
    about = "Enrol agents: activation keys and hosts"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// `pm-activate` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Activation keys
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Activate the agent at ADDR (host:port, default port 7505) and set up its profile, group
    /// and license; or re-apply those when this manager already activated it
    Host(HostArgs),
    /// Make an agent forget this manager; the host is kept as deactivated and its certificate
    /// is never accepted again
    Deactivate {
        /// The host's name (or its address) as `pm-activate list` shows it
        host: String,
    },
    /// Hosts with group, profile, address, state, activation time, certificate expiry and
    /// agent version
    List,
    /// Scan profiles hosts get (`default` always exists)
    Profile {
        #[command(subcommand)]
        command: setup::ProfileCommand,
    },
    /// License files hosts get (the newest registered)
    License {
        #[command(subcommand)]
        command: setup::LicenseCommand,
    },
}

/// `pm-activate host` flags.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// The agent's API address: host:port (port 7505 when omitted)
    #[arg(required_unless_present = "targets", conflicts_with = "targets")]
    pub address: Option<String>,
    /// Activate every address of this file (one a line, or CSV `address,wave`), concurrently
    #[arg(long, value_name = "FILE")]
    pub targets: Option<PathBuf>,
    /// File holding the activation key the agent was given (`pm-activate key new --out`)
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Name to give the host (default: its name in the inventory, else the one the agent
    /// reports); on a host this manager activated, renames it and its history
    #[arg(long)]
    pub name: Option<String>,
    /// Host group
    #[arg(long)]
    pub group: Option<String>,
    /// Scan profile
    #[arg(long)]
    pub profile: Option<String>,
    /// A label `key=value` (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Base URL of `pm-mirror serve` the agent installs from (default: pm.toml `[serve] url`)
    #[arg(long, value_name = "URL")]
    pub dist_url: Option<String>,
    /// How long to wait for the agent on each call
    #[arg(long, default_value = "10s", value_parser = cli::parse_nonzero_duration)]
    pub timeout: Duration,
}

/// `pm-activate key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key; it is shown once
    New {
        /// How many activations it allows (omit with --reusable)
        #[arg(long, default_value_t = 1, conflicts_with = "reusable")]
        uses: u32,
        /// Any number of activations until it expires
        #[arg(long)]
        reusable: bool,
        /// How long it works, at most 24h
        #[arg(long, default_value = "24h", value_parser = cli::parse_nonzero_duration)]
        ttl: Duration,
        /// Write the key to this file (0600) instead of printing it
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// A note for `key list` (who or what it is for)
        #[arg(long)]
        comment: Option<String>,
    },
    /// List keys and their state (never the secret)
    List,
    /// Revoke a key so it activates nothing more
    Revoke {
        /// The key's id (the part after `pmk1.`)
        id: String,
    },
}

/// Runs `pm-activate` and returns its exit status.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let home = args.global.home();
    if let Some(command) = args.command.writes_home() {
        crate::ownership::check_home(&home, &format!("pm-activate {command}"))?;
    }
    match args.command {
        Command::Key { command } => match command {
            KeyCommand::New {
                uses,
                reusable,
                ttl,
                out,
                comment,
            } => {
                let max_uses = (!reusable).then_some(uses);
                key_new(&home, &args.global, max_uses, ttl, out.as_deref(), comment)
            }
            KeyCommand::List => key_list(&home, &args.global),
            KeyCommand::Revoke { id } => key_revoke(&home, &args.global, &id),
        },
        Command::Host(host) => host::activate_host(&home, &args.global, host),
        Command::Deactivate { host } => host::deactivate(&home, &args.global, &host),
        Command::List => host::list(&home, &args.global),
        Command::Profile { command } => setup::profile_command(&home, &args.global, command),
        Command::License { command } => setup::license_command(&home, &args.global, command),
    }
}

impl Command {
    /// The subcommand's name when it writes the home (inventory, keys, PKI, licenses): those
    /// run only as the home's owner ([`crate::ownership::check_home`]); listing only reads.
    fn writes_home(&self) -> Option<&'static str> {
        match self {
            Command::Key { command } => match command {
                KeyCommand::New { .. } => Some("key new"),
                KeyCommand::Revoke { .. } => Some("key revoke"),
                KeyCommand::List => None,
            },
            Command::Host(_) => Some("host"),
            Command::Deactivate { .. } => Some("deactivate"),
            Command::List => None,
            Command::Profile { command } => match command {
                setup::ProfileCommand::New { .. } => Some("profile new"),
                setup::ProfileCommand::Delete { .. } => Some("profile delete"),
                setup::ProfileCommand::Show { .. } | setup::ProfileCommand::List => None,
            },
            Command::License { command } => match command {
                setup::LicenseCommand::Add { .. } => Some("license add"),
                setup::LicenseCommand::List => None,
            },
        }
    }
}

/// A freshly generated key: its text (shown once) and what is stored.
#[derive(Debug)]
pub struct NewKey {
    /// `pmk1.<id>.<secret>`.
    pub text: String,
    /// What the inventory keeps.
    pub record: ActivationKeyRecord,
}

/// Generates a key valid for `ttl` (at most [`MAX_KEY_TTL`]) and `max_uses` activations.
pub fn generate_key(
    max_uses: Option<u32>,
    ttl: Duration,
    comment: Option<String>,
    now: DateTime<Utc>,
) -> Result<NewKey, UserError> {
    if ttl > MAX_KEY_TTL || ttl.is_zero() {
        return Err(
            UserError::usage(format!("--ttl {ttl:?} is out of range: at most 24h"))
                .with_hint("make a new key when this one expires; keys are cheap"),
        );
    }
    if max_uses == Some(0) {
        return Err(UserError::usage(
            "--uses must be at least 1 (or use --reusable)",
        ));
    }
    let mut id = [0u8; 4];
    let mut secret = [0u8; 32];
    openssl::rand::rand_bytes(&mut id).map_err(|e| UserError::failure(e.to_string()))?;
    openssl::rand::rand_bytes(&mut secret).map_err(|e| UserError::failure(e.to_string()))?;
    let id = crate::manifest::hex(&id);
    let secret = base64url(&secret);
    let text = format!("{KEY_PREFIX}.{id}.{secret}");
    let expires_at = now + chrono::Duration::from_std(ttl).expect("at most 24 hours");
    let record = ActivationKeyRecord {
        id,
        secret_sha256: secret_hash(&secret),
        created_at: now,
        expires_at,
        max_uses: max_uses.map(|u| u.min(i32::MAX as u32) as i32),
        uses: 0,
        revoked_at: None,
        comment,
    };
    Ok(NewKey { text, record })
}

fn base64url(bytes: &[u8]) -> String {
    openssl::base64::encode_block(bytes)
        .replace('+', "-")
        .replace('/', "_")
        .trim_end_matches('=')
        .to_string()
}

fn secret_hash(secret: &str) -> String {
    crate::manifest::hex(&openssl::sha::sha256(secret.as_bytes()))
}

/// Why a key does not activate anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// Not of the form `pmk1.<id>.<secret>`.
    #[error("this is not a pm activation key (expected pmk1.<id>.<secret>)")]
    Malformed,
    /// No key with that id.
    #[error("activation key `{0}` is not known to this manager")]
    Unknown(String),
    /// A key with that id exists, but the secret is not its secret.
    #[error(
        "activation key `{0}` is known to this manager, but the key file's secret does not \
         match it: the file was damaged, edited, or mixes two keys"
    )]
    WrongSecret(String),
    /// Past its expiry.
    #[error("activation key `{id}` expired at {at}")]
    Expired { id: String, at: DateTime<Utc> },
    /// All its uses are spent.
    #[error("activation key `{id}` was already used ({uses} of {max_uses})")]
    UsedUp {
        id: String,
        uses: i32,
        max_uses: i32,
    },
    /// Revoked by an operator.
    #[error("activation key `{id}` was revoked at {at}")]
    Revoked { id: String, at: DateTime<Utc> },
}

/// Splits key text into id and secret.
pub fn parse_key(text: &str) -> Result<(String, String), KeyProblem> {
    let mut parts = text.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(KEY_PREFIX), Some(id), Some(secret), None)
            if id.len() == 8
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && secret.len() >= 40
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Ok((id.to_string(), secret.to_string()))
        }
        _ => Err(KeyProblem::Malformed),
    }
}

/// Whether `text` is a key that may activate one more host now.
pub fn check_key(
    text: &str,
    keys: &[ActivationKeyRecord],
    now: DateTime<Utc>,
) -> Result<ActivationKeyRecord, KeyProblem> {
    let (id, secret) = parse_key(text)?;
    let with_id: Vec<&ActivationKeyRecord> = keys.iter().filter(|k| k.id == id).collect();
    if with_id.is_empty() {
        return Err(KeyProblem::Unknown(id));
    }
    let record = with_id
        .into_iter()
        .find(|k| openssl::memcmp::eq(k.secret_sha256.as_bytes(), secret_hash(&secret).as_bytes()))
        .ok_or_else(|| KeyProblem::WrongSecret(id.clone()))?;
    check_key_state(record, now)?;
    Ok(record.clone())
}

pub(crate) fn inventory_error(err: InventoryError) -> anyhow::Error {
    let locked = matches!(err, InventoryError::Locked { .. });
    let user = UserError::failure(err.to_string());
    anyhow::Error::new(if locked {
        user.with_hint("wait for it to finish, close the other session, or raise --lock-timeout")
    } else {
        user
    })
}

/// `--json` of `key new`.
#[derive(Debug, Serialize)]
struct KeyNewReport<'a> {
    changed: bool,
    /// The key itself, unless it was written to `--out`.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    id: &'a str,
    expires_at: DateTime<Utc>,
    max_uses: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<&'a Path>,
}

fn key_new(
    home: &Path,
    global: &GlobalArgs,
    max_uses: Option<u32>,
    ttl: Duration,
    out: Option<&Path>,
    comment: Option<String>,
) -> anyhow::Result<ExitStatus> {
    let key = generate_key(max_uses, ttl, comment, Utc::now())?;
    if global.dry_run {
        if global.json {
            cli::print_json(&serde_json::json!({ "changed": true, "dry_run": true }))?;
        } else {
            cli::print_text("dry run: no key made")?;
        }
        return Ok(ExitStatus::Success);
    }
    if let Some(out) = out {
        if out.exists() {
            return Err(
                UserError::usage(format!("`{}` already exists", out.display()))
                    .with_hint("pick a new file; a key file is never overwritten")
                    .into(),
            );
        }
        crate::durable::write_atomic(out, format!("{}\n", key.text).as_bytes(), 0o600).map_err(
            |err| UserError::failure(format!("cannot write `{}`: {err}", out.display())),
        )?;
    }
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    let stored = inventory.insert_activation_key(&key.record).and_then(|()| {
        inventory.insert_job(
            "key-new",
            key.record.created_at,
            "ok",
            &format!("activation key {}", key.record.id),
        )
    });
    if let Err(err) = stored {
        if let Some(out) = out {
            let _ = std::fs::remove_file(out);
        }
        return Err(inventory_error(err));
    }
    tracing::info!(id = %key.record.id, expires_at = %key.record.expires_at, "activation key created");
    let report = KeyNewReport {
        changed: true,
        key: out.is_none().then_some(key.text.as_str()),
        id: &key.record.id,
        expires_at: key.record.expires_at,
        max_uses: key.record.max_uses,
        out,
    };
    if global.json {
        cli::print_json(&report)?;
    } else {
        let uses = match key.record.max_uses {
            Some(1) => "single use".to_string(),
            Some(n) => format!("{n} uses"),
            None => "any number of uses".to_string(),
        };
        match out {
            Some(out) => cli::print_text(format!(
                "activation key {} written to {} ({uses}, expires {})",
                key.record.id,
                out.display(),
                key.record.expires_at.format("%Y-%m-%d %H:%M:%SZ")
            ))?,
            None => cli::print_text(format!(
                "{}\n({uses}, expires {}; shown once: store it now)",
                key.text,
                key.record.expires_at.format("%Y-%m-%d %H:%M:%SZ")
            ))?,
        }
    }
    Ok(ExitStatus::Success)
}

/// State of a key for `key list`.
fn key_state(key: &ActivationKeyRecord, now: DateTime<Utc>) -> &'static str {
    match check_key_state(key, now) {
        Ok(()) => "active",
        Err(KeyProblem::Revoked { .. }) => "revoked",
        Err(KeyProblem::Expired { .. }) => "expired",
        Err(KeyProblem::UsedUp { .. }) => "used",
        Err(_) => "invalid",
    }
}

fn check_key_state(key: &ActivationKeyRecord, now: DateTime<Utc>) -> Result<(), KeyProblem> {
    let id = key.id.clone();
    if let Some(at) = key.revoked_at {
        return Err(KeyProblem::Revoked { id, at });
    }
    if now >= key.expires_at {
        return Err(KeyProblem::Expired {
            id,
            at: key.expires_at,
        });
    }
    match key.max_uses {
        Some(max_uses) if key.uses >= max_uses => Err(KeyProblem::UsedUp {
            id,
            uses: key.uses,
            max_uses,
        }),
        _ => Ok(()),
    }
}

fn key_list(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let keys =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory.activation_keys().map_err(inventory_error)?,
            None => Vec::new(),
        };
    let now = Utc::now();
    if global.json {
        let keys: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "id": k.id, "state": key_state(k, now), "created_at": k.created_at,
                    "expires_at": k.expires_at, "max_uses": k.max_uses, "uses": k.uses,
                    "revoked_at": k.revoked_at, "comment": k.comment,
                })
            })
            .collect();
        cli::print_json(&serde_json::json!({ "changed": false, "keys": keys }))?;
        return Ok(ExitStatus::Success);
    }
    let mut table = cli::table(&["id", "state", "uses", "created", "expires", "comment"]);
    for key in &keys {
        let uses = match key.max_uses {
            Some(max) => format!("{}/{max}", key.uses),
            None => format!("{}/any", key.uses),
        };
        table.add_row(vec![
            key.id.clone(),
            key_state(key, now).to_string(),
            uses,
            key.created_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
            key.expires_at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
            key.comment.clone().unwrap_or_default(),
        ]);
    }
    cli::print_text(table)?;
    Ok(ExitStatus::Success)
}

fn key_revoke(home: &Path, global: &GlobalArgs, id: &str) -> anyhow::Result<ExitStatus> {
    let id = id
        .trim()
        .trim_start_matches("pmk1.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    if global.dry_run {
        return Ok(ExitStatus::Success);
    }
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    let revoked = inventory
        .revoke_activation_key(&id)
        .map_err(inventory_error)?;
    let known = revoked
        || inventory
            .activation_keys()
            .map_err(inventory_error)?
            .iter()
            .any(|k| k.id == id);
    if !known {
        return Err(UserError::usage(format!("no activation key `{id}`"))
            .with_hint("see `pm-activate key list`")
            .into());
    }
    if revoked {
        inventory
            .insert_job(
                "key-revoke",
                Utc::now(),
                "ok",
                &format!("activation key {id} revoked"),
            )
            .map_err(inventory_error)?;
    }
    if global.json {
        cli::print_json(&serde_json::json!({ "changed": revoked, "id": id }))?;
    } else if revoked {
        cli::print_text(format!("activation key {id} revoked"))?;
    } else {
        cli::print_text(format!("activation key {id} was already revoked"))?;
    }
    Ok(ExitStatus::Success)
}

mod host;
pub mod setup;

/// A secret file that cannot be read or that others can read, with what to do.
pub(crate) fn secret_file_error(what: &str, err: crate::durable::SecretFileError) -> UserError {
    let hint = match &err {
        crate::durable::SecretFileError::Readable { .. } => format!(
            "others may have read the {what} already: revoke it (`pm-activate key revoke ID`), \
             create a new one with `pm-activate key new --out FILE` (written 0600) and keep it 0600"
        ),
        crate::durable::SecretFileError::Io { .. } => {
            "give the file written by `pm-activate key new --out FILE`".to_string()
        }
    };
    UserError::usage(format!("{what} file: {err}")).with_hint(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(max_uses: Option<u32>, ttl_hours: u64) -> NewKey {
        generate_key(
            max_uses,
            Duration::from_secs(ttl_hours * 3600),
            None,
            Utc::now(),
        )
        .unwrap()
    }

    #[test]
    fn keys_are_single_use_by_default_and_expire() {
        let now = Utc::now();
        let new = key(Some(1), 1);
        let mut records = vec![new.record.clone()];
        assert!(check_key(&new.text, &records, now).is_ok());
        records[0].uses = 1;
        assert!(matches!(
            check_key(&new.text, &records, now),
            Err(KeyProblem::UsedUp { .. })
        ));
        let later = now + chrono::Duration::hours(2);
        records[0].uses = 0;
        assert!(matches!(
            check_key(&new.text, &records, later),
            Err(KeyProblem::Expired { .. })
        ));
        records[0].revoked_at = Some(now);
        assert!(matches!(
            check_key(&new.text, &records, now),
            Err(KeyProblem::Revoked { .. })
        ));
    }

    #[test]
    fn a_reusable_key_works_until_it_expires() {
        let new = key(None, 24);
        let mut records = vec![new.record.clone()];
        records[0].uses = 500;
        assert!(check_key(&new.text, &records, Utc::now()).is_ok());
    }

    #[test]
    fn a_wrong_secret_or_garbage_is_refused() {
        let new = key(Some(1), 1);
        let records = vec![new.record.clone()];
        let (id, secret) = parse_key(&new.text).unwrap();
        let mut wrong = secret.into_bytes();
        wrong[0] = if wrong[0] == b'A' { b'B' } else { b'A' };
        let forged = format!("pmk1.{id}.{}", String::from_utf8(wrong).unwrap());
        assert_eq!(
            check_key(&forged, &records, Utc::now()),
            Err(KeyProblem::WrongSecret(id))
        );
        let unknown = format!("pmk1.00000000.{}", "A".repeat(43));
        assert_eq!(
            check_key(&unknown, &records, Utc::now()),
            Err(KeyProblem::Unknown("00000000".into()))
        );
        assert_eq!(
            check_key("hello", &records, Utc::now()),
            Err(KeyProblem::Malformed)
        );
        assert_eq!(
            check_key("pmk1.zz.zz", &records, Utc::now()),
            Err(KeyProblem::Malformed)
        );
    }

    #[test]
    fn keys_live_at_most_a_day_and_the_store_keeps_no_secret() {
        assert!(generate_key(Some(1), Duration::from_secs(25 * 3600), None, Utc::now()).is_err());
        assert!(generate_key(Some(0), Duration::from_secs(60), None, Utc::now()).is_err());
        let new = key(Some(1), 24);
        let (_, secret) = parse_key(&new.text).unwrap();
        assert_ne!(new.record.secret_sha256, secret);
        assert!(!format!("{:?}", new.record).contains(&secret));
    }
}
