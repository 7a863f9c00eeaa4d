//! `pm-poll`: asks every target agent for its status over mutual TLS and records it.
//!
//! The network part runs first with the inventory closed: at most `concurrency` agents at once,
//! each within `timeout`, the whole poll within `deadline` (agents not done by then are recorded
//! as `deadline`). Then one short transaction records everything (`Inventory::record_polls`), so
//! the inventory is locked for milliseconds. Unreachable hosts are recorded with the error, never
//! dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use futures_util::StreamExt;
use serde::Serialize;

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::config::{Config, PollConfig};
use crate::inventory::{
    FleetRow, Inventory, InventoryError, PollCursors, PollFailure, PolledHost, Pruned,
    RecordedPolls,
};
use crate::pki::ca::ManagerCa;
use crate::proto::{self, ErrorResponse, PollResponse};
use crate::targets::{Target, TargetArgs};
use crate::tls;

/// The largest poll answer read from an agent.
const MAX_ANSWER: usize = proto::MAX_ANSWER_BYTES;

/// `pm-poll` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-poll",
    version,
    about = "Ask agents for their status over mutual TLS and record it in the inventory"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Agents asked at once [default: pm.toml `[poll]` concurrency, else 256]
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// How long one agent may take [default: pm.toml `[poll]` timeout, else 10s]
    #[arg(long, value_parser = cli::parse_nonzero_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// How long the whole poll may take [default: pm.toml `[poll]` deadline, else 5m]
    #[arg(long, value_parser = cli::parse_nonzero_duration, value_name = "DURATION")]
    pub deadline: Option<Duration>,
    /// Poll again every DURATION (default 10s) for a live view; Ctrl-C stops (with --json: one
    /// document per line)
    #[arg(long, value_parser = cli::parse_nonzero_duration, value_name = "DURATION",
          num_args = 0..=1, default_missing_value = "10s")]
    pub watch: Option<Duration>,
    /// With --watch: stop after this many polls
    #[arg(long, requires = "watch")]
    pub count: Option<u64>,
    /// Do not poll: delete polls older than pm.toml `[poll]` keep_polls (30d) or --older-than;
    /// version changes, scans and install runs are kept
    #[arg(long, conflicts_with = "watch")]
    pub prune: bool,
    /// With --prune: the age of the polls to delete
    #[arg(long, requires = "prune", value_parser = cli::parse_duration, value_name = "DURATION")]
    pub older_than: Option<Duration>,
}

/// The clock polls are stamped with: the real one, or shifted to `PM_POLL_NOW` (RFC 3339) so
/// tests can record polls "in the past" and watch hosts turn inactive.
fn clock() -> Result<chrono::Duration, UserError> {
    match std::env::var("PM_POLL_NOW") {
        Ok(text) => DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc) - Utc::now())
            .map_err(|err| {
                UserError::usage(format!(
                    "PM_POLL_NOW `{text}` is not an RFC 3339 time: {err}"
                ))
            }),
        Err(_) => Ok(chrono::Duration::zero()),
    }
}

pub(crate) fn inventory_error(err: InventoryError) -> anyhow::Error {
    let hint = match &err {
        InventoryError::Locked { .. } => Some(
            "nothing was recorded; run pm-poll again when the other writer is done, or raise \
             --lock-timeout",
        ),
        _ => None,
    };
    let error = UserError::failure(err.to_string());
    match hint {
        Some(hint) => error.with_hint(hint).into(),
        None => error.into(),
    }
}

pub(crate) fn load_config(home: &Path) -> Result<PollConfig, UserError> {
    let path = home.join("pm.toml");
    if !path.exists() {
        return Ok(PollConfig::default());
    }
    Config::load(&path)
        .map(|c| c.poll)
        .map_err(|err| UserError::usage(err.to_string()))
}

/// Runs `pm-poll`.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let home = args.global.home();
    // Every poll writes the inventory (and renews certificates): only as the home's owner.
    crate::ownership::check_home(&home, "pm-poll")?;
    let config = load_config(&home)?;
    let keep = Keep::of(&config);
    if args.prune {
        let keep = Keep {
            polls: args.older_than.unwrap_or(config.keep_polls),
            ..keep
        };
        return prune(&home, &args.global, keep);
    }
    let concurrency = args.concurrency.unwrap_or(config.concurrency);
    if !(1..=10_000).contains(&concurrency) {
        return Err(UserError::usage("--concurrency must be 1..=10000").into());
    }
    let settings = Settings {
        concurrency,
        timeout: args.timeout.unwrap_or(config.timeout),
        deadline: args.deadline.unwrap_or(config.deadline),
        inactive_after: config.inactive_after,
        scan_max_age: config.scan_max_age,
        ca: certificate_authority(&home)?,
        registry: None,
    };
    // Thousands of agents at once need thousands of sockets: take the hard limit, like other
    // network daemons do (the soft default is often 1024).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open files limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // One client for every round of --watch: its idle connections are reused, so later rounds
    // skip the TLS handshakes.
    let mut client = None;
    let Some(interval) = args.watch else {
        let outcome = poll_once(&home, &args, &settings, keep, &runtime, &mut client)?;
        return print(&args.global, &outcome, false);
    };
    let mut status;
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        let outcome = poll_once(&home, &args, &settings, keep, &runtime, &mut client)?;
        status = print(&args.global, &outcome, true)?;
        n += 1;
        if args.count.is_some_and(|count| n >= count) {
            break;
        }
        let pause = interval.saturating_sub(started.elapsed());
        let stop = runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                _ = crate::mirror::shutdown_signal() => true,
            }
        });
        if stop {
            break;
        }
    }
    Ok(status)
}

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) timeout: Duration,
    pub(crate) deadline: Duration,
    pub(crate) inactive_after: Duration,
    pub(crate) scan_max_age: Duration,
    /// The manager CA: renews agent certificates that are due ([`crate::hosts::renew`]) and
    /// tells an expired certificate from a stranger's when TLS fails.
    pub(crate) ca: Option<Arc<ManagerCa>>,
    /// The hosts, to check that each answers with its own certificate (`None`: not checked
    /// beyond the client's own check of each connection).
    pub(crate) registry: Option<Arc<crate::hosts::Registry>>,
}

/// The manager CA for [`Settings::ca`].
pub(crate) fn certificate_authority(home: &Path) -> Result<Option<Arc<ManagerCa>>, UserError> {
    ManagerCa::load_or_create(home)
        .map(|ca| Some(Arc::new(ca)))
        .map_err(|err| UserError::failure(format!("manager CA: {err}")))
}

/// What one poll did, for printing.
#[derive(Debug, Serialize)]
struct Outcome {
    changed: bool,
    /// `--dry-run`: the hosts a poll would ask (nothing is asked or recorded).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    would_poll: Vec<String>,
    /// The daily prune, when this poll ran it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pruned: Option<PruneReport>,
    job_id: Option<i64>,
    summary: Summary,
    hosts: Vec<HostLine>,
}

#[derive(Debug, Serialize)]
struct Summary {
    polled: usize,
    ok: usize,
    unreachable: usize,
    changed: usize,
    version_changes: usize,
    new_scans: usize,
    new_findings: usize,
    new_update_runs: usize,
    /// Agent certificates this poll renewed (less than a third of their life was left).
    certificates_renewed: usize,
    duration_seconds: f64,
    network_seconds: f64,
    inventory_write_seconds: f64,
}

