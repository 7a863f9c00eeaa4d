//! What the manager sets up on an activated agent after activation, one step at a time so a
//! failed step can be retried alone (the seed's "(n1,n2,n3)" exit codes): the scan profile
//! (`POST /v1/setup/profile`), the host group (`/v1/setup/group`), the engine license
//! (`/v1/setup/license`), the agent's own schedule (`/v1/setup/schedule`, in effect at once
//! and instead of `agent.toml`'s, see `schedule`) and holds (`/v1/setup/hold`, see `hold`). All
//! mutual TLS.
//!
//! State: `setup.json` (written aside, fsync, rename), the profile rendered for a `command`
//! engine in `profile.conf`, the license file in `license/` (0600). A reset forgets all of it
//! together with the manager.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};

use super::{Agent, Engine, ScheduleConfig, error, from_manager, io_error, parse_body};
use crate::durable;
use crate::profile::{self, Profile, ProfileBody};
use crate::proto::{
    self, GroupRequest, HoldRequest, LicenseRequest, ScheduleRequest, SetupResponse,
};
use crate::tls::TlsConnectInfo;

/// The setup record, relative to the state directory.
pub const SETUP_FILE: &str = "setup.json";
/// The active profile rendered for a `command` engine (`{profile}` in `scan_command`).
pub const PROFILE_CONF_FILE: &str = "profile.conf";
/// Directory of the license file.
pub const LICENSE_DIR: &str = "license";
/// A license file larger than this is refused.
const MAX_LICENSE: usize = 1024 * 1024;

/// Setup steps are read-modify-write of one file: one at a time.
static SETUP_LOCK: Mutex<()> = Mutex::new(());

/// The license the agent holds (the file itself is in `license/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseInfo {
    /// Its file name in `license/`.
    pub file_name: String,
    /// sha256 of its content.
    pub sha256: String,
    /// When it expires.
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// When the manager installed it.
    pub installed_at: chrono::DateTime<chrono::Utc>,
}

/// `setup.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// Host group.
    #[serde(default)]
    pub group: Option<String>,
    /// The active scan profile (`None`: the engine's defaults).
    #[serde(default)]
    pub profile: Option<Profile>,
    /// The engine license.
    #[serde(default)]
    pub license: Option<LicenseInfo>,
    /// The manager's schedule, in effect instead of `[schedule]` in `agent.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleConfig>,
    /// The hold on the host (see `hold`); one that ended stays here until the next change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<proto::HoldState>,
}

/// Reads `setup.json` (empty when there is none).
pub fn load(dir: &Path) -> Result<Setup> {
    let path = dir.join(SETUP_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| {
            anyhow::anyhow!(
                "`{}` is damaged ({err}); run the manager's `pm-activate host` for this host again",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Setup::default()),
        Err(err) => Err(io_error("read", &path)(err)),
    }
}

fn save(dir: &Path, setup: &Setup) -> Result<()> {
    let path = dir.join(SETUP_FILE);
    durable::write_atomic(&path, &serde_json::to_vec_pretty(setup)?, 0o600)
        .map_err(io_error("write", &path))
}

/// Forgets the setup (after the manager record is gone); a running agent goes back to the
/// schedule of `agent.toml`.
pub(super) fn forget(dir: &Path) -> Result<()> {
    for file in [SETUP_FILE, PROFILE_CONF_FILE] {
        let path = dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("remove", &path)(err)),
        }
    }
    super::schedule::reload();
    let license = dir.join(LICENSE_DIR);
    match std::fs::remove_dir_all(&license) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error("remove", &license)(err)),
    }
}

/// The path the `{profile}` placeholder of a `command` engine stands for.
pub fn profile_conf(dir: &Path) -> PathBuf {
    dir.join(PROFILE_CONF_FILE)
}

/// A refused setup step: status, code, message.
type Refusal = (StatusCode, &'static str, String);

fn bad(message: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, "bad_request", message.into())
}

