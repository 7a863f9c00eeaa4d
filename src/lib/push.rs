//! `pm-push`: rollouts of dist in waves that stop themselves (DESIGN.md section 4).
//!
//! `update` plans waves (a canary, then batches of `--wave-size` or the wave column of a targets
//! CSV), skips hosts whose last poll shows them on dist already, and asks each host of a wave to
//! install dist (`POST /v1/update`, mutual TLS). After each wave it polls the wave's hosts and
//! records their attempts and state in one short transaction; when a wave's failures exceed
//! `--max-failures`, the rollout stops and the later waves are recorded `not_attempted`. The
//! rollout is a job with a row per host per attempt, so an interrupted pm-push (Ctrl-C, kill)
//! leaves a job that says where it stopped, and `resume JOB` continues it. Before each wave dist
//! is read again: a rollout never installs a revision it did not start with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{HoldRecord, HostAttempt, Inventory, InventoryError, RolloutRecord};
use crate::poll::{Settings, ask_all, mutual_client};
use crate::proto::{self, ErrorResponse, HoldKind, InstallReport};
use crate::repo::Repo;
use crate::targets::{Target, TargetArgs};

pub mod hold;

/// `pm-push` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-push",
    version,
    about = "Roll dist out to agents in waves that stop themselves"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// `pm-push` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install the published dist revision on the targets, in waves
    Update(UpdateArgs),
    /// Show a rollout's progress (default: the newest)
    Status {
        /// The rollout's job id
        job: Option<i64>,
    },
    /// Continue an interrupted or stopped rollout where it ended
    Resume {
        /// The rollout's job id
        job: i64,
    },
    /// Give the targets a scan profile (made with `pm-activate profile new`)
    Profile {
        /// Profile name
        name: String,
        #[command(flatten)]
        targets: TargetArgs,
    },
    /// Give the targets the newest registered license; with FILE, register it first
    License {
        /// A license file to register first (needs --expires)
        #[arg(requires = "expires")]
        file: Option<std::path::PathBuf>,
        /// Its expiry: YYYY-MM-DD or RFC 3339
        #[arg(long, value_parser = crate::activate::setup::parse_expiry)]
        expires: Option<chrono::DateTime<Utc>>,
        #[command(flatten)]
        targets: TargetArgs,
    },
    /// Scan paths on the targets now and record the reports
    Scan {
        /// An absolute path to scan (repeatable)
        #[arg(long = "path", value_name = "PATH", required = true)]
        paths: Vec<String>,
        /// How long one host's scan may take
        #[arg(long, default_value = "1h", value_parser = cli::parse_nonzero_duration)]
        timeout: Duration,
        #[command(flatten)]
        targets: TargetArgs,
    },
    /// Set the agents' own schedule of updates and scans (instead of their agent.toml's)
    Schedule {
        /// When to install dist: a cron expression in host local time, e.g. "*/15 * * * *"
        #[arg(long, value_name = "CRON")]
        update: Option<String>,
        /// When to scan the --scan-path paths: a cron expression, e.g. "0 3 * * *"
        #[arg(long, value_name = "CRON")]
        scan: Option<String>,
        /// An absolute path the scheduled scan covers (repeatable)
        #[arg(long = "scan-path", value_name = "PATH")]
        scan_paths: Vec<String>,
        /// Remove the manager's schedule: each agent's agent.toml applies again
        #[arg(long, conflicts_with_all = ["update", "scan", "scan_paths"])]
        clear: bool,
        #[command(flatten)]
        targets: TargetArgs,
    },
    /// Hold the targets where they are: rollouts and their own schedules leave them alone until
    /// `release` or the end time (a maintenance window, a change freeze)
    Hold {
        /// When the hold ends by itself: a duration from now (4h, 2d), YYYY-MM-DD (its end,
        /// UTC) or an RFC 3339 time [default: until released]
        #[arg(long, value_name = "WHEN", value_parser = hold::parse_until)]
        until: Option<hold::Until>,
        /// Why, for whoever finds the host held
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        targets: TargetArgs,
    },
    /// Release the targets' holds (set by `hold`, a rollback by hand or a fleet rollback): they
    /// follow dist again
    Release {
        #[command(flatten)]
        targets: TargetArgs,
    },
    /// List the holds in force
    Holds,
    /// Replace the targets' pm-agent with the package in dist (a product of kind `agent`); each
    /// agent restarts itself and must come back on the package
    UpgradeAgent {
        /// How long one host may take to answer the upgrade, and then to come back on the package
        #[arg(long, default_value = "60s", value_parser = cli::parse_nonzero_duration)]
        timeout: Duration,
        #[command(flatten)]
        targets: TargetArgs,
    },
}

/// How many failures a wave may have: a count or a percentage of the wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaxFailures {
    /// At most this many hosts.
    Count(usize),
    /// At most this percentage of the wave (rounded down).
    Percent(u8),
}

impl MaxFailures {
    /// Failures a wave of `hosts` may have before the rollout stops.
    pub fn allowed(self, hosts: usize) -> usize {
        match self {
            MaxFailures::Count(n) => n,
            MaxFailures::Percent(p) => hosts * usize::from(p) / 100,
        }
    }
}

impl FromStr for MaxFailures {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a count (e.g. 3) or a percentage (e.g. 10%)");
        match text.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(MaxFailures::Percent(p)),
                _ => Err(bad()),
            },
            None => text
                .trim()
                .parse()
                .map(MaxFailures::Count)
                .map_err(|_| bad()),
        }
    }
}

impl std::fmt::Display for MaxFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxFailures::Count(n) => write!(f, "{n}"),
            MaxFailures::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// `pm-push update` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub waves: WaveArgs,
}

/// How a rollout moves through its waves (kept with the job, so `resume` moves the same way).
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct WaveArgs {
    /// Hosts in the first wave, the canary (0: none) [default: 1; with a wave CSV none, and N
    /// takes the first N hosts of its first wave]
    #[arg(long, value_name = "N")]
    pub canary: Option<usize>,
    /// Hosts per wave after the canary (a targets CSV with a wave column sets the waves instead)
    #[arg(long, default_value = "50", value_parser = cli::parse_count)]
    pub wave_size: usize,
    /// Failures a wave may have before the rollout stops: a count or a percentage, e.g. 10%
    #[arg(long, default_value = "0", value_parser = MaxFailures::from_str)]
    pub max_failures: MaxFailures,
    /// Wait between waves
    #[arg(long, default_value = "0s", value_parser = cli::parse_duration, value_name = "DURATION")]
    #[serde(with = "millis")]
    pub pause: Duration,
    /// How long one host's install may take
    #[arg(long, default_value = "10m", value_parser = cli::parse_nonzero_duration, value_name = "DURATION")]
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Hosts installing at once within a wave
    #[arg(long, default_value = "32", value_parser = cli::parse_count)]
    pub concurrency: usize,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

pub(crate) fn inventory_error(err: InventoryError) -> anyhow::Error {
    let hint = match &err {
        InventoryError::Locked { .. } => Some(
            "run the same command again when the other writer is done, or raise --lock-timeout",
        ),
        _ => None,
    };
    let error = UserError::failure(err.to_string());
    match hint {
        Some(hint) => error.with_hint(hint).into(),
        None => error.into(),
    }
}

/// Runs `pm-push`.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let home = args.global.home();
    // Every subcommand but the listings records a job: only as the home's owner.
    if !matches!(args.command, Command::Status { .. } | Command::Holds) {
        crate::ownership::check_home(&home, "pm-push")?;
    }
    match &args.command {
        Command::Update(update) => start(&home, &args.global, update),
        Command::Status { job } => status(&home, &args.global, *job),
        Command::Resume { job } => resume(&home, &args.global, *job),
        Command::Profile { name, targets } => {
            push_profile(&home, &args.global, name, targets, HashSet::new())
        }
        Command::License {
            file,
            expires,
            targets,
        } => push_license(&home, &args.global, file.as_deref(), *expires, targets),
        Command::Scan {
            paths,
            timeout,
            targets,
        } => push_scan(&home, &args.global, paths, *timeout, targets),
        Command::Schedule {
            update,
            scan,
            scan_paths,
            clear,
            targets,
        } => {
            let request = proto::ScheduleRequest {
                update: update.clone(),
                scan: scan.clone(),
                scan_paths: scan_paths.clone(),
            };
            push_schedule(&home, &args.global, request, *clear, targets)
        }
        Command::UpgradeAgent { timeout, targets } => {
            push_upgrade_agent(&home, &args.global, *timeout, targets)
        }
        Command::Hold {
            until,
            reason,
            targets,
        } => hold::push_hold(
            &home,
            &args.global,
            until.as_ref(),
            reason.as_deref(),
            targets,
        ),
        Command::Release { targets } => hold::push_release(&home, &args.global, targets),
        Command::Holds => hold::list(&home, &args.global),
    }
}

/// Held while a rollout runs: one `pm-push update/resume` or fleet `pm-rollback` at a time
/// changes the fleet's revision (two at once would fight over the same hosts).
pub(crate) struct RolloutLock {
    _file: std::fs::File,
}

/// Takes `PM_HOME/rollout.lock`, or says who holds it.
pub(crate) fn rollout_lock(home: &Path) -> Result<RolloutLock, UserError> {
    use std::io::{Read, Seek, Write};
    let path = home.join("rollout.lock");
    let fail =
        |err: std::io::Error| UserError::failure(format!("cannot use `{}`: {err}", path.display()));
    std::fs::create_dir_all(home).map_err(fail)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(fail)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(fail)?;
            file.rewind().map_err(fail)?;
            write!(file, "{}", std::process::id()).map_err(fail)?;
            Ok(RolloutLock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(UserError::failure(format!(
                "another rollout (pm-push or pm-rollback, PID {}) is running on this manager",
                holder.trim()
            ))
            .with_hint("wait for it to end (`pm-push status` shows it), then run this again"))
        }
        Err(std::fs::TryLockError::Error(err)) => Err(fail(err)),
    }
}

/// The revision dist serves now.
fn dist_revision(home: &Path) -> Result<String, UserError> {
    Repo::new(home)
        .generations()
        .map_err(|err| UserError::failure(err.to_string()))?
        .dist
        .ok_or_else(|| {
            UserError::usage("nothing is published yet: there is no dist to roll out")
                .with_hint("run `pm-mirror sync` and `pm-mirror publish` first")
        })
}