#[derive(Debug, Serialize)]
struct HostLine {
    #[serde(flatten)]
    row: FleetRow,
    /// This poll's answer: ok or the failure kind.
    polled: String,
}

fn poll_once(
    home: &Path,
    args: &Args,
    settings: &Settings,
    keep: Keep,
    runtime: &tokio::runtime::Runtime,
    client: &mut Option<(u64, reqwest::Client)>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let shift = clock()?;
    let started_at = Utc::now() + shift;
    // What to ask, read-only and closed right away.
    let (targets, cursors, settings, roster, active) = {
        let Some(inventory) =
            Inventory::open_read_only(home, args.global.lock_timeout).map_err(inventory_error)?
        else {
            return Err(UserError::usage(format!(
                "no inventory in `{}` yet: there are no hosts to poll",
                home.display()
            ))
            .with_hint("activate agents first with `pm-activate host ADDR --key-file F`")
            .into());
        };
        let hosts = inventory.hosts().map_err(inventory_error)?;
        let where_hosts = args.targets.where_hosts(&inventory)?;
        let targets = args.targets.resolve(&hosts, where_hosts.as_ref())?;
        let roster = roster(&hosts);
        let active = hosts.iter().filter(|h| h.state == "active").count();
        let settings = Settings {
            registry: Some(Arc::new(crate::hosts::Registry::new(hosts))),
            ..settings.clone()
        };
        (
            targets,
            inventory.poll_cursors().map_err(inventory_error)?,
            settings,
            roster,
            active,
        )
    };
    let settings = &settings;
    if targets.is_empty() {
        crate::targets::note_no_active_host();
    }
    if targets.is_empty() || args.global.dry_run {
        return Ok(Outcome {
            changed: false,
            would_poll: targets.iter().map(|t| t.host.clone()).collect(),
            pruned: None,
            job_id: None,
            summary: Summary::empty(started.elapsed().as_secs_f64()),
            hosts: Vec::new(),
        });
    }
    // `--watch` keeps its client (and connections) while the hosts it checks answers against
    // stay the same; a rename, a move or a renewal makes a new one.
    let client = match client {
        Some((kept, client)) if *kept == roster => client.clone(),
        _ => {
            let new = mutual_client(
                home,
                settings.timeout,
                args.watch.is_some(),
                args.global.lock_timeout,
            )?;
            client.insert((roster, new)).1.clone()
        }
    };
    let network = Instant::now();
    let polled = runtime.block_on(ask_all(&client, &targets, &cursors, settings, shift));
    let network_seconds = network.elapsed().as_secs_f64();

    let ok = polled.iter().filter(|p| p.answer.is_ok()).count();
    let unreachable = polled.len() - ok;
    let write = Instant::now();
    let inventory = Inventory::open(home, args.global.lock_timeout).map_err(inventory_error)?;
    let (job_id, recorded, reference) = inventory
        .transaction(|inv| {
            // Read before this run's check replaces it: a prune measures from an earlier run.
            let reference = inv.clock_in_step_at()?;
            let job_id = inv.insert_job(
                "poll",
                started_at,
                if unreachable == 0 {
                    "ok"
                } else if ok == 0 {
                    "failed"
                } else {
                    "partial"
                },
                &format!(
                    "polled {} hosts: {ok} ok, {unreachable} unreachable",
                    polled.len()
                ),
            )?;
            inv.save_settings(&[
                (
                    "inactive_after_seconds",
                    settings.inactive_after.as_secs().to_string(),
                ),
                (
                    "scan_max_age_seconds",
                    settings.scan_max_age.as_secs().to_string(),
                ),
            ])?;
            let recorded = inv.record_polls(job_id, &polled)?;
            for hold in inv.record_seen_holds(&polled)? {
                let way_back = if hold.kind == crate::proto::HoldKind::Hold.as_str() {
                    "sets it again (give its --until and --reason)"
                } else {
                    "gives it back as it was"
                };
                tracing::warn!(
                    "`{}`'s agent does not have the {} hold the manager has in force ({}): its \
                     state was reset or restored, and its own schedule may update it; `pm-push \
                     hold --host {}` {way_back}",
                    hold.host,
                    hold.kind,
                    hold.reason,
                    hold.host
                );
            }
            if let Some(ahead) = clock_ahead_of_agents(&polled) {
                let witnesses = polled
                    .iter()
                    .filter(|p| p.clock_ahead_of_agent.is_some())
                    .count();
                inv.save_clock_against_agents(
                    ahead,
                    started_at,
                    vouches_for_the_clock(witnesses, active),
                )?;
                if ahead.abs() > crate::hosts::MAX_CLOCK_SKEW {
                    tracing::warn!(
                        "this manager's clock is {} its agents' (the median of their answers): \
                         polls are stamped with it and no prune runs while it is ahead; set it \
                         right (`timedatectl status`, NTP)",
                        crate::hosts::clock_offset(started_at, started_at - ahead)
                    );
                }
            }
            Ok((job_id, recorded, reference))
        })
        .map_err(inventory_error)?;
    let inventory_write_seconds = write.elapsed().as_secs_f64();
    let pruned = prune_if_due(
        &inventory,
        started_at,
        job_id,
        keep,
        (ok > 0).then_some(reference),
    );
    let names: Vec<String> = targets.iter().map(|t| t.host.clone()).collect();
    let rows = inventory
        .fleet_status(Some(&names))
        .map_err(inventory_error)?;
    drop(inventory);
    let answers: HashMap<&str, String> = polled
        .iter()
        .map(|p| {
            (
                p.host.as_str(),
                match &p.answer {
                    Ok(_) => "ok".to_string(),
                    Err(failure) => failure.kind.clone(),
                },
            )
        })
        .collect();
    let RecordedPolls {
        changed_hosts,
        version_changes,
        scans,
        findings,
        update_runs,
    } = recorded;
    Ok(Outcome {
        changed: !changed_hosts.is_empty(),
        would_poll: Vec::new(),
        pruned,
        job_id: Some(job_id),
        summary: Summary {
            polled: polled.len(),
            ok,
            unreachable,
            changed: changed_hosts.len(),
            version_changes,
            new_scans: scans,
            new_findings: findings,
            new_update_runs: update_runs,
            certificates_renewed: polled
                .iter()
                .filter(|p| {
                    p.certificate
                        .as_ref()
                        .is_some_and(|c| c.renewed_from.is_some())
                })
                .count(),
            duration_seconds: started.elapsed().as_secs_f64(),
            network_seconds,
            inventory_write_seconds,
        },
        hosts: rows
            .into_iter()
            .map(|row| HostLine {
                polled: answers.get(row.host.as_str()).cloned().unwrap_or_default(),
                row,
            })
            .collect(),
    })
}

impl Summary {
    fn empty(duration_seconds: f64) -> Summary {
        Summary {
            polled: 0,
            ok: 0,
            unreachable: 0,
            changed: 0,
            version_changes: 0,
            new_scans: 0,
            new_findings: 0,
            new_update_runs: 0,
            certificates_renewed: 0,
            duration_seconds,
            network_seconds: 0.0,
            inventory_write_seconds: 0.0,
        }
    }
}

/// What the mutual-TLS client's check of who answers depends on: each host's name, address,
/// state and certificate.
fn roster(hosts: &[crate::inventory::HostRecord]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for h in hosts {
        (&h.host, &h.address, &h.state, &h.certificate_serial).hash(&mut hasher);
        h.certificate_fingerprint.hash(&mut hasher);
    }
    hasher.finish()
}

