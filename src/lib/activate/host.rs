//! `pm-activate host | deactivate | list`: enrolment of agents over the activation protocol of
//! [`crate::proto`], and the hosts of the inventory.
//!
//! `host ADDR --key-file F`: learn the agent's self-signed certificate and pin it; challenge it
//! with a nonce and check its proof of the key (bound to that certificate); take one use of the
//! key in the inventory (atomically, so a replay cannot take a single-use key twice); sign its
//! CSR with the manager CA (the certificate names the host and the IP address the manager
//! reaches it at); send the manager's proof, the CA, the certificate, the manifest key and the
//! dist URL; check over mutual TLS that it now answers as ours; record the host and a job; then
//! the group, profile and labels steps, each reported. Run again against an agent this manager
//! already activated, it only re-applies the steps (mutual TLS, no key needed).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde::Serialize;

use super::setup::{self, SetupPlan};
use super::{HostArgs, KeyProblem, check_key, inventory_error};
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::hosts::{self, HostCertificate, NameUse, renew};
use crate::inventory::{ActivationKeyRecord, HostRecord, Inventory, LicenseRecord};
use crate::pki::ca::{IssueProblem, ManagerCa, cert_fingerprint, check_issued_by, serial_hex};
use crate::profile::Profile;
use crate::proto;
use crate::tls;

/// One reported setup step of `host`.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `activate`, `verify`, `profile`, `group`, `license`, `labels`.
    pub name: String,
    /// Whether it worked (a skipped step did not fail).
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Why it was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// What it did, when that is worth saying (a certificate re-issued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Step {
    pub(super) fn ok(name: &str) -> Step {
        Step {
            name: name.into(),
            ok: true,
            error: None,
            skipped: None,
            note: None,
        }
    }

    /// The step with what it did.
    fn with_note(mut self, note: String) -> Step {
        self.note = Some(note);
        self
    }

    pub(super) fn failed(name: &str, error: impl Into<String>) -> Step {
        Step {
            name: name.into(),
            ok: false,
            error: Some(error.into()),
            skipped: None,
            note: None,
        }
    }

    pub(super) fn skipped(name: &str, why: impl Into<String>) -> Step {
        Step {
            name: name.into(),
            ok: true,
            error: None,
            skipped: Some(why.into()),
            note: None,
        }
    }
}

/// `--json` of `host`.
#[derive(Debug, Serialize)]
struct HostReport {
    changed: bool,
    /// `activated` or `reapplied`.
    action: &'static str,
    host: String,
    address: String,
    group: String,
    profile: String,
    labels: BTreeMap<String, String>,
    certificate_serial: Option<String>,
    certificate_fingerprint: Option<String>,
    certificate_expires_at: Option<chrono::DateTime<Utc>>,
    agent_version: Option<String>,
    engine: Option<String>,
    /// What else happened: kept from an earlier activation, renamed from.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    steps: Vec<Step>,
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, UserError> {
    let mut parsed = BTreeMap::new();
    for label in labels {
        match label.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                parsed.insert(key.trim().to_string(), value.trim().to_string());
            }
            _ => {
                return Err(UserError::usage(format!(
                    "--label `{label}` is not of the form key=value"
                )));
            }
        }
    }
    Ok(parsed)
}

fn check_name(what: &str, value: &str) -> Result<(), UserError> {
    if value.is_empty()
        || value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(UserError::usage(format!(
            "--{what} `{value}` is not a name (1 to 64 letters, digits, `-`, `_`, `.`)"
        )));
    }
    Ok(())
}

/// Resolves `host[:port]` (port 7505 when omitted) to the socket address to connect to and the
/// canonical `host:port` text recorded in the inventory.
async fn resolve(address: &str) -> Result<(SocketAddr, String), UserError> {
    let with_port = if address.parse::<SocketAddr>().is_ok() {
        address.to_string()
    } else if address.parse::<IpAddr>().is_ok() {
        // A bare IPv6 address.
        SocketAddr::new(address.parse().expect("checked"), tls::DEFAULT_AGENT_PORT).to_string()
    } else if address
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        address.to_string()
    } else {
        format!("{address}:{}", tls::DEFAULT_AGENT_PORT)
    };
    let unreachable = |error: String| {
        UserError::failure(format!("agent `{address}` is unreachable: {error}")).with_hint(format!(
            "check the address, that `pm-agent run` is running on the host, and that a firewall \
             lets this manager reach its port (default {})",
            tls::DEFAULT_AGENT_PORT
        ))
    };
    let addr = tokio::net::lookup_host(with_port.as_str())
        .await
        .map_err(|err| unreachable(format!("cannot resolve `{with_port}`: {err}")))?
        .next()
        .ok_or_else(|| unreachable(format!("`{with_port}` resolves to no address")))?;
    Ok((addr, with_port))
}

fn unreachable(address: &str, error: &anyhow::Error) -> UserError {
    UserError::failure(format!("agent `{address}` is unreachable: {error:#}")).with_hint(format!(
        "check that `pm-agent run` is running on the host and that a firewall lets this manager \
         reach its port (default {})",
        tls::DEFAULT_AGENT_PORT
    ))
}

/// An error talking to the agent over an established pin or CA: names a pin mismatch.
fn request_error(address: &str, error: reqwest::Error) -> UserError {
    if let Some(mismatch) = tls::pin_mismatch(&error) {
        return UserError::failure(format!("agent `{address}`: {mismatch}"))
            .with_hint("the agent changed its certificate during activation: try again");
    }
    let error = anyhow::Error::new(error);
    unreachable(address, &error)
}

/// Reads the key file, warning when it is readable by others. Never logs the key.
fn read_key_file(path: &Path) -> Result<String, UserError> {
    crate::durable::read_secret(path)
        .map(|text| text.trim().to_string())
        .map_err(|err| super::secret_file_error("activation key", err))
}

fn key_error(problem: KeyProblem) -> UserError {
    let hint = match problem {
        KeyProblem::Malformed => "give the file written by `pm-activate key new --out FILE`",
        KeyProblem::WrongSecret(_) => {
            "give the file `pm-activate key new --out FILE` wrote, unchanged, or create a new key"
        }
        _ => "create a new key with `pm-activate key new --out FILE` and give it to the agent",
    };
    match problem {
        // What the operator gave is no key at all.
        KeyProblem::Malformed => UserError::usage(problem.to_string()).with_hint(hint),
        _ => UserError::failure(problem.to_string()).with_hint(hint),
    }
}

/// An error answer of the agent, as an error with a hint saying what to do.
fn agent_refusal(address: &str, status: reqwest::StatusCode, body: &[u8]) -> UserError {
    let Ok(error) = serde_json::from_slice::<proto::ErrorResponse>(body) else {
        return UserError::failure(format!(
            "agent `{address}` rejected the command: HTTP {status}"
        ))
        .with_hint("check the agent's log (`journalctl -u pm-agent`) and that it is a pm-agent");
    };
    let message = error.message.trim_end_matches('.');
    match error.code.as_str() {
        "already_activated" => UserError::failure(format!(
            "agent `{address}` is already activated by another manager ({message})"
        ))
        .with_hint("run `pm-agent reset` on the host first, then activate it again"),
        "no_activation_key" => UserError::failure(format!(
            "agent `{address}` holds no activation key ({message})"
        ))
        .with_hint(
            "give it one on the host: `pm-agent reset --activation-key-file FILE` (a key from \
             `pm-activate key new --out FILE`), then `systemctl reload pm-agent`",
        ),
        "clock" => UserError::failure(format!("agent `{address}`: {message}"))
            .with_hint("set the host's clock right (NTP, chrony), then run the same command again"),
        "wrong_key" => UserError::failure(format!(
            "wrong activation key: the agent at `{address}` holds a different key ({message})"
        ))
        .with_hint("use the key file the agent was initialised with, or give it a new key"),
        code => UserError::failure(format!(
            "agent `{address}` rejected the command: {message} ({code})"
        ))
        .with_hint(
            "check the agent's log and version; fix what it says and run the same command again",
        ),
    }
}

