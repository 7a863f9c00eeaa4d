//! `pm-rollback`: the whole fleet (or the chosen targets) back to a backup generation, or one
//! host back to a revision or one of its local backups (DESIGN.md section 4, seed PSMT 4.9).
//!
//! `--generation N`: every target installs the revision of the manager's backup/N
//! (`POST /v1/update {"generation": N}`; the agent reuses its local copies of the files and
//! downloads only what it lacks from the backup the mirror serves), in waves like `pm-push`.
//! Only when every target reported OK (the seed's "OK == Total") does the manager rotate dist
//! back (`pm-mirror`'s dist rollback: backup/N becomes dist, the newer revisions are marked
//! rolled back so `pm-mirror publish` will not publish them again without `--again`). Otherwise
//! dist stays, and the output lists the hosts that failed or were not reached, with reasons.
//!
//! `--host H --to backup:N | REVISION`: one host only; `backup:N` is the host's own local backup
//! (`POST /v1/rollback`), a revision is installed from the generation the mirror serves it in.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use clap::Parser;
use serde::Serialize;

use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{HoldRecord, HostAttempt, Inventory, RolloutRecord};
use crate::poll::{Settings, ask_all, mutual_client};
use crate::proto::{self, HoldKind, InstallReport};
use crate::push::{self, Action, WaveArgs, inventory_error};
use crate::repo::{BACKUP_GENERATIONS, Generations, Repo};
use crate::targets::TargetArgs;

/// `pm-rollback` command line.
#[derive(Debug, Parser)]
#[command(
    name = "pm-rollback",
    version,
    about = "Roll the fleet back to a backup generation, or one host to an earlier revision"
)]
pub struct Args {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// Roll the targets back to the manager's backup generation N (1..3)
    #[arg(
        long,
        value_name = "N",
        required_unless_present = "to",
        conflicts_with = "to"
    )]
    pub generation: Option<u32>,
    /// With --host: `backup:N` (the host's local backup) or a revision the mirror serves
    #[arg(long, value_name = "backup:N|REVISION", requires = "hosts")]
    pub to: Option<String>,
    #[command(flatten)]
    pub targets: TargetArgs,
    /// Hosts in the first wave (0: none)
    #[arg(long, default_value_t = 0)]
    pub canary: usize,
    /// Hosts per wave
    #[arg(long, default_value = "1000", value_parser = cli::parse_count)]
    pub wave_size: usize,
    /// Failures a wave may have before the rollback stops: a count or a percentage
    #[arg(long, default_value = "0", value_parser = <push::MaxFailures as std::str::FromStr>::from_str)]
    pub max_failures: push::MaxFailures,
    /// How long one host's install may take
    #[arg(long, default_value = "10m", value_parser = cli::parse_nonzero_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Hosts installing at once within a wave
    #[arg(long, default_value = "32", value_parser = cli::parse_count)]
    pub concurrency: usize,
}

/// Runs `pm-rollback`.
pub fn run(args: Args) -> anyhow::Result<ExitStatus> {
    let home = args.global.home();
    // A rollback records a job and may rotate dist: only as the home's owner.
    crate::ownership::check_home(&home, "pm-rollback")?;
    match (&args.generation, &args.to) {
        (Some(generation), None) => fleet(&home, &args, *generation),
        (None, Some(to)) => one_host(&home, &args, to),
        _ => {
            Err(UserError::usage("give --generation N, or --host H --to backup:N|REVISION").into())
        }
    }
}

#[derive(Debug, Serialize)]
struct FleetReport {
    #[serde(flatten)]
    rollout: push::Report,
    generation: u32,
    /// Whether the manager's dist rotated back (the whole fleet targeted, every host OK); in a
    /// dry run, whether it would once every host asked succeeds.
    dist_rolled_back: bool,
    /// Whether every target reported OK (rolled back, or already there).
    targets_ok: bool,
    /// dist before and after.
    dist_before: Option<String>,
    dist_after: Option<String>,
}

