//! `pm-push hold`, `release` and `holds`: maintenance windows and change freezes on any target
//! selection, and the end of any hold (see `agent::hold` for what a hold does on the agent).
//!
//! A hold is recorded on the manager for every target, reached or not (rollouts read it from
//! the inventory, so they leave the host alone at once), and sent to each agent
//! (`POST /v1/setup/hold`), whose own schedule then skips updates; an agent that did not answer
//! is reported failed (exit 3) with what that means. A release is recorded and sent the same
//! way; an agent that still holds itself after a release the manager recorded refuses the next
//! push, which records the hold again, so the two never disagree for long unseen.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{JobKind, inventory_error, on_targets, post_agent, read_holds, resolve};
use crate::cli::{self, ExitStatus, GlobalArgs, UserError};
use crate::inventory::{HoldRecord, Inventory};
use crate::proto::{self, HoldKind, HoldRequest, HoldSpec, SetupResponse};
use crate::targets::{Target, TargetArgs};

/// How long one agent may take to answer a hold: it answers once no install runs, and an
/// install holds the agent's lock for up to two minutes.
const HOLD_TIMEOUT: Duration = Duration::from_secs(150);

/// `--until`: as written, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Until {
    text: String,
    when: When,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    After(Duration),
    At(DateTime<Utc>),
}