pub(super) async fn post_json<T: Serialize, R: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    address: &str,
    path: &str,
    body: &T,
) -> Result<R, UserError> {
    post_json_dated(client, address, path, body)
        .await
        .map(|(answer, _)| answer)
}

/// [`post_json`], with the agent's clock as its answer's `Date` header gives it.
async fn post_json_dated<T: Serialize, R: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    address: &str,
    path: &str,
    body: &T,
) -> Result<(R, Option<chrono::DateTime<Utc>>), UserError> {
    let response = client
        .post(format!("https://{address}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).map_err(|e| UserError::failure(e.to_string()))?)
        .send()
        .await
        .map_err(|err| request_error(address, err))?;
    let agent_time = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|date| date.to_str().ok())
        .and_then(|date| httpdate::parse_http_date(date).ok())
        .map(chrono::DateTime::<Utc>::from);
    Ok((read_answer(address, path, response).await?, agent_time))
}

/// Reads an agent's answer: its refusal as an error, or the JSON document it must be.
async fn read_answer<R: serde::de::DeserializeOwned>(
    address: &str,
    path: &str,
    response: reqwest::Response,
) -> Result<R, UserError> {
    let status = response.status();
    let bytes = proto::read_body(response, proto::MAX_ANSWER_BYTES)
        .await
        .map_err(|err| match err {
            proto::AnswerError::Transport(err) => request_error(address, err),
            too_large => UserError::failure(format!("agent `{address}`: {too_large}"))
                .with_hint("check that a pm-agent runs at that address"),
        })?;
    if !status.is_success() {
        return Err(agent_refusal(address, status, &bytes));
    }
    serde_json::from_slice(&bytes).map_err(|err| {
        UserError::failure(format!(
            "agent `{address}` answered {path} with something that is not a pm-agent answer: {err}"
        ))
        .with_hint("check that a pm-agent of a compatible version runs at that address")
    })
}

/// The agent's status, and the fingerprint of the certificate it answered over.
async fn get_status(
    client: &reqwest::Client,
    address: &str,
) -> Result<(proto::AgentStatus, Option<String>), UserError> {
    let response = client
        .get(format!("https://{address}{}", proto::STATUS_PATH))
        .send()
        .await
        .map_err(|err| request_error(address, err))?;
    let presented = tls::peer_fingerprint(&response);
    Ok((
        read_answer(address, proto::STATUS_PATH, response).await?,
        presented,
    ))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The manager's CA and client identity (created on first use).
fn manager_pki(home: &Path) -> Result<(ManagerCa, (PKey<Private>, X509)), UserError> {
    let ca = ManagerCa::load_or_create(home)
        .map_err(|err| UserError::failure(format!("manager CA: {err}")))?;
    let identity = ca
        .client_identity(home)
        .map_err(|err| UserError::failure(format!("manager client certificate: {err}")))?;
    Ok((ca, identity))
}

/// How far a mutual-TLS client trusts an agent this manager activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust<'a> {
    /// The CA, and the name of the address in the URL: exactly what `pm-poll` checks.
    AsPoll,
    /// The CA and exactly this certificate (by fingerprint), whatever it names.
    Pinned(&'a str),
    /// Exactly this certificate, also outside its validity: the one the inventory recorded for
    /// the host, to renew it after it expired.
    PinnedExpired(&'a str),
}

/// A mutual-TLS client for an agent this manager activated (see [`Trust`]).
fn mutual_client(
    ca: &ManagerCa,
    identity: &(PKey<Private>, X509),
    trust: Trust<'_>,
    timeout: Duration,
) -> Result<reqwest::Client, UserError> {
    let (ca, pin) = match trust {
        Trust::AsPoll => (Some(ca.certificate()), None),
        Trust::Pinned(pin) => (Some(ca.certificate()), Some(pin)),
        Trust::PinnedExpired(pin) => (None, Some(pin)),
    };
    tls::client_builder(ca, pin, Some((&identity.0, &identity.1)))
        .and_then(|b| {
            b.timeout(timeout)
                .connect_timeout(timeout)
                .pool_max_idle_per_host(0)
                .build()
                .context("cannot build the TLS client")
        })
        .map_err(|err| UserError::failure(format!("{err:#}")))
}

/// `pm-activate host`.
pub fn activate_host(
    home: &Path,
    global: &GlobalArgs,
    args: HostArgs,
) -> anyhow::Result<ExitStatus> {
    if let Some(url) = &args.dist_url {
        // Refused before any agent is contacted.
        dist_url(home, Some(url))?;
    }
    if args.targets.is_some() && args.name.is_some() {
        return Err(UserError::usage("--name names one host: it cannot go with --targets").into());
    }
    if let Some(targets) = &args.targets {
        let addresses = read_targets(targets)?;
        let context = Shared::load(home, global, &args)?;
        return activate_many(home, global, &args, &context, &addresses);
    }
    let address = args
        .address
        .clone()
        .ok_or_else(|| UserError::usage("give the agent's ADDRESS or --targets FILE"))?;
    let context = Shared::load(home, global, &args)?;
    let report = activate_one(home, global, &args, &context, &runtime()?, &address)?;
    print_host_report(global, &report)
}

/// Serialises this process's use of the inventory between concurrent activations (DuckDB
/// takes one writer; the connections of one process must take turns as well).
static INVENTORY_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn inventory_turn() -> std::sync::MutexGuard<'static, ()> {
    INVENTORY_TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many agents `--targets` activates at once.
const BULK_CONCURRENCY: usize = 8;

/// Everything one `pm-activate host` run reads once, however many agents it activates: the
/// inventory (keys, hosts, profiles, licenses, revoked serials, read-only and closed at once),
/// the CA and client identity, the key file and the flags' values. With `--targets` each agent
/// then costs its own network work only (an unreachable one well under a millisecond of CPU).
struct Shared {
    keys: Vec<ActivationKeyRecord>,
    hosts: Vec<HostRecord>,
    profiles: Vec<Profile>,
    licenses: Vec<LicenseRecord>,
    /// Revoked serial -> the host it was revoked for.
    revoked: HashMap<String, String>,
    /// The hold in force on each held host, sent again with the setup steps.
    holds: HashMap<String, crate::inventory::HoldRecord>,
    ca: ManagerCa,
    identity: (PKey<Private>, X509),
    /// The activation key's text (never logged).
    key: Option<String>,
    labels: BTreeMap<String, String>,
}

impl Shared {
    /// Checks the flags, reads the key file, the inventory and the PKI; refuses an unknown
    /// profile before any agent is contacted (or a key use is taken).
    fn load(home: &Path, global: &GlobalArgs, args: &HostArgs) -> anyhow::Result<Shared> {
        let labels = parse_labels(&args.labels)?;
        if let Some(group) = &args.group {
            check_name("group", group)?;
        }
        if let Some(profile) = &args.profile {
            check_name("profile", profile)?;
        }
        if let Some(name) = &args.name {
            hosts::check_name("--name", name)?;
        }
        let key = args.key_file.as_deref().map(read_key_file).transpose()?;
        if let Some(key) = &key {
            super::parse_key(key).map_err(key_error)?;
        }
        let (keys, hosts, profiles, licenses, revoked, holds) = {
            let _turn = inventory_turn();
            match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
                Some(inventory) => (
                    inventory.activation_keys().map_err(inventory_error)?,
                    inventory.hosts().map_err(inventory_error)?,
                    inventory.profiles().map_err(inventory_error)?,
                    inventory.licenses().map_err(inventory_error)?,
                    inventory.revoked_hosts().map_err(inventory_error)?,
                    inventory.holds().map_err(inventory_error)?,
                ),
                None => Default::default(),
            }
        };
        let (ca, identity) = manager_pki(home)?;
        let context = Shared {
            keys,
            hosts,
            profiles,
            licenses,
            revoked,
            holds,
            ca,
            identity,
            key,
            labels,
        };
        context.plan(home, args, None)?;
        Ok(context)
    }

    /// What to set up on the host: a host already known keeps its group and profile unless the
    /// flags change them.
    fn plan(
        &self,
        home: &Path,
        args: &HostArgs,
        known: Option<&HostRecord>,
    ) -> Result<SetupPlan, UserError> {
        let group = args
            .group
            .clone()
            .or_else(|| known.map(|h| h.group.clone()))
            .unwrap_or_else(|| "default".into());
        let profile = args
            .profile
            .clone()
            .or_else(|| known.map(|h| h.profile.clone()))
            .unwrap_or_else(|| crate::profile::DEFAULT_PROFILE.into());
        let mut plan = SetupPlan::load(home, &self.profiles, &self.licenses, &group, &profile)?;
        plan.hold = known
            .and_then(|h| self.holds.get(&h.host))
            .and_then(|hold| hold.spec(Utc::now()));
        Ok(plan)
    }
}

/// The addresses of a targets file, each once: the first column of the same reader as every
/// other `--targets` (BOM, quotes, comments, `host,wave`).
fn read_targets(targets: &Path) -> Result<Vec<String>, UserError> {
    let mut seen = std::collections::HashSet::new();
    Ok(crate::targets::read_targets_file(targets)?
        .into_iter()
        .map(|listed| listed.name)
        .filter(|name| seen.insert(name.clone()))
        .collect())
}

/// `pm-activate host --targets FILE`: every address of the file, [`BULK_CONCURRENCY`] at a
/// time (workers that each take the next address, so one slow agent holds up no other), with
/// a summary.
fn activate_many(
    home: &Path,
    global: &GlobalArgs,
    args: &HostArgs,
    context: &Shared,
    addresses: &[String],
) -> anyhow::Result<ExitStatus> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<Vec<(usize, Result<HostReport, anyhow::Error>)>> =
        std::sync::Mutex::new(Vec::with_capacity(addresses.len()));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..BULK_CONCURRENCY.min(addresses.len()))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let runtime = runtime()?;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(address) = addresses.get(i) else {
                            return Ok(());
                        };
                        let outcome = activate_one(home, global, args, context, &runtime, address);
                        done.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((i, outcome));
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("an activation worker panicked")?;
        }
        Ok(())
    })?;
    let mut outcomes = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    outcomes.sort_by_key(|(i, _)| *i);
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for (i, outcome) in outcomes {
        match outcome {
            Ok(report) => reports.push(report),
            Err(err) => {
                let hint = err
                    .chain()
                    .find_map(|c| c.downcast_ref::<UserError>())
                    .and_then(|u| u.hint.clone());
                failures.push(serde_json::json!({
                    "address": addresses[i], "error": format!("{err:#}"), "hint": hint,
                }));
            }
        }
    }
    let partial = reports
        .iter()
        .filter(|r| r.steps.iter().any(|s| !s.ok))
        .count();
    let activated = reports.iter().filter(|r| r.action == "activated").count();
    let reapplied = reports.len() - activated;
    let changed = reports.iter().any(|r| r.changed);
    if global.json {
        cli::print_json(&serde_json::json!({
            "changed": changed,
            "summary": {
                "targets": reports.len() + failures.len(), "activated": activated,
                "reapplied": reapplied, "partial": partial, "failed": failures.len(),
            },
            "hosts": reports,
            "failures": failures,
        }))?;
    } else {
        let mut table = cli::table(&["address", "host", "result", "detail"]);
        for report in &reports {
            let failed: Vec<_> = report.steps.iter().filter(|s| !s.ok).collect();
            table.add_row(vec![
                report.address.clone(),
                report.host.clone(),
                if failed.is_empty() {
                    report.action.to_string()
                } else {
                    "partial".to_string()
                },
                failed
                    .iter()
                    .map(|s| format!("{}: {}", s.name, s.error.as_deref().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join("; "),
            ]);
        }
        for failure in &failures {
            table.add_row(vec![
                failure["address"].as_str().unwrap_or_default().to_string(),
                String::new(),
                "failed".into(),
                failure["error"].as_str().unwrap_or_default().to_string(),
            ]);
        }
        cli::print_text(table)?;
        cli::print_text(format!(
            "{activated} activated, {reapplied} re-applied, {partial} partial, {} failed",
            failures.len()
        ))?;
    }
    for failure in &failures {
        eprintln!("error: {}", failure["error"].as_str().unwrap_or_default());
        if let Some(hint) = failure["hint"].as_str() {
            eprintln!("hint: {hint}");
        }
    }
    Ok(if failures.is_empty() && partial == 0 {
        ExitStatus::Success
    } else if reports.is_empty() {
        ExitStatus::Failure
    } else {
        ExitStatus::Partial
    })
}

/// What the activation of one agent works with besides the agent: the run's flags and what it
/// read once, and the worker's runtime.
#[derive(Clone, Copy)]
struct Run<'a> {
    home: &'a Path,
    global: &'a GlobalArgs,
    args: &'a HostArgs,
    context: &'a Shared,
    runtime: &'a tokio::runtime::Runtime,
}