/// The waves of a rollout, numbered. With a wave CSV (`--targets update_list.csv`), its waves
/// under the operator's own numbers (sparse ones too), and a canary only when `canary` asks for
/// one: the first N hosts of the first wave, as wave 0. Otherwise the canary (wave 0; `canary`,
/// 1 when not given) and batches of `wave_size` numbered from 1.
pub fn plan_waves(
    to_do: &[Target],
    canary: Option<usize>,
    wave_size: usize,
) -> Vec<(i32, Vec<Target>)> {
    let csv = to_do.iter().any(|t| t.wave.is_some());
    let mut ordered = to_do.to_vec();
    // Stable: a wave keeps the file's order.
    ordered.sort_by_key(|t| t.wave);
    let canary = canary.unwrap_or(if csv { 0 } else { 1 }).min(ordered.len());
    let mut waves = Vec::new();
    if canary > 0 {
        waves.push((0, ordered[..canary].to_vec()));
    }
    let rest = &ordered[canary..];
    if csv {
        let mut by_wave: BTreeMap<u32, Vec<Target>> = BTreeMap::new();
        for target in rest {
            by_wave
                .entry(target.wave.unwrap_or(u32::MAX))
                .or_default()
                .push(target.clone());
        }
        waves.extend(
            by_wave
                .into_iter()
                .map(|(n, hosts)| (i32::try_from(n).unwrap_or(i32::MAX), hosts)),
        );
    } else {
        waves.extend(
            rest.chunks(wave_size.max(1))
                .zip(1..)
                .map(|(hosts, n)| (n, hosts.to_vec())),
        );
    }
    waves
}

/// The first attempt of every target and the number of waves: `held` when a hold in `holds`
/// is in force on it, `skipped` when its last poll shows it on `revision` (neither is in a
/// wave: they are not asked), else `pending` in its wave.
pub(crate) fn plan_attempts(
    targets: Vec<Target>,
    installed: &HashMap<String, Option<String>>,
    holds: &HashMap<String, HoldRecord>,
    revision: &str,
    canary: Option<usize>,
    wave_size: usize,
) -> (Vec<HostAttempt>, usize) {
    let (held, targets): (Vec<Target>, Vec<Target>) = targets
        .into_iter()
        .partition(|t| holds.contains_key(&t.host));
    let (done, to_do): (Vec<Target>, Vec<Target>) = targets
        .into_iter()
        .partition(|t| installed.get(&t.host).and_then(|r| r.as_deref()) == Some(revision));
    let waves = plan_waves(&to_do, canary, wave_size);
    let attempt = |host: &str, wave: Option<i32>| HostAttempt {
        host: host.to_string(),
        wave,
        attempt: 1,
        result: "pending".into(),
        changed: None,
        revision: None,
        error: None,
    };
    let mut hosts: Vec<HostAttempt> = Vec::new();
    for (number, wave) in &waves {
        hosts.extend(wave.iter().map(|t| attempt(&t.host, Some(*number))));
    }
    hosts.extend(done.iter().map(|t| HostAttempt {
        result: "skipped".into(),
        changed: Some(false),
        revision: Some(revision.to_string()),
        error: Some(format!("already on {revision}")),
        ..attempt(&t.host, None)
    }));
    hosts.extend(held.iter().map(|t| HostAttempt {
        result: "held".into(),
        changed: Some(false),
        revision: installed.get(&t.host).cloned().flatten(),
        error: holds.get(&t.host).map(HoldRecord::describe),
        ..attempt(&t.host, None)
    }));
    (hosts, waves.len())
}

/// The holds a rollout of `action` to `revision` leaves alone: every hold in force, except,
/// for a fleet rollback, those fleet rollbacks set at the same revision (the same
/// `pm-rollback` run again continues what they started).
pub(crate) fn holds_in_the_way(
    mut holds: HashMap<String, HoldRecord>,
    action: Action,
    revision: &str,
) -> HashMap<String, HoldRecord> {
    if let Action::Generation(_) = action {
        holds.retain(|_, hold| {
            hold.kind != HoldKind::FleetRollback.as_str()
                || hold.revision.as_deref() != Some(revision)
        });
    }
    holds
}

/// What each host had installed at its last recent answer (see
/// [`Inventory::installed_revisions`]), read-only.
pub(crate) fn read_installed(
    home: &Path,
    global: &GlobalArgs,
) -> anyhow::Result<HashMap<String, Option<String>>> {
    let manager_key = crate::pki::current_fingerprint(home);
    Ok(Inventory::open_read_only(home, global.lock_timeout)
        .map_err(inventory_error)?
        .map(|inv| inv.installed_revisions(manager_key.as_deref()))
        .transpose()
        .map_err(inventory_error)?
        .unwrap_or_default())
}

/// The holds in force, read-only.
pub(crate) fn read_holds(
    home: &Path,
    global: &GlobalArgs,
) -> anyhow::Result<HashMap<String, HoldRecord>> {
    Ok(Inventory::open_read_only(home, global.lock_timeout)
        .map_err(inventory_error)?
        .map(|inv| inv.holds())
        .transpose()
        .map_err(inventory_error)?
        .unwrap_or_default())
}

/// Changes the host rows of the targets a setup step reached (`step` is no longer failed).
fn mark_hosts(
    inv: &Inventory,
    hosts: &[crate::inventory::HostRecord],
    outcomes: &[(Target, HostOutcome)],
    step: &str,
    change: impl Fn(&mut crate::inventory::HostRecord),
) -> Result<(), InventoryError> {
    for (target, outcome) in outcomes {
        if outcome.is_ok()
            && let Some(host) = hosts.iter().find(|h| h.host == target.host)
        {
            let mut host = host.clone();
            change(&mut host);
            host.setup_failed = without(&host.setup_failed, step);
            inv.upsert_host(&host)?;
        }
    }
    Ok(())
}

/// One host's line in the output.
#[derive(Debug, Clone, Serialize)]
struct HostLine {
    host: String,
    /// None: not asked (skipped, held).
    wave: Option<i32>,
    result: String,
    changed: Option<bool>,
    revision: Option<String>,
    error: Option<String>,
}

