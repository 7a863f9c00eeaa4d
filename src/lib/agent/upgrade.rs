//! The agent replacing its own executable: `POST /v1/upgrade` (mutual TLS, the manager only) and
//! `pm-agent upgrade`. The package comes from the manager's dist like databases do: the signed
//! manifest is fetched and verified exactly as an install does, and the `agent` product's
//! component for this platform (`pm-agent-<ARCH>-<OS>`) is taken when its sha256 differs from the
//! running executable's.
//!
//! Never half-done: the package is downloaded (size limit and sha256 from the manifest), written
//! aside in the executable's directory (`.pm-agent.pm-new-<pid>`, 0755, fsynced), run with
//! `--version` (with a timeout; it must print `pm-agent <version>`), the current executable is
//! kept as `<exe>.previous` (hard link, or a copy), and only then is the new file renamed over
//! the executable and the directory fsynced. A failure before the rename changes nothing. After
//! answering, `pm-agent run` shuts its server down (the port is released) and `exec`s the new
//! executable with the same argv: the same PID, so systemd and the lab keep tracking it. When
//! `exec` fails, `<exe>.previous` is renamed back and the old version serves again, reporting
//! the error in its status (`upgrade_error`).

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::install::{activated_dist_url, fetch_dist, get, http_client, join_url, sha256_file};
use super::{Agent, error, failure_response, from_manager};
use crate::cli::{ExitStatus, UserError};
use crate::durable;
use crate::manifest::{agent_component, hex};
use crate::proto::{self, UpgradeReport};
use crate::tls::TlsConnectInfo;

/// Prefix of the new executable while it is written and checked.
const NEW_PREFIX: &str = ".pm-agent.pm-new-";
/// How long the new executable may take to print its version.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The running executable, read once at start (after a rename over it, `current_exe` would name
/// a deleted file).
#[derive(Debug, Clone)]
pub(super) struct Executable {
    /// Its path.
    pub path: PathBuf,
    /// sha256 of its contents.
    pub sha256: String,
}

impl Executable {
    /// The running executable and its sha256.
    pub(super) fn current() -> Result<Executable> {
        let path = std::env::current_exe().context("cannot find the running executable")?;
        let sha256 = sha256_file(&path)
            .with_context(|| format!("cannot read the executable `{}`", path.display()))?;
        Ok(Executable { path, sha256 })
    }