/// An agent that answered TLS: where, and the certificate it presented.
struct Reached {
    socket: SocketAddr,
    /// `host:port` as the inventory records it.
    address: String,
    presented: X509,
}

/// Activates (or re-applies the setup of) the agent at `address`.
fn activate_one(
    home: &Path,
    global: &GlobalArgs,
    args: &HostArgs,
    context: &Shared,
    runtime: &tokio::runtime::Runtime,
    address: &str,
) -> anyhow::Result<HostReport> {
    let run = Run {
        home,
        global,
        args,
        context,
        runtime,
    };
    let (socket, address) = runtime.block_on(resolve(address))?;
    let presented = match runtime.block_on(tls::fetch_server_certificate(socket, args.timeout)) {
        Ok(cert) => cert,
        Err(err) => {
            // A bad key is the first thing to fix, even when the agent is also down.
            if let Some(key) = &context.key {
                check_key(key, &context.keys, Utc::now()).map_err(key_error)?;
            }
            return Err(unreachable(&address, &err).into());
        }
    };
    let presented_serial = serial_hex(&presented).unwrap_or_default();
    let issued = check_issued_by(&presented, context.ca.certificate());
    if issued != Err(IssueProblem::NotIssued)
        && let Some(host) = context.revoked.get(&presented_serial)
    {
        return Err(UserError::failure(format!(
            "certificate serial {presented_serial} of {host} was revoked: agent `{address}` is \
             not accepted again"
        ))
        .with_hint("run `pm-agent reset` on the host, then activate it again with a new key")
        .into());
    }
    let whose = format!("agent `{address}`'s certificate (serial {presented_serial})");
    let reached = Reached {
        socket,
        address: address.clone(),
        presented: presented.clone(),
    };
    match issued {
        // Activated by this manager already.
        Ok(()) => reapply(run, &reached, None),
        Err(problem @ IssueProblem::Expired { .. }) => {
            if hosts::find_by_certificate(&context.hosts, &presented).is_none() {
                return Err(UserError::failure(format!(
                    "{}, and no active host of this inventory has it",
                    hosts::describe_problem(&whose, "this manager's clock", &problem)
                ))
                .with_hint(
                    "run `pm-agent reset --activation-key-file F` on the host, then activate it \
                     again with that key",
                )
                .into());
            }
            reapply(run, &reached, Some(("after it expired", "renewed")))
        }
        // Valid only from a time ahead of this manager's clock. Unless the last poll found
        // this clock out of step with its agents', the certificate was issued while a clock
        // was wrong (a renewal while the manager's and the agent's clocks were both ahead):
        // a host of this inventory gets it re-issued over its identity, as an expired one.
        Err(problem @ IssueProblem::NotYetValid { .. }) => {
            let out_of_step = Inventory::open_read_only(run.home, run.global.lock_timeout)
                .map_err(inventory_error)?
                .map(|inv| crate::poll::clock_out_of_step(&inv, Utc::now()))
                .transpose()
                .map_err(inventory_error)?
                .flatten();
            let known = hosts::find_by_certificate(&context.hosts, &presented).is_some();
            match out_of_step {
                None if known => reapply(
                    run,
                    &reached,
                    Some((
                        "issued while a clock was wrong (valid only from a later time)",
                        "re-issued: issued while a clock was wrong",
                    )),
                ),
                None => Err(UserError::failure(format!(
                    "{}, and no active host of this inventory has it",
                    hosts::describe_problem(&whose, "this manager's clock", &problem)
                ))
                .with_hint(
                    "if this manager's clock is right (`timedatectl status`), it was issued while \
                     a clock was wrong: run `pm-agent reset --activation-key-file F` on the host, \
                     then activate it again with that key",
                )
                .into()),
                Some((ahead, _)) => {
                    let now = Utc::now();
                    Err(UserError::failure(format!(
                        "{}; the last poll found this manager's clock {} its agents'",
                        hosts::describe_problem(&whose, "this manager's clock", &problem),
                        hosts::clock_offset(now, now - ahead)
                    ))
                    .with_hint(
                        "set this manager's clock right (`timedatectl status`, NTP), then run \
                         the same command again",
                    )
                    .into())
                }
            }
        }
        // Issued by another manager's CA: that agent answers only its manager (mutual TLS).
        Err(IssueProblem::NotIssued) if !self_signed(&presented) => {
            let issuer = presented
                .issuer_name()
                .entries_by_nid(openssl::nid::Nid::COMMONNAME)
                .next()
                .and_then(|e| e.data().to_string().ok())
                .unwrap_or_else(|| "an unknown CA".into());
            Err(UserError::failure(format!(
                "agent `{address}` is already activated by another manager: its certificate \
                 was issued by `{issuer}`, not by this manager's CA"
            ))
            .with_hint("run `pm-agent reset` on the host first, then activate it again")
            .into())
        }
        Err(IssueProblem::NotIssued) => activate_new(run, reached),
    }
}