impl Until {
    /// The end time, when `now` is the start; an error when it is not in the future.
    fn at(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>, UserError> {
        let at = match self.when {
            When::After(duration) => chrono::TimeDelta::from_std(duration)
                .ok()
                .and_then(|delta| now.checked_add_signed(delta))
                .ok_or_else(|| {
                    UserError::usage(format!("--until `{}` is too far away", self.text))
                })?,
            When::At(at) => at,
        };
        if at <= now {
            return Err(UserError::usage(format!(
                "--until `{}` ({}) is past: a hold that ended would hold nothing",
                self.text,
                at.to_rfc3339()
            ))
            .with_hint("give a later time, or a duration from now such as 4h or 2d"));
        }
        Ok(at)
    }
}

/// Parses `--until`: a date (`YYYY-MM-DD`, the end of that day in UTC) or RFC 3339 time, or a
/// duration from now (`90m`, `4h`, `2d`).
pub fn parse_until(text: &str) -> Result<Until, String> {
    let when = match crate::activate::setup::parse_expiry(text) {
        Ok(at) => When::At(at),
        Err(_) => When::After(crate::cli::parse_nonzero_duration(text).map_err(|_| {
            format!(
                "`{text}` is not a duration from now (4h, 2d), a date (YYYY-MM-DD) or an RFC 3339 \
                 time"
            )
        })?),
    };
    Ok(Until {
        text: text.to_string(),
        when,
    })
}

/// `pm-push hold [--until WHEN] [--reason TEXT] [targets]`.
pub(super) fn push_hold(
    home: &Path,
    global: &GlobalArgs,
    until: Option<&Until>,
    reason: Option<&str>,
    targets: &TargetArgs,
) -> anyhow::Result<ExitStatus> {
    let now = Utc::now();
    let until = until.map(|u| u.at(now)).transpose()?;
    let reason = reason.map(str::trim).unwrap_or("held with pm-push hold");
    if reason.is_empty() || reason.len() > 1024 || reason.chars().any(char::is_control) {
        return Err(
            UserError::usage("--reason must be one line of 1 to 1024 bytes")
                .with_hint("say why, e.g. --reason \"change freeze until the release\"")
                .into(),
        );
    }
    let (targets, _) = resolve(home, global, targets)?;
    let installed = super::read_installed(home, global)?;
    let in_force = read_holds(home, global)?;
    // A rollback's hold is kept: it has no end, and a window replacing it would hand the host
    // back to dist when the window ends, undoing the rollback.
    let kept: Arc<HashMap<String, HoldRecord>> = Arc::new(
        in_force
            .iter()
            .filter(|(_, hold)| keeps_over_a_window(hold))
            .map(|(host, hold)| (host.clone(), hold.clone()))
            .collect(),
    );
    let spec = HoldSpec {
        kind: HoldKind::Hold,
        reason: reason.to_string(),
        set_by: crate::inventory::actor(),
        until,
        seconds_left: until.map(|at| (at - now).num_seconds().max(0) as u64),
    };
    let what = match until {
        Some(at) => format!("until {}: {reason}", at.format("%Y-%m-%d %H:%M:%SZ")),
        None => format!("until released: {reason}"),
    };
    let body = Arc::new(HoldRequest {
        hold: Some(spec.clone()),
        only_kind: None,
    });
    let detail = what.clone();
    // The manager records the hold whatever the agent answers: those whose hold differs change.
    let recorded: HashSet<String> = targets
        .iter()
        .filter(|t| !kept.contains_key(&t.host))
        .filter(|t| {
            in_force.get(&t.host).is_none_or(|hold| {
                hold.kind != spec.kind.as_str() || hold.reason != spec.reason || hold.until != until
            })
        })
        .map(|t| t.host.clone())
        .collect();
    // Those whose agent lost its rollback hold get it back: they are not left alone.
    let left_alone: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(
        targets
            .iter()
            .filter(|t| kept.get(&t.host).is_some_and(|hold| hold.on_agent))
            .map(|t| t.host.clone())
            .collect(),
    ));
    // Rollback holds the manager did not know of (`pm-agent rollback` on the host), learned
    // from the agents that kept them: recorded instead of the window.
    let learned: Arc<Mutex<HashMap<String, proto::HoldState>>> = Arc::default();
    let (op_left_alone, op_learned) = (Arc::clone(&left_alone), Arc::clone(&learned));
    let all_left_alone = Arc::clone(&left_alone);
    let record_kept = Arc::clone(&kept);
    let status = on_targets(
        home,
        global,
        JobKind {
            kind: "hold",
            what: &what,
            timeout: HOLD_TIMEOUT,
            unchanged_is_skipped: false,
            canary: false,
            recorded,
            left_alone,
        },
        targets,
        move |client, target| {
            let body = Arc::clone(&body);
            let detail = detail.clone();
            let kept = kept.get(&target.host).cloned();
            let (left_alone, learned) = (Arc::clone(&op_left_alone), Arc::clone(&op_learned));
            async move {
                if let Some(hold) = kept {
                    // The agent lost it (state reset or restored, seen by a poll): given back
                    // as the manager has it, never replaced by the window.
                    if let Some(spec) = hold.spec(Utc::now()).filter(|_| !hold.on_agent) {
                        let request = HoldRequest {
                            hold: Some(spec),
                            only_kind: None,
                        };
                        return send(&client, &target, &request)
                            .await
                            .map(|_| {
                                (
                                    true,
                                    format!(
                                        "gave back its {} hold at {} (no end), which its agent \
                                         did not have: {}",
                                        hold.kind,
                                        hold.revision.as_deref().unwrap_or("its revision"),
                                        hold.reason
                                    ),
                                )
                            })
                            .map_err(|error| {
                                format!(
                                    "{error}; its agent does not have its {} hold and its own \
                                     schedule may update it: run this again when it answers",
                                    hold.kind
                                )
                            });
                    }
                    return Ok((
                        false,
                        format!(
                            "kept its {} hold at {} (no end): {}; `pm-push release --host {}` \
                             ends it",
                            hold.kind,
                            hold.revision.as_deref().unwrap_or("its revision"),
                            hold.reason,
                            target.host
                        ),
                    ));
                }
                let answer = send(&client, &target, &body).await;
                if let Ok(SetupResponse {
                    kept: Some(hold), ..
                }) = answer
                {
                    let line = format!(
                        "kept its {} hold (no end), which its agent holds: {} (set by {}); \
                         `pm-push release --host {}` ends it",
                        hold.kind.as_str(),
                        hold.reason,
                        hold.set_by,
                        target.host
                    );
                    lock(&left_alone).insert(target.host.clone());
                    lock(&learned).insert(target.host.clone(), hold);
                    return Ok((false, line));
                }
                answer
                    .map(|answer| (answer.changed, detail))
                    .map_err(|error| {
                        format!(
                            "{error}; the hold is recorded on the manager, so rollouts leave the \
                             host alone, but its agent does not have it and its own schedule may \
                             still update it: run this again when it answers"
                        )
                    })
            }
        },
        |inv, job_id, outcomes| {
            let learned = lock(&learned);
            let holds: Vec<HoldRecord> = outcomes
                .iter()
                .filter(|(target, _)| !record_kept.contains_key(&target.host))
                .map(|(target, outcome)| match learned.get(&target.host) {
                    Some(hold) => HoldRecord {
                        host: target.host.clone(),
                        kind: hold.kind.as_str().into(),
                        reason: hold.reason.clone(),
                        revision: installed.get(&target.host).cloned().flatten(),
                        set_at: hold.set_at,
                        set_by: format!("{} (from the agent)", hold.set_by),
                        until: hold.until,
                        job_id: Some(job_id),
                        on_agent: true,
                    },
                    None => HoldRecord {
                        host: target.host.clone(),
                        kind: spec.kind.as_str().into(),
                        reason: spec.reason.clone(),
                        revision: installed.get(&target.host).cloned().flatten(),
                        set_at: now,
                        set_by: spec.set_by.clone(),
                        until,
                        job_id: Some(job_id),
                        on_agent: outcome.is_ok(),
                    },
                })
                .collect();
            inv.record_holds(&holds)?;
            for (target, outcome) in outcomes {
                if outcome.as_ref().is_ok_and(|(changed, _)| *changed)
                    && record_kept.contains_key(&target.host)
                {
                    inv.set_hold_on_agent(&target.host, true)?;
                }
            }
            Ok(())
        },
    )?;
    let (n_kept, targets_kept) = {
        let mut hosts: Vec<String> = lock(&all_left_alone).iter().cloned().collect();
        hosts.sort_unstable();
        (hosts.len(), hosts.join(", "))
    };
    if n_kept > 0 {
        eprintln!(
            "note: {n_kept} host(s) rolled back keep their rollback hold, which lasts until \
             released (longer than this hold): {targets_kept}; to put them under this hold \
             instead, `pm-push release` them first (they then follow dist when it ends)"
        );
    }
    Ok(status)
}

fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `hold` stays when a window (`pm-push hold`) is put on its host: a rollback's, by
/// hand or of the fleet. It has no end, so it holds at least as long as any window; replaced,
/// the host would follow dist again when the window ends, undoing the rollback.
fn keeps_over_a_window(hold: &HoldRecord) -> bool {
    hold.kind == HoldKind::Rollback.as_str() || hold.kind == HoldKind::FleetRollback.as_str()
}

/// `pm-push release [targets]`.
pub(super) fn push_release(
    home: &Path,
    global: &GlobalArgs,
    targets: &TargetArgs,
) -> anyhow::Result<ExitStatus> {
    let (targets, _) = resolve(home, global, targets)?;
    let held: Arc<HashMap<String, HoldRecord>> = Arc::new(read_holds(home, global)?);
    let body = Arc::new(HoldRequest {
        hold: None,
        only_kind: None,
    });
    let hosts: Vec<String> = targets.iter().map(|t| t.host.clone()).collect();
    let released_by = crate::inventory::actor();
    // Released on the manager whatever the agent answers.
    let recorded: HashSet<String> = hosts
        .iter()
        .filter(|host| held.contains_key(*host))
        .cloned()
        .collect();
    on_targets(
        home,
        global,
        JobKind {
            kind: "release",
            what: "of holds",
            timeout: HOLD_TIMEOUT,
            unchanged_is_skipped: false,
            canary: false,
            recorded,
            ..JobKind::default()
        },
        targets,
        move |client, target| {
            let body = Arc::clone(&body);
            let held = Arc::clone(&held);
            async move {
                let on_manager = held.contains_key(&target.host);
                send(&client, &target, &body)
                    .await
                    .map(|answer| answer.changed)
                    .map(
                        |on_agent| match (on_agent || on_manager, held.get(&target.host)) {
                            (true, Some(hold)) => (true, format!("released: {}", hold.describe())),
                            (true, None) => (true, "released (the agent held itself)".to_string()),
                            (false, _) => (false, "was not held".to_string()),
                        },
                    )
                    .map_err(|error| {
                        format!(
                            "{error}; released on the manager, but its agent may still hold \
                             itself (its schedule skips updates, and it refuses pushes, which \
                             record the hold again): run this again when it answers"
                        )
                    })
            }
        },
        |inv, job_id, _| {
            inv.release_holds(&hosts, None, &released_by, Some(job_id))
                .map(drop)
        },
    )
}

/// Sends a hold request to one agent: whether its hold changed, and the rollback's hold it kept
/// instead of a window.
async fn send(
    client: &reqwest::Client,
    target: &Target,
    request: &HoldRequest,
) -> Result<SetupResponse, String> {
    let body = serde_json::to_string(request).map_err(|err| err.to_string())?;
    let answer: SetupResponse = post_agent(
        client,
        &target.address,
        proto::HOLD_PATH,
        Some(body),
        "hold",
    )
    .await?;
    Ok(answer)
}

/// One hold in the output of `holds`.
#[derive(Debug, Serialize)]
struct HoldLine {
    host: String,
    kind: String,
    reason: String,
    revision: Option<String>,
    set_at: DateTime<Utc>,
    set_by: String,
    until: Option<DateTime<Utc>>,
    job_id: Option<i64>,
    on_agent: bool,
}

