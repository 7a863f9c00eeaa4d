//! The agent's own schedule: the optional `[schedule]` table of `agent.toml`.
//!
//! ```toml
//! [schedule]
//! update = "*/15 * * * *"     # pull dist (activated agents only)
//! scan = "0 3 * * *"          # scan scan_paths
//! scan_paths = ["/srv", "/home"]
//! ```
//!
//! A scheduled update does nothing while the host is held (see `hold`).
//!
//! Expressions are cron syntax (the `croner` crate): 5 fields, or 6 with seconds first. They
//! are evaluated in the host's local time zone, like the host's own cron files. `pm-agent run`
//! starts one task per expression that sleeps until the next fire time and then runs the same
//! code as the on-demand `update` / `scan` (the install lock keeps a scheduled update and an API
//! or CLI update apart). Runs missed while the agent was down are not replayed, and a run that
//! lasts past its next fire time skips it, like cron.
//!
//! The manager can set the schedule too (`POST /v1/setup/schedule`, kept in `setup.json`): when
//! it has, its schedule is the one in effect and `agent.toml`'s waits until the manager clears
//! it. A running agent applies a new schedule at once: the tasks of the old one are aborted (a
//! run already under way finishes) and the new ones started, without a restart.
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

use super::hold::{Held, HoldPolicy};
use super::{Agent, AgentConfig, CONFIG_FILE, error, from_manager, install, scan, setup};
use crate::cli::UserError;
use crate::proto::{self, UpdateList, UpdateRun};
use crate::tls::TlsConnectInfo;

/// Directory of the scheduled update runs, relative to the state directory.
pub const UPDATES_DIR: &str = "updates";
/// How many update runs `updates/` keeps.
pub const UPDATES_KEEP: usize = 20;

/// The schedule in effect comes from the manager (`setup.json`).
const FROM_MANAGER: &str = "manager";
/// The schedule in effect comes from `[schedule]` in `agent.toml`.
const FROM_AGENT_TOML: &str = "agent.toml";

/// Wakes the task that runs the schedule when the schedule in effect may have changed.
static RELOAD: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// `[schedule]` in `agent.toml`, or the schedule the manager gave (`setup.json`).
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
    /// Where the schedule comes from: `manager` or `agent.toml`.
    pub source: &'static str,
}

fn parse(expression: &str) -> Result<Cron, String> {
    Cron::from_str(expression).map_err(|err| err.to_string())
}

/// A schedule's jobs with their parsed expressions.
type Jobs = Vec<(Job, String, Cron)>;

impl ScheduleConfig {
    /// Checks the schedule the way `agent.toml` is checked at load: cron syntax, an expression
    /// that fires at all, a scan needs paths, the paths are absolute. The error names the key
    /// at fault (`update`, `scan`, `scan_paths`) and the problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        self.parse_jobs().map(drop)
    }

    fn parse_jobs(&self) -> Result<Jobs, (&'static str, String)> {
        let mut jobs = Vec::new();
        for (job, expression) in [(Job::Update, &self.update), (Job::Scan, &self.scan)] {
            if let Some(expression) = expression {
                let cron = parse(expression).map_err(|problem| {
                    (
                        job.as_str(),
                        format!("is not a cron expression (`{expression}`): {problem}"),
                    )
                })?;
                // Valid syntax can still name no date at all (`0 0 30 2 *`): the task would
                // find no next run and only say so in the log, so it is refused here, where
                // the expression is given (agent.toml, the API, `pm-push schedule`).
                if cron.find_next_occurrence(&Local::now(), false).is_err() {
                    return Err((
                        job.as_str(),
                        format!(
                            "`{expression}` never fires: no date matches its day of month and \
                             month"
                        ),
                    ));
                }
                jobs.push((job, expression.clone(), cron));
            }
        }
        if self.scan.is_some() && self.scan_paths.is_empty() {
            return Err(("scan_paths", "is required when a scan is scheduled".into()));
        }
        if let Some(relative) = self.scan_paths.iter().find(|p| !p.is_absolute()) {
            return Err((
                "scan_paths",
                format!("must hold absolute paths, not `{}`", relative.display()),
            ));
        }
        Ok(jobs)
    }
}

/// The jobs of a schedule kept in `path`; errors name the file and the key.
fn jobs_in(schedule: &ScheduleConfig, path: &Path) -> Result<Jobs> {
    schedule.parse_jobs().map_err(|(key, problem)| {
        let error = UserError::usage(format!(
            "`{}`: `schedule.{key}` {problem}",
            path.display()
        ));
        let hint = if path.ends_with(CONFIG_FILE) {
            format!(
                "fix `[schedule]` in `{}`, e.g. `scan = \"0 3 * * *\"` and `scan_paths = [\"/srv\"]`",
                path.display()
            )
        } else {
            "send the schedule again from the manager with `pm-push schedule`".into()
        };
        error.with_hint(hint).into()
    })
}