/// The manager's mutual-TLS client: agents must present a certificate from its CA.
/// With `keep_alive` (`--watch`) idle connections stay open for the next round; a single poll
/// closes each one after its answer, so open sockets never pile up to one per host. The
/// revoked certificates are read from the inventory, waiting up to `lock_timeout` for a writer.
pub(crate) fn mutual_client(
    home: &Path,
    timeout: Duration,
    keep_alive: bool,
    lock_timeout: Duration,
) -> Result<reqwest::Client, UserError> {
    let ca = ManagerCa::load_or_create(home)
        .map_err(|err| UserError::failure(format!("manager CA: {err}")))?;
    let identity = ca
        .client_identity(home)
        .map_err(|err| UserError::failure(format!("manager client certificate: {err}")))?;
    // An agent presenting a revoked certificate is someone holding a deactivated host's key;
    // one presenting another host's certificate at a host's address is not that host's agent.
    let (revoked, registry) = match Inventory::open_read_only(home, lock_timeout) {
        Ok(Some(inventory)) => inventory
            .revoked_serials()
            .and_then(|revoked| Ok((revoked, inventory.hosts()?))),
        Ok(None) => Ok(Default::default()),
        Err(err) => Err(err),
    }
    .map_err(|err| {
        let hint = match err {
            InventoryError::Locked { .. } => {
                "no agent was asked and nothing was recorded; run the same command again when \
                 the other writer is done, or raise --lock-timeout"
            }
            _ => "run `pm-doctor` to check the inventory",
        };
        UserError::failure(format!("cannot read the revoked certificates: {err}")).with_hint(hint)
    })?;
    let registry = crate::hosts::Registry::new(registry);
    tls::client_builder(
        Some(ca.certificate()),
        None,
        Some((&identity.0, &identity.1)),
    )
    .and_then(|b| {
        tls::check_servers(tls::refuse_revoked(b, revoked), move |remote, cert| {
            registry.check_connection(remote, cert)
        })
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(usize::from(keep_alive))
        .build()
        .context("cannot build the TLS client")
    })
    .map_err(|err| UserError::failure(format!("{err:#}")))
}

/// Asks every target, `concurrency` at a time, until the deadline.
pub(crate) async fn ask_all(
    client: &reqwest::Client,
    targets: &[Target],
    cursors: &HashMap<String, PollCursors>,
    settings: &Settings,
    shift: chrono::Duration,
) -> Vec<PolledHost> {
    let deadline = tokio::time::Instant::now() + settings.deadline;
    let results: Arc<std::sync::Mutex<HashMap<String, PolledHost>>> = Arc::default();
    let asked = futures_util::stream::iter(targets.iter().cloned())
        .map(|target| {
            let client = client.clone();
            let cursor = cursors.get(&target.host).cloned().unwrap_or_default();
            let results = Arc::clone(&results);
            let timeout = settings.timeout;
            let ca = settings.ca.clone();
            let registry = settings.registry.clone();
            async move {
                // Each host on its own task, so the two runtime threads share the TLS work.
                let polled = tokio::spawn(async move {
                    let checked = Checks {
                        ca: ca.as_deref(),
                        registry: registry.as_deref(),
                    };
                    ask_one(&client, &target, &cursor, timeout, shift, checked).await
                })
                .await;
                if let Ok(polled) = polled {
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(polled.host.clone(), polled);
                }
            }
        })
        .buffer_unordered(settings.concurrency)
        .collect::<Vec<()>>();
    let finished = tokio::time::timeout_at(deadline, asked).await.is_ok();
    let mut results = std::mem::take(
        &mut *results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut polled: Vec<PolledHost> = targets
        .iter()
        .map(|target| {
            results.remove(&target.host).unwrap_or_else(|| PolledHost {
                host: target.host.clone(),
                polled_at: Utc::now() + shift,
                latency_ms: None,
                answer: Err(PollFailure {
                    kind: if finished { "internal" } else { "deadline" }.into(),
                    message: format!(
                        "not answered within the poll deadline of {:?}",
                        settings.deadline
                    ),
                }),
                certificate: None,
                clock_ahead_of_agent: None,
            })
        })
        .collect();
    advise_not_yet_valid(targets, &mut polled);
    polled
}

/// Ends the message of each certificate not yet valid by this manager's clock
/// ([`NOT_YET_VALID`]) with what to do, decided by the clocks of the agents that answered
/// this poll: in step with this manager's, the certificate was issued while a clock was wrong
/// (a renewal while the manager's and the agent's clocks were both ahead) and is re-issued; out
/// of step, this manager's clock is the one to set right; with no agent heard, both.
fn advise_not_yet_valid(targets: &[Target], polled: &mut [PolledHost]) {
    let ahead = clock_ahead_of_agents(polled);
    for (target, poll) in targets.iter().zip(polled.iter_mut()) {
        let Err(failure) = &mut poll.answer else {
            continue;
        };
        let Some(problem) = failure.message.strip_suffix(NOT_YET_VALID) else {
            continue;
        };
        let address = &target.address;
        let advice = match ahead {
            Some(ahead) if ahead.abs() <= crate::hosts::MAX_CLOCK_SKEW => format!(
                "this manager's clock agrees with its agents' (the median of this poll's \
                 answers), so the certificate was issued while a clock was wrong; \
                 `pm-activate host {address}` re-issues it over the host's identity (if its agent \
                 refuses, run `pm-agent reset` on the host, then `pm-activate host {address} \
                 --key-file F`)"
            ),
            Some(ahead) => {
                let now = Utc::now();
                format!(
                    "this manager's clock is {} its agents' (the median of this poll's answers): \
                     set it right (`timedatectl status`, NTP)",
                    crate::hosts::clock_offset(now, now - ahead)
                )
            }
            None => format!(
                "if this manager's clock is right (`timedatectl status`), the certificate was \
                 issued while a clock was wrong and `pm-activate host {address}` re-issues it; \
                 otherwise set this manager's clock right (NTP)"
            ),
        };
        failure.message = format!("{problem}: {advice}");
    }
}

/// Ends the message of a certificate not yet valid until [`advise_not_yet_valid`] replaces it
/// with what to do.
const NOT_YET_VALID: &str = ": see the clocks";

fn failure(kind: &str, message: impl Into<String>) -> PollFailure {
    PollFailure {
        kind: kind.into(),
        message: message.into(),
    }
}

/// Sorts a transport error into the kinds the inventory records.
fn transport_failure(address: &str, err: &reqwest::Error, timeout: Duration) -> PollFailure {
    let chain = {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    };
    if err.is_timeout() {
        return failure(
            "timeout",
            format!("agent `{address}` did not answer within {timeout:?}"),
        );
    }
    let lower = chain.to_ascii_lowercase();
    if let Some(wrong) = tls::find_cause::<crate::hosts::WrongHost>(err) {
        return failure("wrong_host", wrong.to_string());
    }
    if tls::find_cause::<tls::RevokedCertificate>(err).is_some() {
        return failure(
            "tls",
            format!("agent `{address}` presented a revoked certificate: {chain}"),
        );
    }
    if lower.contains("certificate") || lower.contains("ssl") || lower.contains("tls") {
        return failure(
            "tls",
            format!("TLS with agent `{address}` failed (not activated by this manager?): {chain}"),
        );
    }
    if lower.contains("connection refused") {
        return failure(
            "refused",
            format!("agent `{address}` refused the connection (pm-agent not running?): {chain}"),
        );
    }
    failure("unreachable", format!("agent `{address}`: {chain}"))
}

/// What a poll checks of the agents it reaches besides TLS.
#[derive(Clone, Copy)]
struct Checks<'a> {
    /// Renews certificates and explains TLS failures.
    ca: Option<&'a ManagerCa>,
    /// Each host must answer with its own certificate.
    registry: Option<&'a crate::hosts::Registry>,
}

