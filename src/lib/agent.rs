//! `pm-agent`: the daemon on every managed host (DESIGN.md section 4). This part covers its
//! identity and activation: `init`, `run` (the HTTPS API), `status` and `reset`.
//!
//! State directory (default `/var/lib/pm-agent`, 0700):
//!
//! ```text
//! agent.toml            listen, engine, database_dir, host_name, scan_command, scan_reports_keep
//! scans/<id>.json       the last scan reports (see `scan`)
//! updates/<id>.json     the last scheduled update runs (see `schedule`)
//! installed.json        installed set and 3 backups; files/<sha256> their local copies (see `install`)
//! run.lock              held by `pm-agent run` while it lives: one agent per state dir (see `stop`)
//! reports.seq           the report stream id and the last number a report got (see `reports`)
//! scan-names.<pid>/     aliases of files whose paths hold control characters, during a scan
//! agent.key             the agent's ECDSA P-256 key (0600)
//! agent.pem             its self-signed certificate (used until activation)
//! activation.key        the activation key (0600), deleted once activated
//! manager/ca.pem                       the manager CA (the only issuer of accepted clients)
//! manager/manifest-signing.pub.pem     the manager's manifest signing key
//! manager/key-rotations.json           every change of that key since activation (see `trust`)
//! manager/agent.pem                    the certificate the manager CA issued to this agent
//! manager/identity.pem                 after a re-issue: its key and certificate, 0600 (`identity`)
//! manager/renewal.key                  a re-issue's new key until its certificate arrives, 0600
//! manager/manager.json                 dist URL, host name, activated at, CA fingerprint
//! ```
//!
//! The agent is activated exactly when `manager/manager.json` exists: it is written last (write
//! aside, fsync, rename), so a crash during activation leaves the agent either not activated (the
//! other files in `manager/` are then ignored and overwritten by the next activation) or fully
//! activated. Deactivation removes `manager.json` first.
//!
//! The activation protocol is the one in [`crate::proto`]. This module must not link DuckDB:
//! it never uses `crate::inventory`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::{Parser, Subcommand, ValueEnum};
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde::{Deserialize, Serialize};

use crate::cli::{ExitStatus, GlobalArgs, UserError};
use crate::durable;
use crate::pki::ca::{self, AgentIdentity};
use crate::proto::{self, ErrorResponse};
use crate::tls::{self, ClientAuth, TlsConnectInfo, TlsHandle, TlsListener, TlsServerConfig};

mod hold;
mod identity;
mod install;
mod poll;
mod reports;
mod scan;
mod schedule;
pub mod setup;
mod stop;
mod trust;
mod upgrade;

pub use install::DIST_STALL_TIMEOUT;
pub use schedule::ScheduleConfig;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/pm-agent";
/// The agent's configuration, relative to the state directory.
pub const CONFIG_FILE: &str = "agent.toml";
/// The agent's private key.
pub const KEY_FILE: &str = "agent.key";
/// The agent's self-signed certificate.
pub const SELF_SIGNED_CERT_FILE: &str = "agent.pem";
/// The stored activation key (until activation).
pub const ACTIVATION_KEY_FILE: &str = "activation.key";
/// Directory of what the manager sent at activation.
pub const MANAGER_DIR: &str = "manager";
/// The manager CA.
pub const MANAGER_CA_FILE: &str = "manager/ca.pem";
/// The manager's manifest signing public key.
pub const MANIFEST_KEY_FILE: &str = "manager/manifest-signing.pub.pem";
/// The certificate issued by the manager CA.
pub const ISSUED_CERT_FILE: &str = "manager/agent.pem";
/// The activation record; its existence means "activated".
pub const MANAGER_FILE: &str = "manager/manager.json";

/// A challenge answer is valid for one `complete` within this time.
const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// At most this many challenges are remembered; the oldest is forgotten first.
const MAX_CHALLENGES: usize = 64;
/// Largest request body the agent reads.
const MAX_BODY: usize = 256 * 1024;

/// `pm-agent` command line.
#[derive(Debug, Parser)]
#[command(name = "pm-agent", version, about = "The pm agent on a managed host")]
pub struct Args {
    /// Agent state directory
    #[arg(long, global = true, env = "PM_AGENT_STATE", default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state: PathBuf,
    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging on stderr (-v info, -vv debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    /// The logging flags in the shape [`crate::cli::init_logging`] takes.
    pub fn logging(&self) -> GlobalArgs {
        GlobalArgs {
            home: None,
            json: self.json,
            dry_run: false,
            lock_timeout: Duration::from_secs(30),
            // `run` is a daemon: its start, activation and deactivation are worth a log line.
            verbose: if matches!(self.command, Command::Run) {
                self.verbose.max(1)
            } else {
                self.verbose
            },
            quiet: self.quiet,
        }
    }
}

/// `pm-agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the state directory, key pair and self-signed certificate; store an activation key
    Init(InitArgs),
    /// Serve the agent API (HTTPS); SIGHUP re-reads the state (after `reset`)
    Run,
    /// Show the local state: activated or not, manager, certificate, listen address, engine
    Status,
    /// Forget the manager (needed before a re-activation); a new self-signed identity
    Reset(ResetArgs),
    /// Scan files or directories now with the configured engine; keeps the report
    Scan(scan::ScanArgs),
    /// Install the manager's dist now (only files whose sha256 changed are downloaded)
    Update(UpdateArgs),
    /// Reinstall a local backup of a previously installed set
    Rollback(RollbackArgs),
    /// Replace this executable with the pm-agent package of the manager's dist (restart the
    /// agent afterwards; `pm-push upgrade-agent` does both)
    Upgrade,
    /// Trust the manager's new manifest key after its old one was lost (the operator confirms
    /// its fingerprint; a rotation is followed without this)
    TrustKey(trust::TrustKeyArgs),
}

/// `pm-agent update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// Install the manager's backup N (1..=3) instead of dist (an explicit rollback)
    #[arg(long, value_parser = crate::repo::parse_generation, value_name = "N")]
    pub generation: Option<usize>,
}

/// `pm-agent rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// `backup:N`, N in 1..=3 (1 is the set installed before the current one)
    #[arg(long, value_parser = install::parse_backup, value_name = "backup:N")]
    pub to: usize,
}