/// `pm-push holds`: the holds in force.
pub(super) fn list(home: &Path, global: &GlobalArgs) -> anyhow::Result<ExitStatus> {
    let holds = read_holds(home, global)?;
    let mut lines: Vec<HoldLine> = holds
        .into_values()
        .map(|h| HoldLine {
            host: h.host,
            kind: h.kind,
            reason: h.reason,
            revision: h.revision,
            set_at: h.set_at,
            set_by: h.set_by,
            until: h.until,
            job_id: h.job_id,
            on_agent: h.on_agent,
        })
        .collect();
    lines.sort_by(|a, b| a.host.cmp(&b.host));
    if global.json {
        cli::print_json(&serde_json::json!({ "changed": false, "holds": lines }))?;
        return Ok(ExitStatus::Success);
    }
    if lines.is_empty() {
        cli::print_text("no host is held")?;
        return Ok(ExitStatus::Success);
    }
    let mut table = cli::table(&[
        "host",
        "kind",
        "since",
        "until",
        "reason",
        "by",
        "agent has it",
    ]);
    let time = |at: DateTime<Utc>| at.format("%Y-%m-%d %H:%M:%SZ").to_string();
    for line in &lines {
        table.add_row(vec![
            line.host.clone(),
            line.kind.clone(),
            time(line.set_at),
            // Not `released`: it reads as if the hold had ended.
            line.until
                .map_or("no end (pm-push release)".to_string(), time),
            line.reason.clone(),
            line.set_by.clone(),
            if line.on_agent { "yes" } else { "no" }.to_string(),
        ]);
    }
    cli::print_text(table)?;
    let lost: Vec<&str> = lines
        .iter()
        .filter(|line| !line.on_agent)
        .map(|line| line.host.as_str())
        .collect();
    if !lost.is_empty() {
        eprintln!(
            "note: the agents of {} do not have their hold (unreachable when it was set, or \
             their state was reset or restored): `pm-push hold --host HOST` gives a rollback \
             hold back as it was (a plain hold: give its --until and --reason again)",
            lost.join(", ")
        );
    }
    Ok(ExitStatus::Success)
}

/// The holds a fleet rollback set on `hosts`, released on the agents and then in the
/// inventory once dist rotated back to their revision (a host on dist needs no hold to stay
/// there). Hosts whose agent did not answer, with why: their hold ends at the next
/// `pm-push release`.
pub(crate) fn release_fleet_rollback_holds(
    home: &Path,
    global: &GlobalArgs,
    targets: &[Target],
    job_id: i64,
) -> anyhow::Result<Vec<(String, String)>> {
    let request = HoldRequest {
        hold: None,
        only_kind: Some(HoldKind::FleetRollback),
    };
    let client = crate::poll::mutual_client(home, HOLD_TIMEOUT, false, global.lock_timeout)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let failed: Vec<(String, String)> = runtime.block_on(async {
        use futures_util::StreamExt;
        futures_util::stream::iter(targets)
            .map(|target| {
                let (client, request) = (client.clone(), &request);
                async move { (target.host.clone(), send(&client, target, request).await) }
            })
            .buffer_unordered(32)
            .filter_map(|(host, sent)| async move { sent.err().map(|error| (host, error)) })
            .collect()
            .await
    });
    let hosts: Vec<String> = targets.iter().map(|t| t.host.clone()).collect();
    Inventory::open(home, global.lock_timeout)
        .map_err(inventory_error)?
        .transaction(|inv| {
            inv.release_holds(
                &hosts,
                Some(HoldKind::FleetRollback.as_str()),
                &format!("dist rotated back (job {job_id})"),
                Some(job_id),
            )
        })
        .map_err(inventory_error)?;
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_a_duration_a_date_or_a_time_and_never_in_the_past() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let check = |text: &str, expected: &str| {
            let at = parse_until(text).unwrap().at(now).unwrap();
            assert_eq!(at.to_rfc3339(), expected, "{text}");
        };
        check("4h", "2026-01-01T16:00:00+00:00");
        check("2d", "2026-01-03T12:00:00+00:00");
        check("2026-01-02", "2026-01-02T23:59:59+00:00");
        check("2026-01-01T13:30:00+01:00", "2026-01-01T12:30:00+00:00");
        for past in ["2025-12-31", "2026-01-01T11:00:00Z"] {
            let err = parse_until(past).unwrap().at(now).unwrap_err();
            assert!(err.message.contains("is past"), "{}", err.message);
        }
        for bad in ["0s", "soon", "2026-13-01", ""] {
            assert!(parse_until(bad).is_err(), "{bad}");
        }
    }
}