impl From<&HostAttempt> for HostLine {
    fn from(a: &HostAttempt) -> HostLine {
        HostLine {
            host: a.host.clone(),
            wave: a.wave,
            result: a.result.clone(),
            changed: a.changed,
            revision: a.revision.clone(),
            error: a.error.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
struct WaveLine {
    /// None: the hosts not asked (skipped, held).
    wave: Option<i32>,
    hosts: usize,
    ok: usize,
    failed: usize,
    skipped: usize,
    not_attempted: usize,
    pending: usize,
    held: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) changed: bool,
    job_id: Option<i64>,
    kind: &'static str,
    revision: String,
    pub(crate) state: String,
    pub(crate) summary: BTreeMap<String, usize>,
    waves: Vec<WaveLine>,
    hosts: Vec<HostLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped_at_wave: Option<i32>,
    /// The command that continues a stopped or interrupted rollout: `pm-push resume JOB`, or
    /// for a fleet rollback the same `pm-rollback` again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) next_step: Option<String>,
    /// A fleet rollback that cannot continue as it was run: dist moved since (what happened,
    /// and what to do instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    dist_moved: Option<DistMoved>,
    /// A fleet rollback that stopped or left hosts behind, but dist is its revision now (a
    /// later run rotated it): nothing is left to run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    finished: bool,
}

/// Why a fleet rollback cannot continue as it was run, and what to do.
#[derive(Debug, Serialize)]
struct DistMoved {
    error: String,
    hint: Option<String>,
}

pub(crate) fn report(
    kind: &'static str,
    job_id: Option<i64>,
    revision: &str,
    state: &str,
    stopped_at_wave: Option<i32>,
    hosts: &[HostAttempt],
) -> Report {
    let mut summary: BTreeMap<String, usize> = [
        "ok",
        "failed",
        "skipped",
        "not_attempted",
        "pending",
        "held",
    ]
    .iter()
    .map(|k| (k.to_string(), 0))
    .collect();
    let mut waves: BTreeMap<Option<i32>, WaveLine> = BTreeMap::new();
    for host in hosts {
        *summary.entry(host.result.clone()).or_default() += 1;
        let line = waves.entry(host.wave).or_insert(WaveLine {
            wave: host.wave,
            hosts: 0,
            ok: 0,
            failed: 0,
            skipped: 0,
            not_attempted: 0,
            pending: 0,
            held: 0,
        });
        line.hosts += 1;
        match host.result.as_str() {
            "ok" => line.ok += 1,
            "failed" => line.failed += 1,
            "skipped" => line.skipped += 1,
            "not_attempted" => line.not_attempted += 1,
            "held" => line.held += 1,
            _ => line.pending += 1,
        }
    }
    summary.insert("targets".into(), hosts.len());
    Report {
        // A plan (a dry run) changes what it would install on (Ansible's check mode).
        changed: hosts.iter().any(|h| h.changed == Some(true))
            || (state == "planned" && hosts.iter().any(|h| h.result == "pending")),
        job_id,
        kind,
        revision: revision.to_string(),
        state: state.to_string(),
        summary,
        waves: waves.into_values().collect(),
        hosts: hosts.iter().map(HostLine::from).collect(),
        stopped_at_wave,
        next_step: match (kind, job_id, state) {
            ("update", Some(job), "stopped" | "interrupted") => {
                Some(format!("pm-push resume {job}"))
            }
            _ => None,
        },
        dist_moved: None,
        finished: false,
    }
}

pub(crate) fn print(global: &GlobalArgs, report: &Report) -> anyhow::Result<ExitStatus> {
    let failed = report.summary.get("failed").copied().unwrap_or(0);
    let ok = report.summary.get("ok").copied().unwrap_or(0)
        + report.summary.get("skipped").copied().unwrap_or(0);
    let status = match report.state.as_str() {
        "planned" | "running" => ExitStatus::Success,
        "done" if failed == 0 => ExitStatus::Success,
        _ if ok > 0 => ExitStatus::Partial,
        _ => ExitStatus::Failure,
    };
    if global.json {
        cli::print_json(report)?;
    } else {
        if !global.quiet && !report.hosts.is_empty() {
            let mut table = cli::table(&["wave", "host", "result", "revision", "detail"]);
            for host in &report.hosts {
                table.add_row(vec![
                    match host.wave {
                        None => "-".to_string(),
                        Some(0) => "canary".to_string(),
                        Some(n) => n.to_string(),
                    },
                    host.host.clone(),
                    host.result.clone(),
                    host.revision.clone().unwrap_or_default(),
                    host.error.clone().unwrap_or_default(),
                ]);
            }
            cli::print_text(table)?;
        }
        let s = &report.summary;
        cli::print_text(format!(
            "{} {} of {}: {} ({} ok, {} failed, {} skipped, {} held, {} not attempted, {} \
             pending){}",
            report.kind,
            report.job_id.map_or_else(
                || match report.state.as_str() {
                    "planned" => "(dry run)".to_string(),
                    _ => "(no job: no target)".to_string(),
                },
                |j| format!("job {j}")
            ),
            report.revision,
            report.state,
            s["ok"],
            s["failed"],
            s["skipped"],
            s["held"],
            s["not_attempted"],
            s["pending"],
            report
                .stopped_at_wave
                .map_or(String::new(), |w| format!("; stopped at wave {w}")),
        ))?;
    }
    let next = report.next_step.as_deref().unwrap_or_default();
    match (report.kind, report.state.as_str()) {
        ("update", "stopped") => {
            eprintln!(
                "error: the rollout stopped at wave {}: too many hosts failed; later waves were \
                 not touched",
                report.stopped_at_wave.unwrap_or_default()
            );
            eprintln!(
                "hint: `{next}` runs the waves that were not attempted; after fixing the failed \
                 hosts, `pm-push update` retries them (hosts on dist are skipped)"
            );
        }
        ("update", "interrupted") => eprintln!("hint: `{next}` continues where it stopped"),
        // A fleet rollback is continued by running it again: resuming is refused for it, and
        // an update would install dist, undoing it.
        // Finished since (dist is its revision): `pm-push status` says so instead.
        ("rollback", "stopped" | "interrupted") if report.finished => {}
        ("rollback", state @ ("stopped" | "interrupted")) => {
            if state == "stopped" {
                eprintln!(
                    "error: the rollback stopped at wave {}: too many hosts failed; later waves \
                     were not touched",
                    report.stopped_at_wave.unwrap_or_default()
                );
            }
            if let Some(moved) = &report.dist_moved {
                eprintln!("error: {}", moved.error);
                if let Some(hint) = &moved.hint {
                    eprintln!("hint: {hint}");
                }
                return Ok(status);
            }
            eprintln!(
                "hint: after fixing the failed hosts, run the same pm-rollback again: `{next}` \
                 (hosts already on {} are skipped; without target flags, dist rotates back once \
                 every target that is not held is on it)",
                report.revision
            );
        }
        _ => {}
    }
    Ok(status)
}

/// The command line that runs a fleet rollback again: the one it was started with (kept in its
/// options), else the generation alone.
pub(crate) fn rollback_command(record: &RolloutRecord) -> String {
    serde_json::from_str::<serde_json::Value>(&record.options)
        .ok()
        .and_then(|options| options["command"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            format!(
                "pm-rollback --generation {}",
                record.generation.unwrap_or(1)
            )
        })
}

/// `pm-push update`.
fn start(home: &Path, global: &GlobalArgs, args: &UpdateArgs) -> anyhow::Result<ExitStatus> {
    let revision = dist_revision(home)?;
    let (targets, installed, holds) = {
        let Some(inventory) =
            Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)?
        else {
            return Err(
                UserError::usage("no inventory yet: there are no hosts to update")
                    .with_hint("activate agents first with `pm-activate host ADDR --key-file F`")
                    .into(),
            );
        };
        let hosts = inventory.hosts().map_err(inventory_error)?;
        let where_hosts = args.targets.where_hosts(&inventory)?;
        (
            args.targets.resolve(&hosts, where_hosts.as_ref())?,
            inventory
                .installed_revisions(crate::pki::current_fingerprint(home).as_deref())
                .map_err(inventory_error)?,
            inventory.holds().map_err(inventory_error)?,
        )
    };
    if targets.is_empty() {
        crate::targets::note_no_active_host();
        return print(
            global,
            &report("update", None, &revision, "done", None, &[]),
        );
    }
    let (hosts, waves) = plan_attempts(
        targets,
        &installed,
        &holds,
        &revision,
        args.waves.canary,
        args.waves.wave_size,
    );
    if global.dry_run {
        return print(
            global,
            &report("update", None, &revision, "planned", None, &hosts),
        );
    }
    let _lock = rollout_lock(home)?;
    let options = serde_json::to_string(&args.waves)?;
    let record = RolloutRecord {
        job_id: 0,
        kind: "update".into(),
        revision: Some(revision.clone()),
        generation: None,
        state: "running".into(),
        waves: waves as i32,
        max_failures: args.waves.max_failures.to_string(),
        options,
        pid: Some(std::process::id() as i32),
        stopped_at_wave: None,
        started_at: None,
    };
    // Nobody to ask (every target on dist, or held): the job ends as it starts.
    let nothing_to_ask = !hosts.iter().any(|h| h.result == "pending");
    let job_id = {
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        inventory
            .transaction(|inv| {
                let job_id = inv.start_rollout(
                    Utc::now(),
                    &format!("update to {revision}: {} hosts", hosts.len()),
                    &record,
                    &hosts,
                )?;
                if nothing_to_ask {
                    let summary = summary_line("update", &revision, &hosts);
                    inv.update_rollout(job_id, "done", None, None, "unchanged", &summary)?;
                }
                Ok(job_id)
            })
            .map_err(inventory_error)?
    };
    if nothing_to_ask {
        return print(
            global,
            &report("update", Some(job_id), &revision, "done", None, &hosts),
        );
    }
    tracing::info!(job_id, %revision, waves, "rollout started");
    let done = execute(
        home,
        global,
        job_id,
        &revision,
        &args.waves,
        Action::Update,
        hosts,
    )?;
    print(global, &done.report(job_id, &revision))
}

/// `pm-push resume JOB`.
fn resume(home: &Path, global: &GlobalArgs, job_id: i64) -> anyhow::Result<ExitStatus> {
    let (record, hosts, newest) = {
        let inventory = Inventory::open_read_only(home, global.lock_timeout)
            .map_err(inventory_error)?
            .ok_or_else(|| UserError::usage("no inventory yet: there is no rollout to resume"))?;
        let (record, hosts) = inventory
            .rollout(Some(job_id), "update")
            .map_err(inventory_error)?
            .ok_or_else(|| {
                UserError::usage(format!("there is no rollout with job id {job_id}"))
                    .with_hint("`pm-push status` shows the newest rollout")
            })?;
        let mut newest = job_id;
        for kind in ["update", "rollback"] {
            if let Some((later, _)) = inventory.rollout(None, kind).map_err(inventory_error)? {
                newest = newest.max(later.job_id);
            }
        }
        (record, hosts, newest)
    };
    if record.kind == "rollback" {
        return Err(UserError::usage(format!(
            "job {job_id} is a fleet rollback: it is not resumed but run again"
        ))
        .with_hint(format!(
            "run the same pm-rollback again: `{}` (hosts already on its revision are skipped; \
             without target flags, dist rotates back once every target that is not held is)",
            rollback_command(&record)
        ))
        .into());
    }
    // Holding the lock, no other rollout runs: a `running` one was interrupted.
    let _lock = rollout_lock(home)?;
    let state = record.state.clone();
    if state == "done" {
        let revision = record.revision.clone().unwrap_or_default();
        return print(
            global,
            &report("update", Some(job_id), &revision, "done", None, &hosts),
        );
    }
    // A later rollout (or rollback) may have moved the hosts this one recorded as done: its
    // results no longer say what is left to do.
    if newest > job_id {
        return Err(UserError::usage(format!(
            "rollout {job_id} was followed by rollout {newest}: its results no longer say which \
             hosts are on its revision"
        ))
        .with_hint("start a new rollout: `pm-push update` (hosts already on dist are skipped)")
        .into());
    }
    let revision = record.revision.clone().unwrap_or_default();
    let dist = dist_revision(home)?;
    if dist != revision {
        return Err(UserError::usage(format!(
            "rollout {job_id} was of {revision}, but dist is now {dist}"
        ))
        .with_hint("start a new rollout: `pm-push update`")
        .into());
    }
    let waves: WaveArgs = serde_json::from_str(&record.options)
        .context("the rollout's stored options are not readable")?;
    // Continue: what never finished, or was not attempted, gets a new attempt.
    let hosts: Vec<HostAttempt> = hosts
        .into_iter()
        .map(|mut h| {
            if h.result == "pending" || h.result == "not_attempted" {
                h.attempt += 1;
                h.result = "pending".into();
                h.error = None;
            }
            h
        })
        .collect();
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    inventory
        .transaction(|inv| {
            let pending: Vec<HostAttempt> = hosts
                .iter()
                .filter(|h| h.result == "pending")
                .cloned()
                .collect();
            inv.record_attempts(job_id, &pending)?;
            inv.update_rollout(
                job_id,
                "running",
                None,
                Some(std::process::id() as i32),
                "running",
                &format!("update to {revision}: resumed"),
            )
        })
        .map_err(inventory_error)?;
    drop(inventory);
    let done = execute(
        home,
        global,
        job_id,
        &revision,
        &waves,
        Action::Update,
        hosts,
    )?;
    print(global, &done.report(job_id, &revision))
}

/// A rollout's state, telling a live `running` from one whose process is gone.
pub(crate) fn effective_state(home: &Path, record: &RolloutRecord) -> String {
    if record.state == "running" && !rollout_process_alive(home, record.pid) {
        "interrupted".into()
    } else {
        record.state.clone()
    }
}

/// Whether the process recorded as running a rollout still runs (the manager runs it here). A
/// PID alone is not enough: pid_max is often 32768, so the kernel soon gives a killed rollout's
/// PID to another program, even to the `pm-push status` asking. So it must still be the PID
/// that `rollout.lock` names (every rollout writes its own there; another one means a later
/// rollout has run), not this process, and a pm-push or pm-rollback.
pub(crate) fn rollout_process_alive(home: &Path, pid: Option<i32>) -> bool {
    let Some(pid) = pid else {
        return false;
    };
    match std::fs::read_to_string(home.join("rollout.lock")) {
        Ok(locker) if locker.trim() != pid.to_string() => return false,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return false,
        // Unreadable (another user's home): the other checks decide.
        _ => {}
    }
    pid as u32 != std::process::id()
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| matches!(comm.trim_end(), "pm-push" | "pm-rollback"))
}