/// `pm-agent init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Address of the HTTPS API: IP or IP:PORT (port 7505 by default)
    #[arg(long, value_parser = parse_listen, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Engine adapter
    #[arg(long, value_enum)]
    pub engine: Engine,
    /// The engine's database directory (where revisions are installed)
    #[arg(long, value_name = "DIR")]
    pub database_dir: PathBuf,
    /// File holding an activation key from `pm-activate key new`
    #[arg(long, value_name = "FILE")]
    pub activation_key_file: Option<PathBuf>,
    /// Name of this host in its certificate [default: the machine's host name, else the listen IP]
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,
}

/// `pm-agent reset`.
#[derive(Debug, clap::Args)]
pub struct ResetArgs {
    /// Store this activation key for the next activation
    #[arg(long, value_name = "FILE")]
    pub activation_key_file: Option<PathBuf>,
}

/// Engine adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// ClamAV (`clamscan`/`clamdscan`, databases in the database directory)
    Clamav,
    /// Another engine driven by configured argv lists
    Command,
}

impl Engine {
    fn as_str(self) -> &'static str {
        match self {
            Engine::Clamav => "clamav",
            Engine::Command => "command",
        }
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, tls::DEFAULT_AGENT_PORT));
    }
    Err(format!(
        "`{text}` is not an address: use IP or IP:PORT, e.g. 0.0.0.0:{}",
        tls::DEFAULT_AGENT_PORT
    ))
}

/// `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address of the HTTPS API.
    pub listen: SocketAddr,
    /// Engine adapter.
    pub engine: Engine,
    /// The engine's database directory.
    pub database_dir: PathBuf,
    /// Name of this host in its self-signed certificate.
    pub host_name: String,
    /// `command` engine: the scan argv (paths are appended), e.g. `["/opt/x/scan", "-r"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_command: Option<Vec<String>>,
    /// How many scan reports `scans/` keeps (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_reports_keep: Option<usize>,
    /// clamd's local socket: installs send it `RELOAD` (none: clamscan reads the files each run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamd_socket: Option<PathBuf>,
    /// The agent's own schedule of updates and scans (see `schedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleConfig>,
}

/// `manager/manager.json`: the activation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerRecord {
    /// Base URL of the manager's dist.
    pub dist_url: String,
    /// Name the manager knows this host by.
    pub host_name: String,
    /// When the activation completed.
    pub activated_at: chrono::DateTime<chrono::Utc>,
    /// Fingerprint of the manager CA.
    pub manager_ca_fingerprint: String,
    /// Serial of the issued certificate (hex).
    pub certificate_serial: String,
}

/// Runs a `pm-agent` command.
pub fn run(args: Args) -> Result<ExitStatus> {
    let state = args.state.clone();
    match args.command {
        Command::Init(init_args) => init(&state, &init_args, args.json),
        Command::Run => serve(&state),
        Command::Status => status(&state, args.json),
        Command::Reset(reset_args) => reset(&state, &reset_args, args.json),
        Command::Scan(scan_args) => scan::scan_command(&state, &scan_args, args.json),
        Command::Update(update_args) => {
            let config = load_config(&state)?;
            // By hand on the host: dist whatever a hold says (it stays); the manager's backup
            // N is a rollback by hand, which holds the host there.
            let policy = match update_args.generation {
                None => hold::HoldPolicy::Ignore,
                Some(n) => hold::HoldPolicy::Take(hold::rolled_back_by_hand(
                    &format!("the manager's backup {n} (pm-agent update --generation {n})"),
                    &hold::local_actor(),
                )),
            };
            let report = schedule::record_run(&state, "local", || {
                install::update_from(&state, &config, update_args.generation, &policy)
            })?;
            install::print(&report, args.json)
        }
        Command::Rollback(rollback_args) => {
            let config = load_config(&state)?;
            let hold = hold::rolled_back_by_hand(
                &format!("backup:{} (pm-agent rollback)", rollback_args.to),
                &hold::local_actor(),
            );
            let report = schedule::record_run(&state, "local", || {
                install::rollback(&state, &config, rollback_args.to, hold)
            })?;
            install::print(&report, args.json)
        }
        Command::Upgrade => upgrade::upgrade_command(&state, args.json),
        Command::TrustKey(trust_args) => trust::trust_key_command(&state, &trust_args, args.json),
    }
}

fn io_error(action: &str, path: &Path) -> impl FnOnce(std::io::Error) -> anyhow::Error {
    let message = format!("cannot {action} `{}`", path.display());
    move |err| anyhow::Error::new(err).context(message)
}

/// Opens (creating it 0600) a file of the state directory that is locked with `flock` and read
/// and written while locked (`run.lock`, `reports.seq`).
fn open_locked_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("open", path))
}

fn not_initialised(dir: &Path) -> anyhow::Error {
    UserError::failure(format!(
        "`{}` holds no pm-agent state",
        dir.join(CONFIG_FILE).display()
    ))
    .with_hint(format!(
        "run `pm-agent --state {} init --listen ADDR --engine clamav --database-dir DIR` first",
        dir.display()
    ))
    .into()
}

/// Reads and checks an activation key file; returns the key text (never logged).
fn read_activation_key(path: &Path) -> Result<String> {
    let text = crate::durable::read_secret(path)
        .map_err(|err| crate::activate::secret_file_error("activation key", err))?;
    let key = text.trim().to_string();
    crate::activate::parse_key(&key).map_err(|problem| {
        UserError::usage(format!("`{}`: {problem}", path.display()))
            .with_hint("give the file `pm-activate key new --out FILE` wrote on the manager")
    })?;
    Ok(key)
}

/// The machine's host name, when it is usable in a certificate.
fn machine_host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let name = name.trim();
    let usable = !name.is_empty()
        && name.len() <= 64
        && name != "localhost"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    usable.then(|| name.to_string())
}

fn default_host_name(listen: SocketAddr) -> String {
    machine_host_name().unwrap_or_else(|| listen.ip().to_string())
}

fn load_config(dir: &Path) -> Result<AgentConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_initialised(dir));
        }
        Err(err) => return Err(io_error("read", &path)(err)),
    };
    let config: AgentConfig = toml::from_str(&text).map_err(|err| {
        anyhow::Error::from(UserError::usage(format!(
            "`{}` is not valid: {err}",
            path.display()
        )))
    })?;
    schedule::jobs(&config, &path)?;
    Ok(config)
}