/// Applies `change` to the setup under the lock and saves it when it changed.
fn update(dir: &Path, change: impl FnOnce(&mut Setup) -> Result<()>) -> Result<bool> {
    let _one_at_a_time = SETUP_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let mut setup = load(dir)?;
    let before = setup.clone();
    change(&mut setup)?;
    if setup == before {
        return Ok(false);
    }
    save(dir, &setup)?;
    Ok(true)
}

/// Keeps `hold` (`None`: no hold) in `setup.json`.
pub(super) fn set_hold(dir: &Path, hold: Option<proto::HoldState>) -> Result<bool> {
    update(dir, |setup| {
        setup.hold = hold;
        Ok(())
    })
}

fn apply_hold(agent: &Agent, request: HoldRequest) -> Result<SetupResponse, Refusal> {
    if let Some(spec) = &request.hold {
        super::hold::check_spec(spec).map_err(bad)?;
    }
    super::hold::apply(&agent.dir, &request).map_err(internal)
}

fn apply_group(agent: &Agent, request: GroupRequest) -> Result<bool, Refusal> {
    profile::check_name(&request.group).map_err(|e| bad(format!("group: {e}")))?;
    update(&agent.dir, |setup| {
        setup.group = Some(request.group);
        Ok(())
    })
    .map_err(internal)
}

fn apply_profile(agent: &Agent, profile: Profile) -> Result<bool, Refusal> {
    profile
        .validate()
        .map_err(|e| bad(format!("profile: {e}")))?;
    if agent.config.engine == Engine::Clamav && matches!(profile.body, ProfileBody::File { .. }) {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "profile_unsupported",
            format!(
                "profile `{}` is a file-mode profile, and this agent's engine is clamav, which \
                 takes form profiles only (`pm-activate profile new NAME --set key=value`)",
                profile.name
            ),
        ));
    }
    update(&agent.dir, |setup| {
        if agent.config.engine == Engine::Command {
            let path = profile_conf(&agent.dir);
            durable::write_atomic(&path, profile.rendered().as_bytes(), 0o600)
                .map_err(io_error("write", &path))?;
        }
        setup.profile = Some(profile);
        Ok(())
    })
    .map_err(internal)
}

fn apply_license(agent: &Agent, request: LicenseRequest) -> Result<bool, Refusal> {
    profile::check_name(&request.file_name).map_err(|e| bad(format!("license file name: {e}")))?;
    let content = proto::unhex(&request.content_hex)
        .ok_or_else(|| bad("license: `content_hex` is not hex"))?;
    if content.len() > MAX_LICENSE {
        return Err(bad(format!(
            "license: {} bytes; at most {MAX_LICENSE}",
            content.len()
        )));
    }
    let digest = crate::manifest::hex(&openssl::sha::sha256(&content));
    if !digest.eq_ignore_ascii_case(&request.sha256) {
        return Err(bad(
            "license: the content does not match its sha256 (damaged in transit?)",
        ));
    }
    let now = chrono::Utc::now();
    if request.expires_at <= now {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            "license_expired",
            format!(
                "license `{}` expired at {}; register a current one on the manager with \
                 `pm-activate license add FILE --expires DATE`",
                request.file_name,
                request.expires_at.to_rfc3339()
            ),
        ));
    }
    update(&agent.dir, |setup| {
        if setup.license.as_ref().is_some_and(|l| {
            l.sha256 == digest
                && l.file_name == request.file_name
                && l.expires_at == request.expires_at
        }) {
            return Ok(());
        }
        let license_dir = agent.dir.join(LICENSE_DIR);
        durable::create_private_dir(&license_dir, 0o700)
            .map_err(io_error("create directory", &license_dir))?;
        let path = license_dir.join(&request.file_name);
        durable::write_atomic(&path, &content, 0o600).map_err(io_error("write", &path))?;
        if let Some(old) = &setup.license
            && old.file_name != request.file_name
        {
            let _ = std::fs::remove_file(license_dir.join(&old.file_name));
        }
        setup.license = Some(LicenseInfo {
            file_name: request.file_name,
            sha256: digest,
            expires_at: request.expires_at,
            installed_at: now,
        });
        Ok(())
    })
    .map_err(internal)
}