/// Activates an agent that presents its self-signed certificate: the key protocol.
fn activate_new(run: Run<'_>, reached: Reached) -> anyhow::Result<HostReport> {
    let Reached {
        socket,
        address,
        presented,
    } = reached;
    let presented = &presented;
    let Some(key) = &run.context.key else {
        return Err(UserError::usage(format!(
            "agent `{address}` is not activated by this manager: --key-file is needed"
        ))
        .with_hint("create a key with `pm-activate key new --out FILE` and give it to the agent")
        .into());
    };
    let record = check_key(key, &run.context.keys, Utc::now()).map_err(key_error)?;
    if let Some(name) = &run.args.name {
        hosts::check_name_free(
            &run.context.hosts,
            name,
            NameUse::Activate { address: &address },
        )?;
        hosts::check_address_free(&run.context.hosts, &address, name)?;
    }
    let dist_url = dist_url(run.home, run.args.dist_url.as_deref())?;
    let pin = tls::fingerprint(presented);
    let started = Utc::now();
    if run.global.dry_run {
        // Key, agent and dist URL are fine; the agent is not told anything. It would be
        // activated: changed (what Ansible's check mode reports).
        return Ok(HostReport {
            changed: true,
            action: "dry-run",
            host: run.args.name.clone().unwrap_or_default(),
            address,
            group: run.args.group.clone().unwrap_or_else(|| "default".into()),
            profile: run.args.profile.clone().unwrap_or_else(|| "default".into()),
            labels: run.context.labels.clone(),
            certificate_serial: None,
            certificate_fingerprint: Some(pin),
            certificate_expires_at: None,
            agent_version: None,
            engine: None,
            note: None,
            steps: Vec::new(),
        });
    }

    // Step 1: challenge, over the pinned certificate.
    let pinned = tls::client_builder(None, Some(&pin), None)
        .and_then(|b| {
            b.timeout(run.args.timeout)
                .connect_timeout(run.args.timeout)
                .build()
                .context("cannot build the TLS client")
        })
        .map_err(|err| UserError::failure(format!("{err:#}")))?;
    let manager_nonce = proto::nonce();
    let ca = &run.context.ca;
    let ca_fingerprint =
        cert_fingerprint(ca.certificate()).map_err(|err| UserError::failure(err.to_string()))?;
    let (challenge, agent_time): (proto::ChallengeResponse, _) =
        run.runtime.block_on(post_json_dated(
            &pinned,
            &address,
            proto::CHALLENGE_PATH,
            &proto::ChallengeRequest {
                manager_nonce: manager_nonce.clone(),
                manager_ca_fingerprint: ca_fingerprint,
            },
        ))?;
    let expected = proto::agent_proof(key, &pin, &manager_nonce, &challenge.agent_nonce);
    if !proto::proofs_equal(&expected, &challenge.agent_proof) {
        return Err(UserError::failure(format!(
            "wrong activation key: the agent at `{address}` holds a different key"
        ))
        .with_hint(
            "use the key file the agent was initialised with, or give it a new key \
             (`pm-activate key new --out FILE`, then `pm-agent init --activation-key-file FILE`)",
        )
        .into());
    }
    // Both clocks are known now: certificates work up to an hour apart, not beyond.
    if let Some(agent_time) = agent_time {
        let now = Utc::now();
        if (agent_time - now).abs() > hosts::MAX_CLOCK_SKEW {
            return Err(UserError::failure(format!(
                "the clock of agent `{address}` reads {}, {} this manager's ({}): certificates \
                 would not be valid on both sides",
                hosts::at(agent_time),
                hosts::clock_offset(agent_time, now),
                hosts::at(now)
            ))
            .with_hint(
                "set the host's clock right (NTP, chrony; or this manager's if it is the wrong \
                 one), then run the same command again: no key use was taken",
            )
            .into());
        }
    }
    // The host this manager knew at this address, back after a wipe or a reset (a new CA):
    // names are the manager's, so it keeps the name it had even if the agent's own differs.
    let returning = run
        .context
        .hosts
        .iter()
        .find(|h| h.state == "active" && h.address == address);
    let host_name = match (&run.args.name, returning) {
        (Some(name), _) => name.clone(),
        (None, Some(host)) => host.host.clone(),
        (None, None) => {
            hosts::check_name("the agent's host name", &challenge.host_name).map_err(|err| {
                UserError::usage(err.message).with_hint("give the host a name with --name")
            })?;
            challenge.host_name.clone()
        }
    };
    hosts::check_name_free(
        &run.context.hosts,
        &host_name,
        NameUse::Activate { address: &address },
    )
    .map_err(|err| match &run.args.name {
        Some(_) => err,
        // The name came from the agent, not from the operator: the command itself was fine.
        None => UserError::failure(format!(
            "{}; agent `{address}` reports that name",
            err.message
        ))
        .with_hint(format!(
            "give this one another name with --name, or `pm-activate deactivate {host_name}` \
             first if that host is gone for good"
        )),
    })?;
    let (ips, dns) = hosts::reach_names(&address, Some(socket.ip()));
    let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
    let certificate = ca
        .sign_agent_csr_with(challenge.csr_pem.as_bytes(), &host_name, &ips, &dns)
        .map_err(|err| {
            UserError::failure(format!(
                "cannot issue a certificate for agent `{address}` as `{host_name}`: {err}"
            ))
            .with_hint("give the host a valid name with --name")
        })?;
    let serial = serial_hex(&certificate).map_err(|e| UserError::failure(e.to_string()))?;
    let fingerprint = tls::fingerprint(&certificate);
    let issued = HostCertificate::of(&certificate);

    // One use of the key, atomically: a replay or a concurrent activation is refused here,
    // before the agent is told anything.
    {
        let _turn = inventory_turn();
        let inventory =
            Inventory::open(run.home, run.global.lock_timeout).map_err(inventory_error)?;
        if !inventory
            .use_activation_key(&record.id)
            .map_err(inventory_error)?
        {
            return Err(UserError::failure(format!(
                "activation key `{}` was already used, expired or revoked",
                record.id
            ))
            .with_hint("create a new key with `pm-activate key new --out FILE`")
            .into());
        }
    }

    // Step 2: complete.
    let manifest_key = crate::pki::SigningKey::load_or_create(run.home)
        .and_then(|k| k.public_key_pem())
        .map_err(|err| UserError::failure(format!("manifest signing key: {err}")))?;
    let request = proto::ActivateRequest {
        agent_nonce: challenge.agent_nonce.clone(),
        manager_proof: proto::manager_proof(key, &pin, &challenge.agent_nonce, &manager_nonce),
        ca_pem: String::from_utf8_lossy(
            &ca.certificate_pem()
                .map_err(|e| UserError::failure(e.to_string()))?,
        )
        .into_owned(),
        agent_certificate_pem: String::from_utf8_lossy(
            &certificate
                .to_pem()
                .map_err(|e| UserError::failure(e.to_string()))?,
        )
        .into_owned(),
        manifest_key_pem: String::from_utf8_lossy(&manifest_key).into_owned(),
        dist_url,
        host_name: host_name.clone(),
    };
    let completed: proto::ActivateResponse =
        run.runtime
            .block_on(post_json(&pinned, &address, proto::ACTIVATE_PATH, &request))?;
    if !completed.certificate_serial.eq_ignore_ascii_case(&serial) {
        tracing::warn!(
            expected = %serial,
            reported = %completed.certificate_serial,
            "the agent reports another certificate serial than the one issued"
        );
    }
    tracing::info!(host = %host_name, %address, key = %record.id, "agent activated");

    // From now on: mutual TLS, checked the way pm-poll checks it.
    let mut steps = vec![Step::ok("activate")];
    let mutual = mutual_client(ca, &run.context.identity, Trust::AsPoll, run.args.timeout)?;
    let status = run
        .runtime
        .block_on(verify_status(&mutual, &address, ca, &fingerprint));
    let (agent_version, engine) = match &status {
        Ok(status) => {
            steps.push(Step::ok("verify"));
            (status.agent_version.clone(), status.engine.clone())
        }
        Err(err) => {
            steps.push(Step::failed("verify", err.to_string()));
            (challenge.agent_version.clone(), challenge.engine.clone())
        }
    };
    // The same host back (its state wiped, or reset): what the operator set before stays
    // unless the flags change it.
    let earlier = run.context.hosts.iter().find(|h| h.host == host_name);
    let plan = run.context.plan(run.home, run.args, earlier)?;
    let setup = run.runtime.block_on(setup::apply(&mutual, &address, &plan));
    steps.extend(setup.steps.iter().cloned());
    let group = plan.group.clone();
    let profile = plan.profile.name.clone();
    let mut labels: BTreeMap<String, String> = earlier
        .map(|h| serde_json::from_str(&h.labels).unwrap_or_default())
        .unwrap_or_default();
    labels.extend(run.context.labels.clone());
    let note = earlier.map(|earlier| {
        let mut kept = Vec::new();
        if run.args.group.is_none() {
            kept.push(format!("group {}", earlier.group));
        }
        if run.args.profile.is_none() {
            kept.push(format!("profile {}", earlier.profile));
        }
        if labels.keys().any(|k| !run.context.labels.contains_key(k)) {
            kept.push(format!("labels {}", label_text(&labels)));
        }
        if kept.is_empty() {
            "activated again under its earlier name".to_string()
        } else {
            format!("{} kept from its earlier activation", kept.join(", "))
        }
    });
    let host = HostRecord {
        host: host_name.clone(),
        address: address.clone(),
        group: group.clone(),
        profile: profile.clone(),
        labels: serde_json::to_string(&labels).expect("a map of strings"),
        certificate_serial: Some(serial.clone()),
        certificate_fingerprint: Some(fingerprint.clone()),
        certificate_expires_at: Some(issued.expires_at),
        agent_version: Some(agent_version.clone()),
        engine: Some(engine.clone()),
        activated_at: Some(Utc::now()),
        activation_key_id: Some(record.id.clone()),
        state: "active".into(),
        deactivated_at: None,
        setup_failed: setup.failed(),
        license_sha256: setup.license_sha256.clone(),
    };
    steps.extend(labels_step(&labels));
    let failed = steps.iter().any(|s| !s.ok);
    let turn = inventory_turn();
    let inventory = Inventory::open(run.home, run.global.lock_timeout).map_err(inventory_error)?;
    let taken = inventory
        .transaction(|inv| {
            // Another activation (another agent of the same --targets file, another run) may
            // have taken the name since it was checked.
            let now = inv.hosts()?;
            if let Err(err) =
                hosts::check_name_free(&now, &host_name, NameUse::Activate { address: &address })
            {
                return Ok(Some(err));
            }
            // A host activated again under the same name gets a new certificate; the old one
            // is done.
            if let Some(old) = now
                .iter()
                .find(|h| h.host == host_name)
                .and_then(|h| h.certificate_serial.clone())
                .filter(|old| *old != serial)
            {
                inv.revoke_certificate(&old, &host_name, "replaced by a new activation")?;
            }
            inv.upsert_host(&host)?;
            // A new agent state holds only what this activation sent it.
            if let Some(sent) = setup.hold_sent {
                inv.set_hold_on_agent(&host_name, sent)?;
            }
            inv.insert_job(
                "activate",
                started,
                if failed { "partial" } else { "ok" },
                &format!("activated {host_name} at {address} with key {}", record.id),
            )?;
            Ok(None)
        })
        .map_err(inventory_error)?;
    drop(inventory);
    drop(turn);
    if let Some(err) = taken {
        return Err(err
            .with_hint(format!(
                "the agent at `{address}` was told it is `{host_name}`; run `pm-agent reset` on \
                 it and activate it again with another --name"
            ))
            .into());
    }
    Ok(HostReport {
        changed: true,
        action: "activated",
        host: host_name,
        address,
        group,
        profile,
        labels,
        certificate_serial: Some(serial),
        certificate_fingerprint: Some(fingerprint),
        certificate_expires_at: Some(issued.expires_at),
        agent_version: Some(agent_version),
        engine: Some(engine),
        note,
        steps,
    })
}