fn write_config(dir: &Path, config: &AgentConfig) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = toml::to_string(config).context("cannot encode agent.toml")?;
    durable::write_atomic(&path, text.as_bytes(), 0o644).map_err(io_error("write", &path))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    durable::write_atomic(path, contents, 0o600).map_err(io_error("write", path))
}

/// Writes a new key and self-signed certificate (key first; [`load_identity`] notices a
/// mismatch left by a crash in between and `reset` repairs it).
fn new_identity(dir: &Path, host_name: &str) -> Result<(PKey<Private>, X509)> {
    let (key, cert) = AgentIdentity::generate(host_name).map_err(|err| {
        UserError::usage(format!(
            "cannot make a certificate for `{host_name}`: {err}"
        ))
        .with_hint("give a DNS name or IP address with --host-name")
    })?;
    write_private(&dir.join(KEY_FILE), &key.private_key_to_pem_pkcs8()?)?;
    let cert_path = dir.join(SELF_SIGNED_CERT_FILE);
    durable::write_atomic(&cert_path, &cert.to_pem()?, 0o644)
        .map_err(io_error("write", &cert_path))?;
    Ok((key, cert))
}

fn load_identity(dir: &Path, cert_file: &str) -> Result<(PKey<Private>, X509)> {
    let key = ca::load_private_key(&dir.join(KEY_FILE))?;
    let cert = ca::load_certificate(&dir.join(cert_file))?;
    if !key.public_eq(cert.public_key()?.as_ref()) {
        return Err(UserError::failure(format!(
            "`{}` is not the key of `{}`",
            dir.join(KEY_FILE).display(),
            dir.join(cert_file).display()
        ))
        .with_hint(format!(
            "run `pm-agent --state {} reset` to make a new identity, then activate again",
            dir.display()
        ))
        .into());
    }
    Ok((key, cert))
}

/// What the manager left at activation.
struct Activation {
    record: ManagerRecord,
    ca: X509,
    cert: X509,
}

fn load_activation(dir: &Path) -> Result<Option<Activation>> {
    let path = dir.join(MANAGER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_error("read", &path)(err)),
    };
    let record: ManagerRecord = serde_json::from_slice(&bytes).map_err(|err| {
        UserError::failure(format!("`{}` is damaged: {err}", path.display())).with_hint(format!(
            "run `pm-agent --state {} reset` and activate again",
            dir.display()
        ))
    })?;
    let ca = ca::load_certificate(&dir.join(MANAGER_CA_FILE))?;
    let (record, cert) = identity::issued_certificate(dir, record)?;
    Ok(Some(Activation { record, ca, cert }))
}

/// Forgets the manager: `manager.json` first (the commit), then the rest of `manager/`.
fn forget_manager(dir: &Path) -> Result<bool> {
    let record = dir.join(MANAGER_FILE);
    let was_activated = match std::fs::remove_file(&record) {
        Ok(()) => {
            durable::sync_parent_dir(&record).map_err(io_error("sync", &record))?;
            true
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(io_error("remove", &record)(err)),
    };
    let manager = dir.join(MANAGER_DIR);
    match std::fs::remove_dir_all(&manager) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error("remove", &manager)(err)),
    }
    setup::forget(dir)?;
    durable::sync_dir(dir).map_err(io_error("sync", dir))?;
    Ok(was_activated)
}

#[derive(Debug, Serialize)]
struct InitReport {
    changed: bool,
    state: PathBuf,
    fingerprint: String,
    host_name: String,
    listen: SocketAddr,
    activation_key_stored: bool,
}

fn init(dir: &Path, args: &InitArgs, json: bool) -> Result<ExitStatus> {
    let key = args
        .activation_key_file
        .as_deref()
        .map(read_activation_key)
        .transpose()?;
    let config = AgentConfig {
        listen: args.listen,
        engine: args.engine,
        database_dir: args.database_dir.clone(),
        host_name: args
            .host_name
            .clone()
            .unwrap_or_else(|| default_host_name(args.listen)),
        scan_command: None,
        scan_reports_keep: None,
        clamd_socket: None,
        schedule: None,
    };
    if dir.join(CONFIG_FILE).exists() {
        let existing = load_config(dir)?;
        let stored_key = std::fs::read_to_string(dir.join(ACTIVATION_KEY_FILE))
            .ok()
            .map(|k| k.trim().to_string());
        let key_unchanged = key.is_none() || key == stored_key;
        // Settings init does not take (the scan settings) may have been edited in since.
        let comparable = AgentConfig {
            scan_command: existing.scan_command.clone(),
            scan_reports_keep: existing.scan_reports_keep,
            clamd_socket: existing.clamd_socket.clone(),
            schedule: existing.schedule.clone(),
            ..config.clone()
        };
        if existing != comparable || !key_unchanged {
            return Err(UserError::failure(format!(
                "`{}` is already initialised with other settings",
                dir.display()
            ))
            .with_hint(format!(
                "to store a new activation key run `pm-agent --state {0} reset \
                 --activation-key-file F`; to change the settings edit `{0}/{CONFIG_FILE}` and \
                 restart the agent; or remove `{0}` to start over",
                dir.display()
            ))
            .into());
        }
        let (_, cert) = if dir.join(MANAGER_FILE).exists() {
            identity::issued_identity(dir)?
        } else {
            load_identity(dir, SELF_SIGNED_CERT_FILE)?
        };
        return print_init(
            InitReport {
                changed: false,
                state: dir.to_owned(),
                fingerprint: tls::fingerprint(&cert),
                host_name: config.host_name,
                listen: config.listen,
                activation_key_stored: stored_key.is_some(),
            },
            json,
        );
    }
    durable::create_private_dir(dir, 0o700).map_err(io_error("create directory", dir))?;
    let (_, cert) = new_identity(dir, &config.host_name)?;
    if let Some(key) = &key {
        write_private(
            &dir.join(ACTIVATION_KEY_FILE),
            format!("{key}\n").as_bytes(),
        )?;
    }
    // The configuration last: its presence means "initialised".
    write_config(dir, &config)?;
    tracing::info!(state = %dir.display(), fingerprint = %tls::fingerprint(&cert), "initialised");
    print_init(
        InitReport {
            changed: true,
            state: dir.to_owned(),
            fingerprint: tls::fingerprint(&cert),
            host_name: config.host_name,
            listen: config.listen,
            activation_key_stored: key.is_some(),
        },
        json,
    )
}