/// The manager's schedule, checked like `[schedule]` in `agent.toml`; neither `update` nor
/// `scan` removes it. A change is in effect before the answer: the schedule restarts.
fn apply_schedule(agent: &Agent, request: ScheduleRequest) -> Result<bool, Refusal> {
    let schedule = ScheduleConfig {
        update: request.update,
        scan: request.scan,
        scan_paths: request.scan_paths.into_iter().map(PathBuf::from).collect(),
    };
    let schedule = if schedule.update.is_none() && schedule.scan.is_none() {
        None
    } else {
        schedule
            .check()
            .map_err(|(key, problem)| bad(format!("schedule: `{key}` {problem}")))?;
        Some(schedule)
    };
    let changed = update(&agent.dir, |setup| {
        setup.schedule = schedule;
        Ok(())
    })
    .map_err(internal)?;
    if changed {
        super::schedule::reload();
    }
    Ok(changed)
}

fn internal(err: anyhow::Error) -> Refusal {
    tracing::error!(error = %format!("{err:#}"), "cannot store the setup");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "setup_failed",
        format!("the agent cannot store its setup: {err:#}"),
    )
}

/// The common shape of the handlers: mutual TLS, parse, apply off the async threads.
async fn handle<
    T: serde::de::DeserializeOwned + Send + 'static,
    R: Into<SetupResponse> + Send + 'static,
>(
    agent: Arc<Agent>,
    info: &TlsConnectInfo,
    body: &[u8],
    step: &'static str,
    apply: fn(&Agent, T) -> Result<R, Refusal>,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), info) {
        return *response;
    }
    let request: T = match parse_body(body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let worker = Arc::clone(&agent);
    match tokio::task::spawn_blocking(move || apply(&worker, request)).await {
        Ok(Ok(answer)) => {
            let answer: SetupResponse = answer.into();
            tracing::info!(step, changed = answer.changed, "setup step applied");
            axum::Json(answer).into_response()
        }
        Ok(Err((status, code, message))) => {
            tracing::warn!(step, code, "setup step refused");
            error(status, code, message)
        }
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the setup step stopped: {err}"),
        ),
    }
}

async fn group_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    handle(agent, &info, &body, "group", apply_group).await
}

async fn profile_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    handle(agent, &info, &body, "profile", apply_profile).await
}

async fn license_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    handle(agent, &info, &body, "license", apply_license).await
}

async fn hold_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    handle(agent, &info, &body, "hold", apply_hold).await
}

async fn schedule_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    handle(agent, &info, &body, "schedule", apply_schedule).await
}

/// The setup routes of the agent API.
pub(super) fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route(proto::GROUP_PATH, post(group_handler))
        .route(proto::PROFILE_PATH, post(profile_handler))
        .route(proto::LICENSE_PATH, post(license_handler))
        .route(proto::SCHEDULE_PATH, post(schedule_handler))
        .route(proto::HOLD_PATH, post(hold_handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_forgets_the_setup_and_the_license_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let setup = Setup {
            group: Some("web".into()),
            profile: Some(Profile::default_profile()),
            license: None,
            schedule: Some(ScheduleConfig {
                scan: Some("0 3 * * *".into()),
                scan_paths: vec!["/srv".into()],
                ..Default::default()
            }),
            hold: None,
        };
        save(state, &setup).unwrap();
        std::fs::create_dir(state.join(LICENSE_DIR)).unwrap();
        std::fs::write(state.join(LICENSE_DIR).join("site.lic"), b"x").unwrap();
        assert_eq!(load(state).unwrap(), setup);
        forget(state).unwrap();
        assert_eq!(load(state).unwrap(), Setup::default());
        assert!(!state.join(LICENSE_DIR).exists());
        forget(state).unwrap();
    }
}