fn check_generation(generation: u32) -> Result<usize, UserError> {
    let n = generation as usize;
    if !(1..=BACKUP_GENERATIONS).contains(&n) {
        return Err(UserError::usage(format!(
            "`--generation {generation}` is out of range: 1..={BACKUP_GENERATIONS}"
        ))
        .with_hint("1 is the newest backup; `pm-mirror status` shows the generations"));
    }
    Ok(n)
}

/// This command line as run (`pm-rollback --generation 1 --group web`), to name the next step
/// of a fleet rollback that did not finish: the same command again.
fn command_line() -> String {
    let words: Vec<String> = std::iter::once("pm-rollback".to_string())
        .chain(std::env::args().skip(1))
        .collect();
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

fn fleet(home: &Path, args: &Args, generation: u32) -> anyhow::Result<ExitStatus> {
    let global = &args.global;
    let n = check_generation(generation)?;
    let (targets, _) = push::resolve(home, global, &args.targets)?;
    let generations = Repo::new(home)
        .generations()
        .map_err(|err| UserError::failure(err.to_string()))?;
    let dist_before = generations.dist.clone();
    if targets.is_empty() {
        crate::targets::note_no_active_host();
        return print(
            global,
            &FleetReport {
                rollout: push::report("rollback", None, "-", "done", None, &[]),
                generation,
                dist_rolled_back: false,
                targets_ok: true,
                dist_before: dist_before.clone(),
                dist_after: dist_before,
            },
        );
    }
    let Some(revision) = generations.backups.get(n - 1).cloned() else {
        return Err(UserError::usage(format!(
            "there is no backup/{n}: dist has {} backup generation(s)",
            generations.backups.len()
        ))
        .with_hint("`pm-mirror status` shows the generations")
        .into());
    };
    let installed = push::read_installed(home, global)?;
    let action = Action::Generation(generation);
    let holds_in_force = push::read_holds(home, global)?;
    refuse_over_an_unfinished_rollback(home, global, &holds_in_force, &revision, &generations)?;
    let holds = push::holds_in_the_way(holds_in_force, action, &revision);
    let (hosts, waves) = push::plan_attempts(
        targets.clone(),
        &installed,
        &holds,
        &revision,
        Some(args.canary),
        args.wave_size,
    );
    let options = WaveArgs {
        canary: Some(args.canary),
        wave_size: args.wave_size,
        max_failures: args.max_failures,
        pause: Duration::ZERO,
        timeout: args.timeout,
        concurrency: args.concurrency.max(1),
    };
    let command = command_line();
    if global.dry_run {
        // What the real run does when every host it asks succeeds: over the whole fleet dist
        // rotates back (held hosts do not block it, hosts on the revision are skipped), even
        // when nobody needs to install; over part of it dist stays.
        let rotates = args.targets.is_all();
        let mut report = FleetReport {
            rollout: push::report("rollback", None, &revision, "planned", None, &hosts),
            generation,
            dist_rolled_back: rotates,
            targets_ok: false,
            dist_before: dist_before.clone(),
            dist_after: if rotates {
                Some(revision.clone())
            } else {
                dist_before
            },
        };
        report.rollout.changed |= rotates;
        return print(global, &report);
    }
    let _lock = push::rollout_lock(home)?;
    // The options resume would need, and the command that runs it again (`pm-push status`
    // names it as the next step).
    let mut stored = serde_json::to_value(&options)?;
    stored["command"] = serde_json::Value::String(command.clone());
    // The revision it rolls back from, for what `pm-push status` says once dist moves.
    stored["from"] = serde_json::json!(dist_before);
    // With target flags dist never rotates for it: it is never an unfinished fleet rollback.
    stored["fleet"] = serde_json::json!(args.targets.is_all());
    let record = RolloutRecord {
        job_id: 0,
        kind: "rollback".into(),
        revision: Some(revision.clone()),
        generation: Some(generation as i32),
        state: "running".into(),
        waves: waves as i32,
        max_failures: args.max_failures.to_string(),
        options: stored.to_string(),
        pid: Some(std::process::id() as i32),
        stopped_at_wave: None,
        started_at: None,
    };
    let job_id = Inventory::open(home, global.lock_timeout)
        .map_err(inventory_error)?
        .transaction(|inv| {
            inv.start_rollout(
                Utc::now(),
                &format!("rollback to backup/{n} ({revision}): {} hosts", hosts.len()),
                &record,
                &hosts,
            )
        })
        .map_err(inventory_error)?;
    let executed = if hosts.iter().any(|h| h.result == "pending") {
        push::execute(home, global, job_id, &revision, &options, action, hosts)?
    } else {
        // Everyone is on it already (or held): nothing to ask; the rollout is done.
        let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
        inventory
            .transaction(|inv| {
                inv.update_rollout(job_id, "done", None, None, "ok", "every target was on it")
            })
            .map_err(inventory_error)?;
        push::Executed {
            kind: "rollback",
            state: "done".into(),
            stopped_at: None,
            hosts,
        }
    };
    // OK == Total, held hosts out of both: a held host is left where it is (it follows dist
    // once released), so it neither blocks nor counts.
    let is_ok = |h: &&HostAttempt| matches!(h.result.as_str(), "ok" | "skipped");
    let held: Vec<&HostAttempt> = executed
        .hosts
        .iter()
        .filter(|h| h.result == "held")
        .collect();
    let all_ok = executed.state == "done"
        && executed
            .hosts
            .iter()
            .all(|h| h.result == "held" || is_ok(&h));
    let mut dist_after = dist_before.clone();
    // backup/N must still be what the hosts installed (a publish meanwhile shifts it).
    let still = action.serves(home)?;
    let all_ok = all_ok && still.as_deref() == Some(revision.as_str());
    // Dist is the whole fleet's: it moves back only when the whole fleet was targeted.
    let whole_fleet = args.targets.is_all();
    if all_ok && !whole_fleet {
        eprintln!(
            "note: the targets rolled back to {revision} and are held there, so their own \
             schedules keep them on it; dist stays at {} because only part of the fleet was \
             targeted (run without target flags, or with --all, to move dist too; `pm-push \
             release` with the same target flags lets them follow dist again)",
            dist_before.as_deref().unwrap_or("-")
        );
    }
    let rotate = all_ok && whole_fleet;
    if rotate {
        // On dist, the hosts need no hold to stay there: the holds this rollback (and earlier
        // runs of it) took end first. A kill in between leaves them free and dist where it
        // was; the same command again finishes.
        let unreleased = push::hold::release_fleet_rollback_holds(home, global, &targets, job_id)?;
        for (host, error) in &unreleased {
            eprintln!(
                "warning: {host} keeps its rollback hold (at {revision}, which dist is now): \
                 {error}; `pm-push release --host {host}` ends it"
            );
        }
        let rolled = crate::mirror::rollback_dist(home, global, n)?;
        dist_after = Some(rolled.to.clone());
    } else if still.as_deref() != Some(revision.as_str()) {
        eprintln!(
            "error: backup/{n} is now {} (a publish during the rollback?), not {revision}: dist \
             stays",
            still.as_deref().unwrap_or("-")
        );
    }
    if !held.is_empty() {
        eprintln!(
            "note: {} held host(s) left where they are, not counted against OK == Total: {} \
             (they follow dist once released: `pm-push release --host HOST`)",
            held.len(),
            held.iter()
                .map(|h| h.host.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut report = FleetReport {
        rollout: push::report(
            "rollback",
            Some(job_id),
            &revision,
            &executed.state,
            executed.stopped_at,
            &executed.hosts,
        ),
        generation,
        dist_rolled_back: rotate,
        targets_ok: all_ok,
        dist_before,
        dist_after,
    };
    report.rollout.changed |= rotate;
    if !all_ok && executed.state != "interrupted" {
        report.rollout.next_step = Some(command.clone());
        let missing: Vec<String> = executed
            .hosts
            .iter()
            .filter(|h| h.result != "held" && !is_ok(h))
            .map(|h| {
                format!(
                    "{} ({}{})",
                    h.host,
                    h.result,
                    h.error
                        .as_deref()
                        .map_or(String::new(), |e| format!(": {e}"))
                )
            })
            .collect();
        eprintln!(
            "error: dist stays at {}: not every target rolled back ({} not OK): {}",
            report.dist_before.as_deref().unwrap_or("-"),
            missing.len(),
            missing.join("; ")
        );
        // A stopped rollout's hint (the same command) comes with its table below.
        if executed.state == "done" {
            eprintln!(
                "hint: fix or deactivate those hosts, then run the same pm-rollback again: \
                 `{command}` (hosts already on {revision} are skipped; those it moved are held \
                 there meanwhile)"
            );
        }
    } else if executed.state == "interrupted" {
        report.rollout.next_step = Some(command);
    }
    print(global, &report)
}

/// Refuses a fleet rollback to `revision` while the hosts an earlier one moved are still held
/// at another revision (it did not finish): after a publish, `--generation N` names the
/// revision that rollback was moving away from, and rolling dist back to it would undo both.
/// The same rollback run again (the same revision) continues it.
fn refuse_over_an_unfinished_rollback(
    home: &Path,
    global: &GlobalArgs,
    holds: &HashMap<String, HoldRecord>,
    revision: &str,
    generations: &Generations,
) -> anyhow::Result<()> {
    let elsewhere = holds.values().filter(|hold| {
        hold.revision
            .as_deref()
            .is_some_and(|held| held != revision)
    });
    let Some(inventory) =
        Inventory::open_read_only(home, global.lock_timeout).map_err(inventory_error)?
    else {
        return Ok(());
    };
    let Some(record) = unfinished_fleet_rollback(&inventory, elsewhere) else {
        return Ok(());
    };
    let job_id = record.job_id;
    let mut held: Vec<&str> = holds
        .values()
        .filter(|hold| hold.job_id == Some(job_id))
        .map(|hold| hold.host.as_str())
        .collect();
    held.sort_unstable();
    let refusal = dist_moved(&record, generations).unwrap_or_else(|| {
        // backup/N still serves it: this is another rollback, not that one run again.
        UserError::usage(format!(
            "fleet rollback job {job_id} to {} has not finished, and this one would install \
             {revision}",
            record.revision.as_deref().unwrap_or("-"),
        ))
        .with_hint(format!(
            "one fleet rollback at a time: finish that one (`{}`), or end its holds first: \
             `pm-push release --where \"hold_kind = 'fleet-rollback'\"`",
            push::rollback_command(&record)
        ))
    });
    Err(UserError {
        message: format!(
            "{}; held there meanwhile: {}",
            refusal.message,
            held.join(", ")
        ),
        ..refusal
    }
    .into())
}

/// The newest fleet rollback (over the whole fleet: no target flags) that still holds hosts
/// among `holds` at its revision: it did not rotate dist. A rollback of part of the fleet never
/// rotates dist, so it is never one (its hosts stay held until `pm-push release`).
pub(crate) fn unfinished_fleet_rollback<'a>(
    inventory: &Inventory,
    holds: impl Iterator<Item = &'a HoldRecord>,
) -> Option<RolloutRecord> {
    let mut jobs: Vec<i64> = holds
        .filter(|hold| hold.kind == HoldKind::FleetRollback.as_str())
        .filter_map(|hold| hold.job_id)
        .collect();
    jobs.sort_unstable_by(|a, b| b.cmp(a));
    jobs.dedup();
    jobs.into_iter().find_map(|job_id| {
        let (record, _) = inventory.rollout(Some(job_id), "rollback").ok()??;
        (record.kind == "rollback" && record.generation.is_some() && is_fleet_wide(&record))
            .then_some(record)
    })
}

/// Whether a rollback was run over the whole fleet (no target flags, or `--all`), so that dist
/// rotates back once it finishes. Jobs recorded before this was kept count as fleet-wide.
pub(crate) fn is_fleet_wide(record: &RolloutRecord) -> bool {
    serde_json::from_str::<serde_json::Value>(&record.options)
        .ok()
        .and_then(|options| options["fleet"].as_bool())
        .unwrap_or(true)
}

/// What became of an unfinished fleet rollback when backup/N no longer serves the revision it
/// installs (a publish, or a dist rollback, since it began): running it again would install
/// another revision, so this says what happened and what to do. None while it still can
/// continue, or once dist is its revision (it finished).
pub(crate) fn dist_moved(record: &RolloutRecord, generations: &Generations) -> Option<UserError> {
    let revision = record.revision.as_deref()?;
    let n = usize::try_from(record.generation?).ok()?;
    let now = generations
        .backups
        .get(n.checked_sub(1)?)
        .map(String::as_str);
    if now == Some(revision) || generations.dist.as_deref() == Some(revision) {
        return None;
    }
    let command = push::rollback_command(record);
    let from: Option<String> = serde_json::from_str::<serde_json::Value>(&record.options)
        .ok()
        .and_then(|options| options["from"].as_str().map(str::to_string));
    let dist = generations.dist.as_deref().unwrap_or("-");
    let would = match now {
        Some(now) if from.as_deref() == Some(now) => {
            format!("{now}, the revision it was rolling back from")
        }
        Some(now) => now.to_string(),
        None => "nothing (there is no such backup now)".to_string(),
    };
    let message = format!(
        "fleet rollback job {} to {revision} did not finish, and dist moved since it began \
         (dist is now {dist}, backup/{n} is {}): `{command}` would now install {would}, not \
         {revision}",
        record.job_id,
        now.unwrap_or("-"),
    );
    let keep_dist = format!(
        "to keep dist ({dist}) instead, end that rollback's holds and update: `pm-push release \
         --where \"hold_kind = 'fleet-rollback'\"`, then `pm-push update`"
    );
    let hint = match generations.backups.iter().position(|r| r == revision) {
        Some(i) if !is_fleet_wide(record) => format!(
            "to finish rolling back to {revision}, name the generation that serves it now: `{}` \
             (its targets only: dist stays); {keep_dist}",
            with_generation(&command, i + 1)
        ),
        Some(i) => format!(
            "to finish rolling back to {revision}, name the generation that serves it now: `{}` \
             (once every target is on it, dist rotates to {revision} and the revisions after it \
             are marked rolled back); {keep_dist}",
            with_generation(&command, i + 1)
        ),
        None => format!("{revision} is no longer served (`pm-mirror status`); {keep_dist}"),
    };
    Some(UserError::usage(message).with_hint(hint))
}

/// `command` (a `pm-rollback` command line) with `--generation` set to `n`.
fn with_generation(command: &str, n: usize) -> String {
    let Some(mut words) = shlex::split(command) else {
        return format!("pm-rollback --generation {n}");
    };
    let mut i = 0;
    while i < words.len() {
        if words[i] == "--generation" && i + 1 < words.len() {
            words[i + 1] = n.to_string();
            i += 1;
        } else if words[i].starts_with("--generation=") {
            // shlex quotes a word with `=`: two words read the same and better.
            words.splice(i..=i, ["--generation".to_string(), n.to_string()]);
            i += 1;
        }
        i += 1;
    }
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

fn print(global: &GlobalArgs, report: &FleetReport) -> anyhow::Result<ExitStatus> {
    let reached = report.rollout.summary.get("ok").copied().unwrap_or(0)
        + report.rollout.summary.get("skipped").copied().unwrap_or(0);
    let status = if report.rollout.state == "planned" || report.targets_ok {
        ExitStatus::Success
    } else if reached > 0 {
        ExitStatus::Partial
    } else {
        ExitStatus::Failure
    };
    if global.json {
        cli::print_json(report)?;
        return Ok(status);
    }
    push::print(
        &GlobalArgs {
            json: false,
            ..global.clone()
        },
        &report.rollout,
    )?;
    let planned = report.rollout.state == "planned";
    cli::print_text(if planned && report.dist_rolled_back {
        format!(
            "dist would roll back: {} -> {} (backup/{}), once every host asked succeeds",
            report.dist_before.as_deref().unwrap_or("-"),
            report.dist_after.as_deref().unwrap_or("-"),
            report.generation
        )
    } else if planned {
        format!(
            "dist would stay at {}: only part of the fleet is targeted",
            report.dist_before.as_deref().unwrap_or("-")
        )
    } else if report.dist_rolled_back {
        format!(
            "dist rolled back: {} -> {} (backup/{}); `pm-mirror publish` will not publish the \
             rolled-back revisions again without --again",
            report.dist_before.as_deref().unwrap_or("-"),
            report.dist_after.as_deref().unwrap_or("-"),
            report.generation
        )
    } else {
        format!(
            "dist stays at {}",
            report.dist_before.as_deref().unwrap_or("-")
        )
    })?;
    Ok(status)
}

#[derive(Debug, Serialize)]
struct HostReport {
    changed: bool,
    job_id: i64,
    host: String,
    result: &'static str,
    to: String,
    report: Option<InstallReport>,
    error: Option<String>,
    /// The hold the host is under now (a host rolled back by hand stays there).
    held: Option<String>,
}

/// `--host H --to backup:N | REVISION`.
fn one_host(home: &Path, args: &Args, to: &str) -> anyhow::Result<ExitStatus> {
    let global = &args.global;
    if args.targets.hosts.len() != 1 {
        return Err(UserError::usage("--to rolls back one host: give exactly one --host").into());
    }
    let (targets, _) = push::resolve(home, global, &args.targets)?;
    let target = targets
        .into_iter()
        .next()
        .ok_or_else(|| UserError::usage("the host is not an active host of this manager"))?;
    let started = Utc::now();
    // A host rolled back by hand is held there until released: its own schedule, pushes and
    // rollouts would otherwise take it forward again.
    let hold = proto::HoldSpec {
        kind: proto::HoldKind::Rollback,
        reason: format!("rolled back by hand to {to} with pm-rollback"),
        set_by: crate::inventory::actor(),
        until: None,
        seconds_left: None,
    };
    // What to ask the agent for.
    let (path, body) = if let Some(n) = to.strip_prefix("backup:") {
        n.parse::<usize>()
            .ok()
            .filter(|n| (1..=3).contains(n))
            .ok_or_else(|| {
                UserError::usage(format!(
                    "`{to}` is not a backup: use backup:1, backup:2 or backup:3"
                ))
            })?;
        let request = proto::RollbackRequest {
            to: format!("backup:{n}"),
            hold: Some(hold.clone()),
        };
        (proto::ROLLBACK_PATH, serde_json::to_string(&request)?)
    } else {
        let generations = Repo::new(home)
            .generations()
            .map_err(|err| UserError::failure(err.to_string()))?;
        let update = |generation: Option<u32>| {
            serde_json::to_string(&proto::UpdateRequest {
                generation,
                hold: Some(hold.clone()),
            })
        };
        if generations.dist.as_deref() == Some(to) {
            (proto::UPDATE_PATH, update(None)?)
        } else if let Some(i) = generations.backups.iter().position(|r| r == to) {
            (proto::UPDATE_PATH, update(Some(i as u32 + 1))?)
        } else {
            return Err(UserError::usage(format!(
                "revision `{to}` is not served by the mirror (dist {}, backups {})",
                generations.dist.as_deref().unwrap_or("-"),
                generations.backups.join(", ")
            ))
            .with_hint("choose one of those, or the host's own local backup with --to backup:N")
            .into());
        }
    };
    if global.dry_run {
        cli::print_json(&serde_json::json!({
            "changed": false, "host": target.host, "would_ask": path, "body": body,
        }))?;
        return Ok(ExitStatus::Success);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = mutual_client(home, args.timeout, false, global.lock_timeout)?;
    let outcome: Result<InstallReport, String> = runtime.block_on(push::post_agent(
        &client,
        &target.address,
        path,
        Some(body.clone()),
        "roll back",
    ));
    let polled = runtime.block_on(async {
        let cursors = Inventory::open_read_only(home, global.lock_timeout)
            .ok()
            .flatten()
            .and_then(|inv| inv.poll_cursors().ok())
            .unwrap_or_default();
        let settings = Settings {
            concurrency: 1,
            timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(60),
            inactive_after: Duration::from_secs(1800),
            scan_max_age: Duration::from_secs(7 * 86_400),
            ca: None,
            registry: None,
        };
        ask_all(
            &client,
            std::slice::from_ref(&target),
            &cursors,
            &settings,
            chrono::Duration::zero(),
        )
        .await
    });
    let attempt = HostAttempt {
        host: target.host.clone(),
        wave: Some(0),
        attempt: 1,
        result: if outcome.is_ok() { "ok" } else { "failed" }.into(),
        changed: outcome.as_ref().ok().map(|r| r.changed),
        revision: outcome.as_ref().ok().and_then(|r| r.revision.clone()),
        error: outcome.as_ref().err().cloned(),
    };
    let held = outcome.as_ref().ok().map(|report| HoldRecord {
        host: target.host.clone(),
        kind: hold.kind.as_str().into(),
        reason: hold.reason.clone(),
        revision: report.revision.clone(),
        set_at: Utc::now(),
        set_by: hold.set_by.clone(),
        until: None,
        job_id: None,
        on_agent: true,
    });
    let inventory = Inventory::open(home, global.lock_timeout).map_err(inventory_error)?;
    let job_id = inventory
        .transaction(|inv| {
            let job_id = inv.insert_job(
                "rollback",
                started,
                if outcome.is_ok() { "ok" } else { "failed" },
                &format!("rollback of {} to {to}", target.host),
            )?;
            inv.record_attempts(job_id, std::slice::from_ref(&attempt))?;
            inv.record_polls(job_id, &polled)?;
            if let Some(held) = &held {
                inv.record_holds(&[HoldRecord {
                    job_id: Some(job_id),
                    ..held.clone()
                }])?;
            }
            Ok(job_id)
        })
        .map_err(inventory_error)?;
    drop(inventory);
    let report = HostReport {
        changed: attempt.changed == Some(true),
        job_id,
        host: target.host.clone(),
        result: if outcome.is_ok() { "ok" } else { "failed" },
        to: to.to_string(),
        error: outcome.as_ref().err().cloned(),
        report: outcome.ok(),
        held: held.as_ref().map(HoldRecord::describe),
    };
    if global.json {
        cli::print_json(&report)?;
    } else {
        cli::print_text(match (&report.report, &report.error) {
            (Some(r), _) => format!(
                "{}: {} -> {} (changed: {})",
                report.host,
                r.previous_revision.as_deref().unwrap_or("-"),
                r.revision.as_deref().unwrap_or("-"),
                r.changed
            ),
            (_, Some(e)) => format!("{}: failed: {e}", report.host),
            _ => String::new(),
        })?;
    }
    if report.held.is_some() {
        eprintln!(
            "note: {} is held there: its own schedule, pushes and rollouts leave it alone until \
             `pm-push release --host {}`",
            report.host, report.host
        );
    }
    Ok(if report.error.is_none() {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_step_names_the_generation_that_serves_the_revision_now() {
        let check = |command: &str, n: usize, expected: &str| {
            assert_eq!(with_generation(command, n), expected, "{command}");
        };
        check(
            "pm-rollback --generation 1",
            2,
            "pm-rollback --generation 2",
        );
        check(
            "pm-rollback --wave-size 10 --generation=1 --group 'web farm'",
            3,
            "pm-rollback --wave-size 10 --generation 3 --group 'web farm'",
        );
    }
}