/// The schedules of `agent.toml`, parsed; errors name `agent.toml` and the key.
pub(super) fn jobs(config: &AgentConfig, path: &Path) -> Result<Jobs> {
    match &config.schedule {
        Some(schedule) => jobs_in(schedule, path),
        None => Ok(Vec::new()),
    }
}

/// The schedule in effect: its jobs, the paths its scans cover and where it comes from.
struct Effective {
    jobs: Jobs,
    scan_paths: Arc<[PathBuf]>,
    source: &'static str,
}

/// The manager's schedule when it gave one, else `agent.toml`'s.
fn effective(dir: &Path, config: &AgentConfig) -> Result<Effective> {
    let (schedule, path, source) = match setup::load(dir)?.schedule {
        Some(schedule) => (schedule, dir.join(setup::SETUP_FILE), FROM_MANAGER),
        None => (
            config.schedule.clone().unwrap_or_default(),
            dir.join(CONFIG_FILE),
            FROM_AGENT_TOML,
        ),
    };
    Ok(Effective {
        jobs: jobs_in(&schedule, &path)?,
        scan_paths: schedule.scan_paths.into(),
        source,
    })
}

/// The schedules in effect and their next fire times after now. `path` is `agent.toml` in the
/// state directory; the manager's schedule is read from `setup.json` next to it.
pub(super) fn status(config: &AgentConfig, path: &Path) -> Result<Vec<ScheduleStatus>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let effective = effective(dir, config)?;
    let now = Local::now();
    Ok(effective
        .jobs
        .into_iter()
        .map(|(job, expression, cron)| ScheduleStatus {
            job: job.as_str(),
            expression,
            next_run: cron.find_next_occurrence(&now, false).ok(),
            source: effective.source,
        })
        .collect())
}

/// Starts the task that runs the schedule in effect (one task per expression under it) and
/// restarts them when [`reload`] says the schedule may have changed. Aborting the returned
/// task aborts them all.
pub(super) fn spawn(agent: &Arc<Agent>) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let first = effective(&agent.dir, &agent.config)?;
    Ok(vec![tokio::spawn(supervise(Arc::clone(agent), first))])
}

/// Tells the running schedule to read the schedule in effect again (after a change of
/// `setup.json`); a no-op in a process that runs no schedule.
pub(super) fn reload() {
    RELOAD.notify_one();
}

async fn supervise(agent: Arc<Agent>, first: Effective) {
    let mut tasks = start(&agent, first);
    loop {
        RELOAD.notified().await;
        match effective(&agent.dir, &agent.config) {
            // A run under way in a blocking thread finishes and keeps its report.
            Ok(schedule) => {
                tasks.abort_all();
                tasks = start(&agent, schedule);
            }
            Err(err) => tracing::error!(
                error = %format!("{err:#}"),
                "cannot read the new schedule; keeping the current one"
            ),
        }
    }
}

fn start(agent: &Arc<Agent>, schedule: Effective) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    if schedule.jobs.is_empty() {
        tracing::info!(source = schedule.source, "nothing scheduled");
    }
    for (job, expression, cron) in schedule.jobs {
        tracing::info!(job = job.as_str(), %expression, source = schedule.source, "scheduled");
        tasks.spawn(run_schedule(
            Arc::clone(agent),
            job,
            cron,
            Arc::clone(&schedule.scan_paths),
        ));
    }
    tasks
}

async fn run_schedule(agent: Arc<Agent>, job: Job, cron: Cron, scan_paths: Arc<[PathBuf]>) {
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
        run_once(&agent, job, &scan_paths).await;
    }
}