/// `k=v, k2=v2`.
fn label_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Labels are the manager's own (target selection): recorded with the host, not sent.
fn labels_step(labels: &BTreeMap<String, String>) -> Option<Step> {
    (!labels.is_empty()).then(|| Step::ok("labels"))
}

/// Asks the agent for its status until it reports being activated by this manager and
/// presents the certificate `fingerprint`.
async fn verify_status(
    client: &reqwest::Client,
    address: &str,
    ca: &ManagerCa,
    fingerprint: &str,
) -> Result<proto::AgentStatus, UserError> {
    let ours = cert_fingerprint(ca.certificate()).map_err(|e| UserError::failure(e.to_string()))?;
    // The agent switches to its new certificate right after answering; give it a moment.
    let mut last = None;
    for attempt in 0..10u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        match get_status(client, address).await {
            Ok((_, presented)) if presented.as_deref() != Some(fingerprint) => {
                last = Some(UserError::failure(format!(
                    "agent `{address}` presents certificate {}, not {fingerprint}",
                    presented.unwrap_or_default()
                )));
            }
            Ok((status, _))
                if status.activated
                    && status.manager_ca_fingerprint.as_deref() == Some(ours.as_str()) =>
            {
                return Ok(status);
            }
            Ok(_) => {
                last = Some(UserError::failure(format!(
                    "agent `{address}` does not report being activated by this manager"
                )));
            }
            Err(err) => last = Some(err),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Whether `cert` is signed by its own key (an agent that no manager activated yet).
fn self_signed(cert: &X509) -> bool {
    cert.public_key()
        .and_then(|key| cert.verify(&key))
        .unwrap_or(false)
}

fn dist_url(home: &Path, flag: Option<&str>) -> Result<String, UserError> {
    if let Some(url) = flag {
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| UserError::usage(format!("--dist-url `{url}` is not a URL ({err})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(UserError::usage(format!(
                "--dist-url `{url}` must be an http:// or https:// URL"
            )));
        }
        return Ok(url.trim_end_matches('/').to_string());
    }
    let path = home.join("pm.toml");
    let configured = if path.exists() {
        crate::config::Config::load(&path)
            .map_err(|err| UserError::usage(err.to_string()))?
            .serve
            .url
    } else {
        None
    };
    configured
        .map(|url| url.trim_end_matches('/').to_string())
        .ok_or_else(|| {
            UserError::usage("no dist URL to give the agent").with_hint(format!(
                "pass --dist-url http://MANAGER:PORT or set `[serve] url = \"...\"` in `{}`",
                path.display()
            ))
        })
}