fn print_init(report: InitReport, json: bool) -> Result<ExitStatus> {
    if json {
        crate::cli::print_json(&report)?;
    } else {
        let verb = if report.changed {
            "initialised"
        } else {
            "already initialised"
        };
        crate::cli::print_text(format!(
            "{verb} `{}` ({} on {})\ncertificate fingerprint: {}{}",
            report.state.display(),
            report.host_name,
            report.listen,
            report.fingerprint,
            if report.activation_key_stored {
                "\nactivation key stored; activate with `pm-activate host` on the manager"
            } else {
                "\nno activation key stored; add one with `pm-agent reset --activation-key-file F`"
            }
        ))?;
    }
    Ok(ExitStatus::Success)
}

#[derive(Debug, Serialize)]
struct LocalStatus {
    changed: bool,
    state: PathBuf,
    activated: bool,
    activation_key_stored: bool,
    host_name: String,
    manager_ca_fingerprint: Option<String>,
    dist_url: Option<String>,
    /// Fingerprint of the manager's manifest key this agent trusts.
    manifest_key: Option<String>,
    activated_at: Option<chrono::DateTime<chrono::Utc>>,
    certificate_fingerprint: String,
    certificate_serial: String,
    listen: SocketAddr,
    engine: Engine,
    database_dir: PathBuf,
    agent_version: &'static str,
    /// sha256 of the pm-agent executable on disk (what `pm-agent run` runs after a restart).
    agent_sha256: Option<String>,
    /// Revision installed from dist and the revisions of the local backups (`backup:1` first).
    installed_revision: Option<String>,
    backups: Vec<Option<String>>,
    /// Files of the installed set the database directory no longer holds as installed (the
    /// next install puts them back).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    database_problems: Vec<String>,
    /// The agent's own schedule and the next fire times (local time).
    schedule: Vec<schedule::ScheduleStatus>,
    /// What the manager set up: group, scan profile, license.
    group: Option<String>,
    profile: Option<crate::profile::Profile>,
    license: Option<setup::LicenseInfo>,
    /// The hold in force: nothing moves the host but a rollback or an install by hand.
    hold: Option<proto::HoldState>,
}

fn status(dir: &Path, json: bool) -> Result<ExitStatus> {
    let config = load_config(dir)?;
    let activation = load_activation(dir)?;
    let cert = match &activation {
        Some(activation) => activation.cert.clone(),
        None => ca::load_certificate(&dir.join(SELF_SIGNED_CERT_FILE))?,
    };
    let record = activation.as_ref().map(|a| &a.record);
    let installed = install::revisions(dir)?;
    let database_problems = install::database_problems(dir, &config.database_dir)?;
    let schedule = schedule::status(&config, &dir.join(CONFIG_FILE))?;
    let setup = setup::load(dir)?;
    let report = LocalStatus {
        changed: false,
        state: dir.to_owned(),
        activated: activation.is_some(),
        activation_key_stored: dir.join(ACTIVATION_KEY_FILE).exists(),
        host_name: record
            .map(|r| r.host_name.clone())
            .unwrap_or_else(|| config.host_name.clone()),
        manager_ca_fingerprint: record.map(|r| r.manager_ca_fingerprint.clone()),
        dist_url: record.map(|r| r.dist_url.clone()),
        manifest_key: activation
            .as_ref()
            .and_then(|_| trust::trusted_fingerprint(dir)),
        activated_at: record.map(|r| r.activated_at),
        certificate_fingerprint: tls::fingerprint(&cert),
        certificate_serial: ca::serial_hex(&cert)?,
        listen: config.listen,
        engine: config.engine,
        database_dir: config.database_dir,
        agent_version: env!("CARGO_PKG_VERSION"),
        agent_sha256: upgrade::Executable::current().ok().map(|e| e.sha256),
        installed_revision: installed.0,
        backups: installed.1,
        database_problems,
        schedule,
        group: setup.group,
        profile: setup.profile,
        license: setup.license,
        hold: setup.hold.filter(|h| hold::in_force(h, chrono::Utc::now())),
    };
    if json {
        crate::cli::print_json(&report)?;
        return Ok(ExitStatus::Success);
    }
    let mut table = crate::cli::table(&["state", "value"]);
    let none = || "-".to_string();
    table.add_row(vec![
        "activated".to_string(),
        if report.activated {
            "yes".into()
        } else {
            "no".into()
        },
    ]);
    table.add_row(vec![
        "activation key stored".to_string(),
        if report.activation_key_stored {
            "yes".into()
        } else {
            "no".into()
        },
    ]);
    table.add_row(vec!["host name".to_string(), report.host_name.clone()]);
    table.add_row(vec![
        "manager CA".to_string(),
        report.manager_ca_fingerprint.clone().unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "dist URL".to_string(),
        report.dist_url.clone().unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "manifest key".to_string(),
        report.manifest_key.clone().unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "activated at".to_string(),
        report
            .activated_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "certificate".to_string(),
        report.certificate_fingerprint.clone(),
    ]);
    table.add_row(vec![
        "certificate serial".to_string(),
        report.certificate_serial.clone(),
    ]);
    table.add_row(vec!["listen".to_string(), report.listen.to_string()]);
    table.add_row(vec!["engine".to_string(), report.engine.as_str().into()]);
    table.add_row(vec![
        "agent version".to_string(),
        report.agent_version.to_string(),
    ]);
    table.add_row(vec![
        "executable sha256".to_string(),
        report.agent_sha256.clone().unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "database dir".to_string(),
        report.database_dir.display().to_string(),
    ]);
    table.add_row(vec![
        "installed".to_string(),
        report.installed_revision.clone().unwrap_or_else(none),
    ]);
    for problem in &report.database_problems {
        table.add_row(vec![
            "database problem".to_string(),
            format!("{problem}: the next install copies it back"),
        ]);
    }
    for (n, revision) in report.backups.iter().enumerate() {
        table.add_row(vec![
            format!("backup:{}", n + 1),
            revision.clone().unwrap_or_else(none),
        ]);
    }
    table.add_row(vec![
        "group".to_string(),
        report.group.clone().unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "profile".to_string(),
        report
            .profile
            .as_ref()
            .map(|p| format!("{} ({})", p.name, p.summary()))
            .unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "license".to_string(),
        report
            .license
            .as_ref()
            .map(|l| format!("{} (expires {})", l.file_name, l.expires_at.to_rfc3339()))
            .unwrap_or_else(none),
    ]);
    table.add_row(vec![
        "hold".to_string(),
        report
            .hold
            .as_ref()
            .map(hold::describe)
            .unwrap_or_else(none),
    ]);
    for entry in &report.schedule {
        table.add_row(vec![
            format!("schedule {} (from {})", entry.job, entry.source),
            format!(
                "{} (next run: {})",
                entry.expression,
                entry.next_run.map(|t| t.to_rfc3339()).unwrap_or_else(none)
            ),
        ]);
    }
    crate::cli::print_text(table)?;
    Ok(ExitStatus::Success)
}

