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

use std::collections::BTreeMap;
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
use crate::inventory::{HostRecord, Inventory};
use crate::pki::ca::{ManagerCa, cert_fingerprint, serial_hex, verify_issued_by};
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
}

impl Step {
    pub(super) fn ok(name: &str) -> Step {
        Step {
            name: name.into(),
            ok: true,
            error: None,
            skipped: None,
        }
    }

    pub(super) fn failed(name: &str, error: impl Into<String>) -> Step {
        Step {
            name: name.into(),
            ok: false,
            error: Some(error.into()),
            skipped: None,
        }
    }

    pub(super) fn skipped(name: &str, why: impl Into<String>) -> Step {
        Step {
            name: name.into(),
            ok: true,
            error: None,
            skipped: Some(why.into()),
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
    agent_version: Option<String>,
    engine: Option<String>,
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
    let response = client
        .post(format!("https://{address}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).map_err(|e| UserError::failure(e.to_string()))?)
        .send()
        .await
        .map_err(|err| request_error(address, err))?;
    read_answer(address, path, response).await
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

async fn get_status(
    client: &reqwest::Client,
    address: &str,
) -> Result<proto::AgentStatus, UserError> {
    let response = client
        .get(format!("https://{address}{}", proto::STATUS_PATH))
        .send()
        .await
        .map_err(|err| request_error(address, err))?;
    read_answer(address, proto::STATUS_PATH, response).await
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

/// A mutual-TLS client for an agent this manager activated: its chain must verify against the
/// CA and, when known, it must present exactly the certificate the manager issued.
fn mutual_client(
    ca: &ManagerCa,
    identity: &(PKey<Private>, X509),
    pin: Option<&str>,
    timeout: Duration,
) -> Result<reqwest::Client, UserError> {
    tls::client_builder(
        Some(ca.certificate()),
        pin,
        Some((&identity.0, &identity.1)),
    )
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
    if let Some(targets) = &args.targets {
        return activate_many(home, global, &args, targets);
    }
    let address = args
        .address
        .clone()
        .ok_or_else(|| UserError::usage("give the agent's ADDRESS or --targets FILE"))?;
    let report = activate_one(home, global, &args, &address)?;
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

/// `pm-activate host --targets FILE`: every address of the file, concurrently, with a summary.
fn activate_many(
    home: &Path,
    global: &GlobalArgs,
    args: &HostArgs,
    targets: &Path,
) -> anyhow::Result<ExitStatus> {
    if args.name.is_some() {
        return Err(UserError::usage("--name names one host: it cannot go with --targets").into());
    }
    // The same reader as every other --targets (BOM, quotes, `host,wave`): the first column.
    let mut addresses: Vec<String> = Vec::new();
    for listed in crate::targets::read_targets_file(targets)? {
        if !addresses.contains(&listed.name) {
            addresses.push(listed.name);
        }
    }
    // Create the CA and client certificate once, before the workers race for them.
    manager_pki(home)?;
    let mut outcomes: Vec<(String, Result<HostReport, anyhow::Error>)> = Vec::new();
    for chunk in addresses.chunks(BULK_CONCURRENCY) {
        let results: Vec<_> = std::thread::scope(|scope| {
            let workers: Vec<_> = chunk
                .iter()
                .map(|address| {
                    scope
                        .spawn(move || (address.clone(), activate_one(home, global, args, address)))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("an activation worker panicked"))
                .collect()
        });
        outcomes.extend(results);
    }
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for (address, outcome) in outcomes {
        match outcome {
            Ok(report) => reports.push(report),
            Err(err) => {
                let hint = err
                    .chain()
                    .find_map(|c| c.downcast_ref::<UserError>())
                    .and_then(|u| u.hint.clone());
                failures.push(serde_json::json!({
                    "address": address, "error": format!("{err:#}"), "hint": hint,
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

/// Activates (or re-applies the setup of) the agent at `address`.
fn activate_one(
    home: &Path,
    global: &GlobalArgs,
    args: &HostArgs,
    address: &str,
) -> anyhow::Result<HostReport> {
    let labels = parse_labels(&args.labels)?;
    if let Some(group) = &args.group {
        check_name("group", group)?;
    }
    if let Some(profile) = &args.profile {
        check_name("profile", profile)?;
    }
    let key = args.key_file.as_deref().map(read_key_file).transpose()?;
    if let Some(key) = &key {
        super::parse_key(key).map_err(key_error)?;
    }
    // What the inventory knows: keys, hosts, profiles, licenses (read-only, closed right away).
    let (keys, hosts, profiles, licenses) = {
        let _turn = inventory_turn();
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => (
                inventory.activation_keys().map_err(inventory_error)?,
                inventory.hosts().map_err(inventory_error)?,
                inventory.profiles().map_err(inventory_error)?,
                inventory.licenses().map_err(inventory_error)?,
            ),
            None => (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        }
    };
    // A host already known keeps its group and profile unless the flags change them.
    let plan_for = |known: Option<&HostRecord>| {
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
        SetupPlan::load(home, &profiles, &licenses, &group, &profile)
    };
    // Refuse an unknown profile before the agent is contacted (or a key use is taken).
    plan_for(None)?;
    let runtime = runtime()?;
    let (socket, address) = runtime.block_on(resolve(address))?;
    let presented = runtime
        .block_on(tls::fetch_server_certificate(socket, args.timeout))
        .map_err(|err| unreachable(&address, &err));
    let (ca, identity) = manager_pki(home)?;
    let presented = match presented {
        Ok(cert) => cert,
        Err(unreachable) => {
            // A bad key is the first thing to fix, even when the agent is also down.
            if let Some(key) = &key {
                check_key(key, &keys, Utc::now()).map_err(key_error)?;
            }
            return Err(unreachable.into());
        }
    };
    let presented_serial = serial_hex(&presented).unwrap_or_default();
    if verify_issued_by(&presented, ca.certificate()) {
        // Activated by this manager already.
        if let Some(host) = revoked_host(home, global, &presented_serial)? {
            return Err(UserError::failure(format!(
                "certificate serial {presented_serial} of {host} was revoked: agent `{address}` \
                 is not accepted again"
            ))
            .with_hint("run `pm-agent reset` on the host, then activate it again with a new key")
            .into());
        }
        return reapply(
            home, global, args, &runtime, &address, &ca, &identity, &presented, &hosts, labels,
            &plan_for,
        );
    }
    if !self_signed(&presented) {
        // Issued by another manager's CA: that agent answers only its manager (mutual TLS).
        let issuer = presented
            .issuer_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
            .unwrap_or_else(|| "an unknown CA".into());
        return Err(UserError::failure(format!(
            "agent `{address}` is already activated by another manager (its certificate was              issued by `{issuer}`, not by this manager's CA)"
        ))
        .with_hint("run `pm-agent reset` on the host first, then activate it again")
        .into());
    }
    let Some(key) = key else {
        return Err(UserError::usage(format!(
            "agent `{address}` is not activated by this manager: --key-file is needed"
        ))
        .with_hint("create a key with `pm-activate key new --out FILE` and give it to the agent")
        .into());
    };
    let record = check_key(&key, &keys, Utc::now()).map_err(key_error)?;
    let dist_url = dist_url(home, args.dist_url.as_deref())?;
    let pin = tls::fingerprint(&presented);
    let started = Utc::now();
    if global.dry_run {
        // Key, agent and dist URL are fine; the agent is not told anything. It would be
        // activated: changed (what Ansible's check mode reports).
        return Ok(HostReport {
            changed: true,
            action: "dry-run",
            host: args.name.clone().unwrap_or_default(),
            address,
            group: args.group.clone().unwrap_or_else(|| "default".into()),
            profile: args.profile.clone().unwrap_or_else(|| "default".into()),
            labels,
            certificate_serial: None,
            certificate_fingerprint: Some(pin),
            agent_version: None,
            engine: None,
            steps: Vec::new(),
        });
    }

    // Step 1: challenge, over the pinned certificate.
    let pinned = tls::client_builder(None, Some(&pin), None)
        .and_then(|b| {
            b.timeout(args.timeout)
                .connect_timeout(args.timeout)
                .build()
                .context("cannot build the TLS client")
        })
        .map_err(|err| UserError::failure(format!("{err:#}")))?;
    let manager_nonce = proto::nonce();
    let ca_fingerprint =
        cert_fingerprint(ca.certificate()).map_err(|err| UserError::failure(err.to_string()))?;
    let challenge: proto::ChallengeResponse = runtime.block_on(post_json(
        &pinned,
        &address,
        proto::CHALLENGE_PATH,
        &proto::ChallengeRequest {
            manager_nonce: manager_nonce.clone(),
            manager_ca_fingerprint: ca_fingerprint,
        },
    ))?;
    let expected = proto::agent_proof(&key, &pin, &manager_nonce, &challenge.agent_nonce);
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
    let host_name = args
        .name
        .clone()
        .unwrap_or_else(|| challenge.host_name.clone());
    if let Some(other) = hosts
        .iter()
        .find(|h| h.host == host_name && h.state == "active" && h.address != address)
    {
        return Err(UserError::failure(format!(
            "host `{host_name}` is already activated at `{}`; agent `{address}` cannot take its name",
            other.address
        ))
        .with_hint(format!(
            "give this one another name with --name, or `pm-activate deactivate {host_name}` first"
        ))
        .into());
    }
    let certificate = ca
        .sign_agent_csr_for(challenge.csr_pem.as_bytes(), &host_name, &[socket.ip()])
        .map_err(|err| {
            UserError::failure(format!(
                "cannot issue a certificate for agent `{address}` as `{host_name}`: {err}"
            ))
            .with_hint("give the host a valid name with --name")
        })?;
    let serial = serial_hex(&certificate).map_err(|e| UserError::failure(e.to_string()))?;
    let fingerprint = tls::fingerprint(&certificate);

    // One use of the key, atomically: a replay or a concurrent activation is refused here,
    // before the agent is told anything.
    {
        let _turn = inventory_turn();
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
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
    let manifest_key = crate::pki::SigningKey::load_or_create(home)
        .and_then(|k| k.public_key_pem())
        .map_err(|err| UserError::failure(format!("manifest signing key: {err}")))?;
    let request = proto::ActivateRequest {
        agent_nonce: challenge.agent_nonce.clone(),
        manager_proof: proto::manager_proof(&key, &pin, &challenge.agent_nonce, &manager_nonce),
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
        runtime.block_on(post_json(&pinned, &address, proto::ACTIVATE_PATH, &request))?;
    if !completed.certificate_serial.eq_ignore_ascii_case(&serial) {
        tracing::warn!(
            expected = %serial,
            reported = %completed.certificate_serial,
            "the agent reports another certificate serial than the one issued"
        );
    }
    tracing::info!(host = %host_name, %address, key = %record.id, "agent activated");

    // From now on: mutual TLS, the CA and the issued certificate.
    let mut steps = vec![Step::ok("activate")];
    let mutual = mutual_client(&ca, &identity, Some(&fingerprint), args.timeout)?;
    let status = runtime.block_on(verify_status(&mutual, &address, &ca));
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
    let plan = plan_for(None)?;
    let setup = runtime.block_on(setup::apply(&mutual, &address, &plan));
    steps.extend(setup.steps.iter().cloned());
    let group = plan.group.clone();
    let profile = plan.profile.name.clone();
    let host = HostRecord {
        host: host_name.clone(),
        address: address.clone(),
        group: group.clone(),
        profile: profile.clone(),
        labels: serde_json::to_string(&labels).expect("a map of strings"),
        certificate_serial: Some(serial.clone()),
        certificate_fingerprint: Some(fingerprint.clone()),
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
    // A host activated again under the same name gets a new certificate; the old one is done.
    let replaced = hosts
        .iter()
        .find(|h| h.host == host_name)
        .and_then(|h| h.certificate_serial.clone())
        .filter(|old| *old != serial);
    let turn = inventory_turn();
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    inventory
        .transaction(|inv| {
            if let Some(old) = &replaced {
                inv.revoke_certificate(old, &host_name, "replaced by a new activation")?;
            }
            inv.upsert_host(&host)?;
            inv.insert_job(
                "activate",
                started,
                if failed { "partial" } else { "ok" },
                &format!("activated {host_name} at {address} with key {}", record.id),
            )
            .map(|_| ())
        })
        .map_err(inventory_error)?;
    drop(inventory);
    drop(turn);
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
        agent_version: Some(agent_version),
        engine: Some(engine),
        steps,
    })
}

/// Labels are the manager's own (target selection): recorded with the host, not sent.
fn labels_step(labels: &BTreeMap<String, String>) -> Option<Step> {
    (!labels.is_empty()).then(|| Step::ok("labels"))
}

async fn verify_status(
    client: &reqwest::Client,
    address: &str,
    ca: &ManagerCa,
) -> Result<proto::AgentStatus, UserError> {
    let ours = cert_fingerprint(ca.certificate()).map_err(|e| UserError::failure(e.to_string()))?;
    // The agent switches to its new certificate right after answering; give it a moment.
    let mut last = None;
    for attempt in 0..10u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        match get_status(client, address).await {
            Ok(status)
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

fn revoked_host(
    home: &Path,
    global: &GlobalArgs,
    serial: &str,
) -> Result<Option<String>, anyhow::Error> {
    let _turn = inventory_turn();
    match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
        Some(inventory) => Ok(inventory
            .revoked_certificate(serial)
            .map_err(inventory_error)?),
        None => Ok(None),
    }
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

/// Re-applies group, profile and labels to a host this manager already activated.
#[allow(clippy::too_many_arguments)]
fn reapply(
    home: &Path,
    global: &GlobalArgs,
    args: &HostArgs,
    runtime: &tokio::runtime::Runtime,
    address: &str,
    ca: &ManagerCa,
    identity: &(PKey<Private>, X509),
    presented: &X509,
    hosts: &[HostRecord],
    labels: BTreeMap<String, String>,
    plan_for: &dyn Fn(Option<&HostRecord>) -> Result<SetupPlan, UserError>,
) -> anyhow::Result<HostReport> {
    let fingerprint = tls::fingerprint(presented);
    let serial = serial_hex(presented).unwrap_or_default();
    let started = Utc::now();
    let mutual = mutual_client(ca, identity, Some(&fingerprint), args.timeout)?;
    let mut steps = Vec::new();
    let status = runtime.block_on(verify_status(&mutual, address, ca));
    match &status {
        Ok(_) => steps.push(Step::ok("verify")),
        Err(err) => steps.push(Step::failed("verify", err.to_string())),
    }
    let with_serial = |h: &&HostRecord| h.certificate_serial.as_deref() == Some(serial.as_str());
    // A renamed host leaves its old row (deactivated) with the same serial: prefer the live one.
    let known = hosts
        .iter()
        .filter(with_serial)
        .find(|h| h.state == "active")
        .or_else(|| hosts.iter().find(with_serial));
    let host_name = args
        .name
        .clone()
        .or_else(|| known.map(|h| h.host.clone()))
        .or_else(|| status.as_ref().ok().map(|s| s.host_name.clone()))
        .unwrap_or_else(|| address.to_string());
    let mut host = known.cloned().unwrap_or_else(|| HostRecord {
        certificate_serial: Some(serial.clone()),
        certificate_fingerprint: Some(fingerprint.clone()),
        ..HostRecord::active(&host_name, address)
    });
    let before = host.clone();
    host.host = host_name.clone();
    host.address = address.to_string();
    let plan = plan_for(known)?;
    host.group = plan.group.clone();
    host.profile = plan.profile.name.clone();
    let setup = if global.dry_run {
        None
    } else {
        Some(runtime.block_on(setup::apply(&mutual, address, &plan)))
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
    merged.extend(labels);
    host.labels = serde_json::to_string(&merged).expect("a map of strings");
    if let Ok(status) = &status {
        host.agent_version = Some(status.agent_version.clone());
        host.engine = Some(status.engine.clone());
    }
    steps.extend(labels_step(&merged));
    let failed = steps.iter().any(|s| !s.ok);
    let agent_changed = setup.as_ref().is_some_and(|s| s.changed);
    let changed = host != before || known.is_none() || agent_changed;
    if changed && !global.dry_run {
        let _turn = inventory_turn();
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        inventory
            .transaction(|inv| {
                if before.host != host.host && known.is_some() {
                    // Renamed: keep the old row as history.
                    let mut old = before.clone();
                    old.state = "deactivated".into();
                    old.deactivated_at = Some(Utc::now());
                    inv.upsert_host(&old)?;
                }
                inv.upsert_host(&host)?;
                inv.insert_job(
                    "activate",
                    started,
                    if failed { "partial" } else { "ok" },
                    &format!("re-applied setup of {} at {address}", host.host),
                )
                .map(|_| ())
            })
            .map_err(inventory_error)?;
    }
    Ok(HostReport {
        changed,
        action: "reapplied",
        host: host.host.clone(),
        address: address.to_string(),
        group: host.group.clone(),
        profile: host.profile.clone(),
        labels: merged,
        certificate_serial: Some(serial),
        certificate_fingerprint: Some(fingerprint),
        agent_version: host.agent_version.clone(),
        engine: host.engine.clone(),
        steps,
    })
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
            "{verb} {} at {} (group {}, profile {}, certificate serial {})",
            report.host,
            report.address,
            report.group,
            report.profile,
            report.certificate_serial.as_deref().unwrap_or("?")
        ))?;
        let mut table = cli::table(&["step", "result"]);
        for step in &report.steps {
            table.add_row(vec![
                step.name.clone(),
                match &step.error {
                    None => "ok".to_string(),
                    Some(error) => format!("failed: {error}"),
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
    let client = mutual_client(
        &ca,
        &identity,
        host.certificate_fingerprint.as_deref(),
        Duration::from_secs(10),
    )?;
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