/// Why a host's certificate is re-issued when its setup is re-applied, and what the old
/// serial is recorded as (`revoked_certificates.reason`).
fn reissue_reason(
    presented: &X509,
    address: &str,
    host_name: &str,
    outside: Option<(&'static str, &'static str)>,
) -> Option<(&'static str, &'static str)> {
    let (not_before, not_after) = crate::pki::ca::validity(presented);
    if !crate::pki::ca::names_host(presented, hosts::address_host(address)) {
        Some(("for its new address", "re-issued for a new address"))
    } else if crate::pki::ca::common_name(presented).as_deref() != Some(host_name) {
        Some(("for its new name", "re-issued for a new name"))
    } else if outside.is_some() {
        outside
    } else if hosts::renewal_due(not_before, not_after, Utc::now()) {
        Some(("before it expires", "renewed"))
    } else {
        None
    }
}

/// Re-applies group, profile and labels to a host this manager already activated; renames it
/// (its history moves with it) and re-issues its certificate when the address, the name or its
/// age asks for it, and verifies the way `pm-poll` will reach it.
fn reapply(
    run: Run<'_>,
    reached: &Reached,
    outside: Option<(&'static str, &'static str)>,
) -> anyhow::Result<HostReport> {
    let (socket, address, presented) =
        (reached.socket, reached.address.as_str(), &reached.presented);
    let fingerprint = tls::fingerprint(presented);
    let old_serial = serial_hex(presented).unwrap_or_default();
    let started = Utc::now();
    let known = hosts::find_by_certificate(&run.context.hosts, presented);
    let host_name = run
        .args
        .name
        .clone()
        .or_else(|| known.map(|h| h.host.clone()))
        .or_else(|| crate::pki::ca::common_name(presented))
        .unwrap_or_else(|| hosts::address_host(address).to_string());
    let renamed_from = known
        .map(|h| h.host.clone())
        .filter(|old| *old != host_name);
    match (known, &renamed_from) {
        (Some(_), Some(old)) => hosts::check_name_free(
            &run.context.hosts,
            &host_name,
            NameUse::Rename { from: old },
        )?,
        (None, _) => {
            hosts::check_name("the host's name", &host_name)?;
            hosts::check_name_free(
                &run.context.hosts,
                &host_name,
                NameUse::Activate { address },
            )?
        }
        (Some(_), None) => {}
    }
    if let Some(old) = &renamed_from {
        let inventory = Inventory::open_read_only(run.home, run.global.lock_timeout)
            .map_err(inventory_error)?;
        if let Some(inventory) = inventory
            && let Some(err) =
                rollout_running(run.home, &inventory, old).map_err(inventory_error)?
        {
            return Err(err.into());
        }
    }
    hosts::check_address_free(
        &run.context.hosts,
        address,
        known.map_or(&host_name, |h| &h.host),
    )?;
    let mut steps = Vec::new();
    let mut reissued = None;
    let reason = reissue_reason(presented, address, &host_name, outside);
    if let Some((why, _)) = reason {
        if run.global.dry_run {
            steps.push(Step::skipped(
                "certificate",
                format!("dry run: would re-issue it {why}"),
            ));
        } else {
            let trust = if outside.is_some() {
                Trust::PinnedExpired(&fingerprint)
            } else {
                Trust::Pinned(&fingerprint)
            };
            let pinned = mutual_client(
                &run.context.ca,
                &run.context.identity,
                trust,
                run.args.timeout,
            )?;
            let cert = run
                .runtime
                .block_on(renew::reissue(
                    &pinned,
                    address,
                    &host_name,
                    &run.context.ca,
                    Some(socket.ip()),
                ))
                .map_err(|err| UserError::failure(err.to_string()).with_hint(err.hint()))?;
            steps.push(Step::ok("certificate").with_note(format!(
                "re-issued {why}: serial {}, valid until {}; serial {old_serial} retired",
                serial_hex(&cert).unwrap_or_default(),
                hosts::at(crate::pki::ca::validity(&cert).1)
            )));
            reissued = Some(cert);
        }
    }
    let current = reissued.as_ref().unwrap_or(presented);
    let certificate = HostCertificate::of(current);
    // Verified the way the poll timer will reach it (CA and the address's name, no pin); a dry
    // run changed nothing yet, so it checks the certificate as it is.
    let trust = if run.global.dry_run {
        Trust::Pinned(&fingerprint)
    } else {
        Trust::AsPoll
    };
    let mutual = mutual_client(
        &run.context.ca,
        &run.context.identity,
        trust,
        run.args.timeout,
    )?;
    let status = run.runtime.block_on(verify_status(
        &mutual,
        address,
        &run.context.ca,
        &certificate.fingerprint,
    ));
    match &status {
        Ok(_) => steps.push(Step::ok("verify")),
        Err(err) => steps.push(Step::failed("verify", err.to_string())),
    }
    let mut host = known.cloned().unwrap_or_else(|| HostRecord {
        certificate_serial: Some(old_serial.clone()),
        certificate_fingerprint: Some(fingerprint.clone()),
        ..HostRecord::active(&host_name, address)
    });
    let before = host.clone();
    host.host = host_name.clone();
    host.address = address.to_string();
    if reissued.is_some() || host.certificate_expires_at.is_none() {
        host.certificate_serial = Some(certificate.serial.clone());
        host.certificate_fingerprint = Some(certificate.fingerprint.clone());
        host.certificate_expires_at = Some(certificate.expires_at);
    }
    let plan = run.context.plan(run.home, run.args, known)?;
    host.group = plan.group.clone();
    host.profile = plan.profile.name.clone();
    let setup = if run.global.dry_run {
        None
    } else {
        Some(run.runtime.block_on(setup::apply(&mutual, address, &plan)))
    };
    if let Some(setup) = &setup {
        steps.extend(setup.steps.iter().cloned());
        host.setup_failed = setup.failed();
        if setup.license_sha256.is_some() {
            host.license_sha256 = setup.license_sha256.clone();
        }
    }
    let mut merged: BTreeMap<String, String> =
        serde_json::from_str(&host.labels).unwrap_or_default();
    merged.extend(run.context.labels.clone());
    host.labels = serde_json::to_string(&merged).expect("a map of strings");
    if let Ok(status) = &status {
        host.agent_version = Some(status.agent_version.clone());
        host.engine = Some(status.engine.clone());
    }
    steps.extend(labels_step(&merged));
    let failed = steps.iter().any(|s| !s.ok);
    let hold_now_on_agent = setup.as_ref().is_some_and(|s| s.hold_sent == Some(true))
        && known
            .and_then(|h| run.context.holds.get(&h.host))
            .is_some_and(|hold| !hold.on_agent);
    let agent_changed = setup.as_ref().is_some_and(|s| s.changed) || hold_now_on_agent;
    let changed = host != before || known.is_none() || agent_changed;
    let note = renamed_from
        .as_ref()
        .map(|old| format!("renamed from {old}: its history moved with it"));
    if changed && !run.global.dry_run {
        let mut summary = format!("re-applied setup of {} at {address}", host.host);
        if let Some(note) = &note {
            summary.push_str(&format!("; {note}"));
        }
        if let (Some(cert), Some((why, _))) = (&reissued, reason) {
            summary.push_str(&format!(
                "; certificate re-issued {why} (serial {}, serial {old_serial} retired)",
                serial_hex(cert).unwrap_or_default()
            ));
        }
        let _turn = inventory_turn();
        let inventory =
            Inventory::open(run.home, run.global.lock_timeout).map_err(inventory_error)?;
        let taken = inventory
            .transaction(|inv| {
                match &renamed_from {
                    Some(old) => {
                        // The host's row under its old name first (with the certificate the
                        // agent has now, whatever follows), then it and every row of its
                        // history move to the new name.
                        let mut stay = host.clone();
                        stay.host = old.clone();
                        inv.upsert_host(&stay)?;
                        // A rollout may have started since the check above.
                        if let Some(err) = rollout_running(run.home, inv, old)? {
                            return Ok(Some(err));
                        }
                        if let Err(tables) = inv.rename_host(old, &host.host)? {
                            return Ok(Some(
                                UserError::usage(format!(
                                    "the name `{}` has rows in the inventory ({}): a rename \
                                     never mixes two hosts' histories",
                                    host.host,
                                    tables.join(", ")
                                ))
                                .with_hint(format!(
                                    "the host keeps its name `{old}`; pick a name no host has \
                                     had (`pm-activate list`)"
                                )),
                            ));
                        }
                    }
                    None => inv.upsert_host(&host)?,
                }
                if let (Some(_), Some((_, recorded_as))) = (&reissued, reason) {
                    inv.revoke_certificate(&old_serial, &host.host, recorded_as)?;
                }
                if hold_now_on_agent {
                    inv.set_hold_on_agent(&host.host, true)?;
                }
                inv.insert_job(
                    "activate",
                    started,
                    if failed { "partial" } else { "ok" },
                    &summary,
                )?;
                Ok(None)
            })
            .map_err(inventory_error)?;
        if let Some(err) = taken {
            if reissued.is_some() {
                tracing::warn!(
                    host = %host.host,
                    "the agent already has a certificate for the new name, recorded under its \
                     old one: the next poll gives it back one for the old name"
                );
            }
            return Err(err.into());
        }
    }
    Ok(HostReport {
        changed,
        action: "reapplied",
        host: host.host.clone(),
        address: address.to_string(),
        group: host.group.clone(),
        profile: host.profile.clone(),
        labels: merged,
        certificate_serial: Some(certificate.serial),
        certificate_fingerprint: Some(certificate.fingerprint),
        certificate_expires_at: Some(certificate.expires_at),
        agent_version: host.agent_version.clone(),
        engine: host.engine.clone(),
        note,
        steps,
    })
}