#[derive(Debug, Serialize)]
struct ResetReport {
    changed: bool,
    was_activated: bool,
    fingerprint: String,
    activation_key_stored: bool,
}

fn reset(dir: &Path, args: &ResetArgs, json: bool) -> Result<ExitStatus> {
    let config = load_config(dir)?;
    let key = args
        .activation_key_file
        .as_deref()
        .map(read_activation_key)
        .transpose()?;
    let was_activated = forget_manager(dir)?;
    let (_, cert) = new_identity(dir, &config.host_name)?;
    if let Some(key) = &key {
        write_private(
            &dir.join(ACTIVATION_KEY_FILE),
            format!("{key}\n").as_bytes(),
        )?;
    }
    let report = ResetReport {
        changed: true,
        was_activated,
        fingerprint: tls::fingerprint(&cert),
        activation_key_stored: dir.join(ACTIVATION_KEY_FILE).exists(),
    };
    tracing::info!(fingerprint = %report.fingerprint, was_activated, "reset");
    if json {
        crate::cli::print_json(&report)?;
    } else {
        crate::cli::print_text(format!(
            "{}new certificate fingerprint: {}\na running agent takes it up on SIGHUP \
             (systemctl reload pm-agent) or a restart{}",
            if was_activated {
                "forgot the manager; "
            } else {
                ""
            },
            report.fingerprint,
            if report.activation_key_stored {
                ""
            } else {
                "\nno activation key stored; add one with `pm-agent reset --activation-key-file F`"
            }
        ))?;
    }
    Ok(ExitStatus::Success)
}

// ---------------------------------------------------------------------------------------------
// The HTTPS API.

/// A challenge answered and not yet completed.
struct Pending {
    manager_nonce: String,
    created: Instant,
}

struct Inner {
    /// The agent's private key (replaced by `reset`, picked up on SIGHUP).
    key: PKey<Private>,
    activation: Option<Activation>,
    /// The activation key (never logged).
    activation_key: Option<String>,
    challenges: HashMap<String, Pending>,
}

struct Agent {
    dir: PathBuf,
    config: AgentConfig,
    handle: TlsHandle,
    inner: Mutex<Inner>,
    /// The running executable (`None`: unreadable at start, so no self-upgrade).
    executable: Option<upgrade::Executable>,
    /// A self-upgrade asking the serve loop to restart.
    restart: upgrade::Restart,
    /// Why the last self-upgrade was undone after its answer (cleared by the next one).
    upgrade_error: Mutex<Option<String>>,
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ErrorResponse {
            code: code.to_string(),
            message: message.into(),
        }),
    )
        .into_response()
}

/// A 500 answer for a failed operation: the error chain and its `hint:` in one message.
pub(super) fn failure_response(code: &str, err: &anyhow::Error) -> Response {
    let hint = err
        .downcast_ref::<UserError>()
        .and_then(|e| e.hint.clone())
        .map(|h| format!(" (hint: {h})"))
        .unwrap_or_default();
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        code,
        format!("{err:#}{hint}"),
    )
}

fn not_activated() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "not_activated",
        "this agent is not activated: only the activation calls are answered; activate it with \
         `pm-activate host` on the manager",
    )
}

fn already_activated(activation: &Activation) -> Response {
    error(
        StatusCode::CONFLICT,
        "already_activated",
        format!(
            "this agent is already activated by the manager with CA {}; run `pm-agent reset` on \
             the host to re-activate",
            activation.record.manager_ca_fingerprint
        ),
    )
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|err| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the request is not valid: {err}"),
        ))
    })
}

async fn challenge(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    let request: proto::ChallengeRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let mut inner = agent.lock();
    if let Some(activation) = &inner.activation {
        return already_activated(activation);
    }
    let Some(key) = inner.activation_key.clone() else {
        return error(
            StatusCode::CONFLICT,
            "no_activation_key",
            "this agent holds no activation key; run `pm-agent reset --activation-key-file F` \
             on the host, then `systemctl reload pm-agent` (SIGHUP)",
        );
    };
    let csr_pem = match ca::make_csr(&inner.key, &agent.config.host_name) {
        Ok(pem) => pem,
        Err(err) => {
            tracing::error!(%err, "cannot make a certificate request");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the agent cannot make a certificate request; see its log",
            );
        }
    };
    let now = Instant::now();
    inner
        .challenges
        .retain(|_, pending| now.duration_since(pending.created) < CHALLENGE_TTL);
    while inner.challenges.len() >= MAX_CHALLENGES {
        let oldest = inner
            .challenges
            .iter()
            .min_by_key(|(_, pending)| pending.created)
            .map(|(nonce, _)| nonce.clone());
        match oldest {
            Some(nonce) => inner.challenges.remove(&nonce),
            None => break,
        };
    }
    let agent_nonce = proto::nonce();
    let agent_proof = proto::agent_proof(
        &key,
        &info.local_fingerprint,
        &request.manager_nonce,
        &agent_nonce,
    );
    inner.challenges.insert(
        agent_nonce.clone(),
        Pending {
            manager_nonce: request.manager_nonce,
            created: now,
        },
    );
    tracing::info!(remote = %info.remote, manager_ca = %request.manager_ca_fingerprint, "activation challenge");
    axum::Json(proto::ChallengeResponse {
        agent_nonce,
        agent_proof,
        csr_pem: String::from_utf8_lossy(&csr_pem).into_owned(),
        host_name: agent.config.host_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        engine: agent.config.engine.as_str().to_string(),
    })
    .into_response()
}