/// `pm-push status [JOB]`.
fn status(home: &Path, global: &GlobalArgs, job: Option<i64>) -> anyhow::Result<ExitStatus> {
    let found =
        match Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)? {
            Some(inventory) => inventory.rollout(job, "update").map_err(inventory_error)?,
            None => None,
        };
    let Some((record, hosts)) = found else {
        return Err(UserError::usage(match job {
            Some(job) => format!("there is no rollout with job id {job}"),
            None => "there is no rollout yet".to_string(),
        })
        .with_hint("start one with `pm-push update`")
        .into());
    };
    let state = effective_state(home, &record);
    let mut report = report(
        if record.kind == "rollback" {
            "rollback"
        } else {
            "update"
        },
        Some(record.job_id),
        record.revision.as_deref().unwrap_or("-"),
        &state,
        record.stopped_at_wave,
        &hosts,
    );
    // A rollback that ran every wave but left hosts behind is unfinished too, until dist is
    // its revision (that run, or a later one, rotated it).
    let generations = Repo::new(home)
        .generations()
        .map_err(|err| UserError::failure(err.to_string()))?;
    let unfinished_run = record.kind == "rollback"
        && (matches!(state.as_str(), "stopped" | "interrupted")
            || state == "done"
                && hosts
                    .iter()
                    .any(|h| matches!(h.result.as_str(), "failed" | "not_attempted" | "pending")));
    // Once dist is its revision the rollback is finished, whoever finished it: the command it
    // was run with would now roll back further.
    report.finished = unfinished_run && generations.dist == record.revision;
    let left_behind = unfinished_run && state == "done" && !report.finished;
    if unfinished_run && !report.finished {
        report.next_step = Some(rollback_command(&record));
        // Once dist moved (a publish), the same command would install another revision.
        if let Some(moved) = crate::rollback::dist_moved(&record, &generations) {
            report.next_step = None;
            report.dist_moved = Some(DistMoved {
                error: moved.message,
                hint: moved.hint,
            });
        }
    }
    let printed = print(global, &report);
    if report.finished && !global.json {
        eprintln!(
            "note: dist is {}, this rollback's revision: it is finished (a later run rotated \
             dist), nothing is left to run",
            report.revision
        );
    }
    // `print` names the next step of a stopped or interrupted rollout only.
    if left_behind && !global.json {
        match (&report.dist_moved, &report.next_step) {
            (Some(moved), _) => {
                eprintln!("error: {}", moved.error);
                if let Some(hint) = &moved.hint {
                    eprintln!("hint: {hint}");
                }
            }
            (None, Some(next)) => eprintln!(
                "hint: not every target rolled back: after fixing those hosts, run the same \
                 pm-rollback again: `{next}` (hosts already on {} are skipped)",
                report.revision
            ),
            (None, None) => {}
        }
    }
    printed.map(|status| {
        // Showing a rollout succeeds whatever the rollout's outcome.
        if matches!(status, ExitStatus::Usage) {
            status
        } else {
            ExitStatus::Success
        }
    })
}

/// Why an agent did not install.
#[derive(Debug)]
pub(crate) enum InstallError {
    /// The host is held: the agent refused (HTTP 409 `held`), naming the hold.
    Held {
        message: String,
        hold: proto::HoldState,
    },
    /// Anything else, as a line for people.
    Failed(String),
}

/// Asks one agent to install dist or a backup generation, with the hold to take when given.
async fn install(
    client: &reqwest::Client,
    address: &str,
    action: Action,
    hold: Option<&proto::HoldSpec>,
) -> Result<InstallReport, InstallError> {
    let request = proto::UpdateRequest {
        generation: match action {
            Action::Update => None,
            Action::Generation(n) => Some(n),
        },
        hold: hold.cloned(),
    };
    let body = serde_json::to_string(&request).map_err(|e| InstallError::Failed(e.to_string()))?;
    let (status, answer) = post_agent_raw(client, address, proto::UPDATE_PATH, Some(body))
        .await
        .map_err(InstallError::Failed)?;
    if status == reqwest::StatusCode::CONFLICT
        && let Ok(held) = serde_json::from_slice::<proto::HeldResponse>(&answer)
        && held.code == "held"
    {
        return Err(InstallError::Held {
            message: held.message,
            hold: held.hold,
        });
    }
    agent_answer(address, status, &answer, "install").map_err(InstallError::Failed)
}

/// POSTs `body` (JSON, or nothing) to an agent over mutual TLS: its answer as `T`, or a line
/// that names the agent and says what went wrong (`what` is the refused action: "install").
pub(crate) async fn post_agent<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    address: &str,
    path: &str,
    body: Option<String>,
    what: &str,
) -> Result<T, String> {
    let (status, answer) = post_agent_raw(client, address, path, body).await?;
    agent_answer(address, status, &answer, what)
}

/// POSTs to an agent: the status and the body of its answer (capped), or why there is none.
async fn post_agent_raw(
    client: &reqwest::Client,
    address: &str,
    path: &str,
    body: Option<String>,
) -> Result<(reqwest::StatusCode, Vec<u8>), String> {
    let mut request = client.post(format!("https://{address}{path}"));
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
    }
    let response = request.send().await.map_err(|err| {
        if let Some(wrong) = crate::tls::find_cause::<crate::hosts::WrongHost>(&err) {
            return wrong.to_string();
        }
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        format!("agent `{address}` did not answer: {text}")
    })?;
    let status = response.status();
    let body = proto::read_body(response, proto::MAX_ANSWER_BYTES)
        .await
        .map_err(|err| format!("agent `{address}`: {err}"))?;
    Ok((status, body))
}

/// An agent's answer as `T`, or its refusal as a line for people.
fn agent_answer<T: serde::de::DeserializeOwned>(
    address: &str,
    status: reqwest::StatusCode,
    body: &[u8],
    what: &str,
) -> Result<T, String> {
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorResponse>(body)
            .map(|e| e.message)
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return Err(format!("agent `{address}` could not {what}: {message}"));
    }
    serde_json::from_slice(body)
        .map_err(|err| format!("agent `{address}` answered something that is not a report: {err}"))
}

/// A host's index in the rollout and how its install went.
type Installed = (usize, Result<InstallReport, InstallError>);