async fn ask_one(
    client: &reqwest::Client,
    target: &Target,
    cursor: &PollCursors,
    timeout: Duration,
    shift: chrono::Duration,
    checks: Checks<'_>,
) -> PolledHost {
    let ca = checks.ca;
    let polled_at = Utc::now() + shift;
    let started = Instant::now();
    let answer = tokio::time::timeout(timeout, request(client, target, cursor, timeout))
        .await
        .unwrap_or_else(|_| {
            Err(failure(
                "timeout",
                format!(
                    "agent `{}` did not answer within {timeout:?}",
                    target.address
                ),
            ))
        });
    // Another host's agent at this host's address: its answer is not this host's, and its
    // certificate is never renewed under this host's name.
    let answer = match (answer, checks.registry) {
        (Ok((_, Some(cert), _)), Some(registry))
            if let Err(wrong) = registry.check_host(&target.host, &target.address, &cert) =>
        {
            Err(failure("wrong_host", wrong.to_string()))
        }
        (answer, _) => answer,
    };
    let latency_ms = answer
        .is_ok()
        .then(|| started.elapsed().as_secs_f64() * 1000.0);
    let answered_at = Utc::now() + shift;
    let (answer, clock_ahead_of_agent) = match answer {
        Ok((answer, cert, agent_time)) => (Ok((answer, cert)), agent_time.map(|t| answered_at - t)),
        Err(failure) => (Err(failure), None),
    };
    let (answer, certificate) = match (answer, ca) {
        (Ok((answer, Some(cert))), Some(ca)) => {
            let seen = renew_if_due(client, target, &cert, ca, timeout).await;
            (Ok(answer), Some(seen))
        }
        (Ok((answer, cert)), _) => (
            Ok(answer),
            cert.map(|cert| crate::hosts::CertificateSeen {
                current: crate::hosts::HostCertificate::of(&cert),
                renewed_from: None,
            }),
        ),
        // Only this manager's check of the agent's certificate failing is explained by a look
        // at it (one more handshake); a link that broke mid-handshake is not asked again.
        (Err(failure), Some(ca))
            if failure.kind == "tls" && failure.message.contains("certificate verify failed") =>
        {
            (
                Err(explain_tls(target, checks, ca, timeout)
                    .await
                    .unwrap_or(failure)),
                None,
            )
        }
        (Err(failure), _) => (Err(failure), None),
    };
    PolledHost {
        host: target.host.clone(),
        polled_at,
        latency_ms,
        answer,
        certificate,
        clock_ahead_of_agent,
    }
}

/// Renews the certificate a host presented when it is due (less than a third of its life
/// left) or does not carry the host's name (renamed before names followed): a new key and
/// certificate over the mutual-TLS identity it has, checked on a new connection the way this
/// poll checks one. A failure is logged and leaves the certificate as it was, to be tried
/// again next poll; `pm_host_certificate_expiry_timestamp_seconds` and pm-doctor show it.
async fn renew_if_due(
    client: &reqwest::Client,
    target: &Target,
    cert: &openssl::x509::X509,
    ca: &ManagerCa,
    timeout: Duration,
) -> crate::hosts::CertificateSeen {
    let current = crate::hosts::HostCertificate::of(cert);
    let renamed = crate::pki::ca::common_name(cert).as_deref() != Some(target.host.as_str());
    if !renamed && !crate::hosts::renewal_due(current.not_before, current.expires_at, Utc::now()) {
        return crate::hosts::CertificateSeen {
            current,
            renewed_from: None,
        };
    }
    let renewal = async {
        let new =
            crate::hosts::renew::reissue(client, &target.address, &target.host, ca, None).await?;
        crate::hosts::renew::verify(client, &target.address, &tls::fingerprint(&new)).await?;
        Ok::<_, crate::hosts::renew::RenewError>(new)
    };
    match tokio::time::timeout(timeout * 2, renewal).await {
        Ok(Ok(new)) => {
            tracing::info!(
                host = %target.host,
                from = %current.serial,
                to = %crate::pki::ca::serial_hex(&new).unwrap_or_default(),
                "renewed the agent certificate"
            );
            crate::hosts::CertificateSeen {
                current: crate::hosts::HostCertificate::of(&new),
                renewed_from: Some(current.serial),
            }
        }
        outcome => {
            let error = match outcome {
                Ok(Err(err)) => format!("{err} (hint: {})", err.hint()),
                _ => format!("no answer within {:?}", timeout * 2),
            };
            tracing::warn!(
                host = %target.host,
                expires_at = %crate::hosts::at(current.expires_at),
                %error,
                "cannot renew the agent certificate; trying again next poll"
            );
            crate::hosts::CertificateSeen {
                current,
                renewed_from: None,
            }
        }
    }
}

/// Says why TLS with a host failed when its certificate tells: expired or not yet valid by
/// this manager's clock (both times named), issued by another CA, or not naming this address
/// (the host moved). `None` when the certificate cannot be read or shows nothing wrong.
async fn explain_tls(
    target: &Target,
    checks: Checks<'_>,
    ca: &ManagerCa,
    timeout: Duration,
) -> Option<PollFailure> {
    let address = &target.address;
    let socket = tokio::net::lookup_host(address.as_str())
        .await
        .ok()?
        .next()?;
    let cert = tls::fetch_server_certificate(socket, timeout).await.ok()?;
    let serial = crate::pki::ca::serial_hex(&cert).unwrap_or_default();
    let whose = format!("agent `{address}`'s certificate (serial {serial})");
    let clock = "this manager's clock";
    let issued = crate::pki::ca::check_issued_by(&cert, ca.certificate());
    // Another host's certificate (it answers at this host's address): named as such.
    if issued != Err(crate::pki::ca::IssueProblem::NotIssued)
        && let Some(registry) = checks.registry
        && let Err(wrong) = registry.check_host(&target.host, address, &cert)
        && registry.owner(&cert).is_some()
    {
        return Some(failure("wrong_host", wrong.to_string()));
    }
    match issued {
        Err(problem @ crate::pki::ca::IssueProblem::Expired { .. }) => Some(failure(
            "expired",
            format!(
                "{}: the manager no longer trusts it; if this manager's clock is right, renew \
                 it with `pm-activate host {address}`",
                crate::hosts::describe_problem(&whose, clock, &problem)
            ),
        )),
        Err(problem @ crate::pki::ca::IssueProblem::NotYetValid { .. }) => Some(failure(
            "clock",
            format!(
                "{}{NOT_YET_VALID}",
                crate::hosts::describe_problem(&whose, clock, &problem)
            ),
        )),
        Err(crate::pki::ca::IssueProblem::NotIssued) => Some(failure(
            "tls",
            format!(
                "agent `{address}` presents a certificate this manager's CA did not issue \
                 (serial {serial}): it was reset or activated by another manager; activate it \
                 again with `pm-activate host {address} --key-file F`"
            ),
        )),
        Ok(()) if !crate::pki::ca::names_host(&cert, crate::hosts::address_host(address)) => {
            Some(failure(
                "tls",
                format!(
                    "agent `{address}` presents the certificate of host `{}`, which does not \
                     name this address: the host moved; `pm-activate host ADDRESS` at its new \
                     address re-issues it there",
                    crate::pki::ca::common_name(&cert).unwrap_or_default()
                ),
            ))
        }
        Ok(()) => None,
    }
}