async fn complete(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    let request: proto::ActivateRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let mut inner = agent.lock();
    if let Some(activation) = &inner.activation {
        return already_activated(activation);
    }
    let pending = inner.challenges.remove(&request.agent_nonce);
    let Some(pending) = pending.filter(|p| p.created.elapsed() < CHALLENGE_TTL) else {
        return error(
            StatusCode::BAD_REQUEST,
            "stale_challenge",
            "this agent nonce is unknown, already used or older than a minute; start the \
             activation again",
        );
    };
    let Some(key) = inner.activation_key.clone() else {
        return error(
            StatusCode::CONFLICT,
            "no_activation_key",
            "this agent holds no activation key; run `pm-agent reset --activation-key-file F` \
             on the host, then `systemctl reload pm-agent` (SIGHUP)",
        );
    };
    let expected = proto::manager_proof(
        &key,
        &info.local_fingerprint,
        &request.agent_nonce,
        &pending.manager_nonce,
    );
    if !proto::proofs_equal(&expected, &request.manager_proof) {
        tracing::warn!(remote = %info.remote, "activation refused: wrong manager proof");
        return error(
            StatusCode::FORBIDDEN,
            "wrong_key",
            "the manager does not hold this agent's activation key; check the key file given \
             to `pm-activate host`, or store the right key on the host with `pm-agent reset \
             --activation-key-file F`",
        );
    }
    let bad = |message: &str| error(StatusCode::BAD_REQUEST, "bad_request", message);
    let Ok(ca_cert) = X509::from_pem(request.ca_pem.as_bytes()) else {
        return bad("ca_pem is not a PEM certificate");
    };
    let Ok(cert) = X509::from_pem(request.agent_certificate_pem.as_bytes()) else {
        return bad("agent_certificate_pem is not a PEM certificate");
    };
    if PKey::public_key_from_pem(request.manifest_key_pem.as_bytes()).is_err() {
        return bad("manifest_key_pem is not a PEM public key");
    }
    if request.dist_url.trim().is_empty() {
        return bad("dist_url is empty");
    }
    let ours = cert
        .public_key()
        .map(|public| inner.key.public_eq(&public))
        .unwrap_or(false);
    if !ours {
        return bad("the issued certificate is not for this agent's key");
    }
    match ca::check_issued_by(&cert, &ca_cert) {
        Ok(()) => {}
        Err(ca::IssueProblem::NotIssued) => {
            return bad("the issued certificate is not valid under the given CA");
        }
        Err(problem) => {
            return error(
                StatusCode::CONFLICT,
                "clock",
                format!(
                    "{}; set this host's clock right (NTP) and activate it again",
                    crate::hosts::describe_problem(
                        "the issued certificate",
                        "this agent's clock",
                        &problem
                    )
                ),
            );
        }
    }
    let activation = match commit_activation(&agent.dir, &request, ca_cert, cert) {
        Ok(activation) => activation,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "cannot store the activation");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the agent cannot store the activation: {err:#}"),
            );
        }
    };
    inner.activation_key = None;
    inner.challenges.clear();
    let config = TlsServerConfig {
        key: inner.key.clone(),
        cert: activation.cert.clone(),
        client_auth: ClientAuth::Required {
            ca: activation.ca.clone(),
        },
    };
    if let Err(err) = agent.handle.reload(&config) {
        tracing::error!(error = %format!("{err:#}"), "cannot switch to the issued certificate");
    }
    let response = proto::ActivateResponse {
        certificate_serial: activation.record.certificate_serial.clone(),
        certificate_fingerprint: tls::fingerprint(&activation.cert),
    };
    tracing::info!(
        manager_ca = %activation.record.manager_ca_fingerprint,
        host_name = %activation.record.host_name,
        serial = %response.certificate_serial,
        "activated"
    );
    inner.activation = Some(activation);
    axum::Json(response).into_response()
}

/// Stores what the manager sent; `manager.json` last, so a crash leaves not-activated or
/// activated. Then forgets the activation key.
fn commit_activation(
    dir: &Path,
    request: &proto::ActivateRequest,
    ca_cert: X509,
    cert: X509,
) -> Result<Activation> {
    let manager = dir.join(MANAGER_DIR);
    durable::create_private_dir(&manager, 0o700).map_err(io_error("create directory", &manager))?;
    let write = |file: &str, bytes: &[u8]| {
        let path = dir.join(file);
        durable::write_atomic(&path, bytes, 0o644).map_err(io_error("write", &path))
    };
    write(MANAGER_CA_FILE, &ca_cert.to_pem()?)?;
    write(MANIFEST_KEY_FILE, request.manifest_key_pem.as_bytes())?;
    write(ISSUED_CERT_FILE, &cert.to_pem()?)?;
    // A re-issued pair left by a deactivation that crashed halfway would outrank this one.
    let reissued = dir.join(identity::IDENTITY_FILE);
    match std::fs::remove_file(&reissued) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error("remove", &reissued)(err)),
    }
    let record = ManagerRecord {
        dist_url: request.dist_url.clone(),
        host_name: request.host_name.clone(),
        activated_at: chrono::Utc::now(),
        manager_ca_fingerprint: tls::fingerprint(&ca_cert),
        certificate_serial: ca::serial_hex(&cert)?,
    };
    write(MANAGER_FILE, &serde_json::to_vec_pretty(&record)?)?;
    remove_activation_key(dir)?;
    Ok(Activation {
        record,
        ca: ca_cert,
        cert,
    })
}

fn remove_activation_key(dir: &Path) -> Result<()> {
    let path = dir.join(ACTIVATION_KEY_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => durable::sync_dir(dir).map_err(io_error("sync", dir)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error("remove", &path)(err)),
    }
}