/// Runs the pending hosts wave by wave, recording each wave, until done, stopped or interrupted.
/// Before each wave, dist must still be the revision rolled out, and hosts held since the plan
/// are left alone (`held`); an agent that answers it is held is `held` too, and its hold is
/// recorded. A fleet rollback (`Action::Generation`) holds each host it moves at the revision
/// (kind `fleet-rollback`), so its own schedule does not take it forward before dist rotates.
pub(crate) fn execute(
    home: &Path,
    global: &GlobalArgs,
    job_id: i64,
    revision: &str,
    options: &WaveArgs,
    action: Action,
    mut hosts: Vec<HostAttempt>,
) -> anyhow::Result<Executed> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = mutual_client(home, options.timeout, false, global.lock_timeout)?;
    let known = Inventory::open_read_only(home, global.lock_timeout)
        .map_err(inventory_error)?
        .ok_or_else(|| UserError::failure("the inventory went away"))?
        .hosts()
        .map_err(inventory_error)?;
    let addresses: HashMap<String, String> = known
        .iter()
        .map(|h| (h.host.clone(), h.address.clone()))
        .collect();
    let hold_spec: Option<Arc<proto::HoldSpec>> = match action {
        Action::Update => None,
        Action::Generation(n) => Some(Arc::new(proto::HoldSpec {
            kind: HoldKind::FleetRollback,
            reason: format!("fleet rollback to backup/{n} ({revision}), job {job_id}"),
            set_by: crate::inventory::actor(),
            until: None,
            seconds_left: None,
        })),
    };
    let wave_numbers: Vec<i32> = {
        let mut numbers: Vec<i32> = hosts
            .iter()
            .filter(|h| h.result == "pending")
            .filter_map(|h| h.wave)
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        numbers
    };
    let poll_settings = Settings {
        concurrency: options.concurrency,
        timeout: Duration::from_secs(30),
        deadline: Duration::from_secs(300),
        inactive_after: crate::poll::load_config(home)?.inactive_after,
        scan_max_age: crate::poll::load_config(home)?.scan_max_age,
        ca: crate::poll::certificate_authority(home)?,
        registry: Some(Arc::new(crate::hosts::Registry::new(known))),
    };
    // One listener for the whole run: a Ctrl-C or SIGTERM at any point (a wave, the pause, the
    // poll) stops before the next wave; the hosts asked so far are recorded.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    runtime.spawn({
        let stopping = Arc::clone(&stopping);
        async move {
            crate::mirror::shutdown_signal().await;
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let stopped = {
        let stopping = Arc::clone(&stopping);
        move || {
            let stopping = Arc::clone(&stopping);
            async move {
                while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let mut state = "done";
    let mut stopped_at = None;
    // Whether the rollout's end is recorded (each way out records it once).
    let mut ended = false;
    for (index, wave) in wave_numbers.iter().copied().enumerate() {
        if index > 0 && !options.pause.is_zero() {
            runtime.block_on(async {
                tokio::select! {
                    _ = tokio::time::sleep(options.pause) => {}
                    _ = stopped() => {}
                }
            });
        }
        if stopping.load(std::sync::atomic::Ordering::SeqCst) {
            state = "interrupted";
            let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
            let summary_text = summary_line(action.kind(), revision, &hosts);
            inventory
                .transaction(|inv| {
                    inv.update_rollout(job_id, "interrupted", None, None, "failed", &summary_text)
                })
                .map_err(inventory_error)?;
            ended = true;
            break;
        }
        // Dist must still be what this rollout installs.
        let now = action.serves(home)?;
        if now.as_deref() != Some(revision) {
            tracing::error!(?now, %revision, "the manager's revision changed during the rollout; stopping");
            state = "stopped";
            stopped_at = Some(wave);
            break;
        }
        // A rollout can take hours: a host held meanwhile is left alone.
        let holds = holds_in_the_way(read_holds(home, global)?, action, revision);
        let mut changed_attempts = Vec::new();
        for host in hosts
            .iter_mut()
            .filter(|h| h.wave == Some(wave) && h.result == "pending")
        {
            if let Some(hold) = holds.get(&host.host) {
                host.result = "held".into();
                host.changed = Some(false);
                host.error = Some(hold.describe());
                changed_attempts.push(host.clone());
            }
        }
        let targets: Vec<(usize, String)> = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.wave == Some(wave) && h.result == "pending")
            .map(|(i, h)| (i, addresses.get(&h.host).cloned().unwrap_or_default()))
            .collect();
        for (i, address) in &targets {
            if address.is_empty() {
                hosts[*i].result = "failed".into();
                hosts[*i].error = Some(format!(
                    "host {} is no longer active (deactivated?); it was not asked",
                    hosts[*i].host
                ));
            }
        }
        let targets: Vec<(usize, String)> =
            targets.into_iter().filter(|(_, a)| !a.is_empty()).collect();
        let started = Instant::now();
        let done: Arc<Mutex<Vec<Installed>>> = Arc::default();
        let work = futures_util::stream::iter(targets.clone())
            .map(|(i, address)| {
                let client = client.clone();
                let done = Arc::clone(&done);
                let hold_spec = hold_spec.clone();
                async move {
                    let result = tokio::spawn(async move {
                        install(&client, &address, action, hold_spec.as_deref()).await
                    })
                    .await
                    .unwrap_or_else(|err| {
                        Err(InstallError::Failed(format!(
                            "the install task stopped: {err}"
                        )))
                    });
                    done.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((i, result));
                }
            })
            .buffer_unordered(options.concurrency)
            .collect::<Vec<()>>();
        let interrupted = runtime.block_on(async {
            tokio::select! {
                _ = work => false,
                _ = stopped() => true,
            }
        });
        let finished = std::mem::take(&mut *done.lock().unwrap_or_else(PoisonError::into_inner));
        let mut failures = 0;
        // Holds to record: taken by this fleet rollback, or learnt from agents that refused.
        let mut new_holds: Vec<HoldRecord> = Vec::new();
        for (i, result) in finished {
            let host = &mut hosts[i];
            match result {
                Ok(report) if report.revision.as_deref() != Some(revision) => {
                    host.result = "failed".into();
                    host.changed = Some(report.changed);
                    host.revision = report.revision.clone();
                    host.error = Some(format!(
                        "the agent installed {}, not {revision}: the manager's revision moved \
                         during the rollout, or the agent's dist URL serves another mirror \
                         (check `pm-agent status` on it)",
                        report.revision.as_deref().unwrap_or("nothing")
                    ));
                    failures += 1;
                }
                Ok(report) => {
                    host.result = "ok".into();
                    host.changed = Some(report.changed);
                    host.revision = report.revision.clone();
                    host.error = None;
                    if let Some(spec) = &hold_spec {
                        new_holds.push(HoldRecord {
                            host: host.host.clone(),
                            kind: spec.kind.as_str().into(),
                            reason: spec.reason.clone(),
                            revision: report.revision.clone(),
                            set_at: Utc::now(),
                            set_by: spec.set_by.clone(),
                            until: None,
                            job_id: Some(job_id),
                            on_agent: true,
                        });
                    }
                }
                Err(InstallError::Held { message, hold }) => {
                    host.result = "held".into();
                    host.changed = Some(false);
                    host.error = Some(message);
                    new_holds.push(HoldRecord {
                        host: host.host.clone(),
                        kind: hold.kind.as_str().into(),
                        reason: hold.reason,
                        revision: None,
                        set_at: hold.set_at,
                        set_by: format!("{} (from the agent)", hold.set_by),
                        until: hold.until,
                        job_id: Some(job_id),
                        on_agent: true,
                    });
                }
                Err(InstallError::Failed(error)) => {
                    host.result = "failed".into();
                    host.error = Some(error);
                    failures += 1;
                }
            }
            changed_attempts.push(host.clone());
        }
        tracing::info!(
            wave,
            hosts = targets.len(),
            failures,
            seconds = started.elapsed().as_secs_f64(),
            "wave done"
        );
        // The whole wave counts (attempts of an earlier run that was resumed too), but for its
        // held hosts, which were not asked.
        let in_wave = |h: &&HostAttempt| h.wave == Some(wave) && h.result != "held";
        let wave_size = hosts.iter().filter(in_wave).count();
        let wave_failures = hosts
            .iter()
            .filter(in_wave)
            .filter(|h| h.result == "failed")
            .count();
        let stop = !interrupted && wave_failures > options.max_failures.allowed(wave_size);
        if interrupted {
            state = "interrupted";
        } else if stop {
            state = "stopped";
            stopped_at = Some(wave);
            for host in hosts
                .iter_mut()
                .filter(|h| h.wave > Some(wave) && h.result == "pending")
            {
                host.result = "not_attempted".into();
                changed_attempts.push(host.clone());
            }
        }
        // The wave's hosts as they are now (installed revision, components), and the attempts.
        let wave_hosts: Vec<Target> = targets
            .iter()
            .map(|(i, address)| Target {
                host: hosts[*i].host.clone(),
                address: address.clone(),
                group: String::new(),
                wave: None,
            })
            .collect();
        let polled = if interrupted {
            Vec::new()
        } else {
            let cursors = Inventory::open_read_only(home, global.lock_timeout)
                .map_err(inventory_error)?
                .map(|inv| inv.poll_cursors())
                .transpose()
                .map_err(inventory_error)?
                .unwrap_or_default();
            runtime.block_on(ask_all(
                &client,
                &wave_hosts,
                &cursors,
                &poll_settings,
                chrono::Duration::zero(),
            ))
        };
        let summary_text = summary_line(action.kind(), revision, &hosts);
        let final_state = (interrupted || stop || index + 1 == wave_numbers.len()).then_some(state);
        // The wave's hosts were asked; if only the record fails, installing is idempotent, so
        // resuming asks them again and records them.
        let unrecorded = |err: InventoryError| {
            anyhow::Error::from(UserError::failure(err.to_string()).with_hint(format!(
                "the hosts of wave {wave} were asked but not recorded: `pm-push resume {job_id}` \
                 asks them again and records them"
            )))
        };
        let inventory = Inventory::open(home, global.lock_timeout).map_err(unrecorded)?;
        inventory
            .transaction(|inv| {
                inv.record_attempts(job_id, &changed_attempts)?;
                if !polled.is_empty() {
                    inv.record_polls(job_id, &polled)?;
                }
                inv.record_holds(&new_holds)?;
                inv.record_seen_holds(&polled)?;
                if let Some(final_state) = final_state {
                    inv.update_rollout(
                        job_id,
                        final_state,
                        stopped_at,
                        None,
                        job_status(final_state, &hosts),
                        &summary_text,
                    )?;
                }
                Ok(())
            })
            .map_err(unrecorded)?;
        ended |= final_state.is_some();
        if interrupted || stop {
            break;
        }
    }
    if state == "stopped"
        && stopped_at.is_some()
        && !hosts.iter().any(|h| h.result == "not_attempted")
    {
        // Stopped because dist moved before a wave: record the rest as not attempted.
        let rest: Vec<HostAttempt> = hosts
            .iter_mut()
            .filter(|h| h.result == "pending")
            .map(|h| {
                h.result = "not_attempted".into();
                h.error = Some("the manager's revision changed during the rollout".into());
                h.clone()
            })
            .collect();
        let summary_text = summary_line(action.kind(), revision, &hosts);
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        inventory
            .transaction(|inv| {
                inv.record_attempts(job_id, &rest)?;
                inv.update_rollout(job_id, "stopped", stopped_at, None, "failed", &summary_text)
            })
            .map_err(inventory_error)?;
    } else if !ended {
        // No wave left to run (a resume of a rollout whose hosts all finished): it is done.
        let summary_text = summary_line(action.kind(), revision, &hosts);
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        inventory
            .transaction(|inv| {
                inv.update_rollout(
                    job_id,
                    state,
                    None,
                    None,
                    job_status(state, &hosts),
                    &summary_text,
                )
            })
            .map_err(inventory_error)?;
    }
    Ok(Executed {
        kind: action.kind(),
        state: state.to_string(),
        stopped_at,
        hosts,
    })
}

/// The job status of a rollout that ended in `state`: `ok` when done without failures (held
/// hosts are not failures), `partial` when done with some, else `failed`.
fn job_status(state: &str, hosts: &[HostAttempt]) -> &'static str {
    match (state, hosts.iter().any(|h| h.result == "failed")) {
        ("done", false) => "ok",
        ("done", true) => "partial",
        _ => "failed",
    }
}

/// What a rollout installs on each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The manager's dist.
    Update,
    /// The manager's backup generation N (a fleet rollback).
    Generation(u32),
}

impl Action {
    fn kind(self) -> &'static str {
        match self {
            Action::Update => "update",
            Action::Generation(_) => "rollback",
        }
    }

    /// The revision the manager serves for this action now.
    pub(crate) fn serves(self, home: &Path) -> Result<Option<String>, UserError> {
        let generations = Repo::new(home)
            .generations()
            .map_err(|err| UserError::failure(err.to_string()))?;
        Ok(match self {
            Action::Update => generations.dist,
            Action::Generation(n) => generations.backups.get(n as usize - 1).cloned(),
        })
    }
}

/// How a rollout's waves ended.
pub(crate) struct Executed {
    pub(crate) kind: &'static str,
    pub(crate) state: String,
    pub(crate) stopped_at: Option<i32>,
    pub(crate) hosts: Vec<HostAttempt>,
}

impl Executed {
    fn report(&self, job_id: i64, revision: &str) -> Report {
        report(
            self.kind,
            Some(job_id),
            revision,
            &self.state,
            self.stopped_at,
            &self.hosts,
        )
    }
}

/// What a command did on one host: whether it changed, a line for people, or why it failed.
type HostOutcome = Result<(bool, String), String>;

/// What a per-host command is, for the job log and the output.
#[derive(Default)]
struct JobKind<'a> {
    kind: &'static str,
    what: &'a str,
    /// How long one host may take.
    timeout: Duration,
    /// A host that needed no change is `skipped` rather than `ok` (upgrade-agent: the host was
    /// on the package already).
    unchanged_is_skipped: bool,
    /// The first host goes alone, and when it fails the others are `not_attempted`
    /// (upgrade-agent: a package that breaks the agent must not take the fleet's management
    /// channel with it).
    canary: bool,
    /// Hosts whose record on the manager this command changes whatever their agent answers (a
    /// hold, a release, a profile saved before it is sent): when such an agent fails, the
    /// manager changed all the same, so the run is partial (exit 3) and `changed`, never
    /// "failed, nothing done".
    recorded: HashSet<String>,
    /// Hosts the command leaves as they are (the op says why, and adds those an agent's answer
    /// leaves alone): reported `skipped`.
    left_alone: Arc<Mutex<HashSet<String>>>,
}

