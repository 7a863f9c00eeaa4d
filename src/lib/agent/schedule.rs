//! The agent's own schedule: the optional `[schedule]` table of `agent.toml`.
//!
//! ```toml
//! [schedule]
//! update = "*/15 * * * *"     # pull dist (activated agents only)
//! scan = "0 3 * * *"          # scan scan_paths
//! scan_paths = ["/srv", "/home"]
//! ```
//!
//! Expressions are cron syntax (the `croner` crate): 5 fields, or 6 with seconds first. They
//! are evaluated in the host's local time zone, like the host's own cron files. `pm-agent run`
//! starts one task per expression that sleeps until the next fire time and then runs the same
//! code as the on-demand `update` / `scan` (the install lock keeps a scheduled update and an API
//! or CLI update apart). Runs missed while the agent was down are not replayed, and a run that
//! lasts past its next fire time skips it, like cron.
//!
//! Scan runs keep their reports in `scans/` like on-demand scans; update runs keep theirs in
//! `updates/<id>.json` (the last [`UPDATES_KEEP`], write aside + rename), served as
//! `GET /v1/updates` to the manager.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Result;
use chrono::{DateTime, Local};
use croner::Cron;
use serde::{Deserialize, Serialize};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{Agent, AgentConfig, error, from_manager, install, scan};
use crate::cli::UserError;
use crate::proto::{self, UpdateList, UpdateRun};
use crate::tls::TlsConnectInfo;

/// Directory of the scheduled update runs, relative to the state directory.
pub const UPDATES_DIR: &str = "updates";
/// How many update runs `updates/` keeps.
pub const UPDATES_KEEP: usize = 20;

/// `[schedule]` in `agent.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// When to install the manager's dist (cron expression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
    /// When to scan `scan_paths` (cron expression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<String>,
    /// Absolute paths the scheduled scan covers; required with `scan`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scan_paths: Vec<PathBuf>,
}

/// What a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Job {
    Update,
    Scan,
}

impl Job {
    fn as_str(self) -> &'static str {
        match self {
            Job::Update => "update",
            Job::Scan => "scan",
        }
    }
}

/// One schedule of the agent, for `status`.
#[derive(Debug, Serialize)]
pub(super) struct ScheduleStatus {
    pub job: &'static str,
    pub expression: String,
    pub next_run: Option<DateTime<Local>>,
}

fn parse(expression: &str) -> Result<Cron, String> {
    Cron::from_str(expression).map_err(|err| err.to_string())
}

/// The configured schedules, parsed; errors name `agent.toml` and the key.
pub(super) fn jobs(config: &AgentConfig, path: &Path) -> Result<Vec<(Job, String, Cron)>> {
    let Some(schedule) = &config.schedule else {
        return Ok(Vec::new());
    };
    let bad = |key: &str, problem: String| -> anyhow::Error {
        UserError::usage(format!(
            "`{}`: `schedule.{key}` {problem}",
            path.display()
        ))
        .with_hint(format!(
            "fix `[schedule]` in `{}`, e.g. `scan = \"0 3 * * *\"` and `scan_paths = [\"/srv\"]`",
            path.display()
        ))
        .into()
    };
    let mut jobs = Vec::new();
    for (job, expression) in [(Job::Update, &schedule.update), (Job::Scan, &schedule.scan)] {
        if let Some(expression) = expression {
            let cron = parse(expression).map_err(|problem| {
                bad(
                    job.as_str(),
                    format!("is not a cron expression (`{expression}`): {problem}"),
                )
            })?;
            jobs.push((job, expression.clone(), cron));
        }
    }
    if schedule.scan.is_some() && schedule.scan_paths.is_empty() {
        return Err(bad(
            "scan_paths",
            "is required when `schedule.scan` is set".into(),
        ));
    }
    if let Some(relative) = schedule.scan_paths.iter().find(|p| !p.is_absolute()) {
        return Err(bad(
            "scan_paths",
            format!("must hold absolute paths, not `{}`", relative.display()),
        ));
    }
    Ok(jobs)
}

/// The schedules and their next fire times after now.
pub(super) fn status(config: &AgentConfig, path: &Path) -> Result<Vec<ScheduleStatus>> {
    let now = Local::now();
    Ok(jobs(config, path)?
        .into_iter()
        .map(|(job, expression, cron)| ScheduleStatus {
            job: job.as_str(),
            expression,
            next_run: cron.find_next_occurrence(&now, false).ok(),
        })
        .collect())
}

/// Starts one task per configured schedule.
pub(super) fn spawn(agent: &Arc<Agent>) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let path = agent.dir.join(super::CONFIG_FILE);
    Ok(jobs(&agent.config, &path)?
        .into_iter()
        .map(|(job, expression, cron)| {
            tracing::info!(job = job.as_str(), %expression, "scheduled");
            tokio::spawn(run_schedule(Arc::clone(agent), job, cron))
        })
        .collect())
}