    /// Removes new executables that upgrades left half-written beside this one when they were
    /// killed: those of processes that no longer run (another agent process may be upgrading).
    pub(super) fn remove_leftovers(&self) {
        let Some(Ok(entries)) = self.path.parent().map(fs::read_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(NEW_PREFIX) else {
                continue;
            };
            let running = pid.parse::<u32>().is_ok_and(|pid| {
                pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
            });
            if !running {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// An executable replaced on disk, to be started in place of the running process.
#[derive(Debug)]
pub(super) struct Replaced {
    exe: PathBuf,
    previous: PathBuf,
}

/// What `pm-agent run` shares between the upgrade handler and its serve loop.
#[derive(Debug)]
pub(super) struct Restart {
    /// Set while an upgrade runs or waits for its restart: a second one is refused.
    busy: AtomicBool,
    /// The replaced executable, once the answer is on its way.
    replaced: Mutex<Option<Replaced>>,
    /// Becomes true when the serve loop must shut the server down (any number of waiters, set
    /// before or after they wait).
    requested: tokio::sync::watch::Sender<bool>,
}

impl Default for Restart {
    fn default() -> Restart {
        Restart {
            busy: AtomicBool::new(false),
            replaced: Mutex::new(None),
            requested: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Restart {
    /// Resolves once an upgrade asked for a restart.
    pub(super) async fn requested(&self) {
        let mut requested = self.requested.subscribe();
        let _ = requested.wait_for(|requested| *requested).await;
    }

    /// The replaced executable to start, if an upgrade asked for it.
    pub(super) fn take(&self) -> Option<Replaced> {
        self.replaced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Fetches the verified dist manifest, and when its package for this platform differs from
/// `exe`, downloads, checks and renames it over `exe`. Returns the report and, when the
/// executable was replaced, what to start.
async fn replace_executable(
    dir: &Path,
    exe: &Executable,
) -> Result<(UpgradeReport, Option<Replaced>)> {
    let dist_url = activated_dist_url(dir)?;
    let client = http_client()?;
    // The statement is recorded by the next update, which installs what it names.
    let (manifest, _) = fetch_dist(&client, dir, &dist_url).await?;
    let component = agent_component(std::env::consts::ARCH, std::env::consts::OS);
    if !manifest.has_agent_product() {
        return Err(UserError::failure(format!(
            "the manager's dist ({}) has no `agent` product: there is no pm-agent package to \
             upgrade to",
            manifest.revision
        ))
        .with_hint("add a product of kind `agent` to pm.toml on the manager, sync and publish")
        .into());
    }
    let Some(file) = manifest.agent_package(&component) else {
        return Err(UserError::failure(format!(
            "the manager's dist ({}) has no pm-agent package for this platform (`{component}`)",
            manifest.revision
        ))
        .with_hint(format!(
            "put `pm-agent-<version>-{}-{}` in the agent product's directory on the manager, \
             sync and publish",
            std::env::consts::ARCH,
            std::env::consts::OS
        ))
        .into());
    };
    let to_version = file.version.clone().unwrap_or_default();
    let mut report = UpgradeReport {
        changed: false,
        component: component.clone(),
        from_version: env!("CARGO_PKG_VERSION").to_string(),
        from_sha256: exe.sha256.clone(),
        to_version: to_version.clone(),
        to_sha256: file.sha256.clone(),
        revision: manifest.revision.clone(),
    };
    if file.sha256 == exe.sha256 {
        return Ok((report, None));
    }
    let url = join_url(&dist_url, &file.path);
    let bytes = get(&client, &url, file.size).await?;
    let sha256 = hex(&openssl::sha::sha256(&bytes));
    if bytes.len() as u64 != file.size || sha256 != file.sha256 {
        return Err(UserError::failure(format!(
            "refusing `{url}`: {} bytes with sha256 {sha256}, the signed manifest says {} bytes \
             with sha256 {}",
            bytes.len(),
            file.size,
            file.sha256
        ))
        .with_hint("nothing changed; check the manager's dist (`pm-mirror status`)")
        .into());
    }
    let exe_path = exe.path.clone();
    let state_dir = dir.to_path_buf();
    let package = file.path.clone();
    let replaced = tokio::task::spawn_blocking(move || {
        install_beside(&exe_path, &state_dir, &bytes, &package, &to_version)
    })
    .await
    .context("the upgrade stopped")??;
    report.changed = true;
    Ok((report, Some(replaced)))
}

/// Writes `bytes` beside `exe`, checks that it runs as pm-agent `version`, keeps `exe` as
/// `<exe>.previous` and renames the new file over `exe`. Before the rename nothing is changed
/// (the new file is removed again on failure).
fn install_beside(
    exe: &Path,
    state_dir: &Path,
    bytes: &[u8],
    package: &str,
    version: &str,
) -> Result<Replaced> {
    let dir = exe.parent().context("the executable has no directory")?;
    let new = dir.join(format!("{NEW_PREFIX}{}", std::process::id()));
    let previous = PathBuf::from(format!("{}.previous", exe.display()));
    let result = (|| {
        write_executable(&new, bytes).map_err(|err| {
            UserError::failure(format!("cannot write `{}`: {err}", new.display())).with_hint(
                "the agent must be able to write its executable's directory (the systemd unit's \
                 ReadWritePaths)",
            )
        })?;
        check_runs(&new, state_dir, package, version)?;
        keep_previous(exe, &previous).map_err(|err| {
            UserError::failure(format!(
                "cannot keep the current executable as `{}`: {err}",
                previous.display()
            ))
        })?;
        fs::rename(&new, exe).map_err(|err| {
            UserError::failure(format!(
                "cannot rename the new executable over `{}`: {err}",
                exe.display()
            ))
        })?;
        anyhow::Ok(())
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&new);
        return Err(err);
    }
    if let Err(err) = durable::sync_dir(dir) {
        tracing::warn!(error = %err, dir = %dir.display(), "cannot fsync the executable's directory");
    }
    Ok(Replaced {
        exe: exe.to_owned(),
        previous,
    })
}

fn write_executable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)?;
    file.write_all(bytes)?;
    file.set_permissions(fs::Permissions::from_mode(0o755))?;
    file.sync_all()
}

/// Runs `new --version` (at most [`VERSION_TIMEOUT`]); it must print `pm-agent <version>`.
/// Runs the new executable twice before it may replace the running one: `--version` must name
/// the package's version, and `--state DIR status --json` must read this agent's configuration
/// and state (a build that cannot would fail in `run`, after the exec, with no way back).
fn check_runs(new: &Path, state_dir: &Path, package: &str, version: &str) -> Result<()> {
    let refuse = |problem: String| -> anyhow::Error {
        UserError::failure(format!(
            "the package `{package}` does not run as pm-agent {version}: {problem}"
        ))
        .with_hint("nothing changed; put a working pm-agent build in the agent product's directory on the manager, sync and publish")
        .into()
    };
    let first_line = |text: &[u8]| {
        String::from_utf8_lossy(text)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let stderr_part = |stderr: &[u8]| match first_line(stderr) {
        line if line.is_empty() => String::new(),
        line => format!(" and on stderr `{line}`"),
    };
    let output = run_bounded(new, &["--version".as_ref()]).map_err(refuse)?;
    let expected = format!("pm-agent {version}");
    let printed = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !printed.lines().any(|line| line.trim() == expected) {
        return Err(refuse(format!(
            "`--version` printed `{}` ({}){}, expected `{expected}`",
            first_line(&output.stdout),
            output.status,
            stderr_part(&output.stderr)
        )));
    }
    let args = [
        "--state".as_ref(),
        state_dir.as_os_str(),
        "status".as_ref(),
        "--json".as_ref(),
    ];
    let output = run_bounded(new, &args).map_err(refuse)?;
    if !output.status.success() {
        return Err(refuse(format!(
            "`status` cannot read this agent's state ({}){}",
            output.status,
            stderr_part(&output.stderr)
        )));
    }
    Ok(())
}

/// Runs `program` with `args`, killed after [`VERSION_TIMEOUT`].
fn run_bounded(program: &Path, args: &[&std::ffi::OsStr]) -> Result<std::process::Output, String> {
    let mut attempts = 0;
    let mut child = loop {
        let spawned = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            // Another thread may have forked while the file was still open for writing
            // (ETXTBSY, "text file busy"); that child closes it at its exec.
            Err(err) if err.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 20 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(format!("it cannot be started: {err}")),
            Ok(child) => break child,
        }
    };
    let deadline = Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it did not finish within {VERSION_TIMEOUT:?}"));
            }
            Err(err) => return Err(format!("cannot wait for it: {err}")),
        }
    }
    child
        .wait_with_output()
        .map_err(|err| format!("cannot read its output: {err}"))
}

/// `<exe>.previous` becomes the current executable: a hard link, or a copy across devices.
fn keep_previous(exe: &Path, previous: &Path) -> std::io::Result<()> {
    match fs::remove_file(previous) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    if fs::hard_link(exe, previous).is_ok() {
        return Ok(());
    }
    fs::copy(exe, previous)?;
    fs::File::open(previous)?.sync_all()
}

/// Starts the replaced executable in place of this process (same PID, same argv). Returns only
/// when that failed: `<exe>.previous` is then renamed back and the error returned.
pub(super) fn exec(replaced: Replaced) -> String {
    let mut args = std::env::args_os();
    let arg0: OsString = args.next().unwrap_or_else(|| replaced.exe.clone().into());
    tracing::info!(exe = %replaced.exe.display(), "restarting as the upgraded executable");
    let err = Command::new(&replaced.exe).arg0(arg0).args(args).exec();
    let message = format!(
        "cannot start the upgraded executable `{}`: {err}",
        replaced.exe.display()
    );
    let restored = fs::rename(&replaced.previous, &replaced.exe)
        .and_then(|()| durable::sync_parent_dir(&replaced.exe));
    match restored {
        Ok(()) => {
            tracing::error!(error = %message, "upgrade undone: the previous executable is back and keeps running")
        }
        Err(restore) => {
            tracing::error!(error = %message, restore_error = %restore, "upgrade failed and the previous executable could not be renamed back; this process keeps running")
        }
    }
    message
}

/// `POST /v1/upgrade`: answers with the report, then (when changed) asks the serve loop to
/// restart as the new executable.
pub(super) async fn upgrade_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), &info) {
        return *response;
    }
    if super::stop::stopping() {
        let refusal = super::stop::refusal("the upgrade");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            format!("{refusal:#}"),
        );
    }
    let Some(exe) = agent.executable.clone() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upgrade_failed",
            "this agent could not read its own executable at start, so it cannot upgrade it",
        );
    };
    let restart = &agent.restart;
    if restart.busy.swap(true, Ordering::SeqCst) {
        return error(
            StatusCode::CONFLICT,
            "upgrade_in_progress",
            "an upgrade of this agent is already running; poll its status",
        );
    }
    *agent
        .upgrade_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    // A task of its own: a manager that gives up waiting (its timeout, Ctrl-C) drops this
    // handler, but an upgrade that started finishes, restart included, and frees `busy`.
    let task_agent = agent.clone();
    let task = tokio::spawn(async move {
        let restart = &task_agent.restart;
        let outcome = replace_executable(&task_agent.dir, &exe).await;
        match &outcome {
            Ok((report, Some(_))) => {
                tracing::info!(from = %report.from_sha256, to = %report.to_sha256, version = %report.to_version, "executable replaced; restarting after the answer");
            }
            Ok((_, None)) => restart.busy.store(false, Ordering::SeqCst),
            Err(err) => {
                restart.busy.store(false, Ordering::SeqCst);
                tracing::error!(error = %format!("{err:#}"), "upgrade failed; nothing changed");
            }
        }
        outcome.map(|(report, replaced)| {
            if let Some(replaced) = replaced {
                *restart
                    .replaced
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(replaced);
                // Graceful shutdown lets the answer go out before the server stops.
                restart.requested.send_replace(true);
            }
            report
        })
    });
    match task.await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(err)) => failure_response("upgrade_failed", &err),
        Err(err) => {
            restart.busy.store(false, Ordering::SeqCst);
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "upgrade_failed",
                format!("the upgrade stopped: {err}"),
            )
        }
    }
}

/// `pm-agent upgrade`: replaces the executable on disk; a running `pm-agent run` keeps the old
/// one until it is restarted.
pub(super) fn upgrade_command(dir: &Path, json: bool) -> Result<ExitStatus> {
    let exe = Executable::current()?;
    exe.remove_leftovers();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (report, replaced) = runtime.block_on(replace_executable(dir, &exe))?;
    if json {
        crate::cli::print_json(&report)?;
    } else if let Some(replaced) = replaced {
        crate::cli::print_text(format!(
            "upgraded `{}` from {} ({}) to {} ({}); the previous executable is `{}`\n\
             restart the agent (e.g. `systemctl restart pm-agent`) to run it",
            replaced.exe.display(),
            report.from_version,
            report.from_sha256,
            report.to_version,
            report.to_sha256,
            replaced.previous.display()
        ))?;
    } else {
        crate::cli::print_text(format!(
            "already on the package of {} ({} {}): nothing to do",
            report.revision, report.component, report.to_version
        ))?;
    }
    Ok(ExitStatus::Success)
}

/// The route of this module.
pub(super) fn routes() -> axum::Router<Arc<Agent>> {
    axum::Router::new().route(proto::UPGRADE_PATH, axum::routing::post(upgrade_handler))
}