/// Resolves the targets (read-only) and returns them with every host record.
pub(crate) fn resolve(
    home: &Path,
    global: &GlobalArgs,
    targets: &TargetArgs,
) -> anyhow::Result<(Vec<Target>, Vec<crate::inventory::HostRecord>)> {
    let Some(inventory) =
        Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)?
    else {
        return Err(UserError::usage("no inventory yet: there are no hosts")
            .with_hint("activate agents first with `pm-activate host ADDR --key-file F`")
            .into());
    };
    let hosts = inventory.hosts().map_err(inventory_error)?;
    let where_hosts = targets.where_hosts(&inventory)?;
    Ok((targets.resolve(&hosts, where_hosts.as_ref())?, hosts))
}

/// A per-host command over a fleet with no active host: nothing to do (no job), said alike by
/// every command.
fn no_target(global: &GlobalArgs, kind: &str, what: &str) -> anyhow::Result<ExitStatus> {
    crate::targets::note_no_active_host();
    if global.json {
        cli::print_json(&serde_json::json!({
            "changed": false, "job_id": null, "kind": kind, "hosts": [],
            "summary": {"targets": 0, "ok": 0, "failed": 0, "skipped": 0, "not_attempted": 0},
        }))?;
    } else {
        cli::print_text(format!("{kind} {what}: no target, nothing done"))?;
    }
    Ok(ExitStatus::Success)
}