async fn run_schedule(agent: Arc<Agent>, job: Job, cron: Cron) {
    loop {
        let now = Local::now();
        let next = match cron.find_next_occurrence(&now, false) {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(job = job.as_str(), error = %err, "the schedule has no next run");
                return;
            }
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        run_once(&agent, job).await;
    }
}

/// Runs one scheduled job like its on-demand counterpart and logs the outcome.
async fn run_once(agent: &Arc<Agent>, job: Job) {
    if job == Job::Update && agent.lock().activation.is_none() {
        tracing::info!("scheduled update skipped: the agent is not activated (no dist URL)");
        return;
    }
    let worker = Arc::clone(agent);
    let joined = tokio::task::spawn_blocking(move || -> Result<String> {
        match job {
            Job::Update => {
                let report = record_run(&worker.dir, "schedule", || {
                    install::update(&worker.dir, &worker.config)
                })?;
                Ok(format!(
                    "revision {}, changed: {}",
                    report.revision.as_deref().unwrap_or("-"),
                    report.changed
                ))
            }
            Job::Scan => {
                let paths = worker
                    .config
                    .schedule
                    .as_ref()
                    .map(|s| s.scan_paths.clone())
                    .unwrap_or_default();
                let report = scan::scan(&worker.dir, &worker.config, &paths)?;
                Ok(format!(
                    "report {}, {:?}, {} files scanned, {} findings",
                    report.id,
                    report.result,
                    report.files_scanned.unwrap_or(0),
                    report.findings.len()
                ))
            }
        }
    })
    .await;
    match joined {
        Ok(Ok(outcome)) => tracing::info!(job = job.as_str(), %outcome, "scheduled run done"),
        Ok(Err(err)) => tracing::error!(
            job = job.as_str(),
            error = %format!("{err:#}"),
            "scheduled run failed"
        ),
        Err(err) => tracing::error!(job = job.as_str(), error = %err, "scheduled run panicked"),
    }
}

/// Runs an install (update or rollback) and keeps its run report in `updates/` whatever the
/// outcome, so the manager's poll sees every install, whoever started it.
pub(super) fn record_run(
    dir: &Path,
    trigger: &str,
    install: impl FnOnce() -> Result<proto::InstallReport>,
) -> Result<proto::InstallReport> {
    let started_at = chrono::Utc::now();
    let result = install();
    let run = UpdateRun {
        id: format!(
            "{}-{}",
            started_at.format("%Y%m%dT%H%M%S%.6fZ"),
            &proto::nonce()[..8]
        ),
        trigger: trigger.into(),
        started_at,
        finished_at: chrono::Utc::now(),
        report: result.as_ref().ok().cloned(),
        error: result.as_ref().err().map(|err| format!("{err:#}")),
    };
    if let Err(err) = store_update(dir, &run) {
        tracing::error!(error = %format!("{err:#}"), "cannot keep the update report");
    }
    result
}

/// Stores an update run and removes the oldest beyond [`UPDATES_KEEP`].
fn store_update(dir: &Path, run: &UpdateRun) -> Result<()> {
    super::reports::store(&dir.join(UPDATES_DIR), &run.id, run, UPDATES_KEEP)
}

/// The kept update runs, newest first.
pub(super) fn list_updates(dir: &Path) -> Result<Vec<UpdateRun>> {
    super::reports::list(&dir.join(UPDATES_DIR))
}

async fn updates_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), &info) {
        return *response;
    }
    match list_updates(&agent.dir) {
        Ok(runs) => axum::Json(UpdateList { runs }).into_response(),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the agent cannot read its update reports: {err:#}"),
        ),
    }
}

/// `GET /v1/updates`.
pub(super) fn routes() -> Router<Arc<Agent>> {
    Router::new().route(proto::UPDATES_PATH, get(updates_handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_update_runs_are_kept_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let start = chrono::Utc::now();
        for n in 0..UPDATES_KEEP + 3 {
            let at = start + chrono::Duration::seconds(n as i64);
            let run = UpdateRun {
                id: at.format("%Y%m%dT%H%M%S%.6fZ").to_string(),
                trigger: "schedule".into(),
                started_at: at,
                finished_at: at,
                report: None,
                error: Some(format!("run {n}")),
            };
            store_update(dir.path(), &run).unwrap();
        }
        let runs = list_updates(dir.path()).unwrap();
        assert_eq!(runs.len(), UPDATES_KEEP);
        assert_eq!(
            runs[0].error.as_deref(),
            Some(format!("run {}", UPDATES_KEEP + 2).as_str())
        );
    }
}