/// Runs one scheduled job like its on-demand counterpart and logs the outcome.
async fn run_once(agent: &Arc<Agent>, job: Job, scan_paths: &Arc<[PathBuf]>) {
    if super::stop::stopping() {
        tracing::info!(
            job = job.as_str(),
            "scheduled run skipped: the agent is stopping"
        );
        return;
    }
    if job == Job::Update && agent.lock().activation.is_none() {
        tracing::info!("scheduled update skipped: the agent is not activated (no dist URL)");
        return;
    }
    let worker = Arc::clone(agent);
    let scan_paths = Arc::clone(scan_paths);
    let joined = tokio::task::spawn_blocking(move || -> Result<String> {
        match job {
            Job::Update => {
                let report = record_run(&worker.dir, "schedule", || {
                    install::update_from(&worker.dir, &worker.config, None, &HoldPolicy::Skip)
                })?;
                Ok(format!(
                    "revision {}, changed: {}",
                    report.revision.as_deref().unwrap_or("-"),
                    report.changed
                ))
            }
            Job::Scan => {
                let report = scan::scan(&worker.dir, &worker.config, &scan_paths)?;
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
        Ok(Err(err)) if err.downcast_ref::<Held>().is_some() => tracing::info!(
            job = job.as_str(),
            reason = %err,
            "scheduled run skipped: the host is held"
        ),
        Ok(Err(err)) => tracing::error!(
            job = job.as_str(),
            error = %format!("{err:#}"),
            "scheduled run failed"
        ),
        Err(err) => tracing::error!(job = job.as_str(), error = %err, "scheduled run panicked"),
    }
}

/// Runs an install (update or rollback) and keeps its run report in `updates/` whatever the
/// outcome, so the manager's poll sees every install, whoever started it. An install a hold
/// did not allow never started: no report (it would count as a failed update). A stopping agent
/// starts none; one the agent exits without is recorded by [`record_abandoned`].
pub(super) fn record_run(
    dir: &Path,
    trigger: &str,
    install: impl FnOnce() -> Result<proto::InstallReport>,
) -> Result<proto::InstallReport> {
    if super::stop::stopping() {
        return Err(super::stop::refusal("the install"));
    }
    let started_at = chrono::Utc::now();
    let id = format!(
        "{}-{}",
        started_at.format("%Y%m%dT%H%M%S%.6fZ"),
        &proto::nonce()[..8]
    );
    super::stop::install_started(super::stop::Install {
        id: id.clone(),
        trigger: trigger.into(),
        started_at,
    });
    let result = install();
    let run = UpdateRun {
        id,
        seq: None,
        trigger: trigger.into(),
        started_at,
        finished_at: chrono::Utc::now(),
        report: result.as_ref().ok().cloned(),
        error: result.as_ref().err().map(|err| format!("{err:#}")),
    };
    let held = result
        .as_ref()
        .is_err_and(|err| err.downcast_ref::<Held>().is_some());
    if super::stop::install_ended(&run.id)
        && !held
        && let Err(err) = store_update(dir, run)
    {
        tracing::error!(error = %format!("{err:#}"), "cannot keep the update report");
    }
    result
}

/// Keeps an update run for each install the agent exits without (see `stop`).
pub(super) fn record_abandoned(dir: &Path) {
    for install in super::stop::abandon_installs() {
        let run = UpdateRun {
            id: install.id,
            seq: None,
            trigger: install.trigger,
            started_at: install.started_at,
            finished_at: chrono::Utc::now(),
            report: None,
            error: Some(format!(
                "abandoned: the agent stopped before this install finished (it had {:?} to); an \
                 install is all-or-nothing, so the database directory holds one whole set, never \
                 a mix (the next poll shows which), and the next update completes it",
                super::stop::STOP_GRACE
            )),
        };
        tracing::warn!(id = %run.id, "an install under way was abandoned by the stop");
        if let Err(err) = store_update(dir, run) {
            tracing::error!(error = %format!("{err:#}"), "cannot keep the update report");
        }
    }
}

/// Stores an update run with the next number of the agent's report stream and removes the
/// oldest beyond [`UPDATES_KEEP`].
fn store_update(dir: &Path, run: UpdateRun) -> Result<UpdateRun> {
    super::reports::store_numbered(dir, &dir.join(UPDATES_DIR), UPDATES_KEEP, |seq| {
        let run = UpdateRun {
            seq: Some(seq),
            ..run
        };
        (run.id.clone(), run)
    })
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
    fn an_expression_that_never_fires_is_refused_like_a_malformed_one() {
        let check = |update: &str| {
            ScheduleConfig {
                update: Some(update.into()),
                ..Default::default()
            }
            .check()
        };
        assert!(check("0 3 * * *").is_ok());
        // Every four years is rare, not never.
        assert!(check("0 0 29 2 *").is_ok());
        for never in ["0 0 30 2 *", "0 0 31 4 *", "0 0 0 31 11 *"] {
            let started = std::time::Instant::now();
            let (key, problem) = check(never).unwrap_err();
            assert_eq!(key, "update");
            assert!(problem.contains("never fires"), "{never}: {problem}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{never}"
            );
        }
        assert!(check("every tuesday").unwrap_err().1.contains("not a cron"));
    }

    #[test]
    fn only_the_last_update_runs_are_kept_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let start = chrono::Utc::now();
        for n in 0..UPDATES_KEEP + 3 {
            let at = start + chrono::Duration::seconds(n as i64);
            let run = UpdateRun {
                id: at.format("%Y%m%dT%H%M%S%.6fZ").to_string(),
                seq: None,
                trigger: "schedule".into(),
                started_at: at,
                finished_at: at,
                report: None,
                error: Some(format!("run {n}")),
            };
            store_update(dir.path(), run).unwrap();
        }
        let runs = list_updates(dir.path()).unwrap();
        assert_eq!(runs.len(), UPDATES_KEEP);
        assert_eq!(
            runs[0].error.as_deref(),
            Some(format!("run {}", UPDATES_KEEP + 2).as_str())
        );
    }
}