/// Runs `op` on every target (32 at a time), records a job with a result row per host (and
/// whatever `record` adds, given the job id, in the same transaction) and prints the per-host
/// results.
fn on_targets<F, Fut>(
    home: &Path,
    global: &GlobalArgs,
    job: JobKind<'_>,
    targets: Vec<Target>,
    op: F,
    record: impl FnOnce(&Inventory, i64, &[(Target, HostOutcome)]) -> Result<(), InventoryError>,
) -> anyhow::Result<ExitStatus>
where
    F: Fn(reqwest::Client, Target) -> Fut,
    Fut: std::future::Future<Output = HostOutcome> + Send + 'static,
{
    let JobKind {
        kind,
        what,
        timeout,
        unchanged_is_skipped,
        canary,
        recorded,
        left_alone,
    } = job;
    let left_alone = |host: &str| {
        left_alone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(host)
    };
    let result_of = |target: &Target, outcome: &HostOutcome| match outcome {
        Ok(_) if left_alone(&target.host) => "skipped",
        Ok((false, _)) if unchanged_is_skipped => "skipped",
        Ok(_) => "ok",
        Err(_) => "failed",
    };
    if targets.is_empty() {
        return no_target(global, kind, what);
    }
    if global.dry_run {
        let (skip, hosts): (Vec<String>, Vec<String>) = targets
            .iter()
            .map(|t| t.host.clone())
            .partition(|host| left_alone(host));
        if global.json {
            cli::print_json(&serde_json::json!({
                "changed": false, "kind": kind, "would_apply_to": hosts, "would_skip": skip,
                "hosts": [],
            }))?;
        } else {
            cli::print_text(format!(
                "{kind} {what}: would apply to {} host(s): {}{}",
                hosts.len(),
                hosts.join(", "),
                if skip.is_empty() {
                    String::new()
                } else {
                    format!("; would skip {}: {}", skip.len(), skip.join(", "))
                }
            ))?;
        }
        return Ok(ExitStatus::Success);
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = mutual_client(home, timeout, false, global.lock_timeout)?;
    let started = Utc::now();
    let run = |targets: Vec<Target>| -> Vec<(Target, HostOutcome)> {
        runtime.block_on(
            futures_util::stream::iter(targets)
                .map(|target| {
                    let work = op(client.clone(), target.clone());
                    async move {
                        let outcome = tokio::spawn(work)
                            .await
                            .unwrap_or_else(|err| Err(format!("the task stopped: {err}")));
                        (target, outcome)
                    }
                })
                .buffer_unordered(32)
                .collect(),
        )
    };
    let mut targets = targets;
    let rest = if canary && targets.len() > 1 {
        targets.split_off(1)
    } else {
        Vec::new()
    };
    let mut outcomes = run(targets);
    let canary_failed = outcomes.iter().any(|(_, outcome)| outcome.is_err());
    let not_attempted: Vec<Target> = if canary_failed {
        rest
    } else {
        outcomes.extend(run(rest));
        Vec::new()
    };
    let mut attempts: Vec<HostAttempt> = outcomes
        .iter()
        .map(|(target, outcome)| HostAttempt {
            host: target.host.clone(),
            wave: Some(0),
            attempt: 1,
            result: result_of(target, outcome).into(),
            changed: match outcome {
                Ok((changed, _)) => Some(*changed),
                Err(_) => recorded.contains(&target.host).then_some(true),
            },
            revision: None,
            error: outcome.as_ref().err().cloned(),
        })
        .collect();
    attempts.extend(not_attempted.iter().map(|target| HostAttempt {
        host: target.host.clone(),
        wave: Some(0),
        attempt: 1,
        result: "not_attempted".into(),
        changed: None,
        revision: None,
        error: None,
    }));
    let failed = attempts.iter().filter(|a| a.result == "failed").count();
    let skipped = attempts.iter().filter(|a| a.result == "skipped").count();
    let untouched = not_attempted.len();
    // Failed with nothing changed anywhere: only then is a run "failed" rather than partial.
    let failed_unchanged = attempts
        .iter()
        .filter(|a| a.result == "failed" && a.changed != Some(true))
        .count();
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    let job_id = inventory
        .transaction(|inv| {
            let job_id = inv.insert_job(
                kind,
                started,
                match failed {
                    0 => "ok",
                    _ if failed_unchanged + untouched == attempts.len() => "failed",
                    _ => "partial",
                },
                &format!("{kind} {what}: {} hosts, {failed} failed", attempts.len()),
            )?;
            inv.record_attempts(job_id, &attempts)?;
            record(inv, job_id, &outcomes)?;
            Ok(job_id)
        })
        .map_err(inventory_error)?;
    drop(inventory);
    let mut lines: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|(target, outcome)| match outcome {
            Ok((changed, detail)) => serde_json::json!({
                "host": target.host, "result": result_of(target, outcome), "changed": changed,
                "detail": detail, "error": null,
            }),
            Err(error) => serde_json::json!({
                "host": target.host, "result": "failed",
                "changed": recorded.contains(&target.host), "error": error,
            }),
        })
        .chain(not_attempted.iter().map(|target| {
            serde_json::json!({
                "host": target.host, "result": "not_attempted", "changed": false, "error": null,
            })
        }))
        .collect();
    lines.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
    let changed = attempts.iter().any(|a| a.changed == Some(true));
    if global.json {
        cli::print_json(&serde_json::json!({
            "changed": changed, "job_id": job_id, "kind": kind, "hosts": lines,
            "summary": {
                "targets": lines.len(), "ok": lines.len() - failed - skipped - untouched,
                "failed": failed, "skipped": skipped, "not_attempted": untouched,
            },
        }))?;
    } else {
        let mut table = cli::table(&["host", "result", "detail"]);
        for line in &lines {
            table.add_row(vec![
                line["host"].as_str().unwrap_or_default().to_string(),
                line["result"].as_str().unwrap_or_default().to_string(),
                line["error"]
                    .as_str()
                    .or(line["detail"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            ]);
        }
        cli::print_text(table)?;
        cli::print_text(format!(
            "{kind} {what} (job {job_id}): {} ok, {failed} failed, {skipped} skipped{}",
            lines.len() - failed - skipped - untouched,
            if untouched > 0 {
                format!(
                    ", {untouched} not attempted: the first host failed, so the others were \
                     left alone; fix what it reports and run the same command again"
                )
            } else {
                String::new()
            }
        ))?;
    }
    Ok(match failed {
        0 => ExitStatus::Success,
        _ if failed_unchanged + untouched == lines.len() => ExitStatus::Failure,
        _ => ExitStatus::Partial,
    })
}

fn setup_error(err: UserError) -> String {
    err.message
}

/// `pm-push profile NAME`; `recorded`: the hosts for whose sake the manager already changed
/// (the profile was saved), so a host that fails leaves the run partial, not failed.
fn push_profile(
    home: &Path,
    global: &GlobalArgs,
    name: &str,
    targets: &TargetArgs,
    recorded: HashSet<String>,
) -> anyhow::Result<ExitStatus> {
    let profile = Inventory::open_read_only(home, global.lock_timeout)
        .map_err(inventory_error)?
        .map(|inv| inv.profile(name))
        .transpose()
        .map_err(inventory_error)?
        .flatten()
        .ok_or_else(|| {
            UserError::usage(format!("there is no profile `{name}`")).with_hint(format!(
                "create it with `pm-activate profile new {name} --set key=value` (or `--file F`)"
            ))
        })?;
    let (targets, hosts) = resolve(home, global, targets)?;
    let profile = Arc::new(profile);
    let recorded_for = recorded.clone();
    on_targets(
        home,
        global,
        JobKind {
            kind: "profile",
            what: name,
            timeout: Duration::from_secs(30),
            unchanged_is_skipped: false,
            canary: false,
            recorded,
            ..JobKind::default()
        },
        targets,
        |client, target| {
            let profile = Arc::clone(&profile);
            async move {
                crate::activate::setup::send_profile(&client, &target.address, &profile)
                    .await
                    .map(|answer| (answer.changed, format!("profile {}", profile.name)))
                    .map_err(setup_error)
            }
        },
        |inv, _, outcomes| {
            mark_hosts(inv, &hosts, outcomes, "profile", |host| {
                host.profile = name.to_string();
            })?;
            // A saved profile its host did not get (down, refused): the inventory says the
            // step is pending (`setup: failed: profile`) until a later send reaches the host.
            for (target, outcome) in outcomes {
                if outcome.is_err()
                    && recorded_for.contains(&target.host)
                    && let Some(host) = hosts.iter().find(|h| h.host == target.host)
                {
                    let mut host = host.clone();
                    host.setup_failed = with(&host.setup_failed, "profile");
                    inv.upsert_host(&host)?;
                }
            }
            Ok(())
        },
    )
}

/// Sends profile `name` to the hosts named in `hosts` with the per-host run and report of
/// `pm-push profile` (`pm-activate profile new` after it replaced a profile they use).
pub(crate) fn resend_profile(
    home: &Path,
    global: &GlobalArgs,
    name: &str,
    hosts: &[String],
) -> anyhow::Result<ExitStatus> {
    let targets = TargetArgs {
        hosts: hosts.to_vec(),
        ..TargetArgs::default()
    };
    // The profile is saved: whatever the hosts answer, the manager changed.
    push_profile(
        home,
        global,
        name,
        &targets,
        hosts.iter().cloned().collect(),
    )
}

/// `pm-push schedule`: the agents' own schedule (`POST /v1/setup/schedule`), checked here like
/// the agents check it, so a bad one reaches no host; `clear` (an empty request) gives each
/// agent its agent.toml schedule back.
fn push_schedule(
    home: &Path,
    global: &GlobalArgs,
    request: proto::ScheduleRequest,
    clear: bool,
    targets: &TargetArgs,
) -> anyhow::Result<ExitStatus> {
    if !clear && request.update.is_none() && request.scan.is_none() {
        return Err(UserError::usage("no schedule given")
            .with_hint("give --update CRON, --scan CRON --scan-path PATH, or --clear")
            .into());
    }
    if request.scan.is_none() && !request.scan_paths.is_empty() {
        return Err(UserError::usage("`--scan-path` is for a scheduled scan")
            .with_hint("give the scan's schedule too: --scan CRON")
            .into());
    }
    let schedule = crate::agent::ScheduleConfig {
        update: request.update.clone(),
        scan: request.scan.clone(),
        scan_paths: request.scan_paths.iter().map(Into::into).collect(),
    };
    schedule.check().map_err(|(key, problem)| {
        let flag = match key {
            "update" => "--update",
            "scan" => "--scan",
            _ => "--scan-path",
        };
        UserError::usage(format!("`{flag}` {problem}")).with_hint(
            "cron: 5 fields (minute first) or 6 (seconds first), e.g. \"0 3 * * *\"; the day \
                 of month must exist in the month (no February 30)",
        )
    })?;
    let what = match (&request.update, &request.scan) {
        (None, None) => "cleared".to_string(),
        (update, scan) => [
            update.as_ref().map(|u| format!("update `{u}`")),
            scan.as_ref()
                .map(|s| format!("scan `{s}` of {}", request.scan_paths.join(" "))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    };
    let (targets, _) = resolve(home, global, targets)?;
    let body = Arc::new(serde_json::to_vec(&request)?);
    on_targets(
        home,
        global,
        JobKind {
            kind: "schedule",
            what: &what,
            timeout: Duration::from_secs(30),
            unchanged_is_skipped: false,
            canary: false,
            ..JobKind::default()
        },
        targets,
        |client, target| {
            let body = Arc::clone(&body);
            let detail = what.clone();
            async move {
                let address = &target.address;
                let response = client
                    .post(format!("https://{address}{}", proto::SCHEDULE_PATH))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_vec())
                    .send()
                    .await
                    .map_err(|err| format!("agent `{address}` did not answer: {err}"))?;
                let status = response.status();
                let answer = proto::read_body(response, proto::MAX_ANSWER_BYTES)
                    .await
                    .map_err(|err| format!("agent `{address}`: {err}"))?;
                match serde_json::from_slice::<proto::SetupResponse>(&answer) {
                    Ok(setup) if status.is_success() => Ok((setup.changed, detail)),
                    _ => Err(format!(
                        "agent `{address}` refused the schedule: {}",
                        serde_json::from_slice::<ErrorResponse>(&answer)
                            .map_or_else(|_| format!("HTTP {status}"), |e| e.message)
                    )),
                }
            }
        },
        |_, _, _| Ok(()),
    )
}

/// `failed` (a comma list of setup steps) without `step`.
/// `failed` (the failed setup steps, comma-separated) with `step` in it.
fn with(failed: &str, step: &str) -> String {
    let mut steps: Vec<&str> = failed.split(',').filter(|s| !s.is_empty()).collect();
    if !steps.contains(&step) {
        steps.push(step);
    }
    steps.join(",")
}

fn without(failed: &str, step: &str) -> String {
    failed
        .split(',')
        .filter(|s| !s.is_empty() && *s != step)
        .collect::<Vec<_>>()
        .join(",")
}

/// `pm-push license [FILE --expires DATE]`.
fn push_license(
    home: &Path,
    global: &GlobalArgs,
    file: Option<&Path>,
    expires: Option<chrono::DateTime<Utc>>,
    targets: &TargetArgs,
) -> anyhow::Result<ExitStatus> {
    // A license registered here is a change on the manager whatever the agents answer.
    let registered = match (file, expires) {
        (Some(file), Some(expires)) => {
            crate::activate::setup::register_license(home, global, file, expires)?.1
        }
        _ => false,
    };
    let licenses = Inventory::open_read_only(home, global.lock_timeout)
        .map_err(inventory_error)?
        .map(|inv| inv.licenses())
        .transpose()
        .map_err(inventory_error)?
        .unwrap_or_default();
    let (license, content) =
        crate::activate::setup::current_license(home, &licenses)?.ok_or_else(|| {
            UserError::usage("no license is registered")
                .with_hint("give the file: `pm-push license FILE --expires YYYY-MM-DD`")
        })?;
    let (targets, hosts) = resolve(home, global, targets)?;
    let license = Arc::new((license, content));
    let sha256 = license.0.sha256.clone();
    let recorded: HashSet<String> = if registered {
        targets.iter().map(|t| t.host.clone()).collect()
    } else {
        HashSet::new()
    };
    on_targets(
        home,
        global,
        JobKind {
            kind: "license",
            what: &license.0.file_name.clone(),
            timeout: Duration::from_secs(30),
            unchanged_is_skipped: false,
            canary: false,
            recorded,
            ..JobKind::default()
        },
        targets,
        |client, target| {
            let license = Arc::clone(&license);
            async move {
                crate::activate::setup::send_license(
                    &client,
                    &target.address,
                    &license.0,
                    &license.1,
                )
                .await
                .map(|answer| {
                    (
                        answer.changed,
                        format!(
                            "{} (expires {})",
                            license.0.file_name,
                            license.0.expires_at.format("%Y-%m-%d")
                        ),
                    )
                })
                .map_err(setup_error)
            }
        },
        |inv, _, outcomes| {
            mark_hosts(inv, &hosts, outcomes, "license", |host| {
                host.license_sha256 = Some(sha256.clone());
            })
        },
    )
}

/// `pm-push scan --path P...`: each target scans now; then a poll records the reports.
fn push_scan(
    home: &Path,
    global: &GlobalArgs,
    paths: &[String],
    timeout: Duration,
    targets: &TargetArgs,
) -> anyhow::Result<ExitStatus> {
    if let Some(bad) = paths
        .iter()
        .find(|p| !p.starts_with('/') || p.contains('\0'))
    {
        return Err(UserError::usage(format!("--path `{bad}` is not an absolute path")).into());
    }
    let (targets, _) = resolve(home, global, targets)?;
    let request = Arc::new(proto::ScanRequest {
        paths: paths.to_vec(),
    });
    let cursors = Inventory::open_read_only(home, global.lock_timeout)
        .map_err(inventory_error)?
        .map(|inv| inv.poll_cursors())
        .transpose()
        .map_err(inventory_error)?
        .unwrap_or_default();
    let polled: Arc<Mutex<Vec<crate::inventory::PolledHost>>> = Arc::default();
    let failed_scans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let status = on_targets(
        home,
        global,
        JobKind {
            kind: "scan",
            what: &paths.join(" "),
            timeout,
            unchanged_is_skipped: false,
            canary: false,
            ..JobKind::default()
        },
        targets,
        |client, target| {
            let request = Arc::clone(&request);
            let cursors = cursors.clone();
            let polled = Arc::clone(&polled);
            let failed_scans = Arc::clone(&failed_scans);
            async move {
                let report = scan_one(&client, &target.address, &request).await?;
                // The report is on the agent now: a poll brings it (and the state) in.
                let settings = Settings {
                    concurrency: 1,
                    timeout: Duration::from_secs(30),
                    deadline: Duration::from_secs(60),
                    inactive_after: Duration::from_secs(1800),
                    scan_max_age: Duration::from_secs(7 * 86_400),
                    ca: None,
                    registry: None,
                };
                let mut answer = ask_all(
                    &client,
                    std::slice::from_ref(&target),
                    &cursors,
                    &settings,
                    chrono::Duration::zero(),
                )
                .await;
                polled
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .append(&mut answer);
                let summary = format!(
                    "{}: {} finding(s), {} file(s) scanned",
                    report.result.as_str(),
                    report.findings.len(),
                    report.files_scanned.map_or("?".into(), |n| n.to_string())
                );
                // A scan that did not run to completion is a failed host, recorded all the same.
                if report.result == proto::ScanResult::Error {
                    failed_scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return Err(format!(
                        "the scan failed ({summary}): {}",
                        report.error.as_deref().unwrap_or("no reason given")
                    ));
                }
                Ok((true, summary))
            }
        },
        |inv, _, _| {
            let polled =
                std::mem::take(&mut *polled.lock().unwrap_or_else(PoisonError::into_inner));
            if !polled.is_empty() {
                inv.record_polls(0, &polled)?;
            }
            Ok(())
        },
    )?;
    // Hosts that scanned and failed answered, and their reports are recorded: partial (3), as
    // when some hosts fail; 1 is for when no host could be asked at all.
    if status == ExitStatus::Failure && failed_scans.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        return Ok(ExitStatus::Partial);
    }
    Ok(status)
}

/// `pm-push upgrade-agent`: each target replaces its executable with the `agent` product's
/// package for its platform (`POST /v1/upgrade`) and restarts itself; then its status is asked
/// until it answers from the package's sha256 (ok) or `--timeout` passes (failed). A host on the
/// package already is skipped.
fn push_upgrade_agent(
    home: &Path,
    global: &GlobalArgs,
    timeout: Duration,
    targets: &TargetArgs,
) -> anyhow::Result<ExitStatus> {
    // The selection first, as every command that takes one: an empty fleet is nothing to do.
    let (targets, _) = resolve(home, global, targets)?;
    if targets.is_empty() {
        return no_target(global, "upgrade-agent", "of the agent package");
    }
    let revision = dist_revision(home)?;
    let manifest = Repo::new(home)
        .manifest(&revision)
        .map_err(|err| UserError::failure(err.to_string()))?;
    let packages: Vec<String> = manifest
        .products
        .iter()
        .filter(|p| p.kind == crate::manifest::AGENT_KIND)
        .flat_map(|p| p.components.iter())
        .map(|c| format!("{} {}", c.name, c.version))
        .collect();
    if !manifest.has_agent_product() {
        return Err(UserError::usage(format!(
            "dist ({revision}) has no `agent` product: there is no pm-agent package to roll out"
        ))
        .with_hint(
            "add `[[products]] name = \"agent\" kind = \"agent\" dir = \"...\"` to pm.toml, put \
             pm-agent-<version>-<arch>-<os> binaries in that directory, then run \
             `pm-mirror sync` and `pm-mirror publish`",
        )
        .into());
    }
    on_targets(
        home,
        global,
        JobKind {
            kind: "upgrade-agent",
            what: &format!("{revision} ({})", packages.join(", ")),
            timeout,
            unchanged_is_skipped: true,
            canary: true,
            ..JobKind::default()
        },
        targets,
        move |client, target| async move {
            let report: proto::UpgradeReport = post_agent(
                &client,
                &target.address,
                proto::UPGRADE_PATH,
                None,
                "upgrade",
            )
            .await?;
            if !report.changed {
                return Ok((
                    false,
                    format!("already on {} {}", report.component, report.to_version),
                ));
            }
            wait_for_upgraded(&client, &target.address, &report, timeout).await?;
            Ok((
                true,
                format!(
                    "{} {} -> {} ({} -> {})",
                    report.component,
                    report.from_version,
                    report.to_version,
                    short_sha(&report.from_sha256),
                    short_sha(&report.to_sha256)
                ),
            ))
        },
        |_, _, _| Ok(()),
    )
}

fn short_sha(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Asks an agent that replaced its executable for its status until it answers from the new one
/// (its sha256 is the package's), at most `timeout`. The old process may still answer for a
/// moment before it restarts, so an answer with the old sha256 is only a failure when the agent
/// says why (`upgrade_error`: it went back to the old executable) or time is up.
async fn wait_for_upgraded(
    client: &reqwest::Client,
    address: &str,
    report: &proto::UpgradeReport,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let asked = tokio::time::timeout(
            Duration::from_secs(5),
            client
                .get(format!("https://{address}{}", proto::STATUS_PATH))
                .send(),
        )
        .await;
        let last = match asked {
            Ok(Ok(response)) if response.status().is_success() => {
                let body = proto::read_body(response, proto::MAX_ANSWER_BYTES)
                    .await
                    .unwrap_or_default();
                match serde_json::from_slice::<proto::AgentStatus>(&body) {
                    Ok(status) if status.agent_sha256.as_deref() == Some(&report.to_sha256) => {
                        return Ok(());
                    }
                    Ok(proto::AgentStatus {
                        upgrade_error: Some(error),
                        ..
                    }) => {
                        return Err(format!(
                            "agent `{address}` went back to its previous executable: {error}"
                        ));
                    }
                    Ok(status) => format!(
                        "version {} with sha256 {}",
                        status.agent_version,
                        status.agent_sha256.as_deref().unwrap_or("unknown")
                    ),
                    Err(err) => format!("an answer that is not a status: {err}"),
                }
            }
            Ok(Ok(response)) => format!("HTTP {}", response.status()),
            Ok(Err(err)) => format!("no answer ({err})"),
            Err(_) => "no answer within 5s".into(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "agent `{address}` replaced its executable but did not come back on sha256 {} \
                 within {timeout:?}; last: {last}",
                report.to_sha256
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scan_one(
    client: &reqwest::Client,
    address: &str,
    request: &proto::ScanRequest,
) -> Result<proto::ScanReport, String> {
    let body = serde_json::to_string(request).map_err(|err| err.to_string())?;
    post_agent(client, address, proto::SCAN_PATH, Some(body), "scan").await
}

fn summary_line(kind: &str, revision: &str, hosts: &[HostAttempt]) -> String {
    let count = |result: &str| hosts.iter().filter(|h| h.result == result).count();
    format!(
        "{kind} to {revision}: {} ok, {} failed, {} skipped, {} held, {} not attempted",
        count("ok"),
        count("failed"),
        count("skipped"),
        count("held"),
        count("not_attempted")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_setup_step_is_listed_once_and_taken_out_alone() {
        assert_eq!(with("", "profile"), "profile");
        assert_eq!(with("license", "profile"), "license,profile");
        assert_eq!(with("license,profile", "profile"), "license,profile");
        assert_eq!(without("license,profile", "profile"), "license");
    }

    #[test]
    fn a_pid_now_held_by_another_program_does_not_keep_a_killed_rollout_running() {
        let home = tempfile::tempdir().unwrap();
        let me = std::process::id() as i32;
        // No lock was ever taken: nothing runs.
        assert!(!rollout_process_alive(home.path(), Some(me)));
        // The lock names init, which exists but is no rollout; or this process, which asks.
        std::fs::write(home.path().join("rollout.lock"), "1").unwrap();
        assert!(!rollout_process_alive(home.path(), Some(1)));
        std::fs::write(home.path().join("rollout.lock"), me.to_string()).unwrap();
        assert!(!rollout_process_alive(home.path(), Some(me)));
        assert!(!rollout_process_alive(home.path(), None));
        let record = RolloutRecord {
            job_id: 1,
            kind: "update".into(),
            revision: Some("r1".into()),
            generation: None,
            state: "running".into(),
            waves: 1,
            max_failures: "0".into(),
            options: "{}".into(),
            pid: Some(std::process::id() as i32),
            stopped_at_wave: None,
            started_at: None,
        };
        assert_eq!(effective_state(home.path(), &record), "interrupted");
    }

    fn targets(n: usize, wave: impl Fn(usize) -> Option<u32>) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                host: format!("h{i:02}"),
                address: format!("10.0.0.{i}:7505"),
                group: "g".into(),
                wave: wave(i),
            })
            .collect()
    }

    /// `(wave number, hosts)` of a plan.
    fn sizes(waves: &[(i32, Vec<Target>)]) -> Vec<(i32, usize)> {
        waves.iter().map(|(n, hosts)| (*n, hosts.len())).collect()
    }

    #[test]
    fn a_canary_then_batches_or_the_csv_waves_under_their_own_numbers() {
        assert_eq!(
            sizes(&plan_waves(&targets(50, |_| None), None, 10)),
            [(0, 1), (1, 10), (2, 10), (3, 10), (4, 10), (5, 9)]
        );
        assert_eq!(
            sizes(&plan_waves(&targets(5, |_| None), Some(0), 10)),
            [(1, 5)]
        );
        assert_eq!(
            sizes(&plan_waves(&targets(0, |_| None), None, 10)),
            Vec::<(i32, usize)>::new()
        );
        // The file's sparse waves 5 and 7, in wave order whatever the line order; no canary
        // unless asked for.
        let csv = |i| Some(if i < 3 { 7 } else { 5 });
        let plan = plan_waves(&targets(7, csv), None, 10);
        assert_eq!(sizes(&plan), [(5, 4), (7, 3)]);
        assert_eq!(plan[0].1[0].host, "h03", "a wave keeps the file's order");
        // `--canary 1`: the first host of the first wave, as wave 0.
        let plan = plan_waves(&targets(7, csv), Some(1), 10);
        assert_eq!(sizes(&plan), [(0, 1), (5, 3), (7, 3)]);
        assert_eq!(plan[0].1[0].host, "h03");
    }

    #[test]
    fn held_and_skipped_hosts_are_in_no_wave() {
        let installed: HashMap<String, Option<String>> =
            [("h01".to_string(), Some("r2".to_string()))].into();
        let hold = HoldRecord {
            host: "h02".into(),
            kind: "hold".into(),
            reason: "change freeze".into(),
            revision: None,
            set_at: Utc::now(),
            set_by: "ops".into(),
            until: None,
            job_id: None,
            on_agent: true,
        };
        let holds: HashMap<String, HoldRecord> = [("h02".to_string(), hold)].into();
        let (hosts, waves) =
            plan_attempts(targets(4, |_| None), &installed, &holds, "r2", None, 10);
        assert_eq!(waves, 2);
        let plan: Vec<(&str, Option<i32>, &str)> = hosts
            .iter()
            .map(|h| (h.host.as_str(), h.wave, h.result.as_str()))
            .collect();
        assert_eq!(
            plan,
            [
                ("h00", Some(0), "pending"),
                ("h03", Some(1), "pending"),
                ("h01", None, "skipped"),
                ("h02", None, "held"),
            ]
        );
        assert!(hosts[3].error.as_deref().unwrap().contains("change freeze"));
        // A fleet rollback run again continues what its own holds started.
        let fleet = HoldRecord {
            kind: "fleet-rollback".into(),
            revision: Some("r1".into()),
            ..holds["h02"].clone()
        };
        let holds: HashMap<String, HoldRecord> = [("h02".to_string(), fleet)].into();
        assert!(holds_in_the_way(holds.clone(), Action::Generation(1), "r1").is_empty());
        assert_eq!(
            holds_in_the_way(holds.clone(), Action::Update, "r1").len(),
            1
        );
        assert_eq!(
            holds_in_the_way(holds, Action::Generation(1), "r0").len(),
            1
        );
    }

    #[test]
    fn max_failures_is_a_count_or_a_share_of_the_wave() {
        assert_eq!("3".parse::<MaxFailures>().unwrap().allowed(10), 3);
        assert_eq!("10%".parse::<MaxFailures>().unwrap().allowed(25), 2);
        assert_eq!("0%".parse::<MaxFailures>().unwrap().allowed(25), 0);
        for bad in ["-1", "101%", "many", "5 %x"] {
            assert!(bad.parse::<MaxFailures>().is_err(), "{bad}");
        }
        assert_eq!(MaxFailures::Percent(20).to_string(), "20%");
    }
}