/// Refuses renaming `host` while a rollout that includes it runs: its process would go on
/// recording the host under the old name, splitting its history (a failure, exit 1; nothing
/// changed). A rollout recorded as running whose process is gone is not in the way.
fn rollout_running(
    home: &Path,
    inventory: &Inventory,
    host: &str,
) -> Result<Option<UserError>, crate::inventory::InventoryError> {
    let running = inventory.running_rollouts_of(host)?;
    let Some((job, kind, pid)) = running
        .into_iter()
        .find(|(_, _, pid)| crate::push::rollout_process_alive(home, *pid))
    else {
        return Ok(None);
    };
    let tool = if kind == "rollback" {
        "pm-rollback"
    } else {
        "pm-push update"
    };
    let pid = pid.unwrap_or_default();
    Ok(Some(
        UserError::failure(format!(
            "host `{host}` is in rollout job {job} (`{tool}`, pid {pid}), which is still \
             running: a rename now would split its history between two names"
        ))
        .with_hint(format!(
            "run the same command again once it ended (`pm-push status {job}`); to rename now, \
             stop it first (`kill -INT {pid}`), rename, then {}",
            if kind == "rollback" {
                "run the same `pm-rollback` again".to_string()
            } else {
                format!("`pm-push resume {job}`")
            }
        )),
    ))
}