/// Whether the connection carries a client certificate from the manager CA (the listener
/// already requires it once activated; checked again here).
fn from_manager(inner: &Inner, info: &TlsConnectInfo) -> Result<(), Box<Response>> {
    if inner.activation.is_none() {
        return Err(Box::new(not_activated()));
    }
    match &info.peer {
        // Signed by the manager CA but outside its validity by this host's clock (the TLS
        // listener lets only that failure through, so that it can be named): nothing is done,
        // the answer says which clock to look at.
        Some(peer) if !peer.verified && peer.outside_validity => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "clock",
            format!(
                "the manager's client certificate is valid from {} to {}, but this agent's \
                 clock reads {}: set the clock of this host (or of the manager) right",
                crate::hosts::at(peer.not_before),
                crate::hosts::at(peer.not_after),
                crate::hosts::at(chrono::Utc::now())
            ),
        ))),
        // Agents' certificates come from the same CA: one of them (a compromised host) must
        // not be able to drive the others. Theirs carry serverAuth, the manager's does not.
        Some(peer) if peer.verified && peer.server_auth => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "an agent's certificate cannot call another agent: only the manager's client \
             certificate can",
        ))),
        Some(peer) if peer.verified => Ok(()),
        _ => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a client certificate from this agent's manager CA is required",
        ))),
    }
}

fn agent_status(agent: &Agent, inner: &Inner) -> proto::AgentStatus {
    let setup = setup::load(&agent.dir).unwrap_or_else(|err| {
        tracing::warn!(error = %format!("{err:#}"), "cannot read the setup");
        setup::Setup::default()
    });
    proto::AgentStatus {
        host_name: inner
            .activation
            .as_ref()
            .map(|a| a.record.host_name.clone())
            .unwrap_or_else(|| agent.config.host_name.clone()),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        agent_sha256: agent.executable.as_ref().map(|e| e.sha256.clone()),
        upgrade_error: agent
            .upgrade_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        activated: inner.activation.is_some(),
        manager_ca_fingerprint: inner
            .activation
            .as_ref()
            .map(|a| a.record.manager_ca_fingerprint.clone()),
        engine: agent.config.engine.as_str().to_string(),
        group: setup.group,
        profile: setup.profile.map(|p| p.name),
        license_expires_at: setup.license.map(|l| l.expires_at),
        hold: setup.hold.filter(|h| hold::in_force(h, chrono::Utc::now())),
        reports_hold: true,
        manifest_key: inner
            .activation
            .as_ref()
            .and_then(|_| trust::trusted_fingerprint(&agent.dir)),
    }
}

async fn status_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    let inner = agent.lock();
    if let Err(response) = from_manager(&inner, &info) {
        return *response;
    }
    axum::Json(agent_status(&agent, &inner)).into_response()
}

async fn deactivate(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    let mut inner = agent.lock();
    if let Err(response) = from_manager(&inner, &info) {
        return *response;
    }
    let result = forget_manager(&agent.dir).and_then(|_| {
        // The self-signed identity on disk again (after a re-issue: for the new key).
        let config = identity::self_signed_config(&agent.dir)?;
        agent.handle.reload(&config)?;
        inner.key = config.key;
        Ok(())
    });
    if let Err(err) = result {
        tracing::error!(error = %format!("{err:#}"), "cannot forget the manager");
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the agent cannot forget its manager: {err:#}"),
        );
    }
    inner.activation = None;
    tracing::info!(remote = %info.remote, "deactivated: the manager is forgotten");
    let status = agent_status(&agent, &inner);
    axum::Json(status).into_response()
}

async fn fallback(State(agent): State<Arc<Agent>>) -> Response {
    if agent.lock().activation.is_none() {
        return not_activated();
    }
    error(StatusCode::NOT_FOUND, "not_found", "no such call")
}

fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(proto::CHALLENGE_PATH, post(challenge))
        .route(proto::ACTIVATE_PATH, post(complete))
        .route(proto::STATUS_PATH, get(status_handler))
        .route(proto::DEACTIVATE_PATH, post(deactivate))
        .merge(scan::routes())
        .merge(schedule::routes())
        .merge(setup::routes())
        .merge(poll::routes())
        .route(proto::UPDATE_PATH, post(install::update_handler))
        .route(proto::ROLLBACK_PATH, post(install::rollback_handler))
        .merge(upgrade::routes())
        .merge(identity::routes())
        .fallback(fallback)
        .method_not_allowed_fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

/// Everything `run` serves from, read from the state directory.
struct Loaded {
    tls: TlsServerConfig,
    activation: Option<Activation>,
    activation_key: Option<String>,
}

fn load_state(dir: &Path) -> Result<Loaded> {
    let activation = load_activation(dir)?;
    let tls = match &activation {
        Some(activation) => {
            // A crash between the commit and the deletion of the key leaves it behind.
            remove_activation_key(dir)?;
            identity::repair(dir, &load_config(dir)?.host_name)?;
            let (key, cert) = identity::issued_identity(dir)?;
            TlsServerConfig {
                key,
                cert,
                client_auth: ClientAuth::Required {
                    ca: activation.ca.clone(),
                },
            }
        }
        None => {
            let (key, cert) = load_identity(dir, SELF_SIGNED_CERT_FILE)?;
            TlsServerConfig {
                key,
                cert,
                client_auth: ClientAuth::None,
            }
        }
    };
    let key_path = dir.join(ACTIVATION_KEY_FILE);
    let activation_key = match std::fs::read_to_string(&key_path) {
        Ok(text) => Some(text.trim().to_string()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_error("read", &key_path)(err)),
    };
    Ok(Loaded {
        tls,
        activation,
        activation_key,
    })
}

/// SIGHUP: reads the state directory again (after `pm-agent reset`, a new activation key) and
/// switches to it; on error the agent keeps what it has. `listen` changes need a restart.
async fn reload_on_sighup(agent: Arc<Agent>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        let result = load_state(&agent.dir).and_then(|loaded| {
            agent.handle.reload(&loaded.tls)?;
            let mut inner = agent.lock();
            inner.key = loaded.tls.key.clone();
            inner.activation = loaded.activation;
            inner.activation_key = loaded.activation_key;
            inner.challenges.clear();
            Ok(())
        });
        match result {
            Ok(()) => {
                let inner = agent.lock();
                tracing::info!(
                    fingerprint = %agent.handle.fingerprint(),
                    activated = inner.activation.is_some(),
                    activation_key_stored = inner.activation_key.is_some(),
                    "reloaded the state on SIGHUP"
                );
            }
            Err(err) => tracing::error!(
                error = %format!("{err:#}"),
                "cannot reload the state on SIGHUP; keeping the current one"
            ),
        }
    }
}

/// How long open requests may run on after a self-upgrade asked for a restart.
const RESTART_GRACE: Duration = Duration::from_secs(30);

