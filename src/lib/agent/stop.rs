//! Stopping `pm-agent run`, and one agent per state directory.
//!
//! The run lock: `pm-agent run` holds an exclusive `flock` on `run.lock` in the state directory
//! for as long as the process lives (the kernel drops it when the process ends, however it
//! ends, and at the `exec` of a self-upgrade, whose new image takes it again first thing). A
//! second `pm-agent run` on the same state directory is refused with the holder's pid, before it
//! touches the port or any state: two agents on one state would install into one database
//! directory and write one report store.
//!
//! A stop (SIGTERM from systemd, or SIGINT) starts nothing new: scans waiting for the running
//! one, scheduled runs and install requests are refused ("the agent is stopping"); the running
//! scan engine is ended at once and its report kept, result `error`, saying so; an install
//! under way gets [`STOP_GRACE`] to finish (it is all-or-nothing, see `install`), and if it
//! has not by then the agent exits without it and keeps an update run saying it was abandoned.
//! The process exits within seconds in every case.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};

use super::io_error;
use crate::cli::UserError;

/// The run lock, relative to the state directory.
pub const RUN_LOCK_FILE: &str = "run.lock";
/// How long work under way may take to end after a stop was asked before the agent exits
/// without it.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Set once this process was asked to stop; never cleared.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// Wakes whatever waits for the stop (any number of waiters, before or after it was asked).
static STOP: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Installs under way in this process: their run id, trigger and start, until they end.
static INSTALLS: Mutex<Vec<Install>> = Mutex::new(Vec::new());

/// An install under way.
#[derive(Debug, Clone)]
pub(super) struct Install {
    pub id: String,
    pub trigger: String,
    pub started_at: DateTime<Utc>,
}

/// Asks this process to stop: from now on nothing new starts.
pub(super) fn begin() {
    if !STOPPING.swap(true, Ordering::SeqCst) {
        tracing::info!("stopping: nothing new starts; ending the work under way");
    }
    STOP.send_replace(true);
}

/// Whether this process was asked to stop.
pub(super) fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Resolves once this process was asked to stop.
pub(super) async fn requested() {
    let mut stop = STOP.subscribe();
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The refusal of new work while stopping.
pub(super) fn refusal(what: &str) -> anyhow::Error {
    UserError::failure(format!("the agent is stopping: {what} was not started"))
        .with_hint("ask again once the agent runs again (systemctl start pm-agent)")
        .into()
}

/// Notes an install under way (`record_run`); [`install_ended`] takes the note back.
pub(super) fn install_started(install: Install) {
    INSTALLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(install);
}

/// Takes back the note of install `id`; `false` when it was already recorded as abandoned
/// (the process is exiting: its own report would contradict that record).
pub(super) fn install_ended(id: &str) -> bool {
    let mut installs = INSTALLS.lock().unwrap_or_else(PoisonError::into_inner);
    let before = installs.len();
    installs.retain(|install| install.id != id);
    installs.len() < before
}

/// The installs still under way, taken out of the notes (the agent exits without them).
pub(super) fn abandon_installs() -> Vec<Install> {
    std::mem::take(&mut *INSTALLS.lock().unwrap_or_else(PoisonError::into_inner))
}

/// The run lock, held while this lives (and by the kernel until the process ends).
#[derive(Debug)]
pub(super) struct RunLock {
    _file: File,
}

/// Takes the run lock of `dir` or says which process holds it.
pub(super) fn lock(dir: &Path) -> Result<RunLock> {
    let path = dir.join(RUN_LOCK_FILE);
    let mut file = super::open_locked_file(&path)?;
    match file.try_lock() {
        Ok(()) => {
            // The holder's pid, for the refusal a second agent prints.
            file.set_len(0).map_err(io_error("write", &path))?;
            file.rewind().map_err(io_error("write", &path))?;
            writeln!(file, "{}", std::process::id()).map_err(io_error("write", &path))?;
            Ok(RunLock { _file: file })
        }
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            Err(UserError::failure(format!(
                "another `pm-agent run`{holder} uses the state directory `{}`",
                dir.display()
            ))
            .with_hint(
                "one agent per state directory: stop that one first (systemctl stop pm-agent), \
                 or give this one its own --state and listen address",
            )
            .into())
        }
        Err(TryLockError::Error(err)) => Err(io_error("lock", &path)(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_lock_is_held_once_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        // A second open file description of the same file is a second holder: refused.
        let refused = lock(dir.path()).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("(pid {})", std::process::id())),
            "{refused}"
        );
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn an_install_is_either_ended_or_abandoned_never_both() {
        let install = |id: &str| Install {
            id: id.into(),
            trigger: "schedule".into(),
            started_at: Utc::now(),
        };
        install_started(install("stop-test-a"));
        install_started(install("stop-test-b"));
        assert!(install_ended("stop-test-a"));
        let abandoned = abandon_installs();
        assert!(
            abandoned.iter().any(|i| i.id == "stop-test-b"),
            "{abandoned:?}"
        );
        assert!(
            !install_ended("stop-test-b"),
            "already recorded as abandoned"
        );
    }
}