async fn request(
    client: &reqwest::Client,
    target: &Target,
    cursor: &PollCursors,
    timeout: Duration,
) -> Result<
    (
        PollResponse,
        Option<openssl::x509::X509>,
        Option<DateTime<Utc>>,
    ),
    PollFailure,
> {
    let address = &target.address;
    let mut url =
        reqwest::Url::parse(&format!("https://{address}{}", proto::POLL_PATH)).map_err(|err| {
            failure(
                "bad_address",
                format!("`{address}` is not an address: {err}"),
            )
        })?;
    {
        let mut query = url.query_pairs_mut();
        if let Some(id) = &cursor.scans_after {
            query.append_pair("scans_after", id);
        }
        if let Some(id) = &cursor.updates_after {
            query.append_pair("updates_after", id);
        }
    }
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|err| transport_failure(address, &err, timeout))?;
    let status = response.status();
    let peer = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .and_then(|der| openssl::x509::X509::from_der(der).ok());
    let agent_time = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|date| date.to_str().ok())
        .and_then(|date| httpdate::parse_http_date(date).ok())
        .map(DateTime::<Utc>::from);
    let body = proto::read_body(response, MAX_ANSWER)
        .await
        .map_err(|err| match err {
            proto::AnswerError::Transport(err) => transport_failure(address, &err, timeout),
            proto::AnswerError::TooLarge(_) => failure(
                "bad_response",
                format!("agent `{address}` sent more than {MAX_ANSWER} bytes"),
            ),
        })?;
    if !status.is_success() {
        let refusal = serde_json::from_slice::<ErrorResponse>(&body).ok();
        if let Some(refusal) = refusal.as_ref().filter(|e| e.code == "clock") {
            let offset = agent_time
                .map(|t| {
                    format!(
                        "; the agent's clock is {} this manager's",
                        crate::hosts::clock_offset(t, Utc::now())
                    )
                })
                .unwrap_or_default();
            return Err(failure(
                "clock",
                format!(
                    "agent `{address}` refuses this manager's certificate: {}{offset}",
                    refusal.message
                ),
            ));
        }
        let message = refusal
            .map(|e| format!("{} ({})", e.message, e.code))
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(failure(
            "rejected",
            format!("agent `{address}` refused the poll: {message}"),
        ));
    }
    parse_answer(&body)
        .map(|answer| (answer, peer, agent_time))
        .map_err(|problem| {
            failure(
                "bad_response",
                format!(
                    "agent `{address}` answered something that is not a poll answer: {problem}"
                ),
            )
        })
}

/// Parses an agent's poll answer (at most [`MAX_ANSWER`] bytes, which bounds every string in
/// it; serde_json refuses nesting deeper than 128 and numbers out of their field's range).
/// Agents send at most [`proto::POLL_MAX_REPORTS`] scan reports and update runs; an answer
/// with more is refused rather than written to the inventory.
fn parse_answer(body: &[u8]) -> Result<PollResponse, String> {
    let answer: PollResponse = serde_json::from_slice(body).map_err(|err| err.to_string())?;
    for (what, n) in [
        ("scan reports", answer.scans.len()),
        ("update runs", answer.updates.len()),
    ] {
        if n > proto::POLL_MAX_REPORTS {
            return Err(format!(
                "{n} {what}, more than the {} an agent sends",
                proto::POLL_MAX_REPORTS
            ));
        }
    }
    Ok(answer)
}

fn colour_cell(text: &str, colour: &str, terminal: bool) -> comfy_table::Cell {
    let cell = comfy_table::Cell::new(text);
    if !terminal {
        return cell;
    }
    match colour {
        "green" => cell.fg(comfy_table::Color::Green),
        "yellow" => cell.fg(comfy_table::Color::Yellow),
        "red" => cell.fg(comfy_table::Color::Red),
        _ => cell,
    }
}

fn print(global: &GlobalArgs, outcome: &Outcome, watching: bool) -> anyhow::Result<ExitStatus> {
    let status = if outcome.summary.unreachable == 0 {
        ExitStatus::Success
    } else if outcome.summary.ok == 0 {
        ExitStatus::Failure
    } else {
        ExitStatus::Partial
    };
    if global.json {
        if watching {
            // One compact document per line (JSON Lines), so a pipe can read each round.
            cli::print_text(serde_json::to_string(outcome)?)?;
        } else {
            cli::print_json(outcome)?;
        }
        return Ok(status);
    }
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut text = String::new();
    if watching && terminal {
        // Redraw in place for a live view.
        text.push_str("\x1b[2J\x1b[H");
    }
    if !global.quiet {
        let mut table = cli::table(&[
            "host",
            "group",
            "poll",
            "revision",
            "versions",
            "behind",
            "versions",
            "scan",
            "last scan",
        ]);
        for line in &outcome.hosts {
            let row = &line.row;
            let poll = if line.polled == "ok" {
                format!("ok {:.0} ms", row.latency_ms.unwrap_or_default())
            } else if row.inactive {
                format!("{} (inactive)", line.polled)
            } else {
                line.polled.clone()
            };
            table.add_row(vec![
                comfy_table::Cell::new(&row.host),
                comfy_table::Cell::new(&row.grp),
                colour_cell(
                    &poll,
                    if line.polled == "ok" { "green" } else { "red" },
                    terminal,
                ),
                comfy_table::Cell::new(format!(
                    "{}/{}",
                    row.installed_revision.as_deref().unwrap_or("-"),
                    row.dist_revision.as_deref().unwrap_or("-")
                )),
                comfy_table::Cell::new(row.versions.as_deref().unwrap_or("-")),
                comfy_table::Cell::new(row.behind_by.map_or("-".to_string(), |b| b.to_string())),
                colour_cell(&row.version_colour, &row.version_colour, terminal),
                colour_cell(&row.scan_colour, &row.scan_colour, terminal),
                comfy_table::Cell::new(match (&row.last_scan_at, &row.last_scan_result) {
                    (Some(at), Some(result)) => format!(
                        "{} {result} ({} findings)",
                        at.format("%Y-%m-%d %H:%M"),
                        row.last_scan_findings.unwrap_or(0)
                    ),
                    _ => "-".into(),
                }),
            ]);
        }
        text.push_str(&format!("{table}\n"));
    }
    if !outcome.would_poll.is_empty() {
        text.push_str(&format!(
            "dry run: would poll {} host(s): {}\n",
            outcome.would_poll.len(),
            outcome.would_poll.join(", ")
        ));
    }
    let s = &outcome.summary;
    text.push_str(&format!(
        "polled {}, ok {}, unreachable {}, changed {} in {:.2} s (inventory write {:.0} ms)",
        s.polled,
        s.ok,
        s.unreachable,
        s.changed,
        s.duration_seconds,
        s.inventory_write_seconds * 1000.0
    ));
    cli::print_text(text)?;
    Ok(status)
}

/// What pm-poll keeps (pm.toml `[poll]`), for `--prune` and the prune after a poll.
#[derive(Debug, Clone, Copy)]
struct Keep {
    polls: Duration,
    history: Option<Duration>,
    /// Prune after a poll, once a day (`auto_prune`).
    daily: bool,
}

impl Keep {
    fn of(config: &PollConfig) -> Keep {
        Keep {
            polls: config.keep_polls,
            history: config.keep_history,
            daily: config.auto_prune,
        }
    }
}