fn print_host_report(global: &GlobalArgs, report: &HostReport) -> anyhow::Result<ExitStatus> {
    let failed: Vec<&Step> = report.steps.iter().filter(|s| !s.ok).collect();
    if global.json {
        cli::print_json(report)?;
    } else {
        let verb = if report.action == "activated" {
            "activated"
        } else if report.action == "dry-run" {
            "dry run: would activate"
        } else if report.changed {
            "updated"
        } else {
            "already activated, nothing to change:"
        };
        cli::print_text(format!(
            "{verb} {} at {} (group {}, profile {}, certificate serial {}{})",
            report.host,
            report.address,
            report.group,
            report.profile,
            report.certificate_serial.as_deref().unwrap_or("?"),
            report
                .certificate_expires_at
                .map(|at| format!(", valid until {}", hosts::at(at)))
                .unwrap_or_default()
        ))?;
        if let Some(note) = &report.note {
            cli::print_text(note)?;
        }
        let mut table = cli::table(&["step", "result"]);
        for step in &report.steps {
            table.add_row(vec![
                step.name.clone(),
                match (&step.error, &step.note, &step.skipped) {
                    (Some(error), _, _) => format!("failed: {error}"),
                    (None, Some(note), _) => format!("ok: {note}"),
                    (None, None, Some(why)) => format!("skipped: {why}"),
                    (None, None, None) => "ok".to_string(),
                },
            ]);
        }
        cli::print_text(table)?;
    }
    if failed.is_empty() {
        return Ok(ExitStatus::Success);
    }
    for step in &failed {
        eprintln!(
            "error: step `{}` failed for {}: {}",
            step.name,
            report.host,
            step.error.as_deref().unwrap_or("?")
        );
    }
    eprintln!(
        "hint: fix the cause and run the same `pm-activate host {}` again: only the setup steps \
         are re-applied",
        report.address
    );
    Ok(ExitStatus::Partial)
}

/// `pm-activate deactivate HOST`.
pub fn deactivate(home: &Path, global: &GlobalArgs, name: &str) -> anyhow::Result<ExitStatus> {
    let hosts =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory.hosts().map_err(inventory_error)?,
            None => Vec::new(),
        };
    let Some(host) = hosts
        .iter()
        .find(|h| h.host == name)
        .or_else(|| hosts.iter().find(|h| h.address == name))
        .cloned()
    else {
        return Err(
            UserError::usage(format!("no host `{name}` in the inventory"))
                .with_hint("see `pm-activate list`")
                .into(),
        );
    };
    if host.state == "deactivated" {
        if global.json {
            cli::print_json(&serde_json::json!({
                "changed": false, "host": host.host, "address": host.address,
                "state": host.state, "certificate_serial": host.certificate_serial,
            }))?;
        } else {
            cli::print_text(format!("{} is already deactivated", host.host))?;
        }
        return Ok(ExitStatus::Success);
    }
    if global.dry_run {
        if global.json {
            cli::print_json(&serde_json::json!({
                "changed": true, "dry_run": true, "host": host.host, "address": host.address,
                "state": host.state,
            }))?;
        } else {
            cli::print_text(format!("dry run: would deactivate {}", host.host))?;
        }
        return Ok(ExitStatus::Success);
    }
    let started = Utc::now();
    let (ca, identity) = manager_pki(home)?;
    let trust = host
        .certificate_fingerprint
        .as_deref()
        .map_or(Trust::AsPoll, Trust::Pinned);
    let client = mutual_client(&ca, &identity, trust, Duration::from_secs(10))?;
    let runtime = runtime()?;
    let told = runtime.block_on(async {
        let response = client
            .post(format!(
                "https://{}{}",
                host.address,
                proto::DEACTIVATE_PATH
            ))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body("{}")
            .send()
            .await
            .map_err(|err| request_error(&host.address, err))?;
        let status = response.status();
        let body = proto::read_body(response, proto::MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            Err(agent_refusal(&host.address, status, &body))
        }
    });
    let serial = host.certificate_serial.clone().unwrap_or_default();
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    inventory
        .transaction(|inv| {
            inv.deactivate_host(&host.host, "deactivated")?;
            inv.insert_job(
                "deactivate",
                started,
                if told.is_ok() { "ok" } else { "partial" },
                &format!(
                    "deactivated {} at {}; certificate serial {serial} revoked",
                    host.host, host.address
                ),
            )
            .map(|_| ())
        })
        .map_err(inventory_error)?;
    drop(inventory);
    tracing::info!(host = %host.host, %serial, "host deactivated, certificate revoked");
    if global.json {
        cli::print_json(&serde_json::json!({
            "changed": true, "host": host.host, "address": host.address,
            "state": "deactivated", "certificate_serial": serial,
            "agent_forgot": told.is_ok(),
            "error": told.as_ref().err().map(|e| e.to_string()),
        }))?;
    } else {
        cli::print_text(format!(
            "deactivated {} ({}); certificate serial {serial} is revoked",
            host.host, host.address
        ))?;
    }
    match told {
        Ok(()) => Ok(ExitStatus::Success),
        Err(err) => {
            eprintln!(
                "warning: the agent was not told to forget this manager: {}",
                err.message
            );
            eprintln!(
                "hint: run `pm-agent reset` on {} when it is back; its certificate is refused \
                 from now on",
                host.host
            );
            Ok(ExitStatus::Partial)
        }
    }
}

/// `pm-activate list`.
pub fn list(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let hosts =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory.hosts().map_err(inventory_error)?,
            None => Vec::new(),
        };
    if global.json {
        let hosts: Vec<_> = hosts
            .iter()
            .map(|h| {
                let labels: serde_json::Value = serde_json::from_str(&h.labels).unwrap_or_default();
                serde_json::json!({
                    "host": h.host, "address": h.address, "group": h.group,
                    "profile": h.profile, "labels": labels, "state": h.state,
                    "activated_at": h.activated_at, "deactivated_at": h.deactivated_at,
                    "agent_version": h.agent_version, "engine": h.engine,
                    "certificate_serial": h.certificate_serial,
                    "certificate_expires_at": h.certificate_expires_at,
                    "setup_failed": h.setup_failed.split(',').filter(|s| !s.is_empty())
                        .collect::<Vec<_>>(),
                    "license_sha256": h.license_sha256,
                })
            })
            .collect();
        cli::print_json(&serde_json::json!({ "changed": false, "hosts": hosts }))?;
        return Ok(ExitStatus::Success);
    }
    let mut table = cli::table(&[
        "host",
        "group",
        "profile",
        "address",
        "state",
        "activated",
        "certificate until",
        "agent",
        "setup",
    ]);
    for host in &hosts {
        table.add_row(vec![
            host.host.clone(),
            host.group.clone(),
            host.profile.clone(),
            host.address.clone(),
            host.state.clone(),
            host.activated_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                .unwrap_or_default(),
            host.certificate_expires_at
                .map(|t| t.format("%Y-%m-%d").to_string())
                .unwrap_or_default(),
            host.agent_version.clone().unwrap_or_default(),
            if host.setup_failed.is_empty() {
                "ok".to_string()
            } else {
                format!("failed: {}", host.setup_failed)
            },
        ]);
    }
    cli::print_text(table)?;
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_value_pairs() {
        let labels = parse_labels(&["site=paris".into(), "rack = 4".into()]).unwrap();
        assert_eq!(labels["site"], "paris");
        assert_eq!(labels["rack"], "4");
        assert!(parse_labels(&["nonsense".into()]).is_err());
        assert!(parse_labels(&["=x".into()]).is_err());
    }

    #[test]
    fn agent_refusals_say_what_to_do() {
        let body = serde_json::to_vec(&proto::ErrorResponse {
            code: "already_activated".into(),
            message: "activated by manager CA sha256:ab".into(),
        })
        .unwrap();
        let error = agent_refusal("10.0.0.1:7505", reqwest::StatusCode::CONFLICT, &body);
        assert!(
            error.message.contains("another manager"),
            "{}",
            error.message
        );
        assert!(error.hint.unwrap().contains("pm-agent reset"));
        let error = agent_refusal("a:1", reqwest::StatusCode::BAD_GATEWAY, b"<html>");
        assert!(error.message.contains("rejected"), "{}", error.message);
    }
}