fn serve(dir: &Path) -> Result<ExitStatus> {
    let config = load_config(dir)?;
    // Before the port or any state: one agent per state directory.
    let _run_lock = stop::lock(dir)?;
    let executable = upgrade::Executable::current()
        .inspect_err(|err| {
            tracing::warn!(error = %format!("{err:#}"), "cannot read the executable: self-upgrade is off");
        })
        .ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut upgrade_error = None;
    loop {
        let loaded = load_state(dir)?;
        let replaced = runtime.block_on(serve_until_stopped(
            dir,
            config.clone(),
            loaded,
            executable.clone(),
            upgrade_error.take(),
        ))?;
        let Some(replaced) = replaced else {
            break;
        };
        // The server is down and its port released; on success this never returns.
        upgrade_error = Some(upgrade::exec(replaced));
    }
    // Stopped: work still under way after the grace is left behind (a scan engine was ended
    // already; an install is all-or-nothing) and recorded as abandoned.
    runtime.shutdown_timeout(Duration::from_secs(1));
    schedule::record_abandoned(dir);
    tracing::info!("stopped");
    Ok(ExitStatus::Success)
}

/// Serves the API until a signal (`None`) or a self-upgrade that replaced the executable
/// (`Some`: start it). The listener is closed when this returns.
async fn serve_until_stopped(
    dir: &Path,
    config: AgentConfig,
    loaded: Loaded,
    executable: Option<upgrade::Executable>,
    upgrade_error: Option<String>,
) -> Result<Option<upgrade::Replaced>> {
    let listener = TlsListener::bind(config.listen, &loaded.tls)
        .await
        .map_err(|err| {
            UserError::failure(format!("{err:#}")).with_hint(format!(
                "change `listen` in `{}` or stop what uses the port",
                dir.join(CONFIG_FILE).display()
            ))
        })?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        fingerprint = %listener.handle().fingerprint(),
        activated = loaded.activation.is_some(),
        manager_ca = loaded.activation.as_ref().map(|a| a.record.manager_ca_fingerprint.as_str()).unwrap_or("-"),
        activation_key_stored = loaded.activation_key.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        sha256 = executable.as_ref().map(|e| e.sha256.as_str()).unwrap_or("-"),
        "pm-agent listening on https://{addr}"
    );
    let agent = Arc::new(Agent {
        dir: dir.to_owned(),
        config,
        handle: listener.handle(),
        inner: Mutex::new(Inner {
            key: loaded.tls.key.clone(),
            activation: loaded.activation,
            activation_key: loaded.activation_key,
            challenges: HashMap::new(),
        }),
        executable,
        restart: upgrade::Restart::default(),
        upgrade_error: Mutex::new(upgrade_error),
    });
    let reloader = tokio::spawn(reload_on_sighup(Arc::clone(&agent)));
    let scheduled = schedule::spawn(&agent)?;
    let restart_agent = Arc::clone(&agent);
    let served = axum::serve(
        listener,
        router(Arc::clone(&agent)).into_make_service_with_connect_info::<TlsConnectInfo>(),
    )
    .with_graceful_shutdown(async move {
        tokio::select! {
            _ = crate::mirror::shutdown_signal() => stop::begin(),
            _ = restart_agent.restart.requested() => {}
        }
    });
    // After a restart request, open requests get RESTART_GRACE to finish (a long scan must not
    // hold the upgrade forever); after a stop, STOP_GRACE (the running scan is ended at once,
    // nothing new starts); dropping the server then closes the listener.
    let restart_agent = Arc::clone(&agent);
    let served = tokio::select! {
        served = served => served.context("the agent API stopped"),
        _ = async {
            restart_agent.restart.requested().await;
            tokio::time::sleep(RESTART_GRACE).await;
        } => Ok(()),
        _ = async {
            stop::requested().await;
            tokio::time::sleep(stop::STOP_GRACE).await;
        } => {
            tracing::warn!(grace = ?stop::STOP_GRACE, "requests still open after the stop's grace: closing them");
            Ok(())
        }
    };
    reloader.abort();
    for task in scheduled {
        task.abort();
    }
    served?;
    Ok(agent.restart.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_the_default_port() {
        assert_eq!(
            parse_listen("127.0.0.1").unwrap(),
            "127.0.0.1:7505".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            "[::1]:80".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("host:80").is_err());
    }

    #[test]
    fn only_the_activation_record_makes_an_agent_activated() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        durable::create_private_dir(&state.join(MANAGER_DIR), 0o700).unwrap();
        let (_, cert) = AgentIdentity::generate("agent-1").unwrap();
        let pem = cert.to_pem().unwrap();
        // A crash before the final rename leaves everything but `manager.json`.
        std::fs::write(state.join(MANAGER_CA_FILE), &pem).unwrap();
        std::fs::write(state.join(ISSUED_CERT_FILE), &pem).unwrap();
        assert!(load_activation(state).unwrap().is_none());
        let record = ManagerRecord {
            dist_url: "http://m:8080/".into(),
            host_name: "agent-1".into(),
            activated_at: chrono::Utc::now(),
            manager_ca_fingerprint: tls::fingerprint(&cert),
            certificate_serial: ca::serial_hex(&cert).unwrap(),
        };
        std::fs::write(
            state.join(MANAGER_FILE),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let activation = load_activation(state).unwrap().unwrap();
        assert_eq!(activation.record, record);
        // Forgetting removes the record first, then the rest.
        assert!(forget_manager(state).unwrap());
        assert!(!state.join(MANAGER_DIR).exists());
        assert!(load_activation(state).unwrap().is_none());
        assert!(!forget_manager(state).unwrap());
    }

    #[test]
    fn the_config_round_trips() {
        let config = AgentConfig {
            listen: "0.0.0.0:7505".parse().unwrap(),
            engine: Engine::Clamav,
            database_dir: PathBuf::from("/var/lib/clamav"),
            host_name: "scan-1".into(),
            scan_command: None,
            scan_reports_keep: None,
            clamd_socket: None,
            schedule: None,
        };
        let text = toml::to_string(&config).unwrap();
        assert!(text.contains("engine = \"clamav\""), "{text}");
        assert_eq!(toml::from_str::<AgentConfig>(&text).unwrap(), config);
    }
}