/// How often pm-poll prunes by itself: a prune deletes a day of polls at a time, and every
/// poll of the day finds the last prune recent and skips it.
const PRUNE_EVERY: chrono::Duration = chrono::Duration::days(1);

/// What a prune deleted, in the report of `--prune` and of the poll that pruned.
#[derive(Debug, Serialize)]
struct PruneReport {
    #[serde(flatten)]
    deleted: Pruned,
    /// Ages were measured from here: the start of the newest earlier poll run whose agents
    /// found the clock in step, never after the clock.
    as_of: String,
    /// Polls before this were deleted.
    polls_before: String,
    /// Scans, findings, install runs and superseded versions before this were deleted;
    /// `None`: they are kept (`keep_history = "forever"`).
    history_before: Option<String>,
    /// How long the prune held the inventory.
    seconds: f64,
}

/// The time `now` minus `age`, or bad input for an age beyond the calendar.
fn before(now: DateTime<Utc>, age: Duration, key: &str) -> Result<DateTime<Utc>, UserError> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| now.checked_sub_signed(age))
        .ok_or_else(|| UserError::usage(format!("`{key}` is too long")))
}

/// Prunes in one transaction and records it as a `prune` job (whose time decides when pm-poll
/// prunes by itself next); `dry_run` counts instead and records nothing.
///
/// Ages are measured from `reference`, the start of the newest poll run other than `this_job`
/// whose agents' answers found this manager's clock not ahead of theirs
/// ([`Inventory::clock_in_step_at`]), never from a later time than the clock: a clock that
/// jumped ahead (a wrong RTC after a reboot, an NTP misstep) cannot make the history look
/// older than it is, nor can polls stamped while it was (their run found it ahead), and after
/// a long outage the first prune deletes nothing new (the next one, a day later, catches up).
/// `None` (no poll ever checked the clock: a new or upgraded inventory): the clock.
fn prune_inventory(
    inventory: &Inventory,
    now: DateTime<Utc>,
    this_job: Option<i64>,
    reference: Option<DateTime<Utc>>,
    keep: Keep,
    dry_run: bool,
) -> anyhow::Result<PruneReport> {
    let started = Instant::now();
    let stamped_ahead = inventory
        .polls_stamped_ahead(now, this_job)
        .map_err(inventory_error)?;
    let as_of = reference.map_or(now, |reference| reference.min(now));
    if stamped_ahead > 0 {
        tracing::warn!(
            polls = stamped_ahead,
            "polls are stamped after this manager's clock (recorded while it was ahead, or it \
             was set back since): they stay, and ages are measured from the newest poll before \
             now"
        );
    }
    let polls_before = before(as_of, keep.polls, "keep_polls")?;
    let history_before = keep
        .history
        .map(|age| before(as_of, age, "keep_history"))
        .transpose()?;
    let deleted = inventory
        .transaction(|inv| {
            let deleted = inv.prune(polls_before, history_before, dry_run)?;
            if !dry_run {
                inv.insert_job(
                    "prune",
                    now,
                    "ok",
                    &format!(
                        "deleted {} polls before {}, {} scans, {} findings, {} install runs, {} \
                         superseded versions before {} (ages from the newest poll, {})",
                        deleted.polls,
                        polls_before.to_rfc3339(),
                        deleted.scans,
                        deleted.scan_findings,
                        deleted.update_runs,
                        deleted.component_versions,
                        history_before.map_or("-".into(), |t| t.to_rfc3339()),
                        as_of.to_rfc3339(),
                    ),
                )?;
            }
            Ok(deleted)
        })
        .map_err(inventory_error)?;
    Ok(PruneReport {
        deleted,
        as_of: as_of.to_rfc3339(),
        polls_before: polls_before.to_rfc3339(),
        history_before: history_before.map(|t| t.to_rfc3339()),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The median of how far this manager's clock was ahead of each agent that answered (one
/// agent with a wrong clock does not make the manager's look wrong); `None` without answers.
fn clock_ahead_of_agents(polled: &[PolledHost]) -> Option<chrono::Duration> {
    let mut ahead: Vec<chrono::Duration> = polled
        .iter()
        .filter_map(|p| p.clock_ahead_of_agent)
        .collect();
    ahead.sort_unstable();
    ahead.get(ahead.len() / 2).copied()
}

/// Whether `witnesses` agents whose clocks a poll read are enough to vouch for the manager's
/// clock as a time a prune may measure from: more than half of the `active` hosts, so a run
/// of a few hosts (`--host`) whose clocks went wrong with the manager's cannot.
fn vouches_for_the_clock(witnesses: usize, active: usize) -> bool {
    witnesses > 0 && witnesses * 2 > active
}

/// How far this manager's clock was ahead of its agents' (negative: behind) at the last poll
/// that heard any, and when, when they disagreed by more than clocks may
/// ([`crate::hosts::MAX_CLOCK_SKEW`]) and the clock was not set back since (`now` is not
/// before that poll; pm-poll measures again at its next poll). Read by the prune and pm-doctor.
pub(crate) fn clock_out_of_step(
    inventory: &Inventory,
    now: DateTime<Utc>,
) -> Result<Option<(chrono::Duration, DateTime<Utc>)>, InventoryError> {
    Ok(inventory
        .clock_against_agents()?
        .map(|(ahead, checked_at)| (chrono::Duration::seconds(ahead), checked_at))
        .filter(|(ahead, checked_at)| {
            ahead.abs() > crate::hosts::MAX_CLOCK_SKEW && now >= *checked_at
        }))
}

/// Why no prune may run at `now`: the last poll that heard agents found this manager's clock
/// further ahead of theirs than clocks may disagree ([`clock_out_of_step`]).
fn clock_refusal(inventory: &Inventory, now: DateTime<Utc>) -> anyhow::Result<Option<UserError>> {
    let Some((ahead, checked_at)) = clock_out_of_step(inventory, now)
        .map_err(inventory_error)?
        .filter(|(ahead, _)| *ahead > chrono::Duration::zero())
    else {
        return Ok(None);
    };
    Ok(Some(
        UserError::failure(format!(
            "this manager's clock was {} its agents' at the poll of {}: ages measured by it \
             would take recent polls and history for old ones, so nothing was pruned",
            crate::hosts::clock_offset(checked_at, checked_at - ahead),
            checked_at.to_rfc3339()
        ))
        .with_hint(
            "set this manager's clock right (`timedatectl status`, NTP), then run pm-poll: \
             pruning resumes once a poll finds the clocks in step",
        ),
    ))
}

/// After a poll (`this_job`), on the inventory it just wrote: prunes when `auto_prune` is on,
/// the last prune is a day old (or there was none), an agent answered this poll (`reference`:
/// `None` when none did; else what [`prune_inventory`] measures from, read before this poll
/// was recorded) and the clock is not far ahead of the agents'. A prune that did not run is
/// a warning (none for a new inventory whose clock no poll checked yet): the poll is recorded,
/// and the next one tries again.
fn prune_if_due(
    inventory: &Inventory,
    now: DateTime<Utc>,
    this_job: i64,
    keep: Keep,
    reference: Option<Option<DateTime<Utc>>>,
) -> Option<PruneReport> {
    if !keep.daily {
        return None;
    }
    let due = match inventory.last_prune_at(now) {
        Ok(last) => last.is_none_or(|last| now - last >= PRUNE_EVERY),
        Err(err) => {
            tracing::warn!(error = %err, "cannot tell when the inventory was last pruned");
            false
        }
    };
    if !due {
        return None;
    }
    let Some(reference) = reference else {
        tracing::warn!(
            "no agent answered this poll, so it could not check this manager's clock against \
             theirs: the daily prune did not run; the next poll an agent answers prunes"
        );
        return None;
    };
    if reference.is_none() {
        tracing::info!(
            "no earlier poll checked this manager's clock against its agents': the daily prune \
             waits for the next poll"
        );
        return None;
    }
    let refused = clock_refusal(inventory, now).and_then(|refusal| match refusal {
        Some(refusal) => Err(refusal.into()),
        None => Ok(()),
    });
    match refused
        .and_then(|()| prune_inventory(inventory, now, Some(this_job), reference, keep, false))
    {
        Ok(report) => {
            tracing::info!(deleted = ?report.deleted, seconds = report.seconds, "pruned");
            Some(report)
        }
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "the daily prune did not run; the poll is recorded");
            None
        }
    }
}

/// `pm-poll --prune`: at once, whatever `auto_prune` says; `--older-than` replaces
/// `keep_polls`.
fn prune(home: &Path, global: &GlobalArgs, keep: Keep) -> anyhow::Result<ExitStatus> {
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    let now = Utc::now() + clock()?;
    if let Some(refusal) = clock_refusal(&inventory, now)? {
        return Err(refusal.into());
    }
    let reference = inventory.clock_in_step_at().map_err(inventory_error)?;
    if reference.is_none() {
        tracing::warn!(
            "no poll has checked this manager's clock against its agents' yet: ages are \
             measured from the clock"
        );
    }
    let report = prune_inventory(&inventory, now, None, reference, keep, global.dry_run)?;
    let deleted = report.deleted;
    if global.json {
        cli::print_json(&serde_json::json!({
            "changed": !global.dry_run && deleted != Pruned::default(),
            "dry_run": global.dry_run,
            "deleted_polls": deleted.polls,
            "older_than": report.polls_before,
            "pruned": report,
            "kept": "version changes, scans, findings and install runs newer than keep_history \
                     (all of them by default), each host's newest version and current state",
        }))?;
    } else if !global.quiet {
        let verb = if global.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        let history = match &report.history_before {
            Some(before) => format!(
                "{verb} {} scans, {} findings, {} install runs and {} superseded versions before \
                 {before}",
                deleted.scans,
                deleted.scan_findings,
                deleted.update_runs,
                deleted.component_versions
            ),
            None => "kept scans, findings, install runs and versions (keep_history = \"forever\")"
                .into(),
        };
        cli::print_text(format!(
            "{verb} {} polls before {}; {history}",
            deleted.polls, report.polls_before
        ))?;
    }
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        AgentStatus, InstallReport, InstalledComponent, InstalledFileChange, InstalledState,
        ScanFinding, ScanReport, ScanResult, ScheduleEntry, UpdateRun,
    };

    /// Values of the answer's own, besides `fuzz::JSON_SYNTAX`.
    const JSON_EXTRA: &[&[u8]] = &[
        b"-1e999",
        b"1.7976931348623157e308",
        b"5e-324",
        b"99999999999999999999999999999999",
        b"\"result\": \"error\", ",
    ];

    /// An answer like a real agent's: activated, something installed, a schedule, two scans
    /// (one infected) and an update run.
    fn sample_answer() -> PollResponse {
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc)
        };
        let scan = |id: &str, result: ScanResult, findings: Vec<ScanFinding>| ScanReport {
            id: id.into(),
            seq: Some(7),
            started_at: at("2026-11-26T07:58:10.123456Z"),
            finished_at: at("2026-11-26T07:58:12.5Z"),
            duration_seconds: 2.376544,
            engine: "clamav".into(),
            program: Some("clamscan".into()),
            paths: vec!["/srv/upload".into(), "/home".into()],
            files_scanned: Some(18_234),
            findings,
            result,
            error: None,
        };
        PollResponse {
            status: AgentStatus {
                host_name: "scan-17.example.net".into(),
                agent_version: "0.1.0".into(),
                agent_sha256: Some("ab".repeat(32)),
                upgrade_error: None,
                activated: true,
                manager_ca_fingerprint: Some(format!("sha256:{}", "cd".repeat(32))),
                engine: "clamav".into(),
                group: Some("web".into()),
                profile: Some("default".into()),
                license_expires_at: Some(at("2027-11-26T00:00:00Z")),
                hold: None,
                reports_hold: true,
                manifest_key: None,
            },
            installed: Some(InstalledState {
                revision: Some("r42".into()),
                serial: Some(42),
                installed_at: at("2026-11-26T06:00:03Z"),
                components: vec![
                    InstalledComponent {
                        component: "daily".into(),
                        version: Some("27430".into()),
                        build_time: Some(at("2026-11-26T04:21:00Z")),
                    },
                    InstalledComponent {
                        component: "main".into(),
                        version: Some("62".into()),
                        build_time: None,
                    },
                ],
                backups: vec![Some("r41".into()), Some("r40".into()), None],
                damaged: Vec::new(),
            }),
            schedule: vec![
                ScheduleEntry {
                    job: "update".into(),
                    expression: "0 * * * *".into(),
                    next_run: Some(at("2026-11-26T09:00:00Z")),
                },
                ScheduleEntry {
                    job: "scan".into(),
                    expression: "30 3 * * *".into(),
                    next_run: None,
                },
            ],
            scans: vec![
                scan(
                    "20261126T075810.123456Z-1a2b3c4d",
                    ScanResult::Clean,
                    Vec::new(),
                ),
                scan(
                    "20261126T081502.000001Z-5e6f7a8b",
                    ScanResult::Infected,
                    vec![ScanFinding {
                        path: "/srv/upload/eicar.com".into(),
                        signature: "Eicar-Test-Signature".into(),
                    }],
                ),
            ],
            updates: vec![UpdateRun {
                id: "20261126T060000.000000Z".into(),
                seq: Some(5),
                trigger: "schedule".into(),
                started_at: at("2026-11-26T06:00:00Z"),
                finished_at: at("2026-11-26T06:00:03Z"),
                report: Some(InstallReport {
                    changed: true,
                    action: "update".into(),
                    revision: Some("r42".into()),
                    serial: Some(42),
                    previous_revision: Some("r41".into()),
                    files: vec![InstalledFileChange {
                        name: "daily.cvd".into(),
                        from_version: Some("27429".into()),
                        to_version: Some("27430".into()),
                    }],
                    downloaded: vec!["daily-27430.cdiff".into()],
                    downloaded_bytes: 4_217,
                    reloaded: true,
                }),
                error: None,
            }],
            report_stream: Some("0a1b2c3d4e5f6a7b".into()),
            report_last: Some(1),
        }
    }

    /// Inserts, after an opening brace at a random spot, an unknown field holding something
    /// oversized: deep nesting, a long string, a long number, or many scan reports.
    fn insert_oversized(damage: &mut crate::fuzz::Damage<'_>, scan_report: &[u8]) {
        let at = damage.spot();
        let Some(brace) = damage.bytes.get(at..).and_then(|rest| {
            rest.iter()
                .position(|&b| b == b'{')
                .map(|offset| at + offset + 1)
        }) else {
            return;
        };
        let depth = *damage.rng.pick(&[1usize, 127, 128, 129, 10_000, 100_000]);
        let field: Vec<u8> = match damage.rng.below(4) {
            0 => [
                b"\"nested\": ".to_vec(),
                b"[".repeat(depth),
                b"]".repeat(depth),
                b", ".to_vec(),
            ]
            .concat(),
            1 => [
                b"\"pad\": \"".to_vec(),
                b"a".repeat(depth),
                b"\", ".to_vec(),
            ]
            .concat(),
            2 => [b"\"n\": ".to_vec(), b"9".repeat(depth), b", ".to_vec()].concat(),
            _ => {
                let n = proto::POLL_MAX_REPORTS + damage.rng.below(3);
                let reports = vec![scan_report; n].join(&b","[..]);
                [b"\"scans\": [".to_vec(), reports, b"], ".to_vec()].concat()
            }
        };
        damage.bytes.splice(brace..brace, field);
    }

    /// The poll answer parser under damaged copies of a real answer (harness: `crate::fuzz`):
    /// no panics (nor stack overflows from nesting); whatever parses is within the bounds an
    /// agent keeps to, and round-trips through serde unchanged.
    #[test]
    fn mutated_poll_answers_never_panic_and_parse_only_within_bounds() {
        let original = sample_answer();
        let json = serde_json::to_vec(&original).unwrap();
        assert_eq!(parse_answer(&json).as_ref(), Ok(&original));
        let scan_report = serde_json::to_vec(&original.scans[1]).unwrap();
        let campaign = crate::fuzz::campaign("poll answer", 2000, |seed| {
            let mut rng = crate::fuzz::Rng::new(seed);
            let mut damage = crate::fuzz::Damage::new(&json, 0, &mut rng);
            for _ in 0..1 + damage.rng.below(3) {
                if damage.rng.below(4) == 0 {
                    insert_oversized(&mut damage, &scan_report);
                } else {
                    damage.one(&crate::fuzz::json_tokens(JSON_EXTRA));
                }
            }
            let damaged = damage.bytes;
            let Ok(answer) = parse_answer(&damaged) else {
                return false;
            };
            assert!(answer.scans.len() <= proto::POLL_MAX_REPORTS);
            assert!(answer.updates.len() <= proto::POLL_MAX_REPORTS);
            for scan in &answer.scans {
                assert!(scan.duration_seconds.is_finite());
            }
            // serde_json's default float parsing (no `float_roundtrip` feature) may be one ulp
            // off for long mantissas (seed 136804447726949201: 2.18446744073709551616 reads
            // back as ...095 and again as ...0954), so durations compare to that precision and
            // everything else exactly.
            let again = serde_json::to_vec(&answer).unwrap();
            let mut reread = parse_answer(&again).expect("a parsed answer parses again");
            assert_eq!(reread.scans.len(), answer.scans.len());
            for (back, scan) in reread.scans.iter_mut().zip(&answer.scans) {
                let ulp = f64::EPSILON * scan.duration_seconds.abs().max(f64::MIN_POSITIVE);
                assert!(
                    (back.duration_seconds - scan.duration_seconds).abs() <= ulp,
                    "duration {} reads back as {}",
                    scan.duration_seconds,
                    back.duration_seconds
                );
                back.duration_seconds = scan.duration_seconds;
            }
            assert_eq!(reread, answer, "does not round-trip");
            true
        });
        if !campaign.replay {
            assert!(campaign.accepted < campaign.cases, "nothing was damaged");
        }
    }

    #[test]
    fn only_answers_from_more_than_half_the_active_fleet_vouch_for_the_clock() {
        assert!(vouches_for_the_clock(1, 1));
        assert!(vouches_for_the_clock(2, 3));
        assert!(!vouches_for_the_clock(1, 2));
        assert!(!vouches_for_the_clock(1, 3));
        assert!(!vouches_for_the_clock(0, 0));
        assert!(vouches_for_the_clock(5_001, 10_000));
        assert!(!vouches_for_the_clock(5_000, 10_000));
    }

    #[test]
    fn an_answer_with_more_reports_than_an_agent_sends_is_refused() {
        let mut answer = sample_answer();
        answer.scans = vec![answer.scans[0].clone(); proto::POLL_MAX_REPORTS + 1];
        let json = serde_json::to_vec(&answer).unwrap();
        assert_eq!(
            parse_answer(&json).map(|_| ()),
            Err("51 scan reports, more than the 50 an agent sends".to_string())
        );
        answer.scans.truncate(proto::POLL_MAX_REPORTS);
        assert!(parse_answer(&serde_json::to_vec(&answer).unwrap()).is_ok());
    }

    /// A failed poll whose agent's clock was seen `ahead` (seconds) of this manager's.
    fn failed_poll(message: &str, ahead: Option<i64>) -> PolledHost {
        PolledHost {
            host: "web-1".into(),
            polled_at: Utc::now(),
            latency_ms: None,
            answer: Err(PollFailure {
                kind: "timeout".into(),
                message: message.into(),
            }),
            certificate: None,
            clock_ahead_of_agent: ahead.map(chrono::Duration::seconds),
        }
    }

    #[test]
    fn a_certificate_not_yet_valid_blames_the_clock_the_other_agents_disagree_with() {
        let advice = |others: &[Option<i64>]| {
            let mut polled = vec![failed_poll(
                &format!("valid only from T{NOT_YET_VALID}"),
                None,
            )];
            polled.extend(others.iter().map(|ahead| failed_poll("", *ahead)));
            let targets: Vec<Target> = polled.iter().map(|_| web_1()).collect();
            advise_not_yet_valid(&targets, &mut polled);
            polled[0].answer.clone().unwrap_err().message
        };
        let in_step = advice(&[Some(1), Some(-2)]);
        assert!(
            in_step.contains("issued while a clock was wrong"),
            "{in_step}"
        );
        assert!(
            in_step.contains("pm-activate host 10.0.0.5:7505"),
            "{in_step}"
        );
        assert!(!in_step.contains("set it right"), "{in_step}");
        let behind = advice(&[Some(-86_400 * 300)]);
        assert!(behind.contains("300 days behind its agents'"), "{behind}");
        assert!(behind.contains("set it right"), "{behind}");
        let alone = advice(&[]);
        assert!(
            alone.contains("if this manager's clock is right"),
            "{alone}"
        );
        // Other failures keep their message.
        assert_eq!(advice_untouched(), "refused");
    }

    fn advice_untouched() -> String {
        let mut polled = vec![failed_poll("refused", None)];
        advise_not_yet_valid(&[web_1()], &mut polled);
        polled[0].answer.clone().unwrap_err().message
    }

    fn web_1() -> Target {
        Target {
            host: "web-1".into(),
            address: "10.0.0.5:7505".into(),
            group: "default".into(),
            wave: None,
        }
    }

    #[test]
    fn the_clock_against_agents_is_the_median_of_those_that_answered() {
        let check = |aheads: &[Option<i64>], expected: Option<i64>| {
            let polled: Vec<PolledHost> =
                aheads.iter().map(|ahead| failed_poll("", *ahead)).collect();
            assert_eq!(
                clock_ahead_of_agents(&polled),
                expected.map(chrono::Duration::seconds),
                "{aheads:?}"
            );
        };
        check(&[], None);
        check(&[None, None], None);
        check(&[Some(5), None], Some(5));
        // One agent with a wrong clock does not make the manager's look wrong.
        check(&[Some(1), Some(-86_400 * 300), Some(2)], Some(1));
        check(
            &[Some(86_400 * 100), Some(86_400 * 101), None],
            Some(86_400 * 101),
        );
    }
}
